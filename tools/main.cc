// qllm: the command line. `qllm info`, `qllm bench peak`, `qllm bench moe-ffn`.
#include <CLI/CLI.hpp>

#include <cstdio>

#include "bench_common.h"
#include "qllm/qllm.h"

namespace qllm::bench {
int bench_moe_ffn(const Options& o);
int bench_moe_layer(const Options& o);
int bench_moe_routing(const Options& o);
int bench_wq_gemm(const Options& o);
int bench_sparse24(const Options& o);
int bench_attention(const Options& o);
int bench_paged_read(const Options& o);
}

namespace {
int bench_peak(const qllm::bench::Options& o);

// Every benchmark the CLI knows: `qllm bench <name>`. Each is a function of the shared options,
// defined in its own tools/bench_*.cc.
struct BenchEntry {
  const char* name;
  int (*run)(const qllm::bench::Options&);
};
constexpr BenchEntry kBenches[] = {
    {"peak", bench_peak},
    {"moe-ffn", qllm::bench::bench_moe_ffn},
    {"moe-layer", qllm::bench::bench_moe_layer},
    {"moe-routing", qllm::bench::bench_moe_routing},
    {"wq-gemm", qllm::bench::bench_wq_gemm},
    {"sparse24", qllm::bench::bench_sparse24},
    {"attention", qllm::bench::bench_attention},
    {"paged-read", qllm::bench::bench_paged_read},
};
}  // namespace

namespace {

int bench_peak(const qllm::bench::Options& o) {
  qllm::bench::Reporter rep(o);
  const int all = qllm::Context(qllm::ContextOptions{o.threads, true, qllm::Isa::ref}).threads();
  for (int t : {1, all}) {
    rep.row(qllm::bench::peak_row(qllm::bench::measure_peak(t, o.quick ? 0.05 : 0.5)));
    if (all == 1) break;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"qllm: fast quantised MoE inference on CPUs"};
  app.require_subcommand(1);
  auto* info = app.add_subcommand("info", "CPU features, ISA and thread count qllm will use");
  auto* bench = app.add_subcommand("bench", "benchmarks (see docs/benchmarks.md)");
  qllm::bench::Options o;
  std::string name;
  std::vector<std::string> names;
  std::string names_help;
  for (const auto& b : kBenches) {
    names.emplace_back(b.name);
    names_help += (names_help.empty() ? "" : " | ") + names.back();
  }
  bench->add_option("name", name, names_help)->required()->check(CLI::IsMember(names));
  bench->add_flag("--json", o.json, "one JSON object per line instead of a table");
  bench->add_option("--threads", o.threads, "threads (default: QLLM_NUM_THREADS or physical cores)")->check(CLI::Range(0, 1024));
  bench->add_option("--min-time", o.min_time_s, "seconds to repeat each measured case (median reported)")->check(CLI::Range(0.0, 600.0));
  bench->add_option("--min-reps", o.min_reps, "repetitions per case at least")->check(CLI::Range(1, 1000));
  bench->add_flag("--quick", o.quick, "small shapes (a smoke test, not a measurement)");
  bench->add_option("--rows", o.rows, "moe-ffn: rows per expert to run (default 1,4,16,64,256,512); wq-gemm, sparse24: m values (default 1,4,16,512)")->delimiter(',');
  bench->add_option("--formats", o.formats, "wq-gemm, sparse24: case.format values to run (default all), e.g. s24_s8,s24_f16; attention: KV dtypes (f16,int8)")->delimiter(',');
  bench->add_option("--tokens", o.tokens, "moe-layer: tokens per call to run (default 1,8,64,512); moe-routing: (default 1,64,512); attention: contexts")->delimiter(',');
  bench->add_option("--block-size", o.block_sizes, "attention: KV cache block sizes in tokens (default 128), e.g. 16,128")->delimiter(',')->check(CLI::Range(1, 4096));
  bench->add_flag("--no-peers", o.no_peers, "skip the comparison runs (unfused chain, 1 thread)");
  bench->add_option("--mode", o.mode, "attention: only the cases of this mode")->check(CLI::IsMember({"prefill", "decode"}));
  CLI11_PARSE(app, argc, argv);
  try {
    if (*info) {
      const auto& f = qllm::cpu_features();
      qllm::Context ctx;
      std::printf("cpu: %s\navx2=%d fma=%d f16c=%d avx512f=%d avx512vnni=%d avx_vnni=%d amx_int8=%d\n", f.brand.c_str(), f.avx2,
                  f.fma, f.f16c, f.avx512f, f.avx512vnni, f.avx_vnni, f.amx_int8);
      std::printf("isa: %s (supported:", qllm::isa_name(ctx.isa()));
      for (auto i : qllm::supported_isas()) std::printf(" %s", qllm::isa_name(i));
      std::printf(")\nthreads: %d\n", ctx.threads());
      return 0;
    }
    if (!qllm::isa_supported(qllm::Isa::avx2)) {
      std::fprintf(stderr, "qllm bench: this CPU lacks AVX2/FMA/F16C, which the peak measurements use\n");
      return 2;
    }
    for (const auto& b : kBenches)
      if (name == b.name) return b.run(o);
    return 2;  // unreachable: CLI11 checked the name
  } catch (const qllm::Error& e) {
    std::fprintf(stderr, "qllm: %s\n", e.what());
    return 2;
  }
}
