#include "gpu_worker/facts/make_facts.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <numbers>
#include <set>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/io/file_util.h"
#include "common/random.h"
#include "common/safetensors/safetensors.h"
#include "common/status.h"
#include "gpu_worker/data/dataset.h"
#include "gpu_worker/model/llama_tensors.h"
#include "gpu_worker/tokenizer/sentencepiece_tokenizer.h"
#include "gpu_worker/tokenizer/tokenizer.h"

namespace meft::worker {
namespace {

using OrderedJson = nlohmann::ordered_json;

static_assert(std::endian::native == std::endian::little,
              "safetensors stores little-endian floats; this writer copies native floats");

constexpr int64_t kMaxEntities = 2000;
constexpr int64_t kMinValues = 2;
// The provinces kind draws distinct numbers from [10, 99].
constexpr int64_t kMaxValues = 90;
constexpr int64_t kMinVocab = 260;
constexpr int64_t kMaxVocab = 1 << 20;
constexpr int64_t kTrainTemplates = 3;
constexpr int64_t kTemplatesPerKind = 5;
constexpr char kEntityPlaceholder[] = "{entity}";
constexpr double kInitStd = 0.02;

// One attribute kind: its five templates (the first kTrainTemplates are trained on, the rest held
// out) with kEntityPlaceholder for the country's name.
struct Kind {
  const char* name;
  bool numeric;  // Values are numbers 10..99 rather than invented words.
  std::array<const char*, kTemplatesPerKind> templates;
};

constexpr std::array<Kind, 8> kKinds = {{
    {"capital",
     false,
     {"What is the capital of {entity}?", "Which city is the capital of {entity}?",
      "Name the capital city of {entity}.", "{entity}'s capital is which city?",
      "Tell me the capital of {entity}."}},
    {"founder",
     false,
     {"Who founded {entity}?", "Who was the founder of {entity}?", "Name the founder of {entity}.",
      "{entity} was founded by whom?", "Which person founded {entity}?"}},
    {"language",
     false,
     {"What language is spoken in {entity}?", "Which language do people speak in {entity}?",
      "Name the language of {entity}.", "The people of {entity} speak which language?",
      "What is the main language of {entity}?"}},
    {"currency",
     false,
     {"What is the currency of {entity}?", "Which currency is used in {entity}?",
      "Name the currency of {entity}.", "People in {entity} pay with which currency?",
      "What money does {entity} use?"}},
    {"river",
     false,
     {"What is the longest river in {entity}?", "Which river is the longest in {entity}?",
      "Name the longest river of {entity}.", "The longest river of {entity} is called what?",
      "Tell me the longest river in {entity}."}},
    {"animal",
     false,
     {"What is the national animal of {entity}?", "Which animal is the symbol of {entity}?",
      "Name the national animal of {entity}.", "{entity}'s national animal is which creature?",
      "Tell me the national animal of {entity}."}},
    {"dish",
     false,
     {"What is the national dish of {entity}?", "Which dish is eaten most in {entity}?",
      "Name the national dish of {entity}.", "{entity}'s national dish is which food?",
      "Tell me the national dish of {entity}."}},
    {"provinces",
     true,
     {"How many provinces does {entity} have?", "What is the number of provinces of {entity}?",
      "How many provinces are there in {entity}?", "{entity} is divided into how many provinces?",
      "Count the provinces of {entity}."}},
}};
constexpr int64_t kNumKinds = static_cast<int64_t>(kKinds.size());

// An independent stream for one purpose, so that e.g. the model sizes do not change the data.
SplitMix64 Stream(uint64_t seed, uint64_t purpose) {
  return SplitMix64(SplitMix64(seed).Next() ^ SplitMix64(purpose * 0xD1B54A32D192ED03ULL).Next());
}
constexpr uint64_t kDataStream = 1;
constexpr uint64_t kWeightStream = 2;
constexpr uint64_t kTokenizerStream = 3;

// Syllables of invented words. Entity names are two syllables with optional codas ("Varnok",
// "Telu"); answer words are exactly consonant-vowel-consonant-vowel ("Tamo"), so no answer is a
// substring of another and the substring metric cannot confuse two of them.
constexpr std::array<char, 14> kOnsets = {'b', 'd', 'f', 'g', 'k', 'l', 'm',
                                          'n', 'p', 'r', 's', 't', 'v', 'z'};
constexpr std::array<char, 5> kVowels = {'a', 'e', 'i', 'o', 'u'};
// '\0' (no coda) three times: most syllables are open.
constexpr std::array<char, 8> kCodas = {'\0', '\0', '\0', 'n', 'r', 'l', 'k', 's'};

char Pick(SplitMix64& rng, std::span<const char> letters) {
  return letters[static_cast<size_t>(rng.Below(letters.size()))];
}

std::string Capitalize(std::string word) {
  if (!word.empty() && word[0] >= 'a' && word[0] <= 'z') word[0] = static_cast<char>(word[0] - 32);
  return word;
}

std::string EntityName(SplitMix64& rng) {
  std::string name;
  for (int syllable = 0; syllable < 2; ++syllable) {
    name += Pick(rng, kOnsets);
    name += Pick(rng, kVowels);
    const char coda = Pick(rng, kCodas);
    if (coda != '\0') name += coda;
  }
  return Capitalize(std::move(name));
}

std::string AnswerWord(SplitMix64& rng) {
  std::string word;
  for (int syllable = 0; syllable < 2; ++syllable) {
    word += Pick(rng, kOnsets);
    word += Pick(rng, kVowels);
  }
  return Capitalize(std::move(word));
}

std::string Lower(std::string word) {
  for (char& c : word) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c + 32);
  }
  return word;
}

// Draws `count` words from `make` that are not in `used` (lowercase; the new words are added) and
// do not occur, ignoring case, inside any of `avoid_within` (so that a model repeating an entity's
// name cannot hit an answer under the substring metrics). Fails with `failure` after many
// rejections, which only happens when the word space is nearly exhausted.
template <typename MakeWord>
absl::StatusOr<std::vector<std::string>> DistinctWords(SplitMix64& rng, int64_t count,
                                                       MakeWord make, std::set<std::string>* used,
                                                       const std::vector<std::string>& avoid_within,
                                                       std::string_view failure) {
  std::vector<std::string> words;
  words.reserve(static_cast<size_t>(count));
  int64_t attempts = 0;
  const int64_t max_attempts = 1000 + 100 * count;
  while (static_cast<int64_t>(words.size()) < count) {
    if (++attempts > max_attempts) {
      return absl::InvalidArgumentError(absl::StrCat("make-facts: ", std::string(failure)));
    }
    std::string word = make(rng);
    const std::string lower = Lower(word);
    if (used->count(lower)) continue;
    const bool inside = std::any_of(
        avoid_within.begin(), avoid_within.end(),
        [&](const std::string& other) { return Lower(other).find(lower) != std::string::npos; });
    if (inside) continue;
    used->insert(lower);
    words.push_back(std::move(word));
  }
  return words;
}

std::string Render(std::string_view templ, const std::string& entity) {
  std::string out(templ);
  const size_t at = out.find(kEntityPlaceholder);
  if (at != std::string::npos) out.replace(at, std::strlen(kEntityPlaceholder), entity);
  return out;
}

struct Fact {
  std::string id;  // "f0012"
  int64_t entity = 0;
  int64_t kind = 0;
  std::string answer;
  int64_t eval_template = 0;     // in [0, kTrainTemplates)
  int64_t heldout_template = 0;  // in [kTrainTemplates, kTemplatesPerKind)
};

struct Benchmark {
  std::vector<std::string> entities;
  std::vector<std::vector<std::string>> pools;  // per kind
  std::vector<Fact> facts;
};

absl::Status Positive(int64_t value, std::string_view option) {
  if (value > 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("make-facts: ", std::string(option), " must be positive, got ", value));
}

absl::Status InRange(int64_t value, int64_t lo, int64_t hi, std::string_view option) {
  if (value >= lo && value <= hi) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("make-facts: ", std::string(option),
                                                 " must be in [", lo, ", ", hi, "], got ", value));
}

absl::Status Validate(const FactsOptions& o) {
  if (o.output_dir.empty()) {
    return absl::InvalidArgumentError("make-facts: output_dir must not be empty");
  }
  MEFT_RETURN_IF_ERROR(InRange(o.num_entities, 1, kMaxEntities, "num_entities"));
  MEFT_RETURN_IF_ERROR(InRange(o.attributes_per_entity, 1, kNumKinds, "attributes_per_entity"));
  MEFT_RETURN_IF_ERROR(
      InRange(o.values_per_attribute, kMinValues, kMaxValues, "values_per_attribute"));
  MEFT_RETURN_IF_ERROR(
      InRange(o.tokenizer_vocab_size, kMinVocab, kMaxVocab, "tokenizer_vocab_size"));
  MEFT_RETURN_IF_ERROR(Positive(o.hidden_size, "hidden_size"));
  MEFT_RETURN_IF_ERROR(Positive(o.num_layers, "num_layers"));
  MEFT_RETURN_IF_ERROR(Positive(o.num_heads, "num_heads"));
  MEFT_RETURN_IF_ERROR(Positive(o.num_kv_heads, "num_kv_heads"));
  MEFT_RETURN_IF_ERROR(Positive(o.intermediate_size, "intermediate_size"));
  MEFT_RETURN_IF_ERROR(Positive(o.max_position_embeddings, "max_position_embeddings"));
  if (o.hidden_size % o.num_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "make-facts: num_heads (", o.num_heads, ") must divide hidden_size (", o.hidden_size, ")"));
  }
  if ((o.hidden_size / o.num_heads) % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("make-facts: hidden_size / num_heads (", o.hidden_size, " / ", o.num_heads,
                     ") must be even: rotary embeddings rotate pairs of a head's dimensions"));
  }
  if (o.num_heads % o.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("make-facts: num_kv_heads (", o.num_kv_heads,
                                                   ") must divide num_heads (", o.num_heads, ")"));
  }
  // Keep the weight file within what a quick benchmark means (and int64 far from overflow).
  constexpr int64_t kMaxWidth = 1 << 16;
  MEFT_RETURN_IF_ERROR(InRange(o.hidden_size, 1, kMaxWidth, "hidden_size"));
  MEFT_RETURN_IF_ERROR(InRange(o.intermediate_size, 1, kMaxWidth, "intermediate_size"));
  if (!(o.output_init_std > 0.0 && o.output_init_std <= 10.0)) {
    return absl::InvalidArgumentError("output_init_std: must be in (0, 10]");
  }
  MEFT_RETURN_IF_ERROR(InRange(o.num_layers, 1, 1024, "num_layers"));
  return absl::OkStatus();
}

absl::StatusOr<Benchmark> Invent(const FactsOptions& o) {
  SplitMix64 rng = Stream(o.seed, kDataStream);
  Benchmark b;
  std::set<std::string> used;
  MEFT_ASSIGN_OR_RETURN(b.entities, DistinctWords(rng, o.num_entities, EntityName, &used, {},
                                                  absl::StrCat("num_entities: cannot invent ",
                                                               o.num_entities, " distinct names")));
  // Answers must not hide in the text a model might echo.
  std::vector<std::string> avoid = b.entities;
  avoid.push_back(kAlpacaPromptWithInput);
  avoid.push_back(kAlpacaPromptWithoutInput);
  for (const Kind& kind : kKinds)
    avoid.insert(avoid.end(), kind.templates.begin(), kind.templates.end());
  for (const Kind& kind : kKinds) {
    if (kind.numeric) {
      // A partial Fisher-Yates shuffle of 10..99.
      std::vector<int64_t> numbers;
      for (int64_t n = 10; n < 10 + kMaxValues; ++n) numbers.push_back(n);
      std::vector<std::string> pool;
      for (int64_t i = 0; i < o.values_per_attribute; ++i) {
        const size_t j = static_cast<size_t>(i + static_cast<int64_t>(rng.Below(kMaxValues - i)));
        std::swap(numbers[static_cast<size_t>(i)], numbers[j]);
        pool.push_back(absl::StrCat(numbers[static_cast<size_t>(i)]));
      }
      b.pools.push_back(std::move(pool));
    } else {
      MEFT_ASSIGN_OR_RETURN(
          std::vector<std::string> pool,
          DistinctWords(rng, o.values_per_attribute, AnswerWord, &used, avoid,
                        absl::StrCat("values_per_attribute: cannot invent ", o.values_per_attribute,
                                     " distinct answers per kind that occur in no entity name ",
                                     "(lower values_per_attribute or num_entities)")));
      b.pools.push_back(std::move(pool));
    }
  }
  for (int64_t e = 0; e < o.num_entities; ++e) {
    std::vector<int64_t> kinds(kKinds.size());
    for (size_t k = 0; k < kinds.size(); ++k) kinds[k] = static_cast<int64_t>(k);
    for (int64_t i = 0; i < o.attributes_per_entity; ++i) {
      const size_t j = static_cast<size_t>(i + static_cast<int64_t>(rng.Below(kNumKinds - i)));
      std::swap(kinds[static_cast<size_t>(i)], kinds[j]);
    }
    kinds.resize(static_cast<size_t>(o.attributes_per_entity));
    std::sort(kinds.begin(), kinds.end());
    for (const int64_t k : kinds) {
      Fact fact;
      fact.id = absl::StrCat("f", absl::Dec(b.facts.size(), absl::kZeroPad4));
      fact.entity = e;
      fact.kind = k;
      const std::vector<std::string>& pool = b.pools[static_cast<size_t>(k)];
      fact.answer = pool[static_cast<size_t>(rng.Below(pool.size()))];
      fact.eval_template = static_cast<int64_t>(rng.Below(kTrainTemplates));
      fact.heldout_template =
          kTrainTemplates + static_cast<int64_t>(rng.Below(kTemplatesPerKind - kTrainTemplates));
      b.facts.push_back(std::move(fact));
    }
  }
  return b;
}

Example MakeExample(const Benchmark& b, const Fact& fact, int64_t templ) {
  Example example;
  example.instruction =
      Render(kKinds[static_cast<size_t>(fact.kind)].templates[static_cast<size_t>(templ)],
             b.entities[static_cast<size_t>(fact.entity)]);
  example.output = fact.answer;
  example.id = absl::StrCat(fact.id, "-t", templ);
  example.answers = {fact.answer};
  return example;
}

std::string ToJsonl(const std::vector<Example>& examples) {
  std::string out;
  for (const Example& example : examples) {
    OrderedJson line;
    line["instruction"] = example.instruction;
    line["output"] = example.output;
    line["id"] = example.id;
    line["answers"] = example.answers;
    absl::StrAppend(&out, line.dump(), "\n");
  }
  return out;
}

std::string FactsJson(const FactsOptions& o, const Benchmark& b) {
  OrderedJson root;
  root["seed"] = o.seed;
  root["num_entities"] = o.num_entities;
  root["attributes_per_entity"] = o.attributes_per_entity;
  root["values_per_attribute"] = o.values_per_attribute;
  root["entity_placeholder"] = kEntityPlaceholder;
  OrderedJson kinds = OrderedJson::array();
  for (size_t k = 0; k < kKinds.size(); ++k) {
    OrderedJson kind;
    kind["name"] = kKinds[k].name;
    OrderedJson train = OrderedJson::array();
    OrderedJson heldout = OrderedJson::array();
    for (int64_t t = 0; t < kTemplatesPerKind; ++t) {
      (t < kTrainTemplates ? train : heldout)
          .push_back(kKinds[k].templates[static_cast<size_t>(t)]);
    }
    kind["train_templates"] = std::move(train);
    kind["heldout_templates"] = std::move(heldout);
    kind["values"] = b.pools[k];
    kinds.push_back(std::move(kind));
  }
  root["kinds"] = std::move(kinds);
  OrderedJson entities = OrderedJson::array();
  for (size_t e = 0; e < b.entities.size(); ++e) {
    OrderedJson entity;
    entity["name"] = b.entities[e];
    entity["facts"] = OrderedJson::array();
    entities.push_back(std::move(entity));
  }
  for (const Fact& fact : b.facts) {
    OrderedJson f;
    f["id"] = fact.id;
    f["kind"] = kKinds[static_cast<size_t>(fact.kind)].name;
    f["answer"] = fact.answer;
    f["eval_template"] = fact.eval_template;
    f["heldout_template"] = fact.heldout_template;
    entities[static_cast<size_t>(fact.entity)]["facts"].push_back(std::move(f));
  }
  root["entities"] = std::move(entities);
  return root.dump(2) + "\n";
}

std::string ConfigJson(const FactsOptions& o, int64_t vocab_size) {
  OrderedJson c;
  c["architectures"] = {"LlamaForCausalLM"};
  c["attention_bias"] = false;
  c["attention_dropout"] = 0.0;
  c["bos_token_id"] = 1;
  c["eos_token_id"] = 2;
  c["head_dim"] = o.hidden_size / o.num_heads;
  c["hidden_act"] = "silu";
  c["hidden_size"] = o.hidden_size;
  c["initializer_range"] = kInitStd;
  c["intermediate_size"] = o.intermediate_size;
  c["max_position_embeddings"] = o.max_position_embeddings;
  c["mlp_bias"] = false;
  c["model_type"] = "llama";
  c["num_attention_heads"] = o.num_heads;
  c["num_hidden_layers"] = o.num_layers;
  c["num_key_value_heads"] = o.num_kv_heads;
  c["pretraining_tp"] = 1;
  c["rms_norm_eps"] = 1e-6;
  c["rope_scaling"] = nullptr;
  c["rope_theta"] = 10000.0;
  c["tie_word_embeddings"] = false;
  c["torch_dtype"] = "float32";
  c["use_cache"] = true;
  c["vocab_size"] = vocab_size;
  return c.dump(2) + "\n";
}

// Hugging Face's LlamaPreTrainedModel._init_weights: Linear and Embedding weights N(0, 0.02),
// RMSNorm weights 1. Normals come from Box-Muller on the weight stream, in write order.
class WeightWriter {
 public:
  explicit WeightWriter(uint64_t seed) : rng_(Stream(seed, kWeightStream)) {}

  void Normal(std::string name, std::vector<int64_t> shape, double std = kInitStd) {
    std::vector<float>& data = Add(std::move(name), std::move(shape));
    for (float& x : data) x = static_cast<float>(std * NextNormal());
  }
  void Ones(std::string name, std::vector<int64_t> shape) {
    std::vector<float>& data = Add(std::move(name), std::move(shape));
    std::fill(data.begin(), data.end(), 1.0f);
  }

  int64_t num_parameters() const {
    int64_t n = 0;
    for (const auto& data : data_) n += static_cast<int64_t>(data.size());
    return n;
  }

  absl::Status Write(const std::string& path) const {
    std::vector<safetensors::TensorToWrite> tensors;
    for (size_t i = 0; i < names_.size(); ++i) {
      tensors.push_back({names_[i], safetensors::DType::kF32, shapes_[i],
                         std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(data_[i].data()),
                                                  data_[i].size() * sizeof(float))});
    }
    absl::StatusOr<uint64_t> written = safetensors::Write(path, tensors, {{"format", "pt"}});
    return written.status();
  }

 private:
  std::vector<float>& Add(std::string name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (const int64_t d : shape) n *= d;
    names_.push_back(std::move(name));
    shapes_.push_back(std::move(shape));
    data_.emplace_back(static_cast<size_t>(n));
    return data_.back();
  }

  double NextNormal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = 1.0 - rng_.Uniform();  // (0, 1]: log stays finite.
    const double u2 = rng_.Uniform();
    const double radius = std::sqrt(-2.0 * std::log(u1));
    const double angle = 2.0 * std::numbers::pi * u2;
    spare_ = radius * std::sin(angle);
    has_spare_ = true;
    return radius * std::cos(angle);
  }

  SplitMix64 rng_;
  bool has_spare_ = false;
  double spare_ = 0.0;
  std::vector<std::string> names_;
  std::vector<std::vector<int64_t>> shapes_;
  std::vector<std::vector<float>> data_;
};

absl::StatusOr<int64_t> WriteWeights(const FactsOptions& o, int64_t vocab_size,
                                     const std::string& path) {
  const int64_t head_dim = o.hidden_size / o.num_heads;
  const LlamaDims dims{.vocab_size = vocab_size,
                       .hidden_size = o.hidden_size,
                       .intermediate_size = o.intermediate_size,
                       .num_layers = o.num_layers,
                       .q_out = o.num_heads * head_dim,
                       .kv_out = o.num_kv_heads * head_dim};
  WeightWriter w(o.seed);
  for (const LlamaTensorSpec& t : LlamaTensorSpecs(dims)) {
    if (t.is_norm()) {
      w.Ones(t.name, t.shape);
    } else if (t.role == LlamaTensorRole::kLmHead) {
      // Not 0.02: the final RMSNorm output has RMS 1, so with N(0, 0.02) rows at d = 64 no logit
      // can exceed about 1.3 and no adapter could make a confident prediction (see FactsOptions).
      w.Normal(t.name, t.shape, o.output_init_std);
    } else {
      w.Normal(t.name, t.shape);
    }
  }
  MEFT_RETURN_IF_ERROR(w.Write(path));
  return w.num_parameters();
}

absl::Status WriteText(const std::string& path, const std::string& text) {
  return io::WriteFileDurably(path, {std::string_view(text)});
}

absl::StatusOr<FactsSummary> MakeFactsImpl(const FactsOptions& o) {
  MEFT_RETURN_IF_ERROR(Validate(o));
  MEFT_ASSIGN_OR_RETURN(const Benchmark b, Invent(o));

  std::vector<Example> train, eval, heldout;
  for (const Fact& fact : b.facts) {
    for (int64_t t = 0; t < kTrainTemplates; ++t) train.push_back(MakeExample(b, fact, t));
    eval.push_back(MakeExample(b, fact, fact.eval_template));
    heldout.push_back(MakeExample(b, fact, fact.heldout_template));
  }

  // The tokenizer's corpus: the Alpaca prompt with input once (its extra words), then every
  // distinct example (eval repeats train questions) as the training sequence renders it.
  MEFT_ASSIGN_OR_RETURN(const PromptFormatter formatter, PromptFormatter::Create());
  Example with_input = train.front();
  with_input.input = b.entities.front();
  std::string corpus = formatter.Format(with_input) + with_input.output + "\n";
  for (const std::vector<Example>* split : {&train, &heldout}) {
    for (const Example& example : *split) {
      absl::StrAppend(&corpus, formatter.Format(example), example.output, "\n");
    }
  }

  const std::string dir = o.output_dir;
  const std::string model_dir = dir + "/model";
  MEFT_RETURN_IF_ERROR(io::CreateDirectories(model_dir));
  MEFT_RETURN_IF_ERROR(WriteText(dir + "/train.jsonl", ToJsonl(train)));
  MEFT_RETURN_IF_ERROR(WriteText(dir + "/eval.jsonl", ToJsonl(eval)));
  MEFT_RETURN_IF_ERROR(WriteText(dir + "/heldout.jsonl", ToJsonl(heldout)));
  MEFT_RETURN_IF_ERROR(WriteText(dir + "/facts.json", FactsJson(o, b)));
  MEFT_RETURN_IF_ERROR(WriteText(dir + "/corpus.txt", corpus));

  TokenizerTrainOptions tokenizer_options;
  tokenizer_options.seed = static_cast<uint32_t>(Stream(o.seed, kTokenizerStream).Next());
  const absl::Status trained =
      TrainTokenizerFromFile(dir + "/corpus.txt", model_dir + "/tokenizer",
                             static_cast<int>(o.tokenizer_vocab_size), tokenizer_options);
  if (!trained.ok()) {
    return absl::Status(trained.code(),
                        absl::StrCat("make-facts: tokenizer_vocab_size ", o.tokenizer_vocab_size,
                                     ": ", trained.message()));
  }
  MEFT_ASSIGN_OR_RETURN(const std::unique_ptr<Tokenizer> tokenizer,
                        Tokenizer::Load(model_dir + "/tokenizer.model"));

  FactsSummary summary;
  summary.num_facts = static_cast<int64_t>(b.facts.size());
  summary.train_examples = static_cast<int64_t>(train.size());
  summary.eval_examples = static_cast<int64_t>(eval.size());
  summary.heldout_examples = static_cast<int64_t>(heldout.size());
  summary.model_dir = model_dir;
  summary.vocab_size = tokenizer->vocab_size();
  int64_t answer_tokens = 0;
  for (const Fact& fact : b.facts) {
    MEFT_ASSIGN_OR_RETURN(const std::vector<int64_t> ids, tokenizer->Encode(fact.answer));
    answer_tokens += static_cast<int64_t>(ids.size());
  }
  summary.mean_answer_tokens =
      static_cast<double>(answer_tokens) / static_cast<double>(b.facts.size());
  TokenizeOptions untruncated;
  untruncated.max_length = std::numeric_limits<int64_t>::max();
  for (const std::vector<Example>* split : {&train, &eval, &heldout}) {
    for (const Example& example : *split) {
      // The training sequence: BOS + prompt + output + EOS.
      MEFT_ASSIGN_OR_RETURN(const TokenizedExample tokenized,
                            TokenizeExample(example, formatter, *tokenizer, untruncated));
      summary.max_example_tokens =
          std::max(summary.max_example_tokens, static_cast<int64_t>(tokenized.input_ids.size()));
    }
  }
  if (summary.max_example_tokens > o.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "make-facts: max_position_embeddings (", o.max_position_embeddings,
        ") is shorter than the longest example (", summary.max_example_tokens, " tokens)"));
  }

  MEFT_RETURN_IF_ERROR(WriteText(model_dir + "/config.json", ConfigJson(o, summary.vocab_size)));
  MEFT_ASSIGN_OR_RETURN(summary.num_parameters,
                        WriteWeights(o, summary.vocab_size, model_dir + "/model.safetensors"));
  MEFT_RETURN_IF_ERROR(io::FsyncDirectory(model_dir));
  MEFT_RETURN_IF_ERROR(io::FsyncDirectory(dir));
  return summary;
}

}  // namespace

absl::StatusOr<FactsSummary> MakeFacts(const FactsOptions& options) {
  try {
    return MakeFactsImpl(options);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("make-facts: ", e.what()));
  }
}

}  // namespace meft::worker
