// Umbrella header: everything a C++ user of qllm needs.
#pragma once

#include "qllm/core/arena.h"
#include "qllm/core/context.h"
#include "qllm/core/cpu.h"
#include "qllm/core/dtype.h"
#include "qllm/core/error.h"
#include "qllm/core/tensor.h"
#include "qllm/core/thread_pool.h"
#include "qllm/ops/grouped_matmul.h"
#include "qllm/ops/moe_ffn.h"
#include "qllm/ops/packed.h"
#include "qllm/ops/quant.h"
#include "qllm/ops/norm.h"
#include "qllm/ops/attention.h"
#include "qllm/engine/kv_block_allocator.h"
