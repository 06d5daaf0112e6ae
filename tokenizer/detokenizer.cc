#include "tokenizer/detokenizer.h"

#include "tokenizer/utf8.h"

namespace kraken::tokenizer {

Status IncrementalDetokenizer::Add(int32_t id, std::string* delta) {
  KRAKEN_RETURN_IF_ERROR(tokenizer_.AppendTokenBytes(id, skip_special_, &pending_));
  std::string_view rest = pending_;
  while (!rest.empty()) {
    const Utf8Scan r = ScanUtf8(rest);
    delta->append(rest.substr(0, r.valid));
    if (r.incomplete) {
      rest.remove_prefix(r.valid);  // hold the truncated character
      break;
    }
    if (r.valid == rest.size()) {
      rest = {};
      break;
    }
    delta->append(kReplacement);
    rest.remove_prefix(r.valid + r.error_len);
  }
  pending_.assign(rest);
  return absl::OkStatus();
}

void IncrementalDetokenizer::Finish(std::string* delta) {
  AppendLossyUtf8(pending_, delta);
  pending_.clear();
}

}  // namespace kraken::tokenizer
