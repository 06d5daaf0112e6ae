// UTF-8 validation and lossy decoding with exactly the replacement rule of Rust's
// String::from_utf8_lossy, which Hugging Face tokenizers uses to turn decoded bytes into text:
// one U+FFFD per "maximal subpart of an ill-formed subsequence" (Unicode 15, §3.9, U+FFFD
// substitution of maximal subparts).
//
//   std::string s = LossyUtf8("a\xE2\x82" "b");   // "a\uFFFDb"
//   Utf8Scan r = ScanUtf8(bytes);                  // valid prefix, then error or incomplete tail
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace kraken::tokenizer {

/// The replacement character U+FFFD in UTF-8.
inline constexpr std::string_view kReplacement = "\xEF\xBF\xBD";

/// Result of scanning bytes for the first problem.
struct Utf8Scan {
  size_t valid = 0;         // bytes [0, valid) are well-formed UTF-8
  size_t error_len = 0;     // > 0: bytes [valid, valid + error_len) are one ill-formed subpart
  bool incomplete = false;  // error_len == 0 and valid < size: a truncated but so-far-valid sequence
};

/// Scans `bytes` up to the first ill-formed subpart or truncated sequence.
Utf8Scan ScanUtf8(std::string_view bytes);

/// True when `bytes` is entirely well-formed UTF-8; otherwise `*error_offset` (if given) is the
/// offset of the first byte that is not.
bool IsValidUtf8(std::string_view bytes, size_t* error_offset = nullptr);

/// Appends `bytes` to `*out` with each ill-formed subpart, and a truncated tail, replaced by U+FFFD.
void AppendLossyUtf8(std::string_view bytes, std::string* out);
inline std::string LossyUtf8(std::string_view bytes) {
  std::string out;
  AppendLossyUtf8(bytes, &out);
  return out;
}

/// Appends the UTF-8 encoding of code point `cp` (must be a scalar value).
void AppendCodePoint(char32_t cp, std::string* out);

}  // namespace kraken::tokenizer
