// Workspace: a 64-byte-aligned bump arena that operators take their scratch from.
//
// Operators report workspace_size(...) for their arguments; the caller provides at least that
// many bytes (or lets a Context grow its own arena once). alloc() never touches the heap, so a
// warmed-up call performs zero heap allocations. reset() releases everything at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace qllm {

constexpr size_t kAlign = 64;  // one cache line; also the widest SIMD register (AVX-512)

constexpr size_t align_up(size_t n, size_t a = kAlign) { return (n + a - 1) / a * a; }

// Accumulates the size of a sequence of aligned allocations, mirroring Workspace::alloc.
class WorkspacePlan {
 public:
  template <class T> void add(size_t count) { bytes_ += align_up(count * sizeof(T)); }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_ = 0;
};

class Workspace {
 public:
  Workspace() = default;
  // Wraps caller-owned memory (must be 64-byte aligned); nothing is owned.
  Workspace(void* memory, size_t bytes);
  // Owns a buffer of `bytes`.
  explicit Workspace(size_t bytes);

  // Grows the owned buffer to at least `bytes` (allocates only when it must). Not for wrapped
  // memory. Returns true if it allocated.
  bool reserve(size_t bytes);

  // Returns 64-byte-aligned uninitialised storage for `count` Ts; throws Error (OutOfMemory,
  // naming `op`) when the workspace is too small — that is a bug in a workspace_size().
  template <class T> T* alloc(size_t count, const char* op = "workspace") {
    return static_cast<T*>(alloc_bytes(count * sizeof(T), op));
  }
  void* alloc_bytes(size_t bytes, const char* op);

  void reset() { used_ = 0; }
  size_t capacity() const { return capacity_; }
  size_t used() const { return used_; }

 private:
  struct Free { void operator()(void* p) const; };
  std::unique_ptr<void, Free> owned_;
  uint8_t* base_ = nullptr;
  size_t capacity_ = 0;
  size_t used_ = 0;
};

// Aligned heap buffer for long-lived data (packed weights). Not for hot paths.
void* aligned_malloc(size_t bytes);
void aligned_free(void* p);

}  // namespace qllm
