#pragma once

// C++ face of SentencePiece for gpu_worker/tokenizer, private to that folder; code elsewhere uses
// meft::worker::Tokenizer (tokenizer.h).
//
// SentencePiece itself lives in the loadable module libmeft_spm_shim.so (see sentencepiece_shim.h
// for why it cannot be linked into a worker process). The first use loads the module with
// dlopen(RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND), looking in this order for
//   <directory of the executable>/libmeft_spm_shim.so,
//   <directory of the executable>/../lib/libmeft_spm_shim.so,
//   the build-tree path compiled in as MEFT_SPM_SHIM_PATH,
//   libmeft_spm_shim.so on the dynamic loader's search path,
// and keeps it loaded for the life of the process. This header uses only std types.
//
// Errors are reported as a message string: empty means success. Nothing here throws.

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace meft::worker::spm_bridge {

// Owns one loaded SentencePiece model. Thread-safety: after LoadFromSerialized returns, the const
// methods may be called concurrently (SentencePieceProcessor's encode/decode are const). The
// accessors require a successful LoadFromSerialized.
class Processor {
 public:
  Processor();
  ~Processor();
  Processor(const Processor&) = delete;
  Processor& operator=(const Processor&) = delete;

  // Parses a serialized ModelProto (the bytes of a tokenizer.model file). Returns "" on success,
  // otherwise SentencePiece's message, or why the module could not be loaded. Call once, before
  // any other method.
  std::string LoadFromSerialized(std::string_view serialized);

  // Encodes `text` into piece ids (no BOS/EOS). Returns "" on success.
  std::string Encode(std::string_view text, std::vector<int>* ids) const;

  // Decodes ids (each in [0, piece_size())) into text. Returns "" on success.
  std::string Decode(const std::vector<int>& ids, std::string* text) const;

  int piece_size() const;
  // Special ids as stored in the model; -1 where the model disables one.
  int unk_id() const;
  int bos_id() const;
  int eos_id() const;
  int pad_id() const;
  // Requires 0 <= id < piece_size().
  std::string IdToPiece(int id) const;

 private:
  // Handle from the module's create(); null until LoadFromSerialized.
  void* handle_ = nullptr;
};

// Runs SentencePieceTrainer::Train with the given option map (SentencePiece's flag names, e.g.
// {"vocab_size", "320"}) on `sentences`, after seeding SentencePiece's global random generator
// with `seed`. On success stores the serialized ModelProto in `*serialized_model` and returns "";
// no file is written. Not thread-safe: the random seed is process-wide SentencePiece
// state.
std::string Train(const std::vector<std::pair<std::string, std::string>>& options,
                  const std::vector<std::string>& sentences, uint32_t seed,
                  std::string* serialized_model);

}  // namespace meft::worker::spm_bridge
