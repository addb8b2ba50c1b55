// Weight-only quantised matmul kernels (W8A16 / W4A16): the packed layout and the kernel table.
//
// Packed layout ("weight-only panels", docs/packed-layout.md). n is cut into panels of 16
// columns; within a panel, groups of k follow each other, and each group is
//   [ceil(len_g / KB) k-blocks of 64 bytes][16 f32 scales][16 f32 offsets, if any]
// so one thread streams a panel as one sequential run of bytes, scales included.
// A k-block holds KB consecutive k (KB = 4 for 8-bit, 8 for 4-bit) of the 16 columns as 16
// little-endian dwords, dword s = column s, value i (k = kb * KB + i) in bits [i*B, (i+1)*B).
// Values i < KB - 1 are stored biased (u = q + 2^(B-1), unsigned); the last value (the top bits
// of the dword) is stored as q in two's complement. Why: masking the dword with the bits of
// value i and converting to float (vpand + vcvtdq2ps) then gives exactly u * 2^(iB) (or, for the
// top value, q * 2^((KB-1)B) with its sign), so no shift and no sign extension is needed; the
// power of two is folded into the activation, the bias into a per-group correction.
// k past the end of a group (the last group when k % group_size != 0, or k % KB != 0) is padded
// with q = 0; columns past n are q = 0 with scale 0 and offset 0.
#pragma once

#include <cstdint>

#include "qllm/core/cpu.h"
#include "qllm/core/dtype.h"

namespace qllm::kernels {

struct FloatEpilogue;

constexpr int kWqPanel = 16;
constexpr int64_t kWqBlockBytes = 64;  // one k-block of one panel

struct WqPanels {
  const uint8_t* data = nullptr;
  int bits = 8;           // 8 or 4
  int64_t k = 0, n = 0;
  int64_t kgroup = 0;     // k per group (multiple of kb_k(); per-channel: k rounded up)
  int64_t groups = 0;
  bool has_offset = false;

  int kb_k() const { return bits == 8 ? 4 : 8; }
  int bias() const { return bits == 8 ? 128 : 8; }
  int64_t panels() const { return (n + kWqPanel - 1) / kWqPanel; }
  int64_t group_len(int64_t g) const { return g + 1 < groups ? kgroup : k - g * kgroup; }
  int64_t group_kblocks(int64_t g) const { return (group_len(g) + kb_k() - 1) / kb_k(); }
  int64_t group_bytes() const { return (kgroup / kb_k()) * kWqBlockBytes + (has_offset ? 128 : 64); }
  int64_t panel_bytes() const {
    return (groups - 1) * group_bytes() + group_kblocks(groups - 1) * kWqBlockBytes + (has_offset ? 128 : 64);
  }
  const uint8_t* panel(int64_t p) const { return data + p * panel_bytes(); }
  const uint8_t* group(int64_t p, int64_t g) const { return panel(p) + g * group_bytes(); }
  const float* scale(int64_t p, int64_t g) const {
    return reinterpret_cast<const float*>(group(p, g) + group_kblocks(g) * kWqBlockBytes);
  }
  const float* offset(int64_t p, int64_t g) const { return scale(p, g) + kWqPanel; }
  // The signed value q at (kk, slot s of panel p).
  int q(int64_t p, int64_t kk, int s) const {
    const int64_t g = kk / kgroup, kin = kk - g * kgroup;
    const uint8_t* blk = group(p, g) + (kin / kb_k()) * kWqBlockBytes;
    const uint32_t d = static_cast<uint32_t>(blk[4 * s]) | static_cast<uint32_t>(blk[4 * s + 1]) << 8 |
                       static_cast<uint32_t>(blk[4 * s + 2]) << 16 | static_cast<uint32_t>(blk[4 * s + 3]) << 24;
    const int i = static_cast<int>(kin % kb_k());
    const int v = static_cast<int>((d >> (i * bits)) & ((1u << bits) - 1));
    if (i < kb_k() - 1) return v - bias();
    return v >= bias() ? v - 2 * bias() : v;
  }
};

// Rows of x for the matrix-vector kernel, prepared once per call by wq_gemv_prepare.
struct WqGemvX {
  const float* x = nullptr;     // rows of k f32 (converted activations), ldx apart
  int64_t ldx = 0;
  const float* prep = nullptr;  // kernel-private: gemv_prep_floats(w) floats per row
  int64_t ldp = 0;
};

struct WqKernels {
  Isa isa;
  // Floats of per-row preparation the gemv kernel wants (0: none), and the preparation of its
  // groups [g0, g1) (each group's part of `prep` depends on that group's x only, so threads may
  // prepare disjoint group ranges of one row at once).
  int64_t (*gemv_prep_floats)(const WqPanels& w);
  void (*gemv_prepare)(const WqPanels& w, const float* x, float* prep, int64_t g0, int64_t g1);
  // y rows [0, rows) (rows <= 8), panels [p0, p1): y = x @ W' + bias, to ep.out / ep.out_dtype.
  void (*gemv)(const WqPanels& w, const WqGemvX& x, int64_t rows, int64_t p0, int64_t p1,
               const FloatEpilogue& ep);
  // tile[(kk - k0) * 16 + s] = W'[kk, 16p + s] for kk in [k0, k1), k0 a multiple of kb_k(),
  // W' = (f32(q) + offset) * scale exactly as SPEC writes it (so the GEMM path equals the ref).
  void (*dequant)(const WqPanels& w, int64_t p, int64_t k0, int64_t k1, float* tile);
  // c[r * ldc + s] (r < rows <= 6, s < 16) = (k0 ? c : 0) + sum_kk a[kk * 6 + r] * b[kk * 16 + s],
  // accumulated in kk order with one FMA per term (what the ref does, so the bits agree).
  void (*micro)(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, int rows, bool accumulate);
};

constexpr int kWqMR = 6;  // rows of the GEMM microkernel (6 x 16: 12 accumulators)

const WqKernels& wq_kernels(Isa isa);
const WqKernels& wq_ref_kernels();
const WqKernels& wq_avx2_kernels();
const WqKernels& wq_avx512_kernels();  // VNNI matrix-vector path (x86/avx512/wq_vnni.cc)

// Per-row preparation of the AVX-512 VNNI matrix-vector kernel (x86/avx512/wq_vnni.cc), in
// floats from the row's start, every section 64-byte aligned:
//   [x' = x * 2^(-iB), groups * kgroup floats: the float fallback's activations]
//   [per group: sum of x (for offsets)]
//   [per chunk: 16 words {S (0: all zero, 1-4: digits, 5: float path), 4 s32 accumulator
//     starts -2^(B-1) * sum of digit s, 4 f32 digit weights 2^(u + 8s), f32 float-path bias
//     correction, unused}]
//   [per k-block: 4 digits x (8 bytes for 4-bit: even k then odd k; 4 bytes for 8-bit)]
// A chunk is the group, or 128 k of it when the group is longer than 256 (which keeps the
// s32 sums exact in f32 and the digit count low).
struct WqVnniGeometry {
  int64_t chunk = 0, cpg = 0;  // k per chunk, chunks per group
  int64_t gsum_at = 0, info_at = 0, digits_at = 0, floats = 0;
  explicit WqVnniGeometry(const WqPanels& w) {
    const auto up16 = [](int64_t v) { return (v + 15) / 16 * 16; };
    chunk = w.kgroup <= 256 ? w.kgroup : 128;
    cpg = (w.kgroup + chunk - 1) / chunk;
    const int64_t kp = w.groups * w.kgroup;
    gsum_at = up16(kp);
    info_at = gsum_at + up16(w.groups);
    digits_at = info_at + w.groups * cpg * 16;
    floats = digits_at + up16(kp);
  }
  // Chunk c of group g in a prepared row: its 16 info words, and its digits from k offset c0
  // (blocks of 8 k x 4 digits x 1 byte for 4-bit weights, 4 k x 4 digits for 8-bit).
  const int32_t* info(const float* row, int64_t g, int64_t c) const {
    return reinterpret_cast<const int32_t*>(row + info_at) + (g * cpg + c) * 16;
  }
  const int8_t* digits(const float* row, int64_t kgroup, int bits, int64_t g, int64_t c0) const {
    const int64_t kb = bits == 8 ? 4 : 8;
    return reinterpret_cast<const int8_t*>(row + digits_at) + (g * kgroup + c0) / kb * (kb * 4);
  }
};
// Defined in baseline code (ref/wq.cc): workspace sizing calls it for any ISA.
int64_t wq_vnni_prep_floats(const WqPanels& w);

}  // namespace qllm::kernels
