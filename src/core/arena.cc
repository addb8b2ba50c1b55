#include "qllm/core/arena.h"

#include <cstdlib>
#include <string>

#include "qllm/core/error.h"

namespace qllm {

void* aligned_malloc(size_t bytes) {
  void* p = std::aligned_alloc(kAlign, align_up(bytes ? bytes : 1));
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
