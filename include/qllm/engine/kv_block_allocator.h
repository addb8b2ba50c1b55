// The KV cache's block allocator and per-sequence block tables (vLLM-style paging).
//
// KvBlockAllocator hands out block ids of a pool of num_blocks blocks: a free list (LIFO, so a
// just-freed, cache-warm block is reused first) and a reference count per block, so that
// several sequences can share the blocks of a common prefix. KvBlockManager keeps each
// sequence's block table on top of it: appending tokens allocates blocks as they fill, fork
// shares a prefix, and appending to a shared, partially filled last block first gives the
// sequence its own copy (copy-on-write: the caller runs copy_blocks on the cache with the
// returned pairs before writing the new tokens).
//
// When the pool cannot hold a request, a qllm::Error (kind OutOfMemory) is thrown and nothing
// changes. Not thread-safe: one engine thread owns it (like a Context).
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace qllm {

class KvBlockAllocator {
 public:
  KvBlockAllocator(int32_t num_blocks, int32_t block_size);

  int32_t num_blocks() const { return static_cast<int32_t>(refs_.size()); }
  int32_t block_size() const { return block_size_; }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }

  // A free block with reference count 1; throws Error (OutOfMemory) when none is left.
  int32_t allocate();
  // One more owner of an allocated block.
  void retain(int32_t block);
  // One owner fewer; the block returns to the free list when none is left. Releasing a free
  // block (a double free) or an id outside the pool is an error.
  void release(int32_t block);
  int32_t refcount(int32_t block) const;

 private:
  void check_id(const char* what, int32_t block) const;
  int32_t block_size_;
  std::vector<int32_t> free_;  // stack of free ids
  std::vector<int32_t> refs_;
};

class KvBlockManager {
 public:
  KvBlockManager(int32_t num_blocks, int32_t block_size);

  struct Copy {
    int32_t src, dst;  // copy block src to dst (copy_blocks' block_pairs row)
  };

  // A new, empty sequence. Ids are the caller's; reusing a live id is an error.
  void add_sequence(int64_t seq);
  // A new sequence `child` that shares the first `tokens` tokens of `parent` (-1: all of them):
  // the blocks holding them are shared (reference counts incremented), nothing is copied.
  void fork(int64_t parent, int64_t child, int64_t tokens = -1);
  // Makes room for n more tokens of seq: appends their slot ids (block * block_size + offset) to
  // `slots` and, if seq's last block was shared and partially filled, appends the copy-on-write
  // pair to `copies`. All or nothing: throws Error (OutOfMemory) with no change when the pool
  // cannot hold them.
  void append(int64_t seq, int64_t n, std::vector<int32_t>& slots, std::vector<Copy>& copies);
  // Blocks that append(seq, n) would take from the pool (including a copy-on-write).
  int64_t blocks_needed(int64_t seq, int64_t n) const;
  // Releases the sequence's blocks (shared blocks stay with their other owners).
  void free_sequence(int64_t seq);

  const std::vector<int32_t>& block_table(int64_t seq) const;
  int64_t length(int64_t seq) const;
  bool has_sequence(int64_t seq) const { return seqs_.count(seq) != 0; }
  const KvBlockAllocator& allocator() const { return alloc_; }

 private:
  struct Seq {
    std::vector<int32_t> blocks;
    int64_t len = 0;
  };
  const Seq& get(const char* what, int64_t seq) const;
  KvBlockAllocator alloc_;
  std::unordered_map<int64_t, Seq> seqs_;
};

}  // namespace qllm
