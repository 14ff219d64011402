#include "common/wire/lookup_layout.h"

namespace meft::wire {

const char* AnswerFieldName(AnswerField field) {
  switch (field) {
    case AnswerField::kRowIds:
      return "row_ids";
    case AnswerField::kKeys:
      return "keys";
    case AnswerField::kValues:
      return "values";
    case AnswerField::kTokenRows:
      return "token_rows";
    case AnswerField::kTokenGates:
      return "token_gates";
    case AnswerField::kTokenExperts:
      return "token_experts";
    case AnswerField::kExpertIds:
      return "expert_ids";
    case AnswerField::kRouterRows:
      return "router_rows";
  }
  return "?";
}

std::vector<AnswerTensorLayout> LookupAnswerLayout(const LookupAnswerShape& s) {
  const uint64_t slots = s.tokens * s.top_k;
  std::vector<AnswerTensorLayout> out = {{AnswerField::kRowIds, s.rows * 4},
                                         {AnswerField::kKeys, s.rows * s.row_bytes},
                                         {AnswerField::kValues, s.rows * s.row_bytes}};
  if (s.per_token) {
    out.push_back({AnswerField::kTokenRows, slots * 4});
    out.push_back({AnswerField::kTokenGates, slots * 4});
    if (s.gated) {
      out.push_back({AnswerField::kTokenExperts, slots * 4});
      out.push_back({AnswerField::kExpertIds, s.experts * 4});
      out.push_back({AnswerField::kRouterRows, s.experts * s.row_bytes});
    }
  }
  return out;
}

uint64_t PlacedBytes(std::span<const AnswerTensorLayout> layout) {
  uint64_t total = 0;
  for (const AnswerTensorLayout& t : layout) total += AlignAnswer(t.bytes);
  return total;
}

}  // namespace meft::wire
