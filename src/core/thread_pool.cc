#include "qllm/core/thread_pool.h"

#include <cstdlib>
#include <fstream>
#include <set>
#include <string>
#include <utility>

#include "qllm/core/error.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QLLM_PAUSE() _mm_pause()
#else
#define QLLM_PAUSE() ((void)0)
#endif

namespace qllm {

int ThreadPool::physical_cores() {
  std::set<std::pair<std::string, std::string>> cores;
  for (int cpu = 0; cpu < 4096; ++cpu) {
    const std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
    std::ifstream pkg(base + "physical_package_id"), core(base + "core_id");
    if (!pkg || !core) break;
    std::string p, c;
    pkg >> p;
    core >> c;
    cores.emplace(p, c);
  }
  if (!cores.empty()) return static_cast<int>(cores.size());
  const unsigned hc = std::thread::hardware_concurrency();
  return hc ? static_cast<int>(hc) : 1;
}

ThreadPool::ThreadPool(int threads) {
  if (threads <= 0) {
    if (const char* env = std::getenv("QLLM_NUM_THREADS"); env && *env) {
      char* end = nullptr;
      const long v = std::strtol(env, &end, 10);
      if (*end != '\0' || v < 1 || v > 1024)
        throw_invalid("ThreadPool", "QLLM_NUM_THREADS", "QLLM_NUM_THREADS must be an integer in [1, 1024], got '", env, "'");
      threads = static_cast<int>(v);
    } else {
      threads = physical_cores();
    }
  }
  nthreads_ = threads;
  workers_.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) workers_.emplace_back([this, t] { worker_main(t); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
    generation_.fetch_add(1);
  }
  cv_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::work(int tid) {
  for (;;) {
    const int64_t b = next_.fetch_add(grain_, std::memory_order_relaxed);
    if (b >= n_) break;
    const int64_t e = b + grain_ < n_ ? b + grain_ : n_;
    fn_(ctx_, b, e, tid);
  }
}

void ThreadPool::run(int64_t n, int64_t grain, Fn fn, void* ctx) {
  fn_ = fn;
  ctx_ = ctx;
  n_ = n;
  grain_ = grain;
  next_.store(0, std::memory_order_relaxed);
  pending_.store(nthreads_ - 1, std::memory_order_relaxed);
  // seq_cst on generation_ and sleepers_ (here and in worker_main) so that a worker going to
  // sleep either sees the new generation or is seen as a sleeper and notified.
  generation_.fetch_add(1);
  if (sleepers_.load() > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    cv_.notify_all();
  }
  work(0);
  // Wait for the workers to leave the job; they finish their last chunk, which is short.
  while (pending_.load(std::memory_order_acquire) != 0) QLLM_PAUSE();
}

void ThreadPool::worker_main(int tid) {
  uint64_t seen = 0;
  for (;;) {
    // Spin ~tens of microseconds for the next job before sleeping (see header).
    uint64_t g = generation_.load(std::memory_order_acquire);
    for (int spin = 0; g == seen && spin < 20000; ++spin) {
      QLLM_PAUSE();
      g = generation_.load(std::memory_order_acquire);
    }
    if (g == seen) {
      std::unique_lock<std::mutex> lock(mu_);
      sleepers_.fetch_add(1);
      cv_.wait(lock, [&] { return generation_.load() != seen; });
      sleepers_.fetch_sub(1);
      g = generation_.load(std::memory_order_acquire);
    }
    seen = g;
    if (stop_.load()) return;
    work(tid);
    pending_.fetch_sub(1, std::memory_order_release);
  }
}

}  // namespace qllm
