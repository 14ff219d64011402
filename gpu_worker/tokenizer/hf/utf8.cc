#include "gpu_worker/tokenizer/hf/utf8.h"

#include <array>

namespace meft::worker::hf {
namespace {

// Length of a well-formed sequence starting with `lead` and the allowed range of its second
// byte (Unicode Table 3-7); length 0 for a byte that cannot start one.
struct LeadInfo {
  size_t length;
  uint8_t low;
  uint8_t high;
};

LeadInfo Lead(uint8_t b) {
  if (b < 0x80) return {1, 0, 0};
  if (b >= 0xC2 && b <= 0xDF) return {2, 0x80, 0xBF};
  if (b == 0xE0) return {3, 0xA0, 0xBF};
  if (b == 0xED) return {3, 0x80, 0x9F};
  if (b >= 0xE1 && b <= 0xEF) return {3, 0x80, 0xBF};
  if (b == 0xF0) return {4, 0x90, 0xBF};
  if (b >= 0xF1 && b <= 0xF3) return {4, 0x80, 0xBF};
  if (b == 0xF4) return {4, 0x80, 0x8F};
  return {0, 0, 0};
}

// Number of bytes of the well-formed prefix of the sequence at text[pos] (== Lead().length when
// the sequence is complete and valid).
size_t ValidPrefix(std::string_view text, size_t pos, const LeadInfo& lead) {
  if (lead.length == 0) return 0;
  size_t n = 1;
  while (n < lead.length && pos + n < text.size()) {
    const uint8_t c = static_cast<uint8_t>(text[pos + n]);
    const uint8_t low = n == 1 ? lead.low : 0x80;
    const uint8_t high = n == 1 ? lead.high : 0xBF;
    if (c < low || c > high) break;
    ++n;
  }
  return n;
}

bool IsPrintable(char32_t b) {
  return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

struct ByteLevelTables {
  std::array<std::string, 256> chars;
  // remapped[i]: the byte whose code point is U+0100 + i.
  std::array<uint8_t, 68> remapped{};
  ByteLevelTables() {
    int next = 0;
    for (int b = 0; b < 256; ++b) {
      char32_t c = static_cast<char32_t>(b);
      if (!IsPrintable(c)) {
        remapped[next] = static_cast<uint8_t>(b);
        c = static_cast<char32_t>(256 + next++);
      }
      AppendChar(c, &chars[b]);
    }
  }
};

const ByteLevelTables& Tables() {
  static const ByteLevelTables* tables = new ByteLevelTables();
  return *tables;
}

}  // namespace

bool IsValidUtf8(std::string_view text) {
  for (size_t i = 0; i < text.size();) {
    const LeadInfo lead = Lead(static_cast<uint8_t>(text[i]));
    if (lead.length == 0 || ValidPrefix(text, i, lead) != lead.length) return false;
    i += lead.length;
  }
  return true;
}

std::string ToValidUtf8(std::string_view text, std::vector<size_t>* offsets) {
  std::string out;
  out.reserve(text.size());
  if (offsets != nullptr) offsets->assign(text.size() + 1, 0);
  for (size_t i = 0; i < text.size();) {
    const LeadInfo lead = Lead(static_cast<uint8_t>(text[i]));
    const size_t valid = ValidPrefix(text, i, lead);
    // A complete sequence is copied; otherwise the well-formed prefix (at least the lead byte)
    // becomes one replacement character and decoding resumes at the byte that broke it.
    const bool complete = lead.length != 0 && valid == lead.length;
    const size_t consumed = complete ? lead.length : (valid == 0 ? 1 : valid);
    if (offsets != nullptr) {
      for (size_t k = 0; k < consumed; ++k) (*offsets)[i + k] = out.size() + (complete ? k : 0);
    }
    if (complete) {
      out.append(text.substr(i, consumed));
    } else {
      out.append(kReplacementCharacter);
    }
    i += consumed;
  }
  if (offsets != nullptr) offsets->back() = out.size();
  return out;
}

size_t CharLength(std::string_view text, size_t pos) {
  const uint8_t b = static_cast<uint8_t>(text[pos]);
  if (b < 0x80) return 1;
  if (b < 0xE0) return 2;
  if (b < 0xF0) return 3;
  return 4;
}

char32_t DecodeChar(std::string_view text, size_t pos) {
  const size_t n = CharLength(text, pos);
  const uint8_t b = static_cast<uint8_t>(text[pos]);
  if (n == 1) return b;
  char32_t c = b & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) c = (c << 6) | (static_cast<uint8_t>(text[pos + k]) & 0x3F);
  return c;
}

size_t PreviousCharStart(std::string_view text, size_t pos) {
  size_t start = pos - 1;
  while (start > 0 && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
  return start;
}

void AppendChar(char32_t c, std::string* out) {
  if (c < 0x80) {
    out->push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (c >> 6)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (c >> 12)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (c >> 18)));
    out->push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

std::string_view ByteLevelChar(uint8_t byte) { return Tables().chars[byte]; }

int ByteLevelByte(char32_t c) {
  if (c < 256) return IsPrintable(c) ? static_cast<int>(c) : -1;
  // The 68 remapped bytes take U+0100..U+0143 in byte order.
  if (c >= 256 + 68) return -1;
  return Tables().remapped[c - 256];
}

}  // namespace meft::worker::hf
