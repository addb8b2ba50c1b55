// Attention kernels of the avx512 ISA: the AVX2 kernels (x86/avx2/attention.cc) compiled once
// more with AVX-512 VL + VNNI. Only the s8 decode path changes: its exact int32 dot products use
// vpdpwssd (q.k, int16 pairs) and vpdpbusd (P.V, 7-bit weights x s8 values), which fuse the
// multiply and the add of the AVX2 forms and give the same sums, and its P.V accumulates 4 rows
// at a time in the 32 vector registers. Every float operation is the AVX2 kernel's, so the
// results are bit-identical to the AVX2 and reference kernels (tests compare them).
#define QLLM_ATTN_VNNI 1
// g++ 12 warns about the undefined upper half inside its own _mm512 cast/convert/reduce intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "kernels/x86/avx2/attention.cc"
