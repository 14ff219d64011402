#include "gpu_worker/tokenizer/tokenizer.h"

#include "absl/strings/str_cat.h"

namespace meft::worker {

Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::vector<int64_t>> Tokenizer::EncodeTrusted(std::string_view text) const {
  const TextSpan all{0, text.size()};
  return Encode(text, std::span<const TextSpan>(&all, 1));
}

absl::Status Tokenizer::set_pad_id(int64_t id) {
  if (id < 0 || id >= vocab_size_) {
    return absl::InvalidArgumentError(absl::StrCat("pad_token_id ", id, " is outside [0, ",
                                                   vocab_size_, ") of tokenizer ", source_));
  }
  pad_id_ = id;
  return absl::OkStatus();
}

}  // namespace meft::worker
