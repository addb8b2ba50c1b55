// 2:4 structured sparsity (SPEC section 6): compression, packing and the sparse matmul.
#include "qllm/ops/sparse24.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/kernels.h"
#include "kernels/sparse24.h"
#include "ops/plan.h"
#include "qllm/core/arena.h"
#include "qllm/core/error.h"

namespace qllm {

namespace {

bool weight_dtype(DType d) { return is_float(d) || d == DType::s8; }

// Element i of a row of dtype dt as a double magnitude (prune) / non-zero test (compress).
double element(DType dt, const uint8_t* row, int64_t i) {
  switch (dt) {
    case DType::f16: return f16_to_f32(reinterpret_cast<const uint16_t*>(row)[i]);
    case DType::bf16: return bf16_to_f32(reinterpret_cast<const uint16_t*>(row)[i]);
    case DType::s8: return reinterpret_cast<const int8_t*>(row)[i];
    default: return reinterpret_cast<const float*>(row)[i];
  }
}

void check_weight(const char* op, const char* arg, const TensorView& w) {
  check::present(op, arg, w);
  check::ndim(op, arg, w, 2);
  check::contiguous(op, arg, w);
  if (!weight_dtype(w.dtype()))
    throw_invalid(op, arg, arg, " must be float32, float16, bfloat16 or int8, got ", dtype_name(w.dtype()));
  if (w.dim(1) % 4 != 0)
    throw_invalid(op, arg, arg, " has k = ", w.dim(1), " columns; 2:4 sparsity needs k to be a multiple of 4 (pad k with zeros)");
}

// Checks the compressed pair's shapes and dtypes and every position; returns k.
int64_t check_compressed(const char* op, const TensorView& values, const TensorView& meta) {
  check::present(op, "values", values);
  check::ndim(op, "values", values, 2);
  check::contiguous(op, "values", values);
  if (!weight_dtype(values.dtype()))
    throw_invalid(op, "values", "values must be float32, float16, bfloat16 or int8, got ", dtype_name(values.dtype()));
  const int64_t n = values.dim(0), k = 2 * values.dim(1);
  if (k % 4 != 0)
    throw_invalid(op, "values", "values has ", values.dim(1), " columns (k/2), so k = ", k,
                  ", which is not a multiple of 4");
  check::present(op, "meta", meta);
  check::dtype(op, "meta", meta, DType::u8);
  check::shape(op, "meta", meta, {n, sparse24_meta_cols(k)});
  const int64_t groups = k / 4, mc = sparse24_meta_cols(k);
  const uint8_t* m = meta.data<uint8_t>();
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const int nib = (m[r * mc + g / 2] >> (4 * (g % 2))) & 0xf;
      const int i0 = nib & 3, i1 = nib >> 2;
      if (i0 >= i1)
        throw_invalid(op, "meta", "meta[row ", r, ", group ", g, "] has positions i0 = ", i0, ", i1 = ", i1,
                      "; positions must be increasing (i0 < i1) within a group");
    }
    if (groups % 2 == 1 && (m[r * mc + mc - 1] >> 4) != 0)
      throw_invalid(op, "meta", "meta[row ", r, ", byte ", mc - 1, "] = ", static_cast<int>(m[r * mc + mc - 1]),
                    ": its high nibble is padding (k = ", k, " has an odd number of groups) and must be 0");
  }
  return k;
}

void check_outputs(const char* op, const TensorView& w, const TensorView& values, const TensorView& meta) {
  const int64_t n = w.dim(0), k = w.dim(1);
  check::dtype(op, "values", values, w.dtype());
  check::shape(op, "values", values, {n, k / 2});
  check::dtype(op, "meta", meta, DType::u8);
  check::shape(op, "meta", meta, {n, sparse24_meta_cols(k)});
}

// Writes the compressed row r; keep[g] holds the two sorted positions of group g.
void compress_rows(const TensorView& w, const TensorView& values, const TensorView& meta, bool prune) {
  const int64_t n = w.dim(0), k = w.dim(1), groups = k / 4, mc = sparse24_meta_cols(k);
  const int64_t es = dtype_size(w.dtype());
  const uint8_t* src = w.data<uint8_t>();
  uint8_t* vals = values.mutable_data<uint8_t>();
  uint8_t* m = meta.mutable_data<uint8_t>();
  std::memset(m, 0, static_cast<size_t>(n * mc));
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = src + r * k * es;
    for (int64_t g = 0; g < groups; ++g) {
      int a = 0, b = 1;
      if (prune) {
        // Two largest magnitudes, ties to the lower position (strict > while scanning upward).
        double mag[4];
        for (int i = 0; i < 4; ++i) mag[i] = std::fabs(element(w.dtype(), row, 4 * g + i));
        a = 0;
        for (int i = 1; i < 4; ++i)
          if (mag[i] > mag[a]) a = i;
        b = a == 0 ? 1 : 0;
        for (int i = 0; i < 4; ++i)
          if (i != a && mag[i] > mag[b]) b = i;
      } else {
        // Non-zero positions (checked to be at most 2), completed with the lowest zero ones.
        int pos[4], cnt = 0;
        for (int i = 0; i < 4; ++i)
          if (element(w.dtype(), row, 4 * g + i) != 0.0) pos[cnt++] = i;
        for (int i = 0; i < 4 && cnt < 2; ++i)
          if (element(w.dtype(), row, 4 * g + i) == 0.0) pos[cnt++] = i;
        a = pos[0];
        b = pos[1];
      }
      const int i0 = std::min(a, b), i1 = std::max(a, b);
      std::memcpy(vals + (r * (k / 2) + 2 * g) * es, row + (4 * g + i0) * es, es);
      std::memcpy(vals + (r * (k / 2) + 2 * g + 1) * es, row + (4 * g + i1) * es, es);
      m[r * mc + g / 2] |= static_cast<uint8_t>((i0 | (i1 << 2)) << (4 * (g % 2)));
    }
  }
}

}  // namespace

void prune_24(const TensorView& w, const TensorView& values, const TensorView& meta) {
  constexpr const char* op = "prune_24";
  check_weight(op, "w", w);
  check_outputs(op, w, values, meta);
  compress_rows(w, values, meta, true);
}

void compress_24(const TensorView& w, const TensorView& values, const TensorView& meta) {
  constexpr const char* op = "compress_24";
  check_weight(op, "w", w);
  check_outputs(op, w, values, meta);
  const int64_t n = w.dim(0), k = w.dim(1), es = dtype_size(w.dtype());
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = w.data<uint8_t>() + r * k * es;
    for (int64_t g = 0; g < k / 4; ++g) {
      int cnt = 0;
      for (int i = 0; i < 4; ++i) cnt += element(w.dtype(), row, 4 * g + i) != 0.0;
      if (cnt > 2)
        throw_invalid(op, "w", "w[row ", r, ", group ", g, "] (columns ", 4 * g, "..", 4 * g + 3, ") has ", cnt,
                      " non-zeros; a 2:4 sparse weight has at most 2 in every group of 4 (prune_24 prunes)");
    }
  }
  compress_rows(w, values, meta, false);
}

void decompress_24(const TensorView& values, const TensorView& meta, const TensorView& w) {
  constexpr const char* op = "decompress_24";
  const int64_t k = check_compressed(op, values, meta);
  const int64_t n = values.dim(0), es = dtype_size(values.dtype()), mc = sparse24_meta_cols(k);
  check::dtype(op, "w", w, values.dtype());
  check::shape(op, "w", w, {n, k});
  uint8_t* out = w.mutable_data<uint8_t>();
  std::memset(out, 0, static_cast<size_t>(n * k * es));
  const uint8_t* v = values.data<uint8_t>();
  const uint8_t* m = meta.data<uint8_t>();
  for (int64_t r = 0; r < n; ++r)
    for (int64_t g = 0; g < k / 4; ++g) {
      const int nib = (m[r * mc + g / 2] >> (4 * (g % 2))) & 0xf;
      std::memcpy(out + (r * k + 4 * g + (nib & 3)) * es, v + (r * (k / 2) + 2 * g) * es, es);
      std::memcpy(out + (r * k + 4 * g + (nib >> 2)) * es, v + (r * (k / 2) + 2 * g + 1) * es, es);
    }
}

// ---- packed form -----------------------------------------------------------------------------

namespace {

// Blocks of 8 along k, padded to an even count: the AVX2 kernels read the u16 positions of two
// blocks with one 32-bit broadcast, and the s8 kernel covers two blocks per 256-bit register.
int64_t packed_kb(int64_t k) { return (k + 15) / 16 * 2; }

int64_t pair_bytes_for(DType dt, int64_t k) {
  const int64_t kb = packed_kb(k);
  return static_cast<int64_t>(align_up(static_cast<size_t>(kb * 8 * dtype_size(dt) + kb * 2)));
}

// Packs pairs [p0, p1) of a validated compressed weight.
void pack_pairs(const TensorView& values, const TensorView& meta, uint8_t* out, int64_t pair_bytes,
                int64_t p0, int64_t p1) {
  const DType dt = values.dtype();
  const int64_t n = values.dim(0), k = 2 * values.dim(1), groups = k / 4, mc = sparse24_meta_cols(k);
  const int64_t es = dtype_size(dt), kb = packed_kb(k);
  const uint8_t* v = values.data<uint8_t>();
  const uint8_t* m = meta.data<uint8_t>();
  const bool s8 = dt == DType::s8;
  for (int64_t p = p0; p < p1; ++p) {
    uint8_t* pv = out + p * pair_bytes;
    uint16_t* pm = reinterpret_cast<uint16_t*>(pv + kb * 8 * es);
    std::memset(pv, 0, static_cast<size_t>(pair_bytes));
    for (int64_t b = 0; b < kb; ++b) {
      uint16_t word = 0;
      for (int c = 0; c < 2; ++c) {
        const int64_t col = 2 * p + c;
        for (int h = 0; h < 2; ++h) {
          const int64_t g = 2 * b + h;
          // Missing columns and padding groups: zero values at positions (0, 1).
          int nib = 0x4;
          if (col < n && g < groups) {
            nib = (m[col * mc + g / 2] >> (4 * (g % 2))) & 0xf;
            for (int s = 0; s < 2; ++s) {
              const int lane = s8 ? 4 * c + 2 * h + s : 4 * h + 2 * c + s;
              std::memcpy(pv + (b * 8 + lane) * es, v + (col * (k / 2) + 2 * g + s) * es, es);
            }
          }
          word = static_cast<uint16_t>(word | (nib << (8 * c + 4 * h)));
        }
      }
      pm[b] = word;
    }
  }
}

}  // namespace

size_t PackedSparse24::packed_bytes(DType dtype, int64_t n, int64_t k) {
  return static_cast<size_t>(pair_bytes_for(dtype, k) * ((n + 1) / 2));
}

size_t PackedSparse24::compressed_bytes() const {
  return static_cast<size_t>(n_ * (k_ / 2) * dtype_size(dtype_) + n_ * sparse24_meta_cols(k_));
}

void PackedSparse24::init(const TensorView& values, const TensorView& meta, uint8_t* memory, const char*) {
  dtype_ = values.dtype();
  n_ = values.dim(0);
  k_ = 2 * values.dim(1);
  kb_ = packed_kb(k_);
  pair_bytes_ = pair_bytes_for(dtype_, k_);
  data_ = memory;
  pack_pairs(values, meta, memory, pair_bytes_, 0, pairs());
}

PackedSparse24 PackedSparse24::pack(const TensorView& values, const TensorView& meta, const char* op) {
  check_compressed(op, values, meta);
  PackedSparse24 p;
  const size_t bytes = packed_bytes(values.dtype(), values.dim(0), 2 * values.dim(1));
  p.owned_.reset(static_cast<uint8_t*>(aligned_malloc(std::max<size_t>(bytes, kAlign))));
  p.init(values, meta, p.owned_.get(), op);
  return p;
}

PackedSparse24 PackedSparse24::pack_into(const TensorView& values, const TensorView& meta, void* memory,
                                         const char* op) {
  check_compressed(op, values, meta);
  PackedSparse24 p;
  p.init(values, meta, static_cast<uint8_t*>(memory), op);
  return p;
}

namespace detail {
// Wraps memory that pack_pairs() filled for an already validated weight.
struct PackedSparse24Access {
  static PackedSparse24 wrap(DType dt, int64_t n, int64_t k, const uint8_t* mem) {
    PackedSparse24 p;
    p.dtype_ = dt;
    p.n_ = n;
    p.k_ = k;
    p.kb_ = packed_kb(k);
    p.pair_bytes_ = pair_bytes_for(dt, k);
    p.data_ = mem;
    return p;
  }
};
}  // namespace detail

// ---- sparse24_matmul ---------------------------------------------------------------------------

namespace {

constexpr const char* kOp = "sparse24_matmul";

// Work item = (row block, pair block), claimed dynamically. 60 rows = 15 tiles of the kernel's 4
// rows; 16 pairs = 32 output channels. Within an item k runs in chunks of 128 blocks (1024 deep),
// so the chunk of x (60 x 1024 f32 = 240 KB) stays in L2 while all 16 pairs' chunks (L1-sized
// per pair) stream past it; per-lane partial sums live in a per-thread tile between chunks.
constexpr int64_t kRowBlock = 60;
constexpr int64_t kPairBlock = 16;
constexpr int64_t kChunkKb = 128;

struct Plan {
  bool quant = false;
  int64_t m = 0, k = 0, n = 0, kb = 0;
  DType xdt = DType::f32, wdt = DType::f32;
  const PackedSparse24* packed = nullptr;
};

Plan validate(const Sparse24MatmulArgs& a, const Sparse24MatmulParams& p) {
  Plan pl;
  check::present(kOp, "x", a.x);
  check::ndim(kOp, "x", a.x, 2);
  check::contiguous(kOp, "x", a.x);
  pl.xdt = a.x.dtype();
  pl.quant = pl.xdt == DType::s8;
  if (!pl.quant && !is_float(pl.xdt))
    throw_invalid(kOp, "x", "x must be int8 (W8A8) or float32/float16/bfloat16, got ", dtype_name(pl.xdt));
  pl.m = a.x.dim(0);
  pl.k = a.x.dim(1);
  int64_t wk;
  if (a.packed) {
    if (a.values.present() || a.meta.present())
      throw_invalid(kOp, "packed", "give either values/meta or packed, not both");
    pl.wdt = a.packed->dtype();
    wk = a.packed->k();
    pl.n = a.packed->n();
  } else {
    wk = check_compressed(kOp, a.values, a.meta);
    pl.wdt = a.values.dtype();
    pl.n = a.values.dim(0);
  }
  if (pl.quant != (pl.wdt == DType::s8))
    throw_invalid(kOp, "values", pl.quant ? "int8 x needs int8 values (W8A8), got " : "float x needs float values, got ",
                  dtype_name(pl.wdt), pl.quant ? "" : " (int8 values take int8 x)");
  if (wk != pl.k)
    throw_invalid(kOp, "x", "x has k = ", pl.k, " columns but the 2:4 weight has k = ", wk,
                  " (values [n, k/2] has ", wk / 2, " columns)");
  if (pl.quant && pl.k > 131072)
    throw_invalid(kOp, "x", "k = ", pl.k, " exceeds 131072, where s32 accumulation could overflow");
  pl.kb = packed_kb(pl.k);
  pl.packed = a.packed;
  if (pl.quant) {
    if (p.out_dtype != DType::s32 && !is_float(p.out_dtype))
      throw_invalid(kOp, "out_dtype", "out_dtype for int8 inputs must be int32, float32, float16 or bfloat16, got ",
                    dtype_name(p.out_dtype));
    if (is_float(p.out_dtype)) {
      check::present(kOp, "scale", a.scale);
      check::dtype(kOp, "scale", a.scale, DType::f32);
      check::shape(kOp, "scale", a.scale, {pl.n});
      if (a.per_token_scale.present()) {
        check::dtype(kOp, "per_token_scale", a.per_token_scale, DType::f32);
        check::shape(kOp, "per_token_scale", a.per_token_scale, {pl.m});
      }
    } else if (a.scale.present() || a.per_token_scale.present()) {
      throw_invalid(kOp, "scale", "scale / per_token_scale given but out_dtype is int32 (raw accumulators)");
    }
  } else {
    if (!is_float(p.out_dtype))
      throw_invalid(kOp, "out_dtype", "out_dtype for float inputs must be float32, float16 or bfloat16, got ",
                    dtype_name(p.out_dtype));
    if (a.scale.present() || a.per_token_scale.present())
      throw_invalid(kOp, "scale", "scale / per_token_scale only apply to int8 inputs");
  }
  return pl;
}

int64_t row_block(int64_t m) { return std::min<int64_t>(std::max<int64_t>(m, 1), kRowBlock); }

void store(DType dt, void* y, int64_t i, float v) {
  switch (dt) {
    case DType::f16: static_cast<uint16_t*>(y)[i] = f32_to_f16(v); break;
    case DType::bf16: static_cast<uint16_t*>(y)[i] = f32_to_bf16(v); break;
    default: static_cast<float*>(y)[i] = v; break;
  }
}

}  // namespace

size_t sparse24_matmul_workspace_size(const Context& ctx, const Sparse24MatmulArgs& a, const Sparse24MatmulParams& p) {
  const Plan pl = validate(a, p);
  WorkspacePlan w;
  if (!pl.packed) w.add<uint8_t>(PackedSparse24::packed_bytes(pl.wdt, pl.n, pl.k));
  if (pl.quant) w.add<int16_t>(pl.m * pl.kb * 8);
  else w.add<float>(pl.m * pl.kb * 8);
  w.add<float>(ctx.threads() * row_block(pl.m) * kPairBlock * 8);  // accumulator tiles (f32 or s32)
  return w.bytes();
}

void sparse24_matmul(Context& ctx, const Sparse24MatmulArgs& a, const TensorView& y, const Sparse24MatmulParams& p,
                     Workspace* ws_in) {
  const Plan pl = validate(a, p);
  check::dtype(kOp, "y", y, p.out_dtype);
  check::shape(kOp, "y", y, {pl.m, pl.n});
  if (pl.m == 0 || pl.n == 0) return;
  // All input is valid from here on; nothing was written before this point.
  Workspace& ws = ws_in ? *ws_in : ctx.workspace(sparse24_matmul_workspace_size(ctx, a, p));
  const kernels::KernelTable& kt = ctx.kernels();
  const kernels::Sparse24Kernels& sk = kernels::sparse24_kernels(ctx.isa());
  ThreadPool& pool = ctx.pool();

  PackedSparse24 local;
  const PackedSparse24* pw = pl.packed;
  if (!pw) {
    uint8_t* mem = ws.alloc<uint8_t>(PackedSparse24::packed_bytes(pl.wdt, pl.n, pl.k), kOp);
    // Validated above; pack the pairs in parallel, then wrap the memory (no second validation pass).
    const int64_t pb = pair_bytes_for(pl.wdt, pl.k);
    pool.parallel_for((pl.n + 1) / 2, 64, [&](int64_t b, int64_t e, int) { pack_pairs(a.values, a.meta, mem, pb, b, e); });
    local = detail::PackedSparse24Access::wrap(pl.wdt, pl.n, pl.k, mem);
    pw = &local;
  }
  const int64_t ldx = pl.kb * 8;
  void* xw = pl.quant ? static_cast<void*>(ws.alloc<int16_t>(pl.m * ldx, kOp)) : static_cast<void*>(ws.alloc<float>(pl.m * ldx, kOp));
  const int64_t rb = row_block(pl.m);
  float* tiles = ws.alloc<float>(ctx.threads() * rb * kPairBlock * 8, kOp);

  // Activations once: s8 -> s16 (zero padded), or float -> f32 (zero padded).
  pool.parallel_for(pl.m, 16, [&](int64_t b, int64_t e, int) {
    for (int64_t r = b; r < e; ++r) {
      if (pl.quant) {
        kt.s8_to_s16(a.x.data<int8_t>() + r * pl.k, pl.k, static_cast<int16_t*>(xw) + r * ldx, ldx);
      } else {
        float* xr = static_cast<float*>(xw) + r * ldx;
        kt.to_f32(a.x.data<uint8_t>() + r * pl.k * dtype_size(pl.xdt), pl.xdt, pl.k, xr);
        std::fill(xr + pl.k, xr + ldx, 0.0f);
      }
    }
  });

  const kernels::S24Panels panels{pw->data(), pw->dtype(), pw->kblocks(), pw->pair_bytes()};
  const int64_t pairs = pw->pairs();
  const int64_t rblocks = ceil_div(pl.m, rb), pblocks = ceil_div(pairs, kPairBlock);
  const DType odt = p.out_dtype;
  void* yout = y.mutable_data<void>();
  const float* scale = a.scale.present() ? a.scale.data<float>() : nullptr;
  const float* pts = a.per_token_scale.present() ? a.per_token_scale.data<float>() : nullptr;

  pool.parallel_for(rblocks * pblocks, 1, [&](int64_t b, int64_t e, int tid) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t r0 = (it / pblocks) * rb, rows = std::min(rb, pl.m - r0);
      const int64_t p0 = (it % pblocks) * kPairBlock, p1 = std::min(pairs, p0 + kPairBlock);
      const int64_t ld = (p1 - p0) * 8;
      float* ftile = tiles + static_cast<int64_t>(tid) * rb * kPairBlock * 8;
      int32_t* itile = reinterpret_cast<int32_t*>(ftile);
      std::memset(ftile, 0, static_cast<size_t>(rows * ld) * sizeof(float));
      for (int64_t k0 = 0; k0 < pl.kb; k0 += kChunkKb) {
        const int64_t k1 = std::min(pl.kb, k0 + kChunkKb);
        if (pl.quant) sk.int8_mm(static_cast<const int16_t*>(xw) + r0 * ldx, ldx, rows, panels, p0, p1, k0, k1, itile, ld);
        else sk.float_mm(static_cast<const float*>(xw) + r0 * ldx, ldx, rows, panels, p0, p1, k0, k1, ftile, ld);
      }
      // Lanes {0, 1, 4, 5} hold channel 2p's partial sums, {2, 3, 6, 7} channel 2p + 1's
      // (kernels/sparse24.h); both ISAs share this reduction, so their outputs agree to the bit.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = r0 + r;
        for (int64_t pp = p0; pp < p1; ++pp) {
          for (int c = 0; c < 2; ++c) {
            const int64_t col = 2 * pp + c;
            if (col >= pl.n) break;
            const int64_t li = r * ld + (pp - p0) * 8 + 2 * c;
            const int64_t yi = row * pl.n + col;
            if (pl.quant) {
              const int32_t acc = (itile[li] + itile[li + 1]) + (itile[li + 4] + itile[li + 5]);
              if (odt == DType::s32) static_cast<int32_t*>(yout)[yi] = acc;
              else store(odt, yout, yi, (static_cast<float>(acc) * scale[col]) * (pts ? pts[row] : 1.0f));
            } else {
              store(odt, yout, yi, (ftile[li] + ftile[li + 1]) + (ftile[li + 4] + ftile[li + 5]));
            }
          }
        }
      }
    }
  });
}

}  // namespace qllm
