#include "qllm/engine/kv_block_allocator.h"

#include "qllm/core/error.h"

namespace qllm {

namespace {
constexpr const char* kOp = "kv_block_allocator";

[[noreturn]] void exhausted(int64_t need, int32_t free, int32_t total) {
  std::ostringstream os;
  os << "KV cache pool exhausted: " << need << " more block(s) needed, " << free << " of " << total
     << " free; finish or preempt a sequence, or give the cache more blocks";
  throw Error(ErrorKind::OutOfMemory, kOp, "num_blocks", os.str());
}
}  // namespace

KvBlockAllocator::KvBlockAllocator(int32_t num_blocks, int32_t block_size) : block_size_(block_size) {
  if (num_blocks < 0) throw_invalid(kOp, "num_blocks", "num_blocks must be >= 0, got ", num_blocks);
  if (block_size < 1) throw_invalid(kOp, "block_size", "block_size must be >= 1, got ", block_size);
  refs_.assign(num_blocks, 0);
  free_.reserve(num_blocks);
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // block 0 handed out first
}

void KvBlockAllocator::check_id(const char* what, int32_t block) const {
  if (block < 0 || block >= num_blocks())
    throw_invalid(kOp, "block", what, ": block ", block, " is outside [0, num_blocks = ", num_blocks(), ")");
}

int32_t KvBlockAllocator::allocate() {
  if (free_.empty()) exhausted(1, 0, num_blocks());
  const int32_t b = free_.back();
  free_.pop_back();
  refs_[b] = 1;
  return b;
}

void KvBlockAllocator::retain(int32_t block) {
  check_id("retain", block);
  if (refs_[block] == 0) throw_invalid(kOp, "block", "retain: block ", block, " is free; only allocated blocks can be shared");
  ++refs_[block];
}

void KvBlockAllocator::release(int32_t block) {
  check_id("release", block);
  if (refs_[block] == 0) throw_invalid(kOp, "block", "release: block ", block, " is already free (double free)");
  if (--refs_[block] == 0) free_.push_back(block);
}

int32_t KvBlockAllocator::refcount(int32_t block) const {
  check_id("refcount", block);
  return refs_[block];
}

// ---- KvBlockManager --------------------------------------------------------------------------

KvBlockManager::KvBlockManager(int32_t num_blocks, int32_t block_size) : alloc_(num_blocks, block_size) {}

const KvBlockManager::Seq& KvBlockManager::get(const char* what, int64_t seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) throw_invalid(kOp, "seq", what, ": sequence ", seq, " does not exist");
  return it->second;
}

void KvBlockManager::add_sequence(int64_t seq) {
  if (seqs_.count(seq)) throw_invalid(kOp, "seq", "add_sequence: sequence ", seq, " already exists");
  seqs_[seq] = Seq{};
}

void KvBlockManager::fork(int64_t parent, int64_t child, int64_t tokens) {
  const Seq& p = get("fork", parent);
  if (seqs_.count(child)) throw_invalid(kOp, "seq", "fork: sequence ", child, " already exists");
  if (tokens < 0) tokens = p.len;
  if (tokens > p.len)
    throw_invalid(kOp, "tokens", "fork: sequence ", parent, " has ", p.len, " tokens, cannot share ", tokens);
  const int64_t bs = alloc_.block_size();
  Seq c;
  c.len = tokens;
  c.blocks.assign(p.blocks.begin(), p.blocks.begin() + (tokens + bs - 1) / bs);
  for (int32_t b : c.blocks) alloc_.retain(b);
  seqs_[child] = std::move(c);
}

int64_t KvBlockManager::blocks_needed(int64_t seq, int64_t n) const {
  const Seq& s = get("blocks_needed", seq);
  const int64_t bs = alloc_.block_size();
  const int64_t have = static_cast<int64_t>(s.blocks.size());
  const int64_t need = (s.len + n + bs - 1) / bs - have;
  const bool cow = n > 0 && s.len % bs != 0 && alloc_.refcount(s.blocks.back()) > 1;
  return need + (cow ? 1 : 0);
}

void KvBlockManager::append(int64_t seq, int64_t n, std::vector<int32_t>& slots, std::vector<Copy>& copies) {
  if (n < 0) throw_invalid(kOp, "n", "append: n must be >= 0, got ", n);
  const int64_t need = blocks_needed(seq, n);
  if (need > alloc_.num_free()) exhausted(need, alloc_.num_free(), alloc_.num_blocks());
  Seq& s = seqs_[seq];
  const int64_t bs = alloc_.block_size();
  if (n > 0 && s.len % bs != 0 && alloc_.refcount(s.blocks.back()) > 1) {
    // Copy-on-write: the last block is shared and the new tokens would land in it.
    const int32_t own = alloc_.allocate();
    copies.push_back(Copy{s.blocks.back(), own});
    alloc_.release(s.blocks.back());
    s.blocks.back() = own;
  }
  for (int64_t i = 0; i < n; ++i, ++s.len) {
    if (s.len % bs == 0 && s.len / bs == static_cast<int64_t>(s.blocks.size())) s.blocks.push_back(alloc_.allocate());
    slots.push_back(static_cast<int32_t>(s.blocks[s.len / bs] * bs + s.len % bs));
  }
}

void KvBlockManager::free_sequence(int64_t seq) {
  const Seq& s = get("free_sequence", seq);
  for (int32_t b : s.blocks) alloc_.release(b);
  seqs_.erase(seq);
}

const std::vector<int32_t>& KvBlockManager::block_table(int64_t seq) const { return get("block_table", seq).blocks; }
int64_t KvBlockManager::length(int64_t seq) const { return get("length", seq).len; }

}  // namespace qllm
