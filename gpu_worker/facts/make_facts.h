#pragma once

// The built-in default benchmark (`meft-worker make-facts`): a synthetic closed-book knowledge
// task that a tiny, randomly initialised and frozen LLaMA can only solve by memorising facts in
// its adapter.
//
// Invented countries ("Varnok") each get `attributes_per_entity` attributes drawn from a fixed
// list of kinds (capital, founder, language, currency, river, animal, dish, provinces). Every
// kind has an invented pool of short answer values (two-syllable words such as "Tamo", or numbers
// 10..99 for provinces) and five question templates: the first three are the TRAIN templates,
// the last two the HELD-OUT ones. MakeFacts writes into `output_dir`:
//
//   train.jsonl     every fact asked with each train template (examples for fine-tuning);
//   eval.jsonl      every fact once, with one of its train templates (memorisation);
//   heldout.jsonl   every fact once, with one of its held-out templates (generalisation);
//   corpus.txt      the text the tokenizer is trained on: one Alpaca prompt with input (so the
//                   template's words are covered), then every distinct train and held-out
//                   example rendered once as Alpaca prompt + answer (dataset.h's templates);
//   facts.json      the kinds (templates, value pools) and the entities with their facts;
//   model/tokenizer.model   SentencePiece BPE (TrainTokenizer, LLaMA-like ids, byte fallback);
//   model/config.json       Hugging Face LlamaForCausalLM config, float32;
//   model/model.safetensors random weights initialised as Hugging Face does: every Linear and the
//                           embedding N(0, 0.02), RMSNorm weights 1; HF tensor names.
//
// JSONL lines are {"instruction": question, "output": answer, "id": "fNNNN-tK", "answers":
// [answer]}, where NNNN is the fact's index (facts.json) and K the template's index among the
// kind's five (0-2 train, 3-4 held out). Questions are short ("What is the capital of Varnok?").
// Answers are four-letter words ("Tamo") or two-digit numbers; no answer occurs inside another
// answer, an entity name, a question template or the Alpaca prompt (ignoring case), so the
// substring metrics cannot confuse them or credit an echoed question. With the default vocabulary
// every word answer is one token and a number three ("▁" and two digits: SentencePiece splits
// digits).
//
// Determinism: the same options give byte-identical files (on any platform with IEEE doubles and
// a faithful libm). All randomness comes from SplitMix64 streams derived from `seed` (the data
// and the weights use separate streams, so the model sizes do not change the data); normal
// variates come from Box-Muller in double precision rounded to float32; the tokenizer trainer is
// deterministic (see TrainTokenizer).
// No LibTorch here. Not thread-safe: the tokenizer trainer uses a process-wide random seed.

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace meft::worker {

struct FactsOptions {
  // Directory that receives every file (created with its parents if missing; files in it are
  // overwritten).
  std::string output_dir;
  // Seed of everything random: names, facts, template choice, weights.
  uint64_t seed = 0;
  // Number of invented countries, in [1, 2000].
  int64_t num_entities = 64;
  // Facts per country: distinct attribute kinds, in [1, 8] (the number of kinds).
  int64_t attributes_per_entity = 3;
  // Size of each kind's pool of possible answers, in [2, 90]; chance level is about 1 / this.
  int64_t values_per_attribute = 16;
  // Pieces of the SentencePiece model, at least 260 (3 special + 256 byte pieces + the corpus's
  // characters). The default benchmark's corpus allows up to about 1580 (SentencePiece's error
  // states the limit; smaller benchmarks allow fewer). 1024 makes every invented answer word a
  // single token (mean 1.25 tokens per answer with the numbers); 512 gives about 3.2.
  int64_t tokenizer_vocab_size = 1024;
  // The tiny LLaMA. num_heads divides hidden_size with an even quotient (the head width);
  // num_kv_heads divides num_heads.
  int64_t hidden_size = 64;
  int64_t num_layers = 4;
  int64_t num_heads = 4;
  int64_t num_kv_heads = 2;
  int64_t intermediate_size = 128;
  // Std of the random output layer (lm_head). Every other weight is N(0, 0.02) as in Hugging
  // Face's init, but a frozen random model whose lm_head rows are that small caps every logit at
  // about 0.02 * hidden_size (~1.3 at 64): the model could never become confident, whatever the
  // adapter learns. 0.25 lets logits reach ~16.
  double output_init_std = 0.25;
  // Longest sequence the model supports, in tokens; must hold the longest example
  // (BOS + prompt + answer + EOS).
  int64_t max_position_embeddings = 256;
};

struct FactsSummary {
  // num_entities * attributes_per_entity.
  int64_t num_facts = 0;
  // Lines of train.jsonl (num_facts * 3), eval.jsonl and heldout.jsonl (num_facts each).
  int64_t train_examples = 0;
  int64_t eval_examples = 0;
  int64_t heldout_examples = 0;
  // `output_dir`/model: the Hugging Face model folder (config.json, model.safetensors,
  // tokenizer.model).
  std::string model_dir;
  // Pieces of the trained tokenizer (= config.json vocab_size).
  int64_t vocab_size = 0;
  // Mean number of tokens of a fact's answer, Encode(answer) without BOS/EOS.
  double mean_answer_tokens = 0.0;
  // Longest example in tokens (BOS + prompt + answer + EOS) over all three files.
  int64_t max_example_tokens = 0;
  // Base-model parameters written to model.safetensors.
  int64_t num_parameters = 0;
};

// Validates `options` and writes the benchmark described above. INVALID_ARGUMENT naming the
// option for a bad value (a size out of range, num_heads not dividing hidden_size, an odd head
// width, num_kv_heads not dividing num_heads, a vocabulary SentencePiece cannot build from the
// corpus, a max_position_embeddings shorter than the longest example); I/O errors name the file.
// Nothing is written before the options are validated; on a later error files may be partial.
// Never throws.
absl::StatusOr<FactsSummary> MakeFacts(const FactsOptions& options);

}  // namespace meft::worker
