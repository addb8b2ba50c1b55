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

// Blocks of 8 along k, padded to an even count: the AVX2 float kernel reads the u16 positions of
// two blocks with one 32-bit broadcast.
int64_t packed_kb(int64_t k) { return (k + 15) / 16 * 2; }
// s8: blocks of 16 groups (64 along k), kernels/sparse24.h.
int64_t s8_kb(int64_t k) { return (k + 63) / 64; }

int64_t panel_bytes_for(DType dt, int64_t k) {
  if (dt == DType::s8) return s8_kb(k) * kernels::kS8BlockBytes;
  return packed_kb(k) / 2 * kernels::s24_step_bytes(dtype_size(dt));
}
static_assert(PackedSparse24::kFloatPanelChannels == 2 * kernels::kFP);
int64_t panels_for(DType dt, int64_t n) {
  return dt == DType::s8 ? (n + kernels::kS8Channels - 1) / kernels::kS8Channels : (n + 2 * kernels::kFP - 1) / (2 * kernels::kFP);
}

// Packs float super-panels [s0, s1) of a validated compressed float weight (kernels/sparse24.h).
// Missing channels and padding groups: zero values at positions (0, 1).
void pack_pairs(const TensorView& values, const TensorView& meta, uint8_t* out, int64_t panel_bytes,
                int64_t s0, int64_t s1) {
  using kernels::kFP;
  const DType dt = values.dtype();
  const int64_t n = values.dim(0), k = 2 * values.dim(1), groups = k / 4, mc = sparse24_meta_cols(k);
  const int64_t es = dtype_size(dt), kb = packed_kb(k), step = kernels::s24_step_bytes(es);
  const uint8_t* v = values.data<uint8_t>();
  const uint8_t* m = meta.data<uint8_t>();
  for (int64_t sp = s0; sp < s1; ++sp) {
    uint8_t* pan = out + sp * panel_bytes;
    std::memset(pan, 0, static_cast<size_t>(panel_bytes));
    for (int64_t b = 0; b < kb; ++b) {
      uint8_t* st = pan + (b / 2) * step;
      for (int pj = 0; pj < kFP; ++pj) {
        uint8_t* pv = st + (pj * 16 + (b % 2) * 8) * es;
        uint16_t word = 0;
        for (int c = 0; c < 2; ++c) {
          const int64_t col = 2 * (sp * kFP + pj) + c;
          for (int h = 0; h < 2; ++h) {
            const int64_t g = 2 * b + h;
            int nib = 0x4;
            if (col < n && g < groups) {
              nib = (m[col * mc + g / 2] >> (4 * (g % 2))) & 0xf;
              for (int s = 0; s < 2; ++s)
                std::memcpy(pv + (4 * h + 2 * c + s) * es, v + (col * (k / 2) + 2 * g + s) * es, es);
            }
            word = static_cast<uint16_t>(word | (nib << (8 * c + 4 * h)));
          }
        }
        uint8_t* pm = st + kFP * 16 * es + pj * 4 + (b % 2) * 2;
        pm[0] = static_cast<uint8_t>(word);
        pm[1] = static_cast<uint8_t>(word >> 8);
      }
    }
  }
}

// Packs super-panels [s0, s1) of a validated compressed s8 weight (kernels/sparse24.h). Missing
// channels and padding groups keep zero values and code 0.
void pack_s8_panels(const TensorView& values, const TensorView& meta, uint8_t* out, int64_t panel_bytes,
                    int64_t s0, int64_t s1) {
  using namespace kernels;
  const int64_t n = values.dim(0), k = 2 * values.dim(1), groups = k / 4, mc = sparse24_meta_cols(k);
  const uint8_t* v = values.data<uint8_t>();
  const uint8_t* m = meta.data<uint8_t>();
  for (int64_t sp = s0; sp < s1; ++sp) {
    uint8_t* pan = out + sp * panel_bytes;
    std::memset(pan, 0, static_cast<size_t>(panel_bytes));
    for (int ch = 0; ch < kS8Channels; ++ch) {
      const int64_t col = sp * kS8Channels + ch;
      if (col >= n) break;
      const int j = ch / 8, c = ch % 8;
      for (int64_t g = 0; g < groups; ++g) {
        uint8_t* blk = pan + (g / kS8BlockGroups) * kS8BlockBytes;
        const int64_t gi = g % kS8BlockGroups;
        const int nib = (m[col * mc + g / 2] >> (4 * (g % 2))) & 0xf;
        std::memcpy(blk + gi * kS8Channels * 2 + ch * 2, v + col * (k / 2) + 2 * g, 2);
        uint8_t* cw = blk + kS8BlockGroups * kS8Channels * 2 + gi * 12 + j * 3;
        uint32_t word = cw[0] | (cw[1] << 8) | (cw[2] << 16);
        word |= static_cast<uint32_t>(s24_pair_code(nib & 3, nib >> 2)) << (3 * c);
        cw[0] = static_cast<uint8_t>(word);
        cw[1] = static_cast<uint8_t>(word >> 8);
        cw[2] = static_cast<uint8_t>(word >> 16);
      }
    }
  }
}

void pack_panels(const TensorView& values, const TensorView& meta, uint8_t* out, int64_t panel_bytes, int64_t p0,
                 int64_t p1) {
  if (values.dtype() == DType::s8) pack_s8_panels(values, meta, out, panel_bytes, p0, p1);
  else pack_pairs(values, meta, out, panel_bytes, p0, p1);
}

}  // namespace

size_t PackedSparse24::packed_bytes(DType dtype, int64_t n, int64_t k) {
  // s8: the kernels read each 3-byte code word with a 4-byte load, up to one byte past the end.
  return static_cast<size_t>(panel_bytes_for(dtype, k) * panels_for(dtype, n)) +
         (dtype == DType::s8 ? static_cast<size_t>(kernels::kS8TailPad) : 0);
}

size_t PackedSparse24::compressed_bytes() const {
  return static_cast<size_t>(n_ * (k_ / 2) * dtype_size(dtype_) + n_ * sparse24_meta_cols(k_));
}

void PackedSparse24::init(const TensorView& values, const TensorView& meta, uint8_t* memory, const char*) {
  dtype_ = values.dtype();
  n_ = values.dim(0);
  k_ = 2 * values.dim(1);
  kb_ = dtype_ == DType::s8 ? s8_kb(k_) : packed_kb(k_);
  panel_bytes_ = panel_bytes_for(dtype_, k_);
  data_ = memory;
  pack_panels(values, meta, memory, panel_bytes_, 0, panels());
  if (dtype_ == DType::s8) std::memset(memory + bytes(), 0, static_cast<size_t>(kernels::kS8TailPad));
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
// Wraps memory that pack_panels() filled for an already validated weight.
struct PackedSparse24Access {
  static PackedSparse24 wrap(DType dt, int64_t n, int64_t k, const uint8_t* mem) {
    PackedSparse24 p;
    p.dtype_ = dt;
    p.n_ = n;
    p.k_ = k;
    p.kb_ = dt == DType::s8 ? s8_kb(k) : packed_kb(k);
    p.panel_bytes_ = panel_bytes_for(dt, k);
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
static_assert(kPairBlock % (2 * kernels::kFP) == 0, "work items hold whole pairs of super-panels");
constexpr int64_t kChunkKb = 128;

struct Plan {
  bool quant = false;
  int64_t m = 0, k = 0, n = 0, kb = 0;
  DType xdt = DType::f32, wdt = DType::f32;
  const PackedSparse24* packed = nullptr;
};

Plan validate(const Sparse24MatmulArgs& a, const Sparse24MatmulParams& p) {
  Plan pl;
  pl.quant = check::matmul_operand(kOp, "x", a.x);
  pl.xdt = a.x.dtype();
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

// Large m: the rows kernel (kernels/sparse24.h) from kS24RowsMinM rows on (measured: see
// docs/design.md). Work item = (panel of 64 rows, kRowsPairBlock = 512 pairs = 1024 channels);
// within an item k runs in chunks of 8 blocks (64 deep), so the panel's x chunk (64 x 64 f32 =
// 16 KB) stays in L1 while the item's pairs stream past it, and the item's accumulators (1024
// channels x 64 rows, 256 KB) stay in L2. Every item re-reads its panel's x (1.8 MB at k = 7168,
// 3.7 MB at 14336: from L3), so fewer, larger items read less of it: 512 pairs measured steadier
// than 256 at k = 14336 on 2 threads (185-205 ms against 188-282, avx2; s24h). x is transposed
// once into panels, kRowsTransK columns of a panel at a time so the strided writes land in a
// 128 KB region (L2).
constexpr int64_t kS24RowsMinM = 32;
constexpr int64_t kRowsPairBlock = 512;
constexpr int64_t kRowsChunkKb = 8;
constexpr int64_t kRowsTransK = 512;
bool use_rows(int64_t m) { return m >= kS24RowsMinM; }
int64_t row_panels(int64_t m) { return ceil_div(m, int64_t{kernels::kRowPanel}); }

int64_t row_block(int64_t m) { return std::min<int64_t>(std::max<int64_t>(m, 1), kRowBlock); }

void store(DType dt, void* y, int64_t i, float v) {
  switch (dt) {
    case DType::f16: static_cast<uint16_t*>(y)[i] = f32_to_f16(v); break;
    case DType::bf16: static_cast<uint16_t*>(y)[i] = f32_to_bf16(v); break;
    default: static_cast<float*>(y)[i] = v; break;
  }
}

// s8 path: rows are processed in slabs whose x pair tables (32 bytes per group and row, 8x the
// s8 x) take at most ~8 MB, and never fewer than one row block.
constexpr int64_t kS8TableBudget = int64_t{8} << 20;
constexpr int64_t kS8PanelBlock = 2;  // super-panels per work item: 64 channels
constexpr int64_t kS8ChunkKb = 8;     // blocks of 64 per k chunk when rows > 1: 512 deep, 9.7 KB per super-panel

// s32 per row of table: the groups plus one cache line, so that the rows of a 4-row tile (whose
// table rows would otherwise be a multiple of 4 KB apart) do not all map to the same L1 sets.
int64_t s8_table_ld(int64_t k) { return s8_kb(k) * kernels::kS8BlockGroups * 8 + 16; }

int64_t s8_slab_rows(int64_t m, int64_t k) {
  const int64_t rb = row_block(m);
  const int64_t fit = kS8TableBudget / (s8_table_ld(k) * 4) / rb * rb;
  return std::min(m, std::max(rb, fit));
}

// Large-m s8 path (kernels/sparse24.h, s8 rows kernel) from kS24S8RowsMinM rows on: a 64-row
// panel costs the same at any fill (k = 7168, n = 4096: ~8.2 ms at m = 32 and 48), the tiled
// kernel ~0.21 ms per row (6.4 ms at m = 31), so they cross at ~40 rows (docs/design.md). Work
// item = (panel of 64 rows, kS8RowsPanelBlock super-panels = 512 channels): the item's
// accumulators (512 x 64 s32 = 128 KB) stay in L2 across the k chunks, and the kernel builds its
// x tables per item in the per-thread scratch (kernels::kS8RowsScratchBytes), so no table memory
// outside it. 512 channels per item keeps the x panel's re-reads (once per item) small against
// the weight stream (once per panel).
constexpr int64_t kS24S8RowsMinM = 40;
constexpr int64_t kS8RowsPanelBlock = 16;
// The avx512 rows kernel (vpermb + vpdpbusd) runs every m from 1 on (its table's s8_rows_min_m):
// up to 32 rows it decodes each weight pair in registers for the rows at hand, which at m = 1 is
// as fast as the tiled AVX2 kernel (both stream the weights at DRAM speed) and at m = 4-32 faster
// (session 9: m = 4 0.70-0.77 ms against 1.6-1.9 at k = 7168; docs/design.md).
bool use_s8_rows(const Context& ctx, int64_t m) {
  return m >= std::min<int64_t>(kS24S8RowsMinM, kernels::sparse24_kernels(ctx.isa()).s8_rows_min_m);
}
static_assert(kS8RowsPanelBlock <= kernels::kS8RowsMaxPanels, "the avx512 s8 rows kernel's scratch holds the weight sums of 16 super-panels");

}  // namespace

size_t sparse24_matmul_workspace_size(const Context& ctx, const Sparse24MatmulArgs& a, const Sparse24MatmulParams& p) {
  const Plan pl = validate(a, p);
  WorkspacePlan w;
  if (!pl.packed) w.add<uint8_t>(PackedSparse24::packed_bytes(pl.wdt, pl.n, pl.k));
  if (pl.quant && use_s8_rows(ctx, pl.m)) {
    w.add<uint8_t>(ctx.threads() * kernels::kS8RowsScratchBytes);                                     // chunk tables
    w.add<int32_t>(ctx.threads() * kS8RowsPanelBlock * kernels::kS8Channels * kernels::kRowPanel);  // accumulators
  } else if (pl.quant) {
    w.add<int32_t>(std::max<int64_t>(s8_slab_rows(pl.m, pl.k), 1) * s8_table_ld(pl.k));
    w.add<int32_t>(ctx.threads() * row_block(pl.m) * kS8PanelBlock * kernels::kS8Channels);
  } else if (use_rows(pl.m)) {
    w.add<float>(row_panels(pl.m) * kernels::kRowPanel * pl.kb * 8);       // transposed x panels
    w.add<float>(ctx.threads() * kRowsTransK);                            // row conversion buffers
    w.add<float>(ctx.threads() * kRowsPairBlock * 2 * kernels::kRowPanel);  // accumulator tiles
  } else {
    w.add<float>(pl.m * pl.kb * 8);
    w.add<float>(ctx.threads() * row_block(pl.m) * kPairBlock * 8);  // accumulator tiles
  }
  return w.bytes();
}

namespace {

void run_float(Context& ctx, const Plan& pl, const Sparse24MatmulArgs& a, const PackedSparse24& pw, void* yout,
               DType odt, Workspace& ws) {
  const kernels::KernelTable& kt = ctx.kernels();
  const kernels::Sparse24Kernels& sk = kernels::sparse24_kernels(ctx.isa());
  ThreadPool& pool = ctx.pool();
  const int64_t ldx = pl.kb * 8;
  float* xw = ws.alloc<float>(pl.m * ldx, kOp);
  const int64_t rb = row_block(pl.m);
  float* tiles = ws.alloc<float>(ctx.threads() * rb * kPairBlock * 8, kOp);

  // Activations once: float -> f32 (zero padded).
  pool.parallel_for(pl.m, 16, [&](int64_t b, int64_t e, int) {
    for (int64_t r = b; r < e; ++r) {
      float* xr = xw + r * ldx;
      kt.to_f32(a.x.data<uint8_t>() + r * pl.k * dtype_size(pl.xdt), pl.xdt, pl.k, xr);
      std::fill(xr + pl.k, xr + ldx, 0.0f);
    }
  });

  const kernels::S24Panels panels{pw.data(), pw.dtype(), pw.kblocks(), pw.panel_bytes()};
  const int64_t pairs = pw.panels() * kernels::kFP;  // padded pairs (zero channels past n)
  const int64_t rblocks = ceil_div(pl.m, rb), pblocks = ceil_div(pairs, kPairBlock);
  pool.parallel_for(rblocks * pblocks, 1, [&](int64_t b, int64_t e, int tid) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t r0 = (it / pblocks) * rb, rows = std::min(rb, pl.m - r0);
      const int64_t p0 = (it % pblocks) * kPairBlock, p1 = std::min(pairs, p0 + kPairBlock);
      const int64_t ld = (p1 - p0) * 8;
      float* ftile = tiles + static_cast<int64_t>(tid) * rb * kPairBlock * 8;
      std::memset(ftile, 0, static_cast<size_t>(rows * ld) * sizeof(float));
      // One row streams each super-panel over the whole depth (one sequential stream); more rows
      // take the depth in chunks (see kChunkKb).
      const int64_t chunk = rows == 1 ? pl.kb : kChunkKb;
      for (int64_t k0 = 0; k0 < pl.kb; k0 += chunk)
        sk.float_mm(xw + r0 * ldx, ldx, rows, panels, p0, p1, k0, std::min(pl.kb, k0 + chunk), ftile, ld);
      // Lanes {0, 1, 4, 5} hold channel 2p's partial sums, {2, 3, 6, 7} channel 2p + 1's
      // (kernels/sparse24.h); both ISAs share this reduction, so their outputs agree to the bit.
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t pp = p0; pp < p1; ++pp)
          for (int c = 0; c < 2; ++c) {
            const int64_t col = 2 * pp + c;
            if (col >= pl.n) break;
            const int64_t li = r * ld + (pp - p0) * 8 + 2 * c;
            store(odt, yout, (r0 + r) * pl.n + col, (ftile[li] + ftile[li + 1]) + (ftile[li + 4] + ftile[li + 5]));
          }
    }
  });
}

// Large-m float path: x transposed into 64-row panels, the rows kernel per (panel, pair block).
void run_float_rows(Context& ctx, const Plan& pl, const Sparse24MatmulArgs& a, const PackedSparse24& pw, void* yout,
                    DType odt, Workspace& ws) {
  using kernels::kRowPanel;
  const kernels::KernelTable& kt = ctx.kernels();
  const kernels::Sparse24Kernels& sk = kernels::sparse24_kernels(ctx.isa());
  ThreadPool& pool = ctx.pool();
  const int64_t kpad = pl.kb * 8, npan = row_panels(pl.m), panel_floats = kRowPanel * kpad;
  float* xp = ws.alloc<float>(npan * panel_floats, kOp);
  float* rowbuf = ws.alloc<float>(ctx.threads() * kRowsTransK, kOp);
  float* tiles = ws.alloc<float>(ctx.threads() * kRowsPairBlock * 2 * kRowPanel, kOp);
  const int64_t es = dtype_size(pl.xdt);
  const uint8_t* x = a.x.data<uint8_t>();

  // Transpose (and convert) x: xp[panel][k][64], zero past k and past m.
  const int64_t tchunks = ceil_div(kpad, kRowsTransK);
  pool.parallel_for(npan * tchunks, 1, [&](int64_t b, int64_t e, int tid) {
    float* buf = rowbuf + static_cast<int64_t>(tid) * kRowsTransK;
    for (int64_t it = b; it < e; ++it) {
      const int64_t pan = it / tchunks, k0 = (it % tchunks) * kRowsTransK, k1 = std::min(kpad, k0 + kRowsTransK);
      float* dst = xp + pan * panel_floats + k0 * kRowPanel;
      for (int r = 0; r < kRowPanel; ++r) {
        const int64_t row = pan * kRowPanel + r;
        const int64_t kv = row < pl.m ? std::max<int64_t>(0, std::min(pl.k, k1) - k0) : 0;  // valid columns
        if (kv > 0) kt.to_f32(x + (row * pl.k + k0) * es, pl.xdt, kv, buf);
        for (int64_t j = kv; j < k1 - k0; ++j) buf[j] = 0.0f;
        for (int64_t j = 0; j < k1 - k0; ++j) dst[j * kRowPanel + r] = buf[j];
      }
    }
  });

  const kernels::S24Panels panels{pw.data(), pw.dtype(), pw.kblocks(), pw.panel_bytes()};
  const int64_t pairs = pw.panels() * kernels::kFP, pblocks = ceil_div(pairs, kRowsPairBlock);
  pool.parallel_for(npan * pblocks, 1, [&](int64_t b, int64_t e, int tid) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t pan = it / pblocks, r0 = pan * kRowPanel, rows = std::min<int64_t>(kRowPanel, pl.m - r0);
      const int64_t p0 = (it % pblocks) * kRowsPairBlock, p1 = std::min(pairs, p0 + kRowsPairBlock);
      float* acc = tiles + static_cast<int64_t>(tid) * kRowsPairBlock * 2 * kRowPanel;
      std::memset(acc, 0, static_cast<size_t>((p1 - p0) * 2 * kRowPanel) * sizeof(float));
      const float* xpan = xp + pan * panel_floats;
      for (int64_t k0 = 0; k0 < pl.kb; k0 += kRowsChunkKb)
        sk.float_rows(xpan, panels, p0, p1, k0, std::min(pl.kb, k0 + kRowsChunkKb), acc);
      // acc is channel-major (acc[c][64]): the kernel table's rows_out transposes it into y.
      const int64_t c1 = std::min(pl.n, 2 * p1);
      sk.rows_out(acc, false, rows, c1 - 2 * p0, nullptr, nullptr, odt,
                  static_cast<uint8_t*>(yout) + (r0 * pl.n + 2 * p0) * dtype_size(odt), pl.n);
    }
  });
}

void run_s8(Context& ctx, const Plan& pl, const Sparse24MatmulArgs& a, const PackedSparse24& pw, void* yout, DType odt,
            Workspace& ws) {
  const kernels::Sparse24Kernels& sk = kernels::sparse24_kernels(ctx.isa());
  ThreadPool& pool = ctx.pool();
  const int64_t ldt = s8_table_ld(pl.k), slab = s8_slab_rows(pl.m, pl.k), rb = row_block(pl.m);
  int32_t* tab = ws.alloc<int32_t>(slab * ldt, kOp);
  constexpr int64_t kTile = kS8PanelBlock * kernels::kS8Channels;
  int32_t* tiles = ws.alloc<int32_t>(ctx.threads() * rb * kTile, kOp);
  const kernels::S24S8Panels panels{pw.data(), pw.kblocks(), pw.panel_bytes()};
  const int64_t nsp = pw.panels(), spblocks = ceil_div(nsp, kS8PanelBlock), kb = pw.kblocks();
  const float* scale = a.scale.present() ? a.scale.data<float>() : nullptr;
  const float* pts = a.per_token_scale.present() ? a.per_token_scale.data<float>() : nullptr;
  const int8_t* x = a.x.data<int8_t>();

  for (int64_t s0 = 0; s0 < pl.m; s0 += slab) {
    const int64_t srows = std::min(slab, pl.m - s0);
    pool.parallel_for(srows, 4, [&](int64_t b, int64_t e, int) {
      for (int64_t r = b; r < e; ++r) sk.s8_xtable(x + (s0 + r) * pl.k, pl.k, kb * kernels::kS8BlockGroups, tab + r * ldt);
    });
    const int64_t rblocks = ceil_div(srows, rb);
    pool.parallel_for(rblocks * spblocks, 1, [&](int64_t b, int64_t e, int tid) {
      for (int64_t it = b; it < e; ++it) {
        const int64_t r0 = (it / spblocks) * rb, rows = std::min(rb, srows - r0);
        const int64_t sp0 = (it % spblocks) * kS8PanelBlock, sp1 = std::min(nsp, sp0 + kS8PanelBlock);
        const int64_t ld = (sp1 - sp0) * kernels::kS8Channels;
        int32_t* acc = tiles + static_cast<int64_t>(tid) * rb * kTile;
        std::memset(acc, 0, static_cast<size_t>(rows * ld) * sizeof(int32_t));
        // One row streams each super-panel over the whole depth; more rows take the depth in
        // chunks so that a super-panel's chunk stays in L1 across the row tiles.
        const int64_t chunk = rows == 1 ? kb : kS8ChunkKb;
        for (int64_t k0 = 0; k0 < kb; k0 += chunk)
          sk.s8_mm(tab + r0 * ldt, ldt, rows, panels, sp0, sp1, k0, std::min(kb, k0 + chunk), acc, ld);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = s0 + r0 + r;
          for (int64_t col = sp0 * kernels::kS8Channels; col < std::min(pl.n, sp1 * kernels::kS8Channels); ++col) {
            const int32_t v = acc[r * ld + col - sp0 * kernels::kS8Channels];
            const int64_t yi = row * pl.n + col;
            if (odt == DType::s32) static_cast<int32_t*>(yout)[yi] = v;
            else store(odt, yout, yi, (static_cast<float>(v) * scale[col]) * (pts ? pts[row] : 1.0f));
          }
        }
      }
    });
  }
}

// Large-m s8 path: the rows kernel per (64-row panel, 512 channels); same epilogue as run_s8.
void run_s8_rows(Context& ctx, const Plan& pl, const Sparse24MatmulArgs& a, const PackedSparse24& pw, void* yout,
                 DType odt, Workspace& ws) {
  using kernels::kRowPanel;
  using kernels::kS8Channels;
  const kernels::Sparse24Kernels& sk = kernels::sparse24_kernels(ctx.isa());
  uint8_t* scratch = ws.alloc<uint8_t>(ctx.threads() * kernels::kS8RowsScratchBytes, kOp);
  constexpr int64_t kTile = kS8RowsPanelBlock * kS8Channels * kRowPanel;
  int32_t* tiles = ws.alloc<int32_t>(ctx.threads() * kTile, kOp);
  const kernels::S24S8Panels panels{pw.data(), pw.kblocks(), pw.panel_bytes()};
  const int64_t nsp = pw.panels(), spblocks = ceil_div(nsp, kS8RowsPanelBlock), npan = row_panels(pl.m);
  const float* scale = a.scale.present() ? a.scale.data<float>() : nullptr;
  const float* pts = a.per_token_scale.present() ? a.per_token_scale.data<float>() : nullptr;
  const int8_t* x = a.x.data<int8_t>();
  ctx.pool().parallel_for(npan * spblocks, 1, [&](int64_t b, int64_t e, int tid) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t pan = it / spblocks, r0 = pan * kRowPanel, rows = std::min<int64_t>(kRowPanel, pl.m - r0);
      const int64_t sp0 = (it % spblocks) * kS8RowsPanelBlock, sp1 = std::min(nsp, sp0 + kS8RowsPanelBlock);
      int32_t* acc = tiles + static_cast<int64_t>(tid) * kTile;
      sk.s8_rows(x + r0 * pl.k, pl.k, rows, pl.k, panels, sp0, sp1, acc,
                 scratch + static_cast<int64_t>(tid) * kernels::kS8RowsScratchBytes);
      const int64_t c0 = sp0 * kS8Channels, c1 = std::min(pl.n, sp1 * kS8Channels);
      if (!sk.s8_rows_row_major) {
        // Channel-major acc[c][64]: the kernel table's rows_out (vector transposes on AVX2).
        sk.rows_out(acc, true, rows, c1 - c0, scale ? scale + c0 : nullptr, pts ? pts + r0 : nullptr, odt,
                    static_cast<uint8_t*>(yout) + (r0 * pl.n + c0) * dtype_size(odt), pl.n);
        continue;
      }
      // Row-major per super-panel (the avx512 kernel): acc[sp - sp0][r][32].
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = r0 + r;
        for (int64_t col = c0; col < c1; ++col) {
          const int64_t cc = col - c0;
          const int32_t v = acc[(cc / kS8Channels) * kS8Channels * kRowPanel + r * kS8Channels + cc % kS8Channels];
          const int64_t yi = row * pl.n + col;
          if (odt == DType::s32) static_cast<int32_t*>(yout)[yi] = v;
          else store(odt, yout, yi, (static_cast<float>(v) * scale[col]) * (pts ? pts[row] : 1.0f));
        }
      }
    }
  });
}

}  // namespace

void sparse24_matmul(Context& ctx, const Sparse24MatmulArgs& a, const TensorView& y, const Sparse24MatmulParams& p,
                     Workspace* ws_in) {
  const Plan pl = validate(a, p);
  check::dtype(kOp, "y", y, p.out_dtype);
  check::shape(kOp, "y", y, {pl.m, pl.n});
  if (pl.m == 0 || pl.n == 0) return;
  // All input is valid from here on; nothing was written before this point.
  Workspace& ws = ws_in ? *ws_in : ctx.workspace(sparse24_matmul_workspace_size(ctx, a, p));
  PackedSparse24 local;
  const PackedSparse24* pw = pl.packed;
  if (!pw) {
    uint8_t* mem = ws.alloc<uint8_t>(PackedSparse24::packed_bytes(pl.wdt, pl.n, pl.k), kOp);
    // Validated above; pack the panels in parallel, then wrap the memory (no second validation pass).
    const int64_t pb = panel_bytes_for(pl.wdt, pl.k);
    ctx.pool().parallel_for(panels_for(pl.wdt, pl.n), 1,
                            [&](int64_t b, int64_t e, int) { pack_panels(a.values, a.meta, mem, pb, b, e); });
    local = detail::PackedSparse24Access::wrap(pl.wdt, pl.n, pl.k, mem);
    pw = &local;
  }
  if (pl.quant && use_s8_rows(ctx, pl.m)) run_s8_rows(ctx, pl, a, *pw, y.mutable_data<void>(), p.out_dtype, ws);
  else if (pl.quant) run_s8(ctx, pl, a, *pw, y.mutable_data<void>(), p.out_dtype, ws);
  else if (use_rows(pl.m)) run_float_rows(ctx, pl, a, *pw, y.mutable_data<void>(), p.out_dtype, ws);
  else run_float(ctx, pl, a, *pw, y.mutable_data<void>(), p.out_dtype, ws);
}

}  // namespace qllm
