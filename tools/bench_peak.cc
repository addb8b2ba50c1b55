// bench peak: this machine's limits, measured the way the kernels use the hardware.
//
// Compiled with -mavx2 -mfma (the CLI checks the CPU before calling it). Each test runs one
// copy per thread at once and reports the aggregate rate; `asm volatile("" : "+x"(v))` tells
// the compiler a register may have changed, so loop-invariant work is not hoisted, at no cost.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "bench_common.h"
#include "qllm/core/arena.h"
#include "qllm/core/cpu.h"

namespace qllm::bench {

namespace {

#define QLLM_OPAQUE(v) asm volatile("" : "+x"(v))

// Runs body(tid) on `threads` threads started together; returns wall seconds.
template <class F>
double run_threads(int threads, F&& body) {
  std::barrier sync(threads + 1);
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) ts.emplace_back([&, t] { sync.arrive_and_wait(); body(t); });
  const double t0 = now_s();
  sync.arrive_and_wait();
  for (auto& t : ts) t.join();
  return now_s() - t0;
}

std::atomic<uint64_t> g_sink{0};

// 12 independent FMA chains: 2 FMA pipes x 4-cycle latency need 8; 12 hides the loop overhead.
double fma_gflops(int threads, int64_t iters) {
  const double s = run_threads(threads, [&](int) {
    __m256 acc[12];
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(static_cast<float>(i));
    __m256 mul = _mm256_set1_ps(0.9999999f), add = _mm256_set1_ps(1e-7f);
    for (int64_t it = 0; it < iters; ++it) {
      QLLM_OPAQUE(mul);
      for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], mul, add);
    }
    float out[8];
    __m256 sum = acc[0];
    for (int i = 1; i < 12; ++i) sum = _mm256_add_ps(sum, acc[i]);
    _mm256_storeu_ps(out, sum);
    g_sink += static_cast<uint64_t>(out[0]);
  });
  return threads * static_cast<double>(iters) * 12 * 8 * 2 / s / 1e9;
}

// The int8 loops are written in assembly: with intrinsics GCC kept the accumulator array on
// the stack, and the store-forwarding chains made the "peak" 20% lower than the real one,
// which would have flattered every ratio printed against it.
#define QLLM_IDIOM(a, acc, t)                            \
  "vpmaddubsw %%ymm12, %%ymm" #a ", %%ymm" #t "\n\t"     \
  "vpmaddwd %%ymm15, %%ymm" #t ", %%ymm" #t "\n\t"        \
  "vpaddd %%ymm" #t ", %%ymm" #acc ", %%ymm" #acc "\n\t"

// The AVX2 int8 idiom: vpmaddubsw (u8 x s8 -> s16 pairs) + vpmaddwd by ones + vpaddd;
// 32 multiply-adds per triple; 8 independent accumulators (ymm0-7), 4 activation registers.
double int8_idiom_gops(int threads, int64_t iters) {
  const double s = run_threads(threads, [&](int) {
    int64_t n = iters;
    asm volatile(
        "vpxor %%ymm0, %%ymm0, %%ymm0\n\t"
        "vmovdqa %%ymm0, %%ymm1\n\t vmovdqa %%ymm0, %%ymm2\n\t vmovdqa %%ymm0, %%ymm3\n\t"
        "vmovdqa %%ymm0, %%ymm4\n\t vmovdqa %%ymm0, %%ymm5\n\t vmovdqa %%ymm0, %%ymm6\n\t vmovdqa %%ymm0, %%ymm7\n\t"
        "vpcmpeqw %%ymm15, %%ymm15, %%ymm15\n\t vpsrlw $15, %%ymm15, %%ymm15\n\t"  // s16 ones
        "vpabsb %%ymm15, %%ymm8\n\t vpaddb %%ymm8, %%ymm8, %%ymm9\n\t"
        "vpaddb %%ymm9, %%ymm8, %%ymm10\n\t vpaddb %%ymm9, %%ymm9, %%ymm11\n\t vmovdqa %%ymm15, %%ymm12\n\t"
        "1:\n\t"
        QLLM_IDIOM(8, 0, 13) QLLM_IDIOM(9, 1, 14) QLLM_IDIOM(10, 2, 13) QLLM_IDIOM(11, 3, 14)
        QLLM_IDIOM(8, 4, 13) QLLM_IDIOM(9, 5, 14) QLLM_IDIOM(10, 6, 13) QLLM_IDIOM(11, 7, 14)
        "dec %0\n\t jnz 1b\n\t"
        : "+r"(n)
        :
        : "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
          "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
  });
  return threads * static_cast<double>(iters) * 8 * 32 * 2 / s / 1e9;
}

#define QLLM_EXACT_ROW(off, acc0, acc1)                  \
  "vpbroadcastd " #off "(%2), %%ymm14\n\t"              \
  "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"              \
  "vpaddd %%ymm15, %%ymm" #acc0 ", %%ymm" #acc0 "\n\t"  \
  "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"              \
  "vpaddd %%ymm15, %%ymm" #acc1 ", %%ymm" #acc1 "\n\t"

// The exact path qllm's int8 GEMM uses, instruction for instruction: per k-pair, 32 weight
// bytes widened by vpmovsxbw, 6 activation pairs broadcast from memory, 12 vpmaddwd + 12
// vpaddd into 12 accumulators (ymm0-11); operands in L1.
double int8_exact_gops(int threads, int64_t iters) {
  const double s = run_threads(threads, [&](int) {
    alignas(64) int8_t w[64];
    alignas(64) int32_t act[16];
    for (int i = 0; i < 64; ++i) w[i] = static_cast<int8_t>(i * 7);
    for (int i = 0; i < 16; ++i) act[i] = 0x00030002 + i;
    int64_t n = iters;
    asm volatile(
        "vpxor %%ymm0, %%ymm0, %%ymm0\n\t"
        "vmovdqa %%ymm0, %%ymm1\n\t vmovdqa %%ymm0, %%ymm2\n\t vmovdqa %%ymm0, %%ymm3\n\t"
        "vmovdqa %%ymm0, %%ymm4\n\t vmovdqa %%ymm0, %%ymm5\n\t vmovdqa %%ymm0, %%ymm6\n\t vmovdqa %%ymm0, %%ymm7\n\t"
        "vmovdqa %%ymm0, %%ymm8\n\t vmovdqa %%ymm0, %%ymm9\n\t vmovdqa %%ymm0, %%ymm10\n\t vmovdqa %%ymm0, %%ymm11\n\t"
        "1:\n\t"
        "vpmovsxbw (%1), %%ymm12\n\t"
        "vpmovsxbw 16(%1), %%ymm13\n\t"
        QLLM_EXACT_ROW(0, 0, 1) QLLM_EXACT_ROW(4, 2, 3) QLLM_EXACT_ROW(8, 4, 5)
        QLLM_EXACT_ROW(12, 6, 7) QLLM_EXACT_ROW(16, 8, 9) QLLM_EXACT_ROW(20, 10, 11)
        "dec %0\n\t jnz 1b\n\t"
        : "+r"(n)
        : "r"(w), "r"(act)
        : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
          "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
  });
  return threads * static_cast<double>(iters) * 12 * 16 * 2 / s / 1e9;
}

#define QLLM_VNNI_ROW(off, acc)                                \
  "vpbroadcastd " #off "(%2), %%zmm9\n\t"                       \
  "vpdpbusd %%zmm8, %%zmm9, %%zmm" #acc "\n\t"

// The AVX-512 VNNI loop qllm's avx512 int8 kernel runs: per k-quad one 64-byte weight load,
// 8 activation broadcasts, 8 vpdpbusd (64 multiply-adds each) into 8 accumulators (zmm0-7).
// Only called where the CPU has AVX-512 VNNI (the instructions are in the assembler string).
double int8_vnni_gops(int threads, int64_t iters) {
  const double s = run_threads(threads, [&](int) {
    alignas(64) int8_t w[64];
    alignas(64) int32_t act[16];
    for (int i = 0; i < 64; ++i) w[i] = static_cast<int8_t>(i * 7);
    for (int i = 0; i < 16; ++i) act[i] = 0x01020304 + i;
    int64_t n = iters;
    asm volatile(
        "vpxord %%zmm0, %%zmm0, %%zmm0\n\t"
        "vmovdqa64 %%zmm0, %%zmm1\n\t vmovdqa64 %%zmm0, %%zmm2\n\t vmovdqa64 %%zmm0, %%zmm3\n\t"
        "vmovdqa64 %%zmm0, %%zmm4\n\t vmovdqa64 %%zmm0, %%zmm5\n\t vmovdqa64 %%zmm0, %%zmm6\n\t vmovdqa64 %%zmm0, %%zmm7\n\t"
        "1:\n\t"
        "vmovdqu64 (%1), %%zmm8\n\t"
        QLLM_VNNI_ROW(0, 0) QLLM_VNNI_ROW(4, 1) QLLM_VNNI_ROW(8, 2) QLLM_VNNI_ROW(12, 3)
        QLLM_VNNI_ROW(16, 4) QLLM_VNNI_ROW(20, 5) QLLM_VNNI_ROW(24, 6) QLLM_VNNI_ROW(28, 7)
        "dec %0\n\t jnz 1b\n\t"
        "vzeroupper\n\t"
        : "+r"(n)
        : "r"(w), "r"(act)
        : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9");
  });
  return threads * static_cast<double>(iters) * 8 * 64 * 2 / s / 1e9;
}

// One thread's streaming read of [base, base + bytes) (4 independent load chains; whole 128-byte
// steps, the tail is not read), with software prefetch `ahead` bytes ahead (0 = hardware only).
void stream_read(const uint8_t* base, size_t bytes, size_t ahead) {
  const __m256i* p = reinterpret_cast<const __m256i*>(base);
  const size_t n = bytes / 32;
  __m256i x0 = _mm256_setzero_si256(), x1 = x0, x2 = x0, x3 = x0;
  for (size_t i = 0; i + 4 <= n; i += 4) {
    if (ahead) {
      _mm_prefetch(reinterpret_cast<const char*>(p + i) + ahead, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p + i) + ahead + 64, _MM_HINT_T0);
    }
    x0 = _mm256_xor_si256(x0, _mm256_loadu_si256(p + i));
    x1 = _mm256_xor_si256(x1, _mm256_loadu_si256(p + i + 1));
    x2 = _mm256_xor_si256(x2, _mm256_loadu_si256(p + i + 2));
    x3 = _mm256_xor_si256(x3, _mm256_loadu_si256(p + i + 3));
  }
  const __m256i x = _mm256_xor_si256(_mm256_xor_si256(x0, x1), _mm256_xor_si256(x2, x3));
  g_sink += static_cast<uint64_t>(_mm256_extract_epi64(x, 0));
}

// Read bandwidth (GB/s) of one pass over `bufs` in order, each split evenly across the threads.
// The best of several software-prefetch distances is the limit: it is the most a streaming
// kernel can get, so no kernel can beat it by prefetching. Median of `reps` passes per distance.
double stream_gbps(int threads, const std::vector<StreamSpan>& bufs, int reps) {
  double bytes = 0;
  for (const StreamSpan& b : bufs) bytes += static_cast<double>(b.bytes / threads / 128 * 128) * threads;
  double best = 0;
  for (const size_t ahead : {size_t{0}, size_t{1024}, size_t{2048}, size_t{4096}}) {
    std::vector<double> rates;
    for (int rep = 0; rep < reps; ++rep) {
      const double s = run_threads(threads, [&](int t) {
        for (const StreamSpan& b : bufs) {
          const size_t chunk = b.bytes / threads / 128 * 128;
          stream_read(static_cast<const uint8_t*>(b.data) + t * chunk, chunk, ahead);
        }
      });
      rates.push_back(bytes / s / 1e9);
    }
    std::sort(rates.begin(), rates.end());
    best = std::max(best, rates[rates.size() / 2]);
  }
  return best;
}

// Read bandwidth (GB/s) of equal-sized blocks visited in list order, the list split into one
// contiguous range per thread; each thread keeps `in_flight` blocks open and reads one 128-byte
// step of each in turn, so that many sequential streams run at once (the hardware prefetcher
// follows each; one block at a time, every block start waits for a new stream to ramp up).
// Median of `reps` passes.
double paged_read_gbps(int threads, const std::vector<const uint8_t*>& blocks, size_t block_bytes, int in_flight, int reps) {
  const size_t steps = block_bytes / 128;
  const double bytes = static_cast<double>(blocks.size() / threads * threads) * static_cast<double>(steps * 128);
  std::vector<double> rates;
  for (int rep = 0; rep < reps; ++rep) {
    const double s = run_threads(threads, [&](int t) {
      const size_t per = blocks.size() / threads, b0 = t * per, b1 = b0 + per;
      __m256i x0 = _mm256_setzero_si256(), x1 = x0, x2 = x0, x3 = x0;
      for (size_t b = b0; b < b1; b += in_flight) {
        const size_t open = std::min<size_t>(in_flight, b1 - b);
        for (size_t i = 0; i < steps; ++i)
          for (size_t f = 0; f < open; ++f) {
            const __m256i* p = reinterpret_cast<const __m256i*>(blocks[b + f] + i * 128);
            x0 = _mm256_xor_si256(x0, _mm256_loadu_si256(p));
            x1 = _mm256_xor_si256(x1, _mm256_loadu_si256(p + 1));
            x2 = _mm256_xor_si256(x2, _mm256_loadu_si256(p + 2));
            x3 = _mm256_xor_si256(x3, _mm256_loadu_si256(p + 3));
          }
      }
      const __m256i x = _mm256_xor_si256(_mm256_xor_si256(x0, x1), _mm256_xor_si256(x2, x3));
      g_sink += static_cast<uint64_t>(_mm256_extract_epi64(x, 0));
    });
    rates.push_back(bytes / s / 1e9);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

// Streaming read of a fresh 1 GiB buffer: the DRAM limit every benchmark reports against.
double dram_gbps(int threads, int reps) {
  const size_t bytes = size_t{1} << 30;
  uint8_t* buf = static_cast<uint8_t*>(aligned_malloc(bytes));
  std::memset(buf, 1, bytes);  // touch every page first
  const double best = stream_gbps(threads, {{buf, bytes}}, reps);
  aligned_free(buf);
  return best;
}

// Calibrates `iters` so one run takes about `seconds`, then measures three times and keeps the
// best: on a shared host another tenant's burst only ever lowers a throughput loop's rate, and
// a single unlucky probe (143 GFLOP/s against the usual 180-230 here) had put prefill ratios
// above 1. The peak is the highest rate the loop reaches.
template <class F>
double calibrated(F&& f, int threads, double seconds) {
  int64_t iters = 1 << 16;
  for (;;) {
    const double t0 = now_s();
    f(1, iters);
    const double dt = now_s() - t0;
    if (dt > 0.02) { iters = static_cast<int64_t>(iters * seconds / dt); break; }
    iters *= 4;
  }
  if (iters < 1) iters = 1;
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) best = std::max(best, f(threads, iters));
  return best;
}

}  // namespace

double measure_dram(int threads, int reps) { return dram_gbps(threads, reps); }

double measure_stream(int threads, const std::vector<StreamSpan>& bufs, int reps) {
  return stream_gbps(threads, bufs, reps);
}

double measure_paged_read(int threads, const std::vector<const uint8_t*>& blocks, size_t block_bytes, int in_flight, int reps) {
  return paged_read_gbps(threads, blocks, block_bytes, in_flight, reps);
}

Peak measure_peak(int threads, double seconds) {
  Peak p;
  p.threads = threads;
  p.fma_gflops = calibrated(fma_gflops, threads, seconds);
  p.int8_gops = calibrated(int8_idiom_gops, threads, seconds);
  p.int8_exact_gops = calibrated(int8_exact_gops, threads, seconds);
  if (isa_supported(Isa::avx512)) p.int8_vnni_gops = calibrated(int8_vnni_gops, threads, seconds);
  p.dram_gbps = dram_gbps(threads, 3);
  p.dram_ms = (size_t{1} << 30) / p.dram_gbps / 1e6;
  return p;
}

}  // namespace qllm::bench
