// Context: the explicit state every operator runs in — its thread pool, its ISA and a
// workspace arena for the convenience overloads. No globals: two contexts may differ in all of
// them (the tests run the same op under a ref and an avx2 context side by side).
//
// Concurrency contract: a Context is used by one calling thread at a time.
#pragma once

#include <memory>

#include "qllm/core/arena.h"
#include "qllm/core/cpu.h"
#include "qllm/core/thread_pool.h"

namespace qllm {

namespace kernels { struct KernelTable; }

struct ContextOptions {
  int threads = 0;        // <= 0: QLLM_NUM_THREADS, else physical cores
  bool isa_auto = true;   // true: default_isa() (QLLM_ISA or best); false: use `isa`
  Isa isa = Isa::ref;
};

class Context {
 public:
  explicit Context(const ContextOptions& options = {});
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  ThreadPool& pool() { return pool_; }
  int threads() const { return pool_.size(); }
  Isa isa() const { return isa_; }
  const kernels::KernelTable& kernels() const { return *kernels_; }

  // The context-owned arena: grown to `bytes` (allocating only the first time it must grow),
  // reset, and returned.
  Workspace& workspace(size_t bytes);

 private:
  ThreadPool pool_;
  Isa isa_;
  const kernels::KernelTable* kernels_;
  Workspace arena_;
};

}  // namespace qllm
