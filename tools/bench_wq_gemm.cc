// bench wq-gemm: weight-only quantised matmul (W8A16 / W4A16, f16 activations) at the shapes
// of a large expert / dense FFN (k = 7168 and 14336, n = 4096), against qllm's own dense f16 and
// f32 GEMM (grouped_matmul with one group, packed weights) and OpenBLAS sgemm / sgemv, all in
// the same run, with every figure as a ratio to the limits measured here.
//
// Memory-bound cases (m <= 16) must read the weights from DRAM, not from the 32 MiB L3 where a
// 15 MiB W4 matrix would otherwise stay between repetitions: every format keeps enough packed
// copies of its weight (>= 128 MiB in all) and each timed call uses the next copy. The copies
// are a benchmark artefact; the library itself keeps one packed copy.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "bench_common.h"
#include "qllm/qllm.h"

#if QLLM_HAVE_OPENBLAS
#include <cblas.h>
#endif

namespace qllm::bench {

namespace {

struct Format {
  const char* name;
  int bits;  // 8, 4, or 0 for dense
  int64_t group_size;
};

}  // namespace

int bench_wq_gemm(const Options& o) {
  const int64_t n = o.quick ? 512 : 4096;
  const std::vector<int64_t> ks = o.quick ? std::vector<int64_t>{256} : std::vector<int64_t>{7168, 14336};
  const std::vector<int64_t> ms = m_values(o, "bench wq-gemm");
  const std::vector<Format> formats = {{"w8", 8, 0}, {"w4", 4, 128}, {"w4", 4, 32}};

  Context ctx(ContextOptions{o.threads, true, Isa::ref});
  const Peak peak = measure_peak(ctx.threads(), o.quick ? 0.05 : 0.3);
  Reporter rep(o);
  rep.row(peak_row(peak));
#if QLLM_HAVE_OPENBLAS
  openblas_set_num_threads(ctx.threads());
#endif
  const int64_t max_m = *std::max_element(ms.begin(), ms.end());

  for (int64_t k : ks) {
    // Dense weights in the Linear layout [n, k]: f32 (OpenBLAS, qllm f32) and f16 (qllm f16).
    const std::vector<float> wf = random_f32(n * k, -1.0f, 1.0f, 1);
    std::vector<uint16_t> wh(n * k);
    for (int64_t i = 0; i < n * k; ++i) wh[i] = f32_to_f16(wf[i]);
    const double f32_bytes = 4.0 * n * k, f16_bytes = 2.0 * n * k;
    std::vector<PackedWeight> pf32, pf16;
    for (int c = 0; c < (o.wants_format("f32") ? copies_for(f32_bytes) : 0); ++c)
      pf32.push_back(PackedWeight::pack(TensorView(wf.data(), DType::f32, {1, n, k}), true));
    for (int c = 0; c < (o.wants_format("f16") ? copies_for(f16_bytes) : 0); ++c)
      pf16.push_back(PackedWeight::pack(TensorView(wh.data(), DType::f16, {1, n, k}), true));
    std::vector<std::vector<float>> blas_w;  // OpenBLAS reads the raw matrix
    if (!o.no_peers && o.wants_format("openblas_f32"))
      for (int c = 0; c < copies_for(f32_bytes); ++c) blas_w.push_back(wf);

    // Quantised weights: random codes and O(1/sqrt(k)) scales, packed (copies for rotation).
    std::vector<std::vector<PackedQuantWeight>> pq(formats.size());
    for (size_t f = 0; f < formats.size(); ++f) {
      const Format& fm = formats[f];
      const auto q = random_s8(fm.bits == 8 ? n * k : n * k / 2, 2 + f);
      const int64_t G = fm.group_size ? (k + fm.group_size - 1) / fm.group_size : 1;
      const auto sc = random_f32(G * n, 0.5f / std::sqrt(float(k)), 1.5f / std::sqrt(float(k)), 7);
      const TensorView qv(q.data(), fm.bits == 8 ? DType::s8 : DType::s4x2, {n, fm.bits == 8 ? k : k / 2});
      const TensorView sv = fm.group_size ? TensorView(sc.data(), DType::f32, {G, n}) : TensorView(sc.data(), DType::f32, {n});
      PackedQuantWeight first = PackedQuantWeight::pack(qv, sv, TensorView(), fm.group_size, true);
      const int copies = copies_for(static_cast<double>(first.bytes()));
      pq[f].push_back(std::move(first));
      for (int c = 1; c < copies; ++c) pq[f].push_back(PackedQuantWeight::pack(qv, sv, TensorView(), fm.group_size, true));
    }

    const std::vector<float> xf = random_f32(max_m * k, -1.0f, 1.0f, 9);
    std::vector<uint16_t> xh(max_m * k);
    for (int64_t i = 0; i < max_m * k; ++i) xh[i] = f32_to_f16(xf[i]);
    std::vector<float> yf(max_m * n);
    std::vector<uint16_t> yh(max_m * n);
    std::vector<int64_t> gl(1);

    for (int64_t m : ms) {
      gl[0] = m;
      const bool memory_bound = m <= 16;
      const double dram_now = memory_bound ? measure_dram(ctx.threads(), o.quick ? 1 : 3) : peak.dram_gbps;
      const double flops = 2.0 * m * n * k;
      // Dense peers.
      size_t it = 0;
      auto dense = [&](std::vector<PackedWeight>& pw, DType dt) {
        GroupedMatmulArgs a;
        a.x = dt == DType::f32 ? TensorView(xf.data(), DType::f32, {m, k}) : TensorView(xh.data(), DType::f16, {m, k});
        a.group_list = TensorView(gl.data(), DType::s64, {1});
        GroupedMatmulParams p;
        p.out_dtype = dt;
        const TensorView yv = dt == DType::f32 ? TensorView(yf.data(), DType::f32, {m, n}) : TensorView(yh.data(), DType::f16, {m, n});
        return median_seconds(o, [&] {
          a.packed_w = &pw[it++ % pw.size()];
          grouped_matmul(ctx, a, yv, p);
        });
      };
      // --formats picks the rows to run (f32 / f16 / openblas_f32 / w8 / w4); a skipped dense
      // peer leaves its speedup column out.
      const double t_f16 = o.no_peers || !o.wants_format("f16") ? 0 : dense(pf16, DType::f16);
      const double t_f32 = o.no_peers || !o.wants_format("f32") ? 0 : dense(pf32, DType::f32);
      double t_blas = 0;
#if QLLM_HAVE_OPENBLAS
      if (!o.no_peers && o.wants_format("openblas_f32"))
        t_blas = median_seconds(o, [&] {
          const float* w = blas_w[it++ % blas_w.size()].data();
          if (m == 1)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(n), static_cast<int>(k), 1.0f, w, static_cast<int>(k),
                        xf.data(), 1, 0.0f, yf.data(), 1);
          else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
                        1.0f, xf.data(), static_cast<int>(k), w, static_cast<int>(k), 0.0f, yf.data(), static_cast<int>(n));
        });
#endif

      // The streaming rate of the very copies a format reads (see measure_stream).
      auto own_stream = [&](const std::vector<StreamSpan>& spans) {
        return memory_bound ? measure_stream(ctx.threads(), spans, o.quick ? 1 : 3) : 0.0;
      };
      auto dense_spans = [](const std::vector<PackedWeight>& pw) {
        std::vector<StreamSpan> s;
        for (const PackedWeight& w : pw) s.push_back({w.panels(0), w.bytes()});
        return s;
      };
      auto report = [&](const char* format, int64_t gs, double t, double wbytes, double xbytes, double stream_now) {
        nlohmann::ordered_json j;
        j["bench"] = "wq-gemm";
        j["case"] = {{"format", format}, {"group_size", gs}, {"m", m}, {"k", k}, {"n", n},
                     {"threads", ctx.threads()}, {"isa", isa_name(ctx.isa())}};
        j["median_ms"] = t * 1e3;
        const double bytes = wbytes + xbytes;
        if (memory_bound) {
          j["gbps"] = bytes / t / 1e9;
          j["dram_gbps"] = dram_now;
          j["dram_ratio"] = bytes / t / 1e9 / dram_now;
          j["stream_gbps"] = stream_now;
          j["stream_ratio"] = bytes / t / 1e9 / stream_now;
        }
        j["gflops"] = flops / t / 1e9;
        j["fma_peak_ratio"] = flops / t / 1e9 / peak.fma_gflops;
        if (!o.no_peers) {
          if (t_f16 > 0) j["speedup_vs_dense"] = t_f16 / t;      // qllm dense f16 (the A16 baseline)
          if (t_f32 > 0) j["speedup_vs_dense_f32"] = t_f32 / t;  // qllm dense f32
          if (t_blas > 0) j["speedup_vs_openblas"] = t_blas / t;
        }
        rep.row(j);
      };
      if (!o.no_peers) {
        if (t_f32 > 0) report("f32", 0, t_f32, f32_bytes, 4.0 * m * k, own_stream(dense_spans(pf32)));
        if (t_f16 > 0) report("f16", 0, t_f16, f16_bytes, 2.0 * m * k, own_stream(dense_spans(pf16)));
        if (t_blas > 0) {
          nlohmann::ordered_json j;
          j["bench"] = "wq-gemm";
          j["case"] = {{"format", "openblas_f32"}, {"group_size", 0}, {"m", m}, {"k", k}, {"n", n},
                       {"threads", ctx.threads()}, {"isa", m == 1 ? "sgemv" : "sgemm"}};
          j["median_ms"] = t_blas * 1e3;
          if (memory_bound) {
            j["gbps"] = (f32_bytes + 4.0 * m * k) / t_blas / 1e9;
            j["dram_gbps"] = dram_now;
            j["dram_ratio"] = (f32_bytes + 4.0 * m * k) / t_blas / 1e9 / dram_now;
          }
          j["gflops"] = flops / t_blas / 1e9;
          j["fma_peak_ratio"] = flops / t_blas / 1e9 / peak.fma_gflops;
          rep.row(j);
        }
      }
      for (size_t f = 0; f < formats.size(); ++f) {
        if (!o.wants_format(formats[f].name)) continue;
        WeightQuantMatmulArgs a;
        a.x = TensorView(xh.data(), DType::f16, {m, k});
        const TensorView yv(yh.data(), DType::f16, {m, n});
        const double t = median_seconds(o, [&] {
          a.packed_w = &pq[f][it++ % pq[f].size()];
          weight_quant_matmul(ctx, a, yv);
        });
        std::vector<StreamSpan> spans;
        for (const PackedQuantWeight& w : pq[f]) spans.push_back({w.data(), w.bytes()});
        report(formats[f].name, formats[f].group_size, t, static_cast<double>(pq[f][0].bytes()), 2.0 * m * k, own_stream(spans));
      }
    }
  }
  return 0;
}

}  // namespace qllm::bench
