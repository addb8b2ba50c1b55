// qllm::Error — the one exception type of the library.
//
// Every rejected input raises an Error that names the operator, the argument, what was expected
// and what was given, so that a user reading only the message can fix the call.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace qllm {

enum class ErrorKind { InvalidArgument, OutOfMemory, Io, Format, Internal };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, std::string op, std::string arg, const std::string& message)
      : std::runtime_error(op.empty() ? message : op + ": " + message),
        kind_(kind), op_(std::move(op)), arg_(std::move(arg)) {}

  ErrorKind kind() const noexcept { return kind_; }
  const std::string& op() const noexcept { return op_; }    // e.g. "grouped_matmul"
  const std::string& arg() const noexcept { return arg_; }  // e.g. "group_list"

 private:
  ErrorKind kind_;
  std::string op_;
  std::string arg_;
};

namespace detail {
inline void format_into(std::ostringstream&) {}
template <class T, class... Rest>
void format_into(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  format_into(os, rest...);
}
}  // namespace detail

// Throws InvalidArgument for `op`/`arg` with a message built from the remaining pieces.
template <class... Parts>
[[noreturn]] void throw_invalid(const std::string& op, const std::string& arg,
                                const Parts&... parts) {
  std::ostringstream os;
  detail::format_into(os, parts...);
  throw Error(ErrorKind::InvalidArgument, op, arg, os.str());
}

}  // namespace qllm
