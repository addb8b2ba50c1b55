#include "qllm/core/context.h"

#include "kernels/kernels.h"
#include "qllm/core/error.h"

namespace qllm {

Context::Context(const ContextOptions& options)
    : pool_(options.threads), isa_(options.isa_auto ? default_isa() : options.isa) {
  if (!isa_supported(isa_))
    throw_invalid("Context", "isa", "ISA ", isa_name(isa_), " is not supported by this CPU");
  kernels_ = &kernels::table(isa_);
}

Workspace& Context::workspace(size_t bytes) {
  arena_.reserve(bytes);
  arena_.reset();
  return arena_;
}

}  // namespace qllm
