#pragma once

// The byte layout of a Lookup answer, shared by the server that writes it and the worker that
// sizes the memory it is written into (DESIGN §3). When the answer is placed in memory the caller
// offered (a same-host worker's shared-memory region), its tensors follow each other in the order
// below, each starting at a multiple of kAnswerAlignment. Both sides compute sizes here, so they
// cannot drift apart.

#include <cstdint>
#include <span>
#include <vector>

namespace meft::wire {

// Every placed tensor starts at a multiple of this (a cache line; shm::kAlignment).
inline constexpr uint64_t kAnswerAlignment = 64;

// The tensors of an answer, in layout order (the order of the reply's fields).
enum class AnswerField {
  kRowIds,        // [rows] int32
  kKeys,          // [rows, d] rows of the row dtype
  kValues,        // [rows, d]
  kTokenRows,     // [tokens, top_k] int32 (per_token)
  kTokenGates,    // [tokens, top_k] fp32 (per_token)
  kTokenExperts,  // [tokens, top_k] int32 (gated per_token)
  kExpertIds,     // [experts] int32 (gated per_token)
  kRouterRows,    // [experts, d] (gated per_token)
};

// Every field, in layout order.
inline constexpr AnswerField kAnswerFields[] = {
    AnswerField::kRowIds,     AnswerField::kKeys,         AnswerField::kValues,
    AnswerField::kTokenRows,  AnswerField::kTokenGates,   AnswerField::kTokenExperts,
    AnswerField::kExpertIds,  AnswerField::kRouterRows};

const char* AnswerFieldName(AnswerField field);  // "row_ids", "keys", ...

// What decides the answer's size.
struct LookupAnswerShape {
  uint64_t rows = 0;       // |S|, the selected rows
  uint64_t row_bytes = 0;  // bytes of one row: d * the row dtype's size
  uint64_t tokens = 0;     // T
  uint64_t top_k = 0;      // slots per token
  uint64_t experts = 0;    // n_e, the probed experts (gated per_token only)
  bool per_token = false;  // per_token mode: token_rows and token_gates are sent
  bool gated = false;      // gated per_token: token_experts, expert_ids and router_rows too
};

struct AnswerTensorLayout {
  AnswerField field;
  uint64_t bytes = 0;
};

// The tensors `shape` has, in layout order, with their byte sizes.
std::vector<AnswerTensorLayout> LookupAnswerLayout(const LookupAnswerShape& shape);

// Bytes the tensors take when placed from an aligned offset: the sum of their sizes, each rounded
// up to kAnswerAlignment.
uint64_t PlacedBytes(std::span<const AnswerTensorLayout> layout);

// Rounds `at` up to a multiple of kAnswerAlignment.
constexpr uint64_t AlignAnswer(uint64_t at) {
  return (at + kAnswerAlignment - 1) & ~(kAnswerAlignment - 1);
}

}  // namespace meft::wire
