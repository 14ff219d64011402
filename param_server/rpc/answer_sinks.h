#pragma once

// The AnswerSink of a same-host worker: the response region its request offered in its attached
// shared-memory arena.

#include <cstdint>
#include <span>
#include <vector>

#include "param_server/server/answer_sink.h"

namespace meft::rpc {

// Places the answer's tensors one after another from `begin`, each at a multiple of
// wire::kAnswerAlignment, within [begin, begin + capacity) of the memory at `base`; offsets count
// from `base` (the arena's start). The caller has checked that the range lies inside the mapped
// arena, which must stay mapped while the sink is used. Not thread-safe: one lookup uses it.
class RegionAnswerSink : public server::AnswerSink {
 public:
  RegionAnswerSink(uint8_t* base, uint64_t begin, uint64_t capacity)
      : base_(base), begin_(begin), capacity_(capacity) {}

  bool Reserve(std::span<const wire::AnswerTensorLayout> layout) override;
  // Aborts for an index Reserve did not accept: writing outside the checked layout would write
  // into memory another process offered for something else.
  char* Place(size_t index, uint64_t* offset) override;

 private:
  uint8_t* const base_;
  const uint64_t begin_;
  const uint64_t capacity_;
  std::vector<uint64_t> offsets_;  // of each reserved tensor; empty until Reserve succeeds
};

}  // namespace meft::rpc
