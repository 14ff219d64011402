// Tokenizer::Load: chooses the backend for a path. In its own file so that the tokenizer.json
// backend builds without SentencePiece (tests/fuzz links it alone).

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/io/file_util.h"
#include "common/status.h"
#include "gpu_worker/tokenizer/hf/json_ref.h"
#include "gpu_worker/tokenizer/hf_tokenizer.h"
#include "gpu_worker/tokenizer/sentencepiece_tokenizer.h"
#include "gpu_worker/tokenizer/tokenizer.h"

namespace meft::worker {
namespace {

bool IsDirectory(const std::string& path) {
  // ListDirectory succeeds only for directories; cheap enough for a one-off load.
  return io::ListDirectory(path).ok();
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (!dir.empty() && dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

// add_bos_token / add_eos_token of `dir`/tokenizer_config.json, when the file exists.
absl::StatusOr<SentencePieceOptions> ReadSentencePieceOptions(const std::string& dir) {
  SentencePieceOptions options;
  const std::string path = JoinPath(dir, "tokenizer_config.json");
  if (!io::PathExists(path)) return options;
  MEFT_ASSIGN_OR_RETURN(const std::string text, io::ReadFile(path));
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON: ", e.what()));
  }
  const hf::JsonRef root(json, path);
  MEFT_RETURN_IF_ERROR(root.RequireObject());
  MEFT_ASSIGN_OR_RETURN(options.add_bos_token, root["add_bos_token"].BoolOr(true));
  MEFT_ASSIGN_OR_RETURN(options.add_eos_token, root["add_eos_token"].BoolOr(false));
  return options;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePiece(const std::string& file,
                                                             const std::string& dir) {
  absl::StatusOr<std::string> bytes = io::ReadFile(file);
  if (!bytes.ok()) {
    return absl::Status(bytes.status().code(),
                        absl::StrCat("cannot read tokenizer model: ", bytes.status().message()));
  }
  MEFT_ASSIGN_OR_RETURN(const SentencePieceOptions options, ReadSentencePieceOptions(dir));
  MEFT_ASSIGN_OR_RETURN(auto tokenizer,
                        SentencePieceTokenizer::FromSerialized(*bytes, file, options));
  return std::unique_ptr<Tokenizer>(std::move(tokenizer));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  if (IsDirectory(path)) {
    const std::string json = JoinPath(path, "tokenizer.json");
    if (io::PathExists(json)) {
      MEFT_ASSIGN_OR_RETURN(auto tokenizer, HfTokenizer::LoadFile(json));
      return std::unique_ptr<Tokenizer>(std::move(tokenizer));
    }
    const std::string model = JoinPath(path, "tokenizer.model");
    if (!io::PathExists(model)) {
      return absl::NotFoundError(
          absl::StrCat("no tokenizer in ", path, ": neither ", json, " nor ", model, " exists"));
    }
    return LoadSentencePiece(model, path);
  }
  if (absl::EndsWith(path, ".json")) {
    MEFT_ASSIGN_OR_RETURN(auto tokenizer, HfTokenizer::LoadFile(path));
    return std::unique_ptr<Tokenizer>(std::move(tokenizer));
  }
  const size_t slash = path.rfind('/');
  return LoadSentencePiece(path, slash == std::string::npos ? "." : path.substr(0, slash));
}

}  // namespace meft::worker
