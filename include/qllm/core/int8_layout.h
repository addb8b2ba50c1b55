// How int8 weight panels group the reduction axis (docs/packed-layout.md): in pairs for the
// AVX2 and reference kernels (vpmaddwd), in quads for the AVX-512 VNNI kernel (vpdpbusd).
// A packed weight records its layout; an ISA reads the layout its kernel table names.
#pragma once

#include <cstdint>

#include "qllm/core/cpu.h"

namespace qllm {

enum class Int8Layout : uint8_t { pairs, quads };

constexpr int64_t int8_group(Int8Layout l) { return l == Int8Layout::pairs ? 2 : 4; }
inline const char* int8_layout_name(Int8Layout l) { return l == Int8Layout::pairs ? "pairs" : "quads"; }
// The layout the given ISA's int8 kernel reads.
constexpr Int8Layout int8_layout_for(Isa isa) { return isa == Isa::avx512 ? Int8Layout::quads : Int8Layout::pairs; }

}  // namespace qllm
