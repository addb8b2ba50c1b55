// bench sparse24: the 2:4 sparse matmul (SPEC section 6) at k = 7168 / 14336, n = 4096, against
// qllm's own dense kernels of the same value dtype on the decompressed weight (grouped_matmul with
// G = 1: the float GEMM for f32/f16, W8A8 for s8) and against OpenBLAS sgemm/sgemv (float cases,
// f32 dense weight; linked into the CLI only), all in the same run with the machine's limits.
// Every format rotates over >= 128 MiB of weight copies, so that small m streams from DRAM.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "bench_common.h"
#include "qllm/qllm.h"

#if QLLM_HAVE_OPENBLAS
#include <cblas.h>
#endif

namespace qllm::bench {

namespace {

struct Format { const char* name; DType dt; };

// Weights rotate over copies (copies_for in bench_common.h: an s8 2:4 weight of 7168 x 4096 is
// 17 MB, which the 32 MiB L3 would otherwise serve). --quick (smoke tests): one copy; its tiny
// weights would otherwise need thousands.

std::vector<uint8_t> random_weight(DType dt, int64_t count, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<uint8_t> w(static_cast<size_t>(count * dtype_size(dt)));
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (int64_t i = 0; i < count; ++i) {
    const float v = d(g);
    switch (dt) {
      case DType::f16: reinterpret_cast<uint16_t*>(w.data())[i] = f32_to_f16(v * 0.05f); break;
      case DType::s8: reinterpret_cast<int8_t*>(w.data())[i] = static_cast<int8_t>(std::fmax(-127.f, std::fmin(127.f, std::nearbyint(v * 40)))); break;
      default: reinterpret_cast<float*>(w.data())[i] = v * 0.05f; break;
    }
  }
  return w;
}

}  // namespace

int bench_sparse24(const Options& o) {
  const int64_t n = o.quick ? 256 : 4096;
  const std::vector<int64_t> ks = o.quick ? std::vector<int64_t>{512} : std::vector<int64_t>{7168, 14336};
  const std::vector<int64_t> ms = m_values(o, "bench sparse24");
  Context ctx(ContextOptions{o.threads, true, Isa::ref});
  const Peak peak = measure_peak(ctx.threads(), o.quick ? 0.05 : 0.3);
  Reporter rep(o);
  rep.row(peak_row(peak));
#if QLLM_HAVE_OPENBLAS
  openblas_set_num_threads(ctx.threads());
#endif
  const int64_t max_m = *std::max_element(ms.begin(), ms.end());
  for (int64_t k : ks) {
    for (const Format f : {Format{"s24_f32", DType::f32}, Format{"s24_f16", DType::f16}, Format{"s24_s8", DType::s8}}) {
      if (!o.wants_format(f.name)) continue;
      const bool quant = f.dt == DType::s8;
      const int64_t es = dtype_size(f.dt);
      // Weight: Gaussian, pruned 2:4; the dense peers get the decompressed (pruned) weight.
      std::vector<uint8_t> dense = random_weight(f.dt, n * k, 1);
      std::vector<uint8_t> vals(n * k / 2 * es), meta(n * sparse24_meta_cols(k));
      const TensorView vv(vals.data(), f.dt, {n, k / 2}), mv(meta.data(), DType::u8, {n, sparse24_meta_cols(k)});
      prune_24(TensorView(dense.data(), f.dt, {n, k}), vv, mv);
      decompress_24(vv, mv, TensorView(dense.data(), f.dt, {n, k}));
      std::vector<PackedSparse24> sps;
      sps.push_back(PackedSparse24::pack(vv, mv));
      for (int c = 1; c < (o.quick ? 1 : copies_for(static_cast<double>(sps[0].bytes()))); ++c) sps.push_back(PackedSparse24::pack(vv, mv));
      const PackedSparse24& sp = sps[0];
      std::vector<PackedWeight> pws;
      std::vector<std::vector<float>> dense32;
      if (!o.no_peers) {
        for (int c = 0; c < (o.quick ? 1 : copies_for(static_cast<double>(n * k * es))); ++c)
          pws.push_back(PackedWeight::pack(TensorView(dense.data(), f.dt, {1, n, k}), true, ctx.isa()));
        if (!quant) {
          dense32.emplace_back(n * k);
          for (int64_t i = 0; i < n * k; ++i)
            dense32[0][i] = f.dt == DType::f16 ? f16_to_f32(reinterpret_cast<uint16_t*>(dense.data())[i]) : reinterpret_cast<float*>(dense.data())[i];
          for (int c = 1; c < (o.quick ? 1 : copies_for(4.0 * n * k)); ++c) dense32.push_back(dense32[0]);
        }
      }
      dense = {};
      dense.shrink_to_fit();
      vals = {};
      vals.shrink_to_fit();

      const std::vector<uint8_t> x = random_weight(quant ? DType::s8 : f.dt, max_m * k, 2);
      std::vector<float> x32;
      if (!quant && !o.no_peers) {
        x32.resize(max_m * k);
        for (int64_t i = 0; i < max_m * k; ++i)
          x32[i] = f.dt == DType::f16 ? f16_to_f32(reinterpret_cast<const uint16_t*>(x.data())[i]) : reinterpret_cast<const float*>(x.data())[i];
      }
      std::vector<float> scale(n, 1e-3f), pts(max_m, 1.0f), y(max_m * n), y2(max_m * n);
      // Outputs: the value dtype for float (f16 out for f16), f32 dequantised for s8.
      const DType odt = quant ? DType::f32 : f.dt;

      for (int64_t m : ms) {
        Sparse24MatmulArgs a;
        a.x = TensorView(x.data(), quant ? DType::s8 : f.dt, {m, k});
        a.packed = &sp;
        if (quant) {
          a.scale = TensorView(scale.data(), DType::f32, {n});
          a.per_token_scale = TensorView(pts.data(), DType::f32, {m});
        }
        const TensorView yv(y.data(), odt, {m, n});
        const bool memory_bound = m <= 4;
        const double dram_now = memory_bound ? measure_dram(ctx.threads(), o.quick ? 1 : 3) : peak.dram_gbps;
        size_t it = 0;
        const auto sparse_call = [&] {
          a.packed = &sps[it++ % sps.size()];
          sparse24_matmul(ctx, a, yv, {odt});
        };

        double t = 0, t_dense = 0, t_blas = 0;
        if (o.no_peers) {
          t = median_seconds(o, sparse_call);
        } else {
          std::vector<int64_t> gl = {m};
          GroupedMatmulArgs g;
          g.x = a.x;
          size_t it2 = 0;
          g.group_list = TensorView(gl.data(), DType::s64, {1});
          if (quant) {
            g.scale = TensorView(scale.data(), DType::f32, {1, n});
            g.per_token_scale = a.per_token_scale;
          }
          GroupedMatmulParams gp;
          gp.out_dtype = odt;
          // Sparse and dense calls alternate (median of each): the host's load drifts by 10-30%
          // over seconds, and timing the two in separate windows had moved speedup_vs_dense by
          // as much (s8 m = 512 on AVX2: 1.09 in one run, 1.59-1.61 in the next two).
          const std::vector<double> ts = median_seconds_paired(o, {sparse_call, [&] {
                                                                    g.packed_w = &pws[it2++ % pws.size()];
                                                                    grouped_matmul(ctx, g, TensorView(y2.data(), odt, {m, n}), gp);
                                                                  }});
          t = ts[0];
          t_dense = ts[1];
#if QLLM_HAVE_OPENBLAS
          if (!quant) {
            // y[m, n] = x[m, k] @ W[n, k]^T in f32 (OpenBLAS has no f16 GEMM: the f16 case runs it on
            // the same weight widened to f32, i.e. twice the bytes).
            t_blas = median_seconds(o, [&] {
              const float* w32 = dense32[it2++ % dense32.size()].data();
              if (m == 1) cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1.0f, w32, k, x32.data(), 1, 0.0f, y2.data(), 1);
              else cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x32.data(), k, w32, k, 0.0f, y2.data(), n);
            });
          }
#endif
        }

        const double macs = static_cast<double>(m) * n * k;  // dense-equivalent multiply-adds
        const double bytes = static_cast<double>(sp.bytes()) + m * k * dtype_size(a.x.dtype()) + m * n * dtype_size(odt);
        nlohmann::ordered_json j;
        j["bench"] = "sparse24";
        j["case"] = {{"format", f.name}, {"m", m}, {"k", k}, {"n", n}, {"threads", ctx.threads()}, {"isa", isa_name(ctx.isa())}};
        j["median_ms"] = t * 1e3;
        // gflops: dense-equivalent (2 m n k / t, comparable with the dense peers); actual_gflops:
        // the flops the kernel really does (half: only the kept values are multiplied).
        j["gflops"] = 2 * macs / t / 1e9;
        j["actual_gflops"] = macs / t / 1e9;
        if (quant) {
          // The s8 kernel is vpshufb + vpmaddwd + vpaddd: the exact s16 loop's ceiling applies.
          j["int8_exact_ratio"] = macs / t / 1e9 / peak.int8_exact_gops;
        } else {
          j["fma_peak_ratio"] = macs / t / 1e9 / peak.fma_gflops;
          j["dense_equiv_fma_peak_ratio"] = 2 * macs / t / 1e9 / peak.fma_gflops;
        }
        if (memory_bound) {
          j["gbps"] = bytes / t / 1e9;
          j["dram_gbps"] = dram_now;
          j["dram_ratio"] = bytes / t / 1e9 / dram_now;
          // Against the streaming rate of the very copies it reads (see measure_stream).
          std::vector<StreamSpan> spans;
          for (const PackedSparse24& w : sps) spans.push_back({w.data(), w.bytes()});
          const double stream_now = measure_stream(ctx.threads(), spans, o.quick ? 1 : 3);
          j["stream_gbps"] = stream_now;
          j["stream_ratio"] = bytes / t / 1e9 / stream_now;
        }
        if (!o.no_peers) {
          j["dense_ms"] = t_dense * 1e3;
          j["speedup_vs_dense"] = t_dense / t;
          if (t_blas > 0) {
            j["openblas_ms"] = t_blas * 1e3;
            j["speedup_vs_openblas"] = t_blas / t;
          }
        }
        rep.row(j);
      }
    }
  }
  return 0;
}

}  // namespace qllm::bench
