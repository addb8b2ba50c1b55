#include "kernels/kernels.h"
#include "qllm/core/error.h"

namespace qllm::kernels {

const KernelTable& table(Isa isa) {
  switch (isa) {
    case Isa::ref: return ref_table();
    case Isa::avx2:
#if QLLM_HAVE_AVX2
      return avx2_table();
#else
      break;
#endif
    case Isa::avx512:
#if QLLM_HAVE_AVX2
      return avx512_table();
#else
      break;
#endif
  }
  throw_invalid("qllm", "isa", "ISA ", isa_name(isa), " was not compiled into this build");
}

}  // namespace qllm::kernels
