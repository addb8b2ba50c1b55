// Shared benchmark plumbing: timing (medians), machine limits, and the two output formats
// (a readable table, or one JSON object per line with --json).
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace qllm::bench {

struct Options {
  bool json = false;
  int threads = 0;        // 0: the library default
  double min_time_s = 1.0;  // per measured case: repeat until this much time has passed...
  int min_reps = 3;         // ...and at least this many times
  bool quick = false;     // small shapes, for smoke tests
  std::vector<int64_t> rows;  // moe-ffn: rows per expert to run (empty: the standard list)
  std::vector<int64_t> tokens;  // moe-layer: tokens per call to run (empty: the standard list)
  std::vector<int64_t> block_sizes;  // attention: KV cache block sizes in tokens (empty: 128)
  bool no_peers = false;  // skip the comparison runs (for quick tuning)
  std::string mode;       // attention: run only the cases of this mode (prefill | decode); empty: all
  std::vector<std::string> formats;  // wq-gemm, sparse24: case.format values to run (empty: all)
  bool wants_format(const std::string& f) const {
    for (const auto& x : formats)
      if (x == f) return true;
    return formats.empty();
  }
};

// This machine's limits, measured in the same run (bench peak).
struct Peak {
  int threads = 1;
  double fma_gflops = 0;    // f32 FMA, 2 flops each
  double int8_gops = 0;     // vpmaddubsw + vpmaddwd + vpaddd idiom, 2 ops per multiply-add
  double int8_exact_gops = 0;  // exact s16 vpmaddwd loop (what qllm's avx2 int8 kernel runs)
  double int8_vnni_gops = 0;   // AVX-512 VNNI vpdpbusd loop (the avx512 kernel's); 0 without VNNI
  double dram_gbps = 0;     // streaming read of a 1 GiB buffer
  double dram_ms = 0;       // median time of one such pass
};
Peak measure_peak(int threads, double seconds_per_test);
// DRAM read bandwidth alone (GB/s): the available bandwidth drifts on a shared host, so
// memory-bound cases measure it again right before they run.
double measure_dram(int threads, int reps);
// The same streaming probe over given buffers (e.g. a case's own rotation of weight copies),
// read once in order per pass. The host backs a buffer with 2 MiB pages only some of the time,
// and that moves its streaming rate by up to 1.7x (30-35 vs 50-62 GB/s here); so a memory-bound
// case also reports `stream_ratio` against the rate of the very pages it reads, next to
// `dram_ratio` against the fresh 1 GiB probe.
struct StreamSpan {
  const void* data;
  size_t bytes;
};
double measure_stream(int threads, const std::vector<StreamSpan>& bufs, int reps);

// Read bandwidth of blocks of `block_bytes` (a multiple of 128) visited in the given order, the
// list split into one contiguous range per thread, each thread reading `in_flight` blocks at
// once, a 128-byte step of each in turn (bench paged-read).
double measure_paged_read(int threads, const std::vector<const uint8_t*>& blocks, size_t block_bytes, int in_flight, int reps);

// The limits as one benchmark row (`bench` = "peak"), printed first by every benchmark so its
// ratios can be checked against the limits of the same run.
nlohmann::ordered_json peak_row(const Peak& p);

// Deterministic benchmark data: full-range int8 (four values per generator draw) and uniform floats.
std::vector<int8_t> random_s8(size_t n, uint32_t seed);
std::vector<float> random_f32(size_t n, float lo, float hi, uint32_t seed);
// Random bytes from splitmix64: gigabytes of weights in about a second (mt19937 would take most
// of a minute).
void fill_random(void* p, size_t bytes, uint64_t seed);

// Matmul benchmarks (wq-gemm, sparse24): each timed call reads the next of several copies of its
// weight, >= 128 MiB in all, so that small m streams the weight from DRAM and not from the
// 32 MiB L3. copies_for(bytes of one copy) is how many copies that takes.
constexpr double kRotateBytes = 128.0 * 1024 * 1024;
int copies_for(double bytes);
// The m values of a matmul benchmark: --rows, else 1, 4, 16, 512 (1, 16 with --quick); checked.
std::vector<int64_t> m_values(const Options& o, const char* bench);

double now_s();
// Runs fn until min_time_s and min_reps are both reached; returns the median seconds per call.
double median_seconds(const Options& o, const std::function<void()>& fn);
// Times several candidates on the same data in alternation (a, b, a, b, ...) until each has
// min_reps calls and min_time_s has passed; returns each one's median seconds per call. Used
// where a ratio between them is reported: on this shared host DRAM bandwidth drifts within a
// run, and timing one candidate after the other would fold that drift into the ratio.
std::vector<double> median_seconds_paired(const Options& o, const std::vector<std::function<void()>>& fns);

// Prints one result: a JSON line, or an aligned table row (the header printed once per bench).
class Reporter {
 public:
  explicit Reporter(const Options& o) : o_(o) {}
  void row(const nlohmann::ordered_json& j);

 private:
  const Options& o_;
  std::string last_bench_;
  std::string last_header_;
};

}  // namespace qllm::bench
