#include "bench_common.h"
#include "qllm/core/error.h"

#include <random>
#include <cmath>

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace qllm::bench {

nlohmann::ordered_json peak_row(const Peak& p) {
  nlohmann::ordered_json j;
  j["bench"] = "peak";
  j["case"] = {{"threads", p.threads}};
  j["median_ms"] = p.dram_ms;  // one 1 GiB read pass
  j["fma_gflops"] = p.fma_gflops;
  j["int8_gops"] = p.int8_gops;
  j["int8_exact_gops"] = p.int8_exact_gops;
  j["int8_vnni_gops"] = p.int8_vnni_gops;
  j["dram_gbps"] = p.dram_gbps;
  j["threads"] = p.threads;
  return j;
}

std::vector<int8_t> random_s8(size_t n, uint32_t seed) {
  std::vector<int8_t> v(n);
  std::mt19937 g(seed);
  for (size_t i = 0; i < n; i += 4) {
    const uint32_t r = g();
    for (size_t j = 0; j < 4 && i + j < n; ++j) v[i + j] = static_cast<int8_t>(r >> (8 * j));
  }
  return v;
}

std::vector<float> random_f32(size_t n, float lo, float hi, uint32_t seed) {
  std::vector<float> v(n);
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  for (auto& x : v) x = d(g);
  return v;
}

int copies_for(double bytes) { return std::max(1, static_cast<int>(std::ceil(kRotateBytes / bytes))); }

std::vector<int64_t> m_values(const Options& o, const char* bench) {
  std::vector<int64_t> ms = o.quick ? std::vector<int64_t>{1, 16} : std::vector<int64_t>{1, 4, 16, 512};
  if (!o.rows.empty()) ms = o.rows;
  for (int64_t m : ms)
    if (m < 1 || m > 4096) throw_invalid(bench, "rows", "--rows values (m) must be in [1, 4096], got ", m);
  return ms;
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median_seconds(const Options& o, const std::function<void()>& fn) {
  std::vector<double> t;
  const double start = now_s();
  while (static_cast<int>(t.size()) < o.min_reps || now_s() - start < o.min_time_s) {
    const double t0 = now_s();
    fn();
    t.push_back(now_s() - t0);
    if (t.size() >= 1000) break;
  }
  std::sort(t.begin(), t.end());
  const size_t n = t.size();
  return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

void fill_random(void* p, size_t bytes, uint64_t seed) {
  uint8_t* b = static_cast<uint8_t*>(p);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    std::memcpy(b + i, &z, 8);
  }
  for (; i < bytes; ++i) b[i] = static_cast<uint8_t>(i * 131 + seed);
}

std::vector<double> median_seconds_paired(const Options& o, const std::vector<std::function<void()>>& fns) {
  std::vector<std::vector<double>> t(fns.size());
  const double start = now_s();
  // min_time_s is the budget of each candidate, as with median_seconds.
  const double budget = o.min_time_s * static_cast<double>(fns.size());
  while (static_cast<int>(t[0].size()) < o.min_reps || now_s() - start < budget) {
    for (size_t i = 0; i < fns.size(); ++i) {
      const double t0 = now_s();
      fns[i]();
      t[i].push_back(now_s() - t0);
    }
    if (t[0].size() >= 1000) break;
  }
  std::vector<double> med;
  for (auto& v : t) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    med.push_back(n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
  }
  return med;
}

namespace {
std::string cell(const nlohmann::ordered_json& v) {
  char buf[64];
  if (v.is_number_float()) {
    const double d = v.get<double>();
    std::snprintf(buf, sizeof buf, d != 0 && (d < 0.01 && d > -0.01) ? "%.2e" : "%.3f", d);
    return buf;
  }
  if (v.is_string()) return v.get<std::string>();
  return v.dump();
}
}  // namespace

void Reporter::row(const nlohmann::ordered_json& j) {
  if (o_.json) {
    std::printf("%s\n", j.dump().c_str());
    std::fflush(stdout);
    return;
  }
  // Table: the case's fields, then every other field except "bench" and "case".
  std::vector<std::pair<std::string, std::string>> cols;
  for (auto& [k, v] : j["case"].items()) cols.emplace_back(k, cell(v));
  for (auto& [k, v] : j.items())
    if (k != "bench" && k != "case") cols.emplace_back(k, cell(v));
  const std::string bench = j["bench"].get<std::string>();
  // A header whenever the columns change (rows of one bench may carry extra figures, such as a
  // comparison measured only for some cases).
  std::string header;
  for (auto& c : cols) header += c.first + ",";
  if (bench != last_bench_) std::printf("\n== qllm bench %s ==\n", bench.c_str());
  if (bench != last_bench_ || header != last_header_) {
    for (auto& c : cols) std::printf("%*s ", static_cast<int>(std::max<size_t>(c.first.size(), 9)), c.first.c_str());
    std::printf("\n");
    last_bench_ = bench;
    last_header_ = header;
  }
  for (auto& c : cols) std::printf("%*s ", static_cast<int>(std::max<size_t>(c.first.size(), 9)), c.second.c_str());
  std::printf("\n");
  std::fflush(stdout);
}

}  // namespace qllm::bench
