#pragma once

// Instruction-tuning examples from JSONL files (DESIGN §5).
//
// Data file: one JSON object per line,
//   {"instruction": "...", "input": "...", "output": "..."}
// `instruction` and `output` are required strings; `input` is an optional string (null or absent
// means no input). Optional extras used by evaluation: `id` (string or integer) and `answers`
// (array of strings: the gold references when there are several). Other fields are ignored.
// Blank lines are skipped. Errors are INVALID_ARGUMENT naming `file:line` and the field, e.g.
// `train.jsonl:17: field "output" is missing`.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace meft::worker {

struct Example {
  std::string instruction;
  // Empty when the line has no input (absent, null or "").
  std::string input;
  std::string output;
  // The line's `id` (an integer is written in decimal); otherwise the 0-based position of the
  // example among the file's examples, in decimal.
  std::string id;
  // The line's `answers`; empty when absent.
  std::vector<std::string> answers;
  // 1-based line number in the source file.
  int64_t line = 0;
};

// Reads and parses the JSONL file `path`. NOT_FOUND if it does not exist; INVALID_ARGUMENT naming
// `path:line` and the field for a bad line, or `path` alone when it holds no example.
absl::StatusOr<std::vector<Example>> LoadJsonl(const std::string& path);

// Parses JSONL `content`; `source` stands for the file name in error messages.
absl::StatusOr<std::vector<Example>> ParseJsonl(std::string_view content,
                                                const std::string& source);

// The gold references of an example for evaluation: `answers` when non-empty, else {output}.
std::vector<std::string> References(const Example& example);

}  // namespace meft::worker
