// Test entry point: a run asked (QLLM_ISA) for an instruction set this CPU lacks is skipped
// with exit code 77, which ctest reports as "skipped" (SKIP_RETURN_CODE).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>

#include "qllm/core/cpu.h"
#include "qllm/core/error.h"

int main(int argc, char** argv) {
  if (const char* env = std::getenv("QLLM_ISA"); env && *env) {
    try {
      if (!qllm::isa_supported(qllm::parse_isa(env))) {
        std::printf("QLLM_ISA=%s: not supported by this CPU or build; skipped\n", env);
        return 77;
      }
    } catch (const qllm::Error& e) {
      std::printf("%s\n", e.what());
      return 1;
    }
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
