#include "param_server/rpc/answer_sinks.h"

#include <spdlog/spdlog.h>

#include <cstdlib>
#include <utility>

namespace meft::rpc {

bool RegionAnswerSink::Reserve(std::span<const wire::AnswerTensorLayout> layout) {
  offsets_.clear();
  if (base_ == nullptr) return false;
  const uint64_t end = begin_ + capacity_;
  uint64_t at = begin_;
  std::vector<uint64_t> offsets;
  offsets.reserve(layout.size());
  for (const wire::AnswerTensorLayout& t : layout) {
    at = wire::AlignAnswer(at);
    if (at > end || t.bytes > end - at) return false;
    offsets.push_back(at);
    at += t.bytes;
  }
  offsets_ = std::move(offsets);
  return true;
}

char* RegionAnswerSink::Place(size_t index, uint64_t* offset) {
  if (index >= offsets_.size()) {
    spdlog::critical("RegionAnswerSink: tensor {} was not in the reserved layout of {} tensors",
                     index, offsets_.size());
    std::abort();
  }
  *offset = offsets_[index];
  return reinterpret_cast<char*>(base_ + offsets_[index]);
}

}  // namespace meft::rpc
