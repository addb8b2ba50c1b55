// Attention tile kernels (flash / paged prefill) of the avx512 ISA: x86/avx2/attention.cc compiled
// once more with AVX-512 F/BW/VL + VNNI. Its QLLM_ATTN_VNNI paths use zmm (an 8-key interleaved
// K tile, 4 rows x 8 keys of score chains, 4 x 64 dims of P.V, 16-lane exp) with the same float
// operations in the same order, so the results are bit-identical to the AVX2 and reference
// kernels (tests compare them). The decode kernel is x86/avx512/attention_decode.cc.
#define QLLM_ATTN_VNNI 1
// g++ 12 warns about the undefined upper half inside its own _mm512 cast/convert/reduce intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "kernels/x86/avx2/attention.cc"
