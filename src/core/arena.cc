#include "qllm/core/arena.h"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "qllm/core/error.h"

namespace qllm {

namespace {

// Large buffers (packed weights, KV pools, big workspaces) are streamed from DRAM by the
// memory-bound kernels. On 4 KiB pages such a stream takes a TLB miss every 4 KiB and the
// hardware prefetchers stop at every page boundary; Linux's transparent huge pages give 2 MiB
// pages, but with THP in "madvise" mode (Debian's default) only to ranges that ask for them.
// So buffers of at least kHugeMin bytes are 2 MiB aligned and madvise(MADV_HUGEPAGE)d (a hint:
// where the kernel has no huge page it falls back to small pages). QLLM_HUGE_PAGES=0 turns
// this off. Smaller buffers are not worth the alignment slack.
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kHugeMin = size_t{8} << 20;

bool huge_pages_wanted() {
  static const bool on = [] {
    const char* v = std::getenv("QLLM_HUGE_PAGES");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  return on;
}

}  // namespace

void* aligned_malloc(size_t bytes) {
  void* p = nullptr;
  if (bytes >= kHugeMin && huge_pages_wanted()) {
    if (posix_memalign(&p, kHugePage, bytes) != 0) p = nullptr;
#ifdef MADV_HUGEPAGE
    if (p) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  } else {
    p = std::aligned_alloc(kAlign, align_up(bytes ? bytes : 1));
  }
  if (!p) throw Error(ErrorKind::OutOfMemory, "aligned_malloc", "bytes", "cannot allocate " + std::to_string(bytes) + " bytes");
  return p;
}

void aligned_free(void* p) { std::free(p); }

void Workspace::Free::operator()(void* p) const { aligned_free(p); }

Workspace::Workspace(void* memory, size_t bytes)
    : base_(static_cast<uint8_t*>(memory)), capacity_(bytes) {
  if (reinterpret_cast<uintptr_t>(memory) % kAlign != 0)
    throw_invalid("Workspace", "memory", "workspace memory must be 64-byte aligned");
}

Workspace::Workspace(size_t bytes) { reserve(bytes); }

bool Workspace::reserve(size_t bytes) {
  if (bytes <= capacity_) return false;
  if (base_ && !owned_) throw_invalid("Workspace", "bytes", "cannot grow caller-owned workspace memory");
  owned_.reset(aligned_malloc(bytes));
  base_ = static_cast<uint8_t*>(owned_.get());
  capacity_ = bytes;
  used_ = 0;
  return true;
}

void* Workspace::alloc_bytes(size_t bytes, const char* op) {
  const size_t need = align_up(bytes);
  if (used_ + need > capacity_)
    throw Error(ErrorKind::OutOfMemory, op, "workspace",
                "workspace too small: need " + std::to_string(used_ + need) + " bytes, have " + std::to_string(capacity_));
  void* p = base_ + used_;
  used_ += need;
  return p;
}

}  // namespace qllm
