#pragma once

// UTF-8 helpers of the tokenizer.json backend: repairing arbitrary bytes into valid UTF-8 the way
// Rust's String::from_utf8_lossy (and Python's bytes.decode("utf-8", "replace")) does, walking
// code points, and GPT-2's byte-level alphabet. Pure functions; thread-safe.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace meft::worker::hf {

// "\xEF\xBF\xBD", U+FFFD REPLACEMENT CHARACTER.
inline constexpr std::string_view kReplacementCharacter = "\xEF\xBF\xBD";

// True if `text` is well-formed UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF).
bool IsValidUtf8(std::string_view text);

// `text` with every maximal ill-formed subsequence replaced by U+FFFD (the Unicode "maximal
// subpart" practice that Rust's from_utf8_lossy follows). When `offsets` is not null it receives
// text.size() + 1 entries: (*offsets)[i] is the position in the result of input byte i (the start
// of its replacement character for bytes inside an ill-formed subsequence), and the last entry is
// the result's size.
std::string ToValidUtf8(std::string_view text, std::vector<size_t>* offsets = nullptr);

// Byte length of the UTF-8 sequence starting at text[pos] in valid UTF-8; requires pos < size.
size_t CharLength(std::string_view text, size_t pos);

// Decodes the code point at text[pos] of valid UTF-8; requires pos < size.
char32_t DecodeChar(std::string_view text, size_t pos);

// Start of the code point that ends at text[pos - 1] of valid UTF-8; requires pos > 0.
size_t PreviousCharStart(std::string_view text, size_t pos);

// Appends the UTF-8 encoding of `c` (a Unicode scalar value) to `out`.
void AppendChar(char32_t c, std::string* out);

// GPT-2's byte-level alphabet: each byte maps to one printable code point (bytes '!'..'~',
// 0xA1..0xAC and 0xAE..0xFF to themselves, the other 68 to U+0100 upwards in byte order).
// The UTF-8 text of `byte`'s code point.
std::string_view ByteLevelChar(uint8_t byte);
// The byte whose code point is `c`, or -1 if `c` is not in the alphabet.
int ByteLevelByte(char32_t c);

}  // namespace meft::worker::hf
