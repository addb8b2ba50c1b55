// The int8 GEMM epilogues (s32 / dequant / SwiGLU) on an s32 tile: AVX2 code shared by every
// x86 int8 kernel. A kernel computes an mr x 16 tile of panel p into c[mr][16] (exact s32
// values) and calls this.
#pragma once

#include <cstdint>

#include "kernels/kernels.h"

namespace qllm::kernels::avx2 {

void int8_epilogue(const int32_t* c, int mr, int64_t r0, int64_t p, const Int8Epilogue& ep);

}  // namespace qllm::kernels::avx2
