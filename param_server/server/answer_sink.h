#pragma once

// Memory of the caller's that a lookup's answer may be written into instead of the reply's own
// bytes, the way Triton's response allocator lets a frontend decide where outputs go. For a
// same-host worker it is the shared-memory region the request offered; param_server/rpc
// implements it (answer_sinks.h), so the domain code never sees the arena.

#include <cstddef>
#include <cstdint>
#include <span>

#include "common/wire/lookup_layout.h"

namespace meft::server {

class AnswerSink {
 public:
  virtual ~AnswerSink() = default;

  // Offered the answer's whole layout (common/wire/lookup_layout.h) before any byte is written.
  // True: every tensor goes into the sink, and Place is then called once per tensor, in layout
  // order. False (it does not fit): the answer is built in the reply's own bytes instead.
  virtual bool Reserve(std::span<const wire::AnswerTensorLayout> layout) = 0;

  // After Reserve returned true: where tensor `index` of the reserved layout goes (room for its
  // bytes), and in `*offset` the offset the reply reports for it (placed_offset).
  virtual char* Place(size_t index, uint64_t* offset) = 0;
};

}  // namespace meft::server
