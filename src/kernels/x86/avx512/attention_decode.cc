// Decode kernel of the avx512 ISA: x86/avx2/attention_decode.cc compiled once more with AVX-512
// F/BW/VL + VNNI. The s8 path's exact int32 dot products use vpdpbusd (q.k of 16 keys per pass on
// biased, register-transposed K bytes; P.V with 7-bit weights), which give the same integer sums
// as the AVX2 forms, and the float passes use zmm with the AVX2 kernel's operations in the same
// order, so the results are bit-identical to the AVX2 and reference kernels (tests compare them).
#define QLLM_ATTN_VNNI 1
// g++ 12 warns about the undefined upper half inside its own _mm512 cast/convert/reduce intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "kernels/x86/avx2/attention_decode.cc"
