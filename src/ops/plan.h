// Internal helpers shared by the operators' planning code.
#pragma once

#include <algorithm>
#include <cstdint>

namespace qllm {

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Index g with prefix[g] <= item < prefix[g + 1] (prefix has G + 1 non-decreasing entries).
inline int64_t find_group(const int64_t* prefix, int64_t G, int64_t item) {
  return static_cast<int64_t>(std::upper_bound(prefix, prefix + G + 1, item) - prefix) - 1;
}

}  // namespace qllm
