#pragma once

// Evaluation metrics of DESIGN §5 and the files an evaluation writes (predictions.jsonl,
// metrics.json). Every scorer is a pure function of its arguments returning a score in [0, 1];
// each doc comment states the exact rule. No torch here. Nothing here throws.

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace meft::worker {

// ---- Text normalisation -------------------------------------------------------------------

// Whitespace normalisation used by the substring metrics: every maximal run of ASCII whitespace
// (space, \t, \n, \v, \f, \r) becomes one space, and leading and trailing whitespace is removed.
// Nothing else changes (no case folding, punctuation or article removal, no Unicode handling).
std::string NormalizeWhitespace(std::string_view text);

// ASCII lowercase ('A'-'Z' -> 'a'-'z'); all other bytes, including non-ASCII UTF-8, unchanged.
std::string AsciiLower(std::string_view text);

// ---- NQ ------------------------------------------------------------------------------------

// Natural Questions "exact match as substring": 1.0 if, after NormalizeWhitespace of both sides,
// some non-empty gold answer occurs as a contiguous substring of the prediction (case-sensitive,
// byte-wise); otherwise 0.0. Empty golds (after normalisation) are ignored, so no golds at all
// scores 0.0.
double NqSubstringMatch(std::string_view prediction, std::span<const std::string> golds);

// ---- SQuAD ---------------------------------------------------------------------------------

// SQuAD "lowercase substring": as NqSubstringMatch, but both sides are also AsciiLower-ed before
// the substring test (normalise whitespace, then lowercase).
double SquadLowercaseSubstringMatch(std::string_view prediction,
                                    std::span<const std::string> golds);

// ---- GSM8K ---------------------------------------------------------------------------------

// The last number in `text`, as a canonical decimal string, or nullopt if there is none.
//
// A number is: an optional '-' sign, digits, optional thousands groups, optional fraction.
//   - The sign counts only when the '-' directly precedes the first digit and is not itself
//     preceded by a letter or digit ("x = -7" -> -7; "5-3" -> 5 and 3).
//   - A ',' inside the integer part belongs to the number only when followed by exactly three
//     digits and then a non-digit or another such group ("1,234,567" -> 1234567; "3,4" -> 3 and
//     4; "1,23456" -> 1 and 23456). Commas are dropped.
//   - A '.' followed by at least one digit starts the fraction ("3.50" -> 3.5; "42." -> 42).
// Canonical form: no leading zeros in the integer part ("0" if empty), no trailing zeros in the
// fraction, no '.' without a fraction, and no '-' on zero. Thus "3.50", "3.5" and "03.5" are all
// "3.5", and "-0" is "0".
std::optional<std::string> ExtractLastNumber(std::string_view text);

// The gold number of a GSM8K answer: the last number after the last "####" when the answer
// contains "####" (the dataset's format), otherwise the last number of the whole answer.
std::optional<std::string> Gsm8kGoldNumber(std::string_view gold);

// GSM8K final-number accuracy: 1.0 if ExtractLastNumber(prediction) and Gsm8kGoldNumber(gold)
// both exist and are equal as canonical decimal strings (numerical equality of decimals, exact,
// no floating point); otherwise 0.0. With several golds, the best (max) score.
double Gsm8kFinalNumberMatch(std::string_view prediction, std::span<const std::string> golds);

// ---- ToolBench -----------------------------------------------------------------------------

// Parses a set of API names. Representation, tried in order:
//   1. a JSON array of strings, e.g. `["search_flights", "book_hotel"]` (the whole text, after
//      trimming whitespace, must parse as such an array);
//   2. otherwise a comma-separated list, e.g. `search_flights, book_hotel`; each item has
//      surrounding whitespace and any surrounding '[', ']', '"', '\'' characters stripped.
// Names are then trimmed of whitespace; empty names are dropped; duplicates collapse. Never fails:
// a model's free-text answer parses to whatever comma-separated items it has.
std::set<std::string> ParseApiSet(std::string_view text);

// Intersection over union |pred ∩ gold| / |pred ∪ gold| of two API-name sets (names compared
// exactly, case-sensitive); 1.0 when both are empty.
double ApiSetIoU(const std::set<std::string>& prediction, const std::set<std::string>& gold);

// ToolBench API-set IoU of a prediction against golds, each parsed with ParseApiSet; with several
// golds, the best (max) score; 0.0 with no golds.
double ToolBenchApiIoU(std::string_view prediction, std::span<const std::string> golds);

// ---- Metric selection and per-example scoring --------------------------------------------

enum class Metric { kNqSubstring, kSquadLowercaseSubstring, kGsm8kFinalNumber, kToolBenchApiIoU };

// Names used in configs, predictions.jsonl and metrics.json: "nq_substring_em",
// "squad_lower_substring", "gsm8k_final_number", "toolbench_api_iou".
std::string_view MetricName(Metric metric);

// Inverse of MetricName. INVALID_ARGUMENT listing the known names for anything else.
absl::StatusOr<Metric> ParseMetric(std::string_view name);

// The score of one prediction under `metric` against `references`.
double Score(Metric metric, std::string_view prediction, std::span<const std::string> references);

// ---- Records, summary, files ----------------------------------------------------------------

// One evaluated example, a line of predictions.jsonl.
struct PredictionRecord {
  std::string id;
  std::string prompt;
  std::string prediction;
  std::vector<std::string> references;
  // Metric name -> score.
  std::map<std::string, double> scores;
};

// Scores `record` (its prediction against its references) with each of `metrics`, filling
// record->scores.
void ScoreRecord(std::span<const Metric> metrics, PredictionRecord* record);

struct MetricsSummary {
  int64_t num_examples = 0;
  // Metric name -> mean of that metric's scores over the records that carry it.
  std::map<std::string, double> means;
  // Metric name -> number of records that carry it.
  std::map<std::string, int64_t> counts;
};

// Means of the per-example scores. No records gives num_examples 0 and empty maps.
MetricsSummary Summarize(std::span<const PredictionRecord> records);

// One line per record, in order:
//   {"id": ..., "prompt": ..., "prediction": ..., "references": [...], "scores": {name: x}}
// Strings that are not valid UTF-8 (a model can generate broken byte sequences) are written with
// U+FFFD in place of the invalid bytes. The file is created or truncated, written and fsynced.
absl::Status WritePredictionsJsonl(const std::string& path,
                                   std::span<const PredictionRecord> records);

// {"num_examples": N, "metrics": {name: mean, ...}, "counts": {name: count, ...}} plus the
// string entries of `extra` (e.g. model, checkpoint, step) at the top level; an `extra` key equal
// to one of the three reserved names is INVALID_ARGUMENT. Written like WritePredictionsJsonl.
absl::Status WriteMetricsJson(const std::string& path, const MetricsSummary& summary,
                              const std::map<std::string, std::string>& extra = {});

}  // namespace meft::worker
