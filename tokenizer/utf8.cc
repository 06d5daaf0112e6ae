#include "tokenizer/utf8.h"

#include <cstdint>

namespace kraken::tokenizer {

Utf8Scan ScanUtf8(std::string_view bytes) {
  const auto* s = reinterpret_cast<const uint8_t*>(bytes.data());
  const size_t n = bytes.size();
  size_t i = 0;
  while (i < n) {
    const uint8_t b = s[i];
    if (b < 0x80) {
      ++i;
      continue;
    }
    // Length and the allowed range of the second byte (Unicode Table 3-7).
    int len;
    uint8_t lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) {
      len = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
      len = 3;
      if (b == 0xE0) lo = 0xA0;
      if (b == 0xED) hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
      len = 4;
      if (b == 0xF0) lo = 0x90;
      if (b == 0xF4) hi = 0x8F;
    } else {
      return {i, 1, false};
    }
    for (int k = 1; k < len; ++k) {
      if (i + k >= n) return {i, 0, true};
      const uint8_t c = s[i + k];
      const uint8_t l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
      if (c < l || c > h) return {i, static_cast<size_t>(k), false};
    }
    i += len;
  }
  return {n, 0, false};
}

bool IsValidUtf8(std::string_view bytes, size_t* error_offset) {
  const Utf8Scan r = ScanUtf8(bytes);
  if (r.valid == bytes.size()) return true;
  if (error_offset != nullptr) *error_offset = r.valid;
  return false;
}

void AppendLossyUtf8(std::string_view bytes, std::string* out) {
  while (!bytes.empty()) {
    const Utf8Scan r = ScanUtf8(bytes);
    out->append(bytes.substr(0, r.valid));
    if (r.valid == bytes.size()) return;
    out->append(kReplacement);
    if (r.incomplete) return;  // the truncated tail is one subpart
    bytes.remove_prefix(r.valid + r.error_len);
  }
}

void AppendCodePoint(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace kraken::tokenizer
