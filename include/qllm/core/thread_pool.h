// ThreadPool: a fixed set of workers that run parallel_for loops.
//
// The calling thread takes part in every loop, so a pool of N threads starts N-1 workers.
// parallel_for hands out chunks through one atomic counter (threads claim work; an uneven
// chunk costs nobody else a wait) and never allocates: the body is passed by reference through
// a plain function pointer, not a std::function. Workers spin briefly before sleeping, because
// operators issue several short loops back to back and a condition-variable wake-up costs tens
// of microseconds, which is a visible share of a decode step.
//
// Concurrency contract: one parallel_for at a time per pool (a Context is used by one thread).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace qllm {

class ThreadPool {
 public:
  // threads <= 0: QLLM_NUM_THREADS if set, else the number of physical cores.
  explicit ThreadPool(int threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return nthreads_; }

  // Calls body(begin, end, thread_index) over [0, n) in chunks of `grain` items.
  template <class F>
  void parallel_for(int64_t n, int64_t grain, F&& body) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    if (nthreads_ == 1 || n <= grain) {
      body(int64_t{0}, n, 0);
      return;
    }
    run(n, grain, &trampoline<F>, static_cast<void*>(&body));
  }

  // Physical cores of this machine (from /sys topology; falls back to hardware_concurrency).
  static int physical_cores();

 private:
  using Fn = void (*)(void* ctx, int64_t begin, int64_t end, int tid);
  template <class F> static void trampoline(void* ctx, int64_t b, int64_t e, int tid) {
    (*static_cast<F*>(ctx))(b, e, tid);
  }
  void run(int64_t n, int64_t grain, Fn fn, void* ctx);
  void work(int tid);
  void worker_main(int tid);

  int nthreads_ = 1;
  std::vector<std::thread> workers_;

  // Current job; published by bumping generation_.
  Fn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  int64_t grain_ = 1;
  alignas(64) std::atomic<int64_t> next_{0};
  alignas(64) std::atomic<uint64_t> generation_{0};
  alignas(64) std::atomic<int> pending_{0};  // workers still inside the current job
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<int> sleepers_{0};
};

}  // namespace qllm
