#include "gpu_worker/tokenizer/hf_tokenizer.h"

#include <algorithm>
#include <array>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/io/file_util.h"
#include "common/status.h"
#include "gpu_worker/tokenizer/hf/json_ref.h"
#include "gpu_worker/tokenizer/hf/utf8.h"

namespace meft::worker {
namespace {

using hf::AddedToken;
using hf::JsonRef;
using hf::Quote;
using Json = nlohmann::json;

// What transformers' tokenizer classes contribute (transformers 4.57).
struct TokenizerClass {
  std::string_view name;  // without the "Fast" suffix
  // The class rebuilds tokenizer.json's post-processor from add_bos_token / add_eos_token.
  bool rebuilds_post_processor;
  bool add_bos_default;
  // Default special tokens; empty = none.
  std::string_view bos, eos, unk, pad;
};

constexpr std::array<TokenizerClass, 5> kClasses = {{
    {"LlamaTokenizer", true, true, "<s>", "</s>", "<unk>", ""},
    {"CodeLlamaTokenizer", true, true, "<s>", "</s>", "<unk>", ""},
    {"GPT2Tokenizer", false, false, "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", ""},
    {"Qwen2Tokenizer", false, false, "", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"},
    {"PreTrainedTokenizer", false, false, "", "", "", ""},
}};

// AutoTokenizer's choice for a config.json model_type when tokenizer_config.json names none.
std::string_view ClassForModelType(std::string_view model_type) {
  if (model_type == "llama" || model_type == "mistral" || model_type == "mixtral") {
    return "LlamaTokenizer";
  }
  if (model_type == "gpt2") return "GPT2Tokenizer";
  if (model_type == "qwen2") return "Qwen2Tokenizer";
  return "PreTrainedTokenizer";
}

absl::StatusOr<Json> ParseJsonFile(const std::string& text, const std::string& path) {
  Json json;
  try {
    json = Json::parse(text);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON: ", e.what()));
  }
  if (!json.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": expected a JSON object, got ", json.type_name()));
  }
  return json;
}

// A special-token entry: a string, {"content": ...}, or null / absent (nullopt).
absl::StatusOr<std::optional<std::string>> SpecialTokenContent(const JsonRef& json) {
  if (json.is_null()) return std::nullopt;
  if (json.json().is_object()) {
    MEFT_ASSIGN_OR_RETURN(std::string content, json["content"].String());
    return content;
  }
  MEFT_ASSIGN_OR_RETURN(std::string content, json.String());
  return content;
}

// Reads an added token object {"content", "single_word", "lstrip", "rstrip", "normalized",
// "special"} (transformers' defaults where a flag is absent: normalized = !special).
absl::StatusOr<AddedToken> ParseAddedToken(const JsonRef& json) {
  MEFT_RETURN_IF_ERROR(json.RequireObject());
  AddedToken token;
  MEFT_ASSIGN_OR_RETURN(token.content, json["content"].String());
  if (token.content.empty()) return json["content"].Invalid("an added token cannot be empty");
  MEFT_ASSIGN_OR_RETURN(token.special, json["special"].BoolOr(false));
  MEFT_ASSIGN_OR_RETURN(token.normalized, json["normalized"].BoolOr(!token.special));
  MEFT_ASSIGN_OR_RETURN(token.lstrip, json["lstrip"].BoolOr(false));
  MEFT_ASSIGN_OR_RETURN(token.rstrip, json["rstrip"].BoolOr(false));
  MEFT_ASSIGN_OR_RETURN(token.single_word, json["single_word"].BoolOr(false));
  return token;
}

// Whether tokenizer.json looks like transformers' LlamaConverter output for add_prefix_space
// `add`: with `legacy`, a Prepend("▁") normalizer (alone or in a Sequence) exactly when `add`;
// without, a Metaspace pre-tokenizer with prepend_scheme "first" (add) or "never".
absl::StatusOr<bool> AgreesWithAddPrefixSpace(const JsonRef& root, bool add, bool legacy) {
  if (legacy) {
    const JsonRef normalizer = root["normalizer"];
    bool has_prepend = false;
    auto is_prepend = [](const JsonRef& n) {
      return !n.is_null() && n.json().is_object() && n.json().value("type", "") == "Prepend" &&
             n.json().value("prepend", "") == "\xE2\x96\x81";
    };
    if (is_prepend(normalizer)) has_prepend = true;
    if (!normalizer.is_null() && normalizer.json().is_object() &&
        normalizer.json().value("type", "") == "Sequence") {
      MEFT_ASSIGN_OR_RETURN(const size_t n, normalizer["normalizers"].ArraySize());
      for (size_t i = 0; i < n; ++i)
        has_prepend = has_prepend || is_prepend(normalizer["normalizers"].At(i));
    }
    return has_prepend == add;
  }
  const JsonRef pre = root["pre_tokenizer"];
  if (pre.is_null() || !pre.json().is_object() || pre.json().value("type", "") != "Metaspace") {
    return false;
  }
  return pre.json().value("prepend_scheme", "") == (add ? "first" : "never");
}

// transformers' clean_up_tokenization.
std::string CleanUpTokenizationSpaces(std::string text) {
  static constexpr std::array<std::pair<std::string_view, std::string_view>, 10> kRules = {{
      {" .", "."},
      {" ?", "?"},
      {" !", "!"},
      {" ,", ","},
      {" ' ", "'"},
      {" n't", "n't"},
      {" 'm", "'m"},
      {" 's", "'s"},
      {" 've", "'ve"},
      {" 're", "'re"},
  }};
  for (const auto& [from, to] : kRules) {
    std::string out;
    size_t previous = 0;
    for (size_t pos = text.find(from); pos != std::string::npos; pos = text.find(from, previous)) {
      out.append(text, previous, pos - previous);
      out.append(to);
      previous = pos + from.size();
    }
    out.append(text, previous);
    text = std::move(out);
  }
  return text;
}

// The special tokens read from tokenizer_config.json, special_tokens_map.json and config.json.
struct SideConfig {
  const TokenizerClass* cls = nullptr;
  // bos, eos, unk, pad (kSpecialKeys order): content, and where it was read for messages
  // ("<file>: <path>: ").
  std::array<std::optional<std::string>, 4> specials;
  std::array<std::string, 4> special_where;
  std::vector<std::pair<std::string, std::string>> additional;  // (content, where)
};

constexpr std::array<std::string_view, 4> kSpecialKeys = {"bos_token", "eos_token", "unk_token",
                                                          "pad_token"};

}  // namespace

absl::StatusOr<std::unique_ptr<HfTokenizer>> HfTokenizer::Create(const HfTokenizerFiles& files) {
  const std::string& path = files.tokenizer_json_path;
  MEFT_ASSIGN_OR_RETURN(const Json document, ParseJsonFile(files.tokenizer_json, path));
  const JsonRef root(document, path);

  MEFT_ASSIGN_OR_RETURN(hf::BpeModel model, hf::BpeModel::FromJson(root["model"]));
  std::unique_ptr<HfTokenizer> t(new HfTokenizer(path, std::move(model)));
  MEFT_ASSIGN_OR_RETURN(t->normalizer_, hf::ParseNormalizer(root["normalizer"]));
  MEFT_ASSIGN_OR_RETURN(t->pre_tokenizer_, hf::ParsePreTokenizer(root["pre_tokenizer"]));
  MEFT_ASSIGN_OR_RETURN(t->decoder_, hf::ParseDecoder(root["decoder"]));
  MEFT_ASSIGN_OR_RETURN(const hf::PostProcessor post,
                        hf::ParsePostProcessor(root["post_processor"]));

  // Added tokens of tokenizer.json. A token in the vocabulary keeps its vocabulary id (and the
  // file must agree); one outside it takes the file's id, which no vocabulary entry may use.
  std::vector<AddedToken> added;
  absl::flat_hash_map<std::string, size_t> added_index;
  auto add_token = [&](AddedToken token, const JsonRef& where,
                       std::optional<int64_t> file_id) -> absl::Status {
    if (added_index.contains(token.content)) {
      return where.Invalid(absl::StrCat(Quote(token.content), " is an added token twice"));
    }
    const int32_t vocab_id = t->model_.TokenToId(token.content);
    if (vocab_id >= 0) {
      if (file_id.has_value() && *file_id != vocab_id) {
        return where.Invalid(absl::StrCat("id ", *file_id, " of ", Quote(token.content),
                                          " differs from its id ", vocab_id, " in model.vocab"));
      }
      token.id = vocab_id;
    } else {
      if (!file_id.has_value()) {
        return where.Invalid(absl::StrCat(Quote(token.content), " is not a token of ", path));
      }
      if (*file_id < 0 || *file_id > hf::kMaxTokenId || t->model_.IdToToken(*file_id) != nullptr) {
        return where.Invalid(absl::StrCat("id ", *file_id, " of ", Quote(token.content),
                                          " is out of range or taken by a vocabulary entry"));
      }
      token.id = static_cast<int32_t>(*file_id);
    }
    for (const AddedToken& other : added) {
      if (other.id == token.id) {
        return where.Invalid(absl::StrCat(Quote(token.content), " and ", Quote(other.content),
                                          " have the same id ", token.id));
      }
    }
    added_index[token.content] = added.size();
    added.push_back(std::move(token));
    return absl::OkStatus();
  };
  const JsonRef added_json = root["added_tokens"];
  if (!added_json.is_null()) {
    MEFT_ASSIGN_OR_RETURN(const size_t n, added_json.ArraySize());
    for (size_t i = 0; i < n; ++i) {
      const JsonRef entry = added_json.At(i);
      MEFT_ASSIGN_OR_RETURN(AddedToken token, ParseAddedToken(entry));
      MEFT_ASSIGN_OR_RETURN(const int64_t id, entry["id"].Int());
      MEFT_RETURN_IF_ERROR(add_token(std::move(token), entry, id));
    }
  }

  // The side files.
  SideConfig side;
  std::optional<Json> config_doc;
  std::optional<Json> map_doc;
  std::optional<Json> model_doc;
  if (files.tokenizer_config.has_value()) {
    MEFT_ASSIGN_OR_RETURN(config_doc,
                          ParseJsonFile(*files.tokenizer_config, files.tokenizer_config_path));
  }
  if (files.special_tokens_map.has_value()) {
    MEFT_ASSIGN_OR_RETURN(map_doc,
                          ParseJsonFile(*files.special_tokens_map, files.special_tokens_map_path));
  }
  if (files.model_config.has_value()) {
    MEFT_ASSIGN_OR_RETURN(model_doc, ParseJsonFile(*files.model_config, files.model_config_path));
  }
  const Json empty = Json::object();
  const JsonRef config(config_doc.has_value() ? *config_doc : empty, files.tokenizer_config_path);
  const JsonRef special_map(map_doc.has_value() ? *map_doc : empty, files.special_tokens_map_path);
  const JsonRef model_config(model_doc.has_value() ? *model_doc : empty, files.model_config_path);

  std::string class_name;
  if (!config["tokenizer_class"].is_null()) {
    MEFT_ASSIGN_OR_RETURN(class_name, config["tokenizer_class"].String());
  } else {
    MEFT_ASSIGN_OR_RETURN(const std::string model_type, model_config["model_type"].StringOr(""));
    class_name = ClassForModelType(model_type);
  }
  const std::string_view base_name =
      absl::EndsWith(class_name, "Fast")
          ? std::string_view(class_name).substr(0, class_name.size() - 4)
          : std::string_view(class_name);
  for (const TokenizerClass& cls : kClasses) {
    if (cls.name == base_name) side.cls = &cls;
  }
  if (side.cls == nullptr) {
    std::vector<std::string> known;
    for (const TokenizerClass& cls : kClasses)
      known.push_back(absl::StrCat(hf::AsAbsl(cls.name), "(Fast)"));
    return config["tokenizer_class"].Unsupported(absl::StrCat(
        "unsupported ", Quote(class_name), " (supported: ", absl::StrJoin(known, ", "), ")"));
  }

  // transformers' add_prefix_space. Llama-family classes rebuild the tokenizer from
  // tokenizer.model when it is set; the others replace the add_prefix_space of a top-level
  // ByteLevel pre-tokenizer by tokenizer_config.json's value (false when absent; null leaves it).
  const JsonRef prefix_space = config["add_prefix_space"];
  if (side.cls->rebuilds_post_processor) {
    if (!prefix_space.is_null()) {
      // transformers then converts tokenizer.model again; meft reads tokenizer.json, which is
      // that conversion when save_pretrained wrote both. Check the part the flag decides.
      MEFT_ASSIGN_OR_RETURN(const bool add, prefix_space.BoolOr(true));
      MEFT_ASSIGN_OR_RETURN(const bool legacy, config["legacy"].BoolOr(true));
      MEFT_ASSIGN_OR_RETURN(const bool agrees, AgreesWithAddPrefixSpace(root, add, legacy));
      if (!agrees) {
        return prefix_space.Unsupported(absl::StrCat(
            "add_prefix_space ", add ? "true" : "false", " with legacy ", legacy ? "true" : "false",
            " makes transformers rebuild this ", class_name, " from tokenizer.model with ",
            legacy ? (add ? "a Prepend(\"▁\") normalizer" : "no Prepend normalizer")
                   : (add ? "Metaspace prepend_scheme \"first\""
                          : "Metaspace prepend_scheme \"never\""),
            ", which ", path, " does not have; meft reads tokenizer.json as it is"));
      }
    }
  } else if (prefix_space.is_missing() || !prefix_space.is_null()) {
    MEFT_ASSIGN_OR_RETURN(const bool value, prefix_space.BoolOr(false));
    const JsonRef pre = root["pre_tokenizer"];
    if (!pre.is_null() && pre.json().is_object() && pre.json().value("type", "") == "ByteLevel") {
      MEFT_ASSIGN_OR_RETURN(const bool current, pre["add_prefix_space"].BoolOr(true));
      if (current != value) {
        Json replaced = pre.json();
        replaced["add_prefix_space"] = value;
        MEFT_ASSIGN_OR_RETURN(t->pre_tokenizer_,
                              hf::ParsePreTokenizer(JsonRef(replaced, files.tokenizer_json_path)));
      }
    }
  }

  // transformers reads special_tokens_map.json only when tokenizer_config.json has no
  // added_tokens_decoder, and then its entries win.
  const bool legacy = config["added_tokens_decoder"].is_missing();
  const std::array<std::string_view, 4> class_defaults = {side.cls->bos, side.cls->eos,
                                                          side.cls->unk, side.cls->pad};
  for (size_t k = 0; k < kSpecialKeys.size(); ++k) {
    JsonRef source = config[kSpecialKeys[k]];
    if (legacy && !special_map[kSpecialKeys[k]].is_missing()) source = special_map[kSpecialKeys[k]];
    if (source.is_missing()) {
      side.special_where[k] =
          absl::StrCat(files.tokenizer_config_path, ": ", hf::AsAbsl(kSpecialKeys[k]), ": ");
      if (!class_defaults[k].empty()) {
        side.specials[k] = std::string(class_defaults[k]);
        absl::StrAppend(&side.special_where[k], "(absent; ", class_name, "'s default) ");
      }
      continue;
    }
    MEFT_ASSIGN_OR_RETURN(side.specials[k], SpecialTokenContent(source));
    side.special_where[k] = source.Where();
  }
  JsonRef additional = config["additional_special_tokens"];
  if (legacy && !special_map["additional_special_tokens"].is_missing()) {
    additional = special_map["additional_special_tokens"];
  }
  if (!additional.is_null()) {
    MEFT_ASSIGN_OR_RETURN(const size_t n, additional.ArraySize());
    for (size_t i = 0; i < n; ++i) {
      MEFT_ASSIGN_OR_RETURN(const std::optional<std::string> content,
                            SpecialTokenContent(additional.At(i)));
      if (content.has_value()) side.additional.emplace_back(*content, additional.At(i).Where());
    }
  }
  const JsonRef decoder_entries = config["added_tokens_decoder"];
  if (!decoder_entries.is_null()) {
    MEFT_RETURN_IF_ERROR(decoder_entries.RequireObject());
    for (const auto& [key, value] : decoder_entries.json().items()) {
      const JsonRef entry = decoder_entries[key];
      MEFT_ASSIGN_OR_RETURN(AddedToken token, ParseAddedToken(entry));
      int64_t id = -1;
      if (!absl::SimpleAtoi(key, &id)) return entry.Invalid("the key must be a token id");
      if (auto it = added_index.find(token.content); it != added_index.end()) {
        // transformers adds the entry again when its flags differ; tokenizers then takes
        // lstrip, rstrip and single_word from the new entry and keeps the token special once it
        // was (its normalized flag stays, as the matching sets are not rebuilt from it).
        AddedToken& existing = added[it->second];
        existing.lstrip = token.lstrip;
        existing.rstrip = token.rstrip;
        existing.single_word = token.single_word;
        existing.special = existing.special || token.special;
        continue;
      }
      MEFT_RETURN_IF_ERROR(add_token(std::move(token), entry, id));
    }
  }
  MEFT_ASSIGN_OR_RETURN(const std::optional<bool> add_bos,
                        [&]() -> absl::StatusOr<std::optional<bool>> {
                          if (config["add_bos_token"].is_null()) return std::nullopt;
                          return config["add_bos_token"].BoolOr(false);
                        }());
  MEFT_ASSIGN_OR_RETURN(const std::optional<bool> add_eos,
                        [&]() -> absl::StatusOr<std::optional<bool>> {
                          if (config["add_eos_token"].is_null()) return std::nullopt;
                          return config["add_eos_token"].BoolOr(false);
                        }());
  MEFT_ASSIGN_OR_RETURN(t->clean_up_tokenization_spaces_,
                        config["clean_up_tokenization_spaces"].BoolOr(false));

  // Special tokens named by the side files become special added tokens when they are not added
  // tokens yet (transformers adds them to the backend tokenizer).
  auto ensure_special = [&](const std::string& content,
                            const std::string& where) -> absl::StatusOr<int64_t> {
    if (auto it = added_index.find(content); it != added_index.end()) return added[it->second].id;
    if (t->model_.TokenToId(content) < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, Quote(content), " is not a token of ", path));
    }
    AddedToken token;
    token.content = content;
    token.special = true;
    token.normalized = false;
    MEFT_RETURN_IF_ERROR(add_token(std::move(token), root["model"]["vocab"], std::nullopt));
    return added.back().id;
  };
  std::array<int64_t, 4> special_ids = {-1, -1, -1, -1};
  for (size_t k = 0; k < kSpecialKeys.size(); ++k) {
    if (!side.specials[k].has_value()) continue;
    MEFT_ASSIGN_OR_RETURN(special_ids[k], ensure_special(*side.specials[k], side.special_where[k]));
  }
  for (const auto& [content, where] : side.additional) {
    MEFT_RETURN_IF_ERROR(ensure_special(content, where).status());
  }

  t->bos_id_ = special_ids[0];
  t->eos_id_ = special_ids[1];
  t->unk_id_ = special_ids[2];
  if (t->eos_id_ < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(side.special_where[1],
                     "the tokenizer has no end-of-sequence token (set eos_token: meft "
                     "ends every training answer with it and stops generation there)"));
  }
  t->pad_id_ = special_ids[3] >= 0 ? special_ids[3] : (t->unk_id_ >= 0 ? t->unk_id_ : t->eos_id_);

  int64_t vocab_size = t->model_.id_limit();
  for (const AddedToken& token : added) vocab_size = std::max<int64_t>(vocab_size, token.id + 1);
  t->vocab_size_ = vocab_size;

  if (side.cls->rebuilds_post_processor) {
    if (add_bos.value_or(side.cls->add_bos_default)) {
      if (t->bos_id_ < 0) {
        return config["add_bos_token"].Invalid("add_bos_token is true but there is no bos_token");
      }
      t->prefix_ids_.push_back(t->bos_id_);
    }
    if (add_eos.value_or(false)) t->suffix_ids_.push_back(t->eos_id_);
  } else {
    t->prefix_ids_ = post.prefix;
    t->suffix_ids_ = post.suffix;
  }
  for (const int64_t id : t->prefix_ids_) {
    if (id >= vocab_size)
      return root["post_processor"].Invalid(absl::StrCat("id ", id, " is not a token"));
  }
  for (const int64_t id : t->suffix_ids_) {
    if (id >= vocab_size)
      return root["post_processor"].Invalid(absl::StrCat("id ", id, " is not a token"));
  }

  for (size_t i = 0; i < added.size(); ++i) {
    t->added_by_id_[added[i].id] = i;
    if (added[i].special) t->special_by_content_[added[i].content] = added[i].id;
  }
  MEFT_ASSIGN_OR_RETURN(t->added_,
                        hf::AddedVocabulary::Create(std::move(added), t->normalizer_.get()));
  return t;
}

absl::StatusOr<std::unique_ptr<HfTokenizer>> HfTokenizer::LoadFile(
    const std::string& tokenizer_json_path) {
  HfTokenizerFiles files;
  files.tokenizer_json_path = tokenizer_json_path;
  absl::StatusOr<std::string> json = io::ReadFile(tokenizer_json_path);
  if (!json.ok()) {
    return absl::Status(json.status().code(),
                        absl::StrCat("cannot read tokenizer: ", json.status().message()));
  }
  files.tokenizer_json = *std::move(json);
  const size_t slash = tokenizer_json_path.rfind('/');
  const std::string dir =
      slash == std::string::npos ? "" : tokenizer_json_path.substr(0, slash + 1);
  auto read_optional = [&](const std::string& name, std::string* path,
                           std::optional<std::string>* content) -> absl::Status {
    *path = dir + name;
    if (!io::PathExists(*path)) return absl::OkStatus();
    MEFT_ASSIGN_OR_RETURN(*content, io::ReadFile(*path));
    return absl::OkStatus();
  };
  MEFT_RETURN_IF_ERROR(read_optional("tokenizer_config.json", &files.tokenizer_config_path,
                                     &files.tokenizer_config));
  MEFT_RETURN_IF_ERROR(read_optional("special_tokens_map.json", &files.special_tokens_map_path,
                                     &files.special_tokens_map));
  MEFT_RETURN_IF_ERROR(read_optional("config.json", &files.model_config_path, &files.model_config));
  return Create(files);
}

const hf::AddedToken* HfTokenizer::AddedById(int64_t id) const {
  auto it = added_by_id_.find(id);
  return it == added_by_id_.end() ? nullptr : &added_->tokens()[it->second];
}

absl::Status HfTokenizer::EncodeSegment(std::string_view text, bool at_origin,
                                        bool specials_allowed, std::vector<int64_t>* ids) const {
  std::string normalized(text);
  if (normalizer_ != nullptr) {
    absl::Status status = normalizer_->Normalize(&normalized);
    if (!status.ok()) {
      return absl::Status(status.code(), absl::StrCat(source_, ": normalizer: ", status.message()));
    }
  }
  std::vector<hf::Segment> parts;
  MEFT_RETURN_IF_ERROR(added_->Split(
      normalized, /*normalized_pass=*/true,
      [specials_allowed](size_t, size_t) { return specials_allowed; }, &parts));
  std::vector<hf::Piece> pieces;
  std::vector<int32_t> word_ids;
  for (const hf::Segment& part : parts) {
    if (part.id >= 0) {
      ids->push_back(part.id);
      continue;
    }
    pieces.clear();
    pieces.push_back(hf::Piece{normalized.substr(part.begin, part.end - part.begin),
                               at_origin && part.begin == 0});
    if (pre_tokenizer_ != nullptr) {
      absl::Status status = pre_tokenizer_->PreTokenize(&pieces);
      if (!status.ok()) {
        return absl::Status(status.code(),
                            absl::StrCat(source_, ": pre_tokenizer: ", status.message()));
      }
    }
    for (const hf::Piece& piece : pieces) {
      word_ids.clear();
      model_.Tokenize(piece.text, &word_ids);
      ids->insert(ids->end(), word_ids.begin(), word_ids.end());
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> HfTokenizer::Encode(
    std::string_view text, std::span<const TextSpan> special_spans) const {
  // Ill-formed UTF-8 becomes U+FFFD first; the trusted spans move with the text.
  std::string repaired;
  std::vector<TextSpan> spans;
  spans.reserve(special_spans.size());
  for (const TextSpan& span : special_spans) {
    spans.push_back(TextSpan{std::min(span.begin, text.size()), std::min(span.end, text.size())});
  }
  if (!hf::IsValidUtf8(text)) {
    std::vector<size_t> offsets;
    repaired = hf::ToValidUtf8(text, &offsets);
    for (TextSpan& span : spans) span = TextSpan{offsets[span.begin], offsets[span.end]};
    text = repaired;
  }
  auto trusted = [&spans](size_t begin, size_t end) {
    return std::any_of(spans.begin(), spans.end(),
                       [&](const TextSpan& s) { return s.begin <= begin && end <= s.end; });
  };

  std::vector<hf::Segment> segments;
  MEFT_RETURN_IF_ERROR(added_->Split(text, /*normalized_pass=*/false, trusted, &segments));
  std::vector<int64_t> ids;
  for (const hf::Segment& segment : segments) {
    if (segment.id >= 0) {
      ids.push_back(segment.id);
      continue;
    }
    // Normalized special tokens (rare) are matched only when the whole segment is trusted.
    MEFT_RETURN_IF_ERROR(EncodeSegment(text.substr(segment.begin, segment.end - segment.begin),
                                       segment.begin == 0, trusted(segment.begin, segment.end),
                                       &ids));
  }
  return ids;
}

std::string HfTokenizer::Decode(std::span<const int64_t> ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (const int64_t id : ids) {
    if (id < 0 || id >= vocab_size_) continue;
    const hf::AddedToken* added = AddedById(id);
    const std::string* token = added != nullptr ? &added->content : model_.IdToToken(id);
    if (token == nullptr) continue;
    if (skip_special_tokens && special_by_content_.contains(*token)) continue;
    tokens.push_back(*token);
  }
  std::string text;
  if (decoder_ != nullptr) {
    decoder_->DecodeChain(&tokens);
    for (const std::string& token : tokens) text += token;
  } else {
    text = absl::StrJoin(tokens, " ");
  }
  // Token strings are UTF-8, but a decoder without a byte-level step may have cut one.
  if (!hf::IsValidUtf8(text)) text = hf::ToValidUtf8(text);
  if (clean_up_tokenization_spaces_) text = CleanUpTokenizationSpaces(std::move(text));
  return text;
}

std::string HfTokenizer::IdToPiece(int64_t id) const {
  if (const hf::AddedToken* added = AddedById(id); added != nullptr) return added->content;
  const std::string* token = model_.IdToToken(id);
  return token == nullptr ? "" : *token;
}

int64_t HfTokenizer::SpecialTokenId(std::string_view content) const {
  auto it = special_by_content_.find(hf::AsAbsl(content));
  return it == special_by_content_.end() ? -1 : it->second;
}

bool HfTokenizer::IsSpecial(int64_t id) const {
  if (id < 0 || id >= vocab_size_) return false;
  const hf::AddedToken* added = AddedById(id);
  const std::string* token = added != nullptr ? &added->content : model_.IdToToken(id);
  return token != nullptr && special_by_content_.contains(*token);
}

}  // namespace meft::worker
