// Kernels of the 2:4 sparse matmul, one table per ISA (ref reads the same packed layout, so the
// tests run one packed weight through ref and AVX2 and demand identical bits).
//
// Float packed layout (PackedSparse24, layout version 2): output channels in pairs (A = 2p,
// B = 2p + 1), and pairs in super-panels of kFP = 4 (8 channels; n padded with zero channels).
// k is padded with all-zero groups to a multiple of 16, giving KB (even) blocks of 8, walked in
// steps of two blocks. A super-panel is one sequential stream: step s (blocks 2s, 2s + 1) holds
//   values [kFP pairs][2 blocks][8] (dtype), then meta [kFP pairs] u32
// (a pair's u32 = block 2s's u16 | block 2s+1's u16 << 16; a block's u16: low byte A's meta byte
// for the block's two groups g0 = 2kb, g1 = 2kb + 1, high byte B's). (Version 1 stored each pair
// as its own values stream followed by its own meta stream: 16 streams for the 8 pairs a
// matrix-vector tile reads, which ran at ~22 GB/s; one stream per super-panel, two super-panels
// per core at a time, reads at the dense kernels' DRAM rate.) The 8 values of a block are ordered for the kernel's gather (vpermilps on
// x[8kb, 8kb+8), one group per 128-bit lane):
//     A.g0.v0 A.g0.v1 B.g0.v0 B.g0.v1 | A.g1.v0 A.g1.v1 B.g1.v0 B.g1.v1
// which gives 8 accumulator lanes per (row, pair): lanes {0, 1, 4, 5} belong to A, {2, 3, 6, 7} to B.
// (The s8 weights use the super-panel layout further down.)
#pragma once

#include <cstdint>

#include "qllm/core/cpu.h"
#include "qllm/core/dtype.h"

namespace qllm::kernels {

constexpr int kFP = 4;  // pairs per float super-panel (two of them fill the m = 1 kernel's 8 accumulators)
// Bytes of one step (two blocks) of one float super-panel.
constexpr int64_t s24_step_bytes(int64_t es) { return kFP * 16 * es + kFP * 4; }

struct S24Panels {
  const uint8_t* data = nullptr;
  DType dtype = DType::f32;
  int64_t kb = 0;           // blocks of 8 along k (even)
  int64_t panel_bytes = 0;  // bytes of one super-panel: kb / 2 steps
  int64_t step_bytes() const { return s24_step_bytes(dtype_size(dtype)); }
  // Step s of the super-panel holding pair p, and pair p's values / meta in it.
  const uint8_t* step(int64_t p, int64_t s) const { return data + (p / kFP) * panel_bytes + s * step_bytes(); }
  const uint8_t* values(int64_t p, int64_t kb_) const {
    return step(p, kb_ / 2) + ((p % kFP) * 16 + (kb_ % 2) * 8) * dtype_size(dtype);
  }
  uint16_t meta(int64_t p, int64_t kb_) const {
    const uint8_t* q = step(p, kb_ / 2) + kFP * 16 * dtype_size(dtype) + (p % kFP) * 4 + (kb_ % 2) * 2;
    return static_cast<uint16_t>(q[0] | (q[1] << 8));
  }
};

// acc[r * ld_acc + (p - p0) * 8 + lane] += the lanes' products over blocks [kb0, kb1) (even
// bounds), for rows [0, rows) and pairs [p0, p1) (p0 even). Float: x rows of f32, ldx apart, zero past k;
// each lane accumulates its terms in block order with one FMA each.
using S24FloatFn = void (*)(const float* x, int64_t ldx, int64_t rows, const S24Panels& w, int64_t p0,
                            int64_t p1, int64_t kb0, int64_t kb1, float* acc, int64_t ld_acc);

// ---- float large-m kernel: rows in the vector lanes -------------------------------------------
// For many rows the kernels above pay one permute per useful FMA. The rows kernel instead reads x
// transposed in panels of kRowPanel = 64 rows: xp[k][64] f32 (k padded to kb * 8, rows past m
// zero), and for each kept weight of a channel it broadcasts the value once and runs 8 FMAs (64
// rows) with x row-vectors as memory operands at the kept k (the offsets come straight from the
// channel's meta byte: position i -> i * 256 bytes). No permutes: per 8 useful FMAs 9 loads.
// acc[c * 64 + r] (c = 2 (p - p0) + {0: A, 1: B}) += sum over the kept terms of blocks [kb0, kb1)
// (even bounds) in k order, one FMA each: per output one chain in ascending k.
constexpr int kRowPanel = 64;
using S24RowsFn = void (*)(const float* xp, const S24Panels& w, int64_t p0, int64_t p1, int64_t kb0, int64_t kb1,
                           float* acc);

// ---- s8 (W8A8) layout: super-panels of 32 channels and an x pair table -------------------------
// The s8 kernel gathers from a per-call table of x pairs instead of from x itself: for every row
// and group g of 4, tab[g][t] (8 s32) = u16(x[4g + i0]) | x[4g + i1] << 16 for the six position
// pairs t = (0,1) (0,2) (0,3) (1,2) (1,3) (2,3) (entries 6, 7 = 0). The weight stores, per channel
// and group, its pair's code t (3 bits) and its two values; one vpermd of the group's table with
// the codes of 8 channels as indices then yields 8 ready s16 pairs for one vpmaddwd, so a group of
// 8 channels costs broadcast + vpsrlvd + vpermd + vpmovsxbw + vpmaddwd + vpaddd (the old
// vpshufb-control layout spent ~13 uops per channel pair and block building its control).
// Packed (PackedSparse24, s8): channels in super-panels of 32 (n padded with zero channels), k in
// blocks of 16 groups (64 deep, padded with zero groups). One block of one super-panel is
// kS8BlockBytes = 1216 bytes (19 cache lines):
//   values [16 groups][4 sub-panels][8 channels][2] s8   (1024 bytes)
//   codes  [16 groups][4 sub-panels] 24-bit little endian, channel c's code in bits 3c..3c+2
// so one pass reads 1 value byte + 1.5 bits per kept value. The kernels read a code word with a
// 4-byte load, one byte past it (the buffer is padded by kS8TailPad bytes).
constexpr int kS8Channels = 32;
constexpr int kS8BlockGroups = 16;
constexpr int64_t kS8BlockBytes = kS8BlockGroups * (kS8Channels * 2 + 12);
constexpr int64_t kS8TailPad = 64;
// Code of the position pair i0 < i1 (index into a group's x-pair table).
constexpr int s24_pair_code(int i0, int i1) { return i0 == 0 ? i1 - 1 : i0 == 1 ? i1 + 1 : 5; }

struct S24S8Panels {
  const uint8_t* data = nullptr;
  int64_t kblocks = 0;      // blocks of 16 groups
  int64_t panel_bytes = 0;  // kblocks * kS8BlockBytes: one super-panel
  const uint8_t* block(int64_t sp, int64_t b) const { return data + sp * panel_bytes + b * kS8BlockBytes; }
};

// One row of s8 x [k] (k a multiple of 4) -> tab [groups_pad][8] s32 (groups past k/4 zero).
using S24XTableFn = void (*)(const int8_t* x, int64_t k, int64_t groups_pad, int32_t* tab);
// acc[r * ld_acc + (sp - sp0) * 32 + c] += channel c's exact dot products over blocks [b0, b1),
// for rows [0, rows) (tables ldt s32 apart) and super-panels [sp0, sp1).
using S24S8Fn = void (*)(const int32_t* tab, int64_t ldt, int64_t rows, const S24S8Panels& w, int64_t sp0,
                         int64_t sp1, int64_t b0, int64_t b1, int32_t* acc, int64_t ld_acc);

// ---- s8 large-m kernel: rows in the vector lanes ----------------------------------------------
// For many rows the s8 kernel above pays one vpermd per vpmaddwd (8 channels x 2 kept k). The
// rows kernel instead walks one 64-row panel of x (kRowPanel rows, row-major s8, ldx apart) and
// builds, per k range of kS8RowsRangeGroups groups, a table in scratch:
//   rt[g][t][64] s32 = u16(x[r][4g + i0(t)]) | x[r][4g + i1(t)] << 16   (t = the 6 pair codes)
// (1.5 KB per group), read in k chunks of kS8RowsChunkGroups groups (a 12 KB slice, hot in L1
// while a block of channels runs over it; see docs/design.md). Per channel and group: one broadcast of the
// channel's two kept values as an s16 pair (vpbroadcastw + vpmovsxbw), the table entry of its
// pair code (offset = code * 256 bytes, 2 ALU ops from the packed code word), and per 8 rows one
// vpmaddwd with that entry as memory operand + vpaddd: 16 useful multiply-adds per vpmaddwd, the
// dense exact kernel's rate, on the kept half only. Packed layout unchanged (the s8 super-panels
// above). acc[(sp - sp0) * 32 + c][64] (row r at + r) = channel c's exact dot products over the
// whole depth (overwritten; rows past `rows` are 0); scratch: kS8RowsScratchBytes, 64-aligned.
constexpr int kS8RowsChunkGroups = 8;
constexpr int64_t kS8RowsGroupBytes = 6 * kRowPanel * 4;
// ---- avx512 twin (x86/avx512/sparse24_s8.cc, AVX-512 VNNI + VBMI): u8 x s8 vpdpbusd ----------
// Same contract except acc's layout (row-major per super-panel: Sparse24Kernels::s8_rows_row_major);
// channels in the lanes: per super-panel, chunks of kS8Rows512ChunkBlocks blocks
// are decoded into per group pair index / value vectors (256 bytes: 8 KB per chunk), then every
// 8-row tile of the panel runs one vpermb (gathering each channel's 4 kept x of the pair from the
// row's 64 x bytes) + one vpdpbusd (its 4 kept s8 weights) per 16 channels; the tile's sums live in
// acc itself (row-major per super-panel) between chunks, so the panel's x chunk (16 KB) is reused
// by every super-panel of the call. Up to 32 rows it instead decodes each pair in registers and
// applies it to <= 8 rows at once (no decoded chunk in memory), so the avx512 ISA runs it from
// m = 1 on (s8_rows_min_m = 1) and never the tiled s8_mm.
constexpr int kS8Rows512ChunkBlocks = 4;
constexpr int kS8RowsMaxPanels = 16;  // super-panels per call (sp1 - sp0) the avx512 kernel's scratch holds sums of
constexpr int64_t kS8Rows512ScratchBytes =  // decoded chunk, the panel's x chunk biased to u8, weight sums
    kS8Rows512ChunkBlocks * 8 * 256 + kRowPanel * kS8Rows512ChunkBlocks * 64 + kS8RowsMaxPanels * kS8Channels * 4;
// AVX2 walk (session 5, s24h): the table is built once per k range of kS8RowsRangeGroups groups
// (192 KB of scratch, in L2) and the channels run in blocks of kS8RowsBlockPanels super-panels
// (64 channels: 16 KB of accumulators) chunk by chunk over the range. Chunks of 8 groups (12 KB
// slices) measured ~8 % faster than 4 (bare kernel 0.23 against 0.25 ns per vpmaddwd); 16 slower.
constexpr int kS8RowsRangeGroups = 128;
constexpr int kS8RowsBlockPanels = 2;
constexpr int64_t kS8RowsScratchBytes = kS8Rows512ScratchBytes > kS8RowsRangeGroups * kS8RowsGroupBytes
                                            ? kS8Rows512ScratchBytes
                                            : kS8RowsRangeGroups * kS8RowsGroupBytes;
static_assert(kS8RowsScratchBytes % 64 == 0, "per-thread scratch pieces stay 64-byte aligned");
using S24S8RowsFn = void (*)(const int8_t* x, int64_t ldx, int64_t rows, int64_t k, const S24S8Panels& w,
                             int64_t sp0, int64_t sp1, int32_t* acc, void* scratch);

// ---- output of the rows kernels (session 5, s24h) ---------------------------------------------
// acc channel-major, acc[c * kRowPanel + r] (c < ncols, r < rows <= kRowPanel; the float rows
// kernel's acc, and the AVX2 / ref s8 rows kernels' acc across super-panels), to row-major
// y[r * ldy + c] of dtype odt. Float acc (s32_acc false): the value itself (RNE to f16 / bf16).
// s32 acc: odt s32 the value itself, else (float(v) * scale[c]) * pts[r] in f32 (pts null: no
// second product), then RNE to odt: the op's scalar epilogue, so every ISA gives ref's bits. acc
// must be readable up to channel ncols rounded up to 8 and to kRowPanel rows (the AVX2 version
// transposes 8 x 8 tiles: the strided scalar gather cost ~5 % of an s8 m = 512 call).
using S24RowsOutFn = void (*)(const void* acc, bool s32_acc, int64_t rows, int64_t ncols, const float* scale,
                              const float* pts, DType odt, void* y, int64_t ldy);

struct Sparse24Kernels {
  Isa isa;
  S24FloatFn float_mm;
  S24RowsFn float_rows;  // large m (ops/sparse24.cc picks it from kS24RowsMinM rows on)
  S24XTableFn s8_xtable;
  S24S8Fn s8_mm;
  S24S8RowsFn s8_rows;  // large m (ops/sparse24.cc: kS24S8RowsMinM)
  // Layout of s8_rows's acc: false = channel-major acc[c][64] (the contract above); true = row-major
  // per super-panel, acc[(sp - sp0) * 32 * 64 + r * 32 + c] (the avx512 kernel's natural layout:
  // channels in the lanes; saves a transpose there and in the op's epilogue).
  bool s8_rows_row_major = false;
  // Smallest m for which ops/ runs s8_rows instead of the tiled s8_mm (the op caps it at 40;
  // the avx512 kernel: 1).
  int64_t s8_rows_min_m = 40;
  S24RowsOutFn rows_out = nullptr;  // output of the channel-major rows kernels (see S24RowsOutFn)
};

const Sparse24Kernels& sparse24_kernels(Isa isa);

namespace ref {
void s24_rows_out(const void* acc, bool s32_acc, int64_t rows, int64_t ncols, const float* scale, const float* pts,
                  DType odt, void* y, int64_t ldy);
void s24_float_mm(const float* x, int64_t ldx, int64_t rows, const S24Panels& w, int64_t p0, int64_t p1,
                  int64_t kb0, int64_t kb1, float* acc, int64_t ld_acc);
void s24_float_rows(const float* xp, const S24Panels& w, int64_t p0, int64_t p1, int64_t kb0, int64_t kb1, float* acc);
void s24_s8_xtable(const int8_t* x, int64_t k, int64_t groups_pad, int32_t* tab);
void s24_s8_mm(const int32_t* tab, int64_t ldt, int64_t rows, const S24S8Panels& w, int64_t sp0, int64_t sp1,
               int64_t b0, int64_t b1, int32_t* acc, int64_t ld_acc);
void s24_s8_rows(const int8_t* x, int64_t ldx, int64_t rows, int64_t k, const S24S8Panels& w, int64_t sp0, int64_t sp1,
                 int32_t* acc, void* scratch);
}  // namespace ref
namespace avx2 {
void s24_rows_out(const void* acc, bool s32_acc, int64_t rows, int64_t ncols, const float* scale, const float* pts,
                  DType odt, void* y, int64_t ldy);
void s24_float_mm(const float* x, int64_t ldx, int64_t rows, const S24Panels& w, int64_t p0, int64_t p1,
                  int64_t kb0, int64_t kb1, float* acc, int64_t ld_acc);
void s24_float_rows(const float* xp, const S24Panels& w, int64_t p0, int64_t p1, int64_t kb0, int64_t kb1, float* acc);
void s24_s8_xtable(const int8_t* x, int64_t k, int64_t groups_pad, int32_t* tab);
void s24_s8_mm(const int32_t* tab, int64_t ldt, int64_t rows, const S24S8Panels& w, int64_t sp0, int64_t sp1,
               int64_t b0, int64_t b1, int32_t* acc, int64_t ld_acc);
void s24_s8_rows(const int8_t* x, int64_t ldx, int64_t rows, int64_t k, const S24S8Panels& w, int64_t sp0, int64_t sp1,
                 int32_t* acc, void* scratch);
}  // namespace avx2
namespace avx512 {
// zmm rows kernel (x86/avx512/sparse24.cc): two pairs' accumulators at once, same bits as ref.
void s24_float_rows(const float* xp, const S24Panels& w, int64_t p0, int64_t p1, int64_t kb0, int64_t kb1, float* acc);
// s8 rows kernel on vpdpbusd (x86/avx512/sparse24_s8.cc; needs AVX-512 VBMI too: the table
// picks it only where cpu_features().avx512vbmi). sp1 - sp0 <= kS8RowsMaxPanels.
void s24_s8_rows(const int8_t* x, int64_t ldx, int64_t rows, int64_t k, const S24S8Panels& w, int64_t sp0, int64_t sp1,
                 int32_t* acc, void* scratch);
}  // namespace avx512

}  // namespace qllm::kernels
