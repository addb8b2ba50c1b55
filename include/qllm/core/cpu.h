// CPU feature detection and the instruction-set choice.
//
// The ISA is chosen once at start-up from cpuid: the best one this build has and the CPU runs.
// QLLM_ISA=ref|avx2|avx512 forces one (an unknown or unsupported name is an error, not a silent
// fallback). A Context may also name its ISA explicitly, which is how the tests compare kernels.
#pragma once

#include <string>
#include <vector>

namespace qllm {

// avx512 = the avx2 set plus AVX-512 F/BW/VL and VNNI (its int8 GEMM uses vpdpbusd).
enum class Isa { ref, avx2, avx512 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512vnni = false, avx_vnni = false, amx_int8 = false;
  bool avx512vbmi = false;  // vpermb / vpmultishiftqb (the avx512 s8 2:4 rows kernel)
  std::string brand;
};

const CpuFeatures& cpu_features();
const char* isa_name(Isa isa);
Isa parse_isa(const std::string& name);  // throws Error for unknown names
bool isa_supported(Isa isa);             // compiled in and runnable on this CPU
std::vector<Isa> supported_isas();       // ascending, ref first
Isa default_isa();                       // QLLM_ISA if set (validated), else the best supported

}  // namespace qllm
