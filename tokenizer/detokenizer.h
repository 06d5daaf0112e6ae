// Streaming detokenization: turns generated token ids into text deltas that are always complete
// UTF-8, and whose concatenation equals Tokenizer::Decode of all the ids — however many ids
// each Add carries.
//
//   IncrementalDetokenizer d(*tok, /*skip_special=*/true);
//   std::string delta;
//   KRAKEN_RETURN_IF_ERROR(d.Add(id, &delta));   // may append nothing: a character is incomplete
//   ...
//   d.Finish(&delta);                             // end of generation: flush what is held
//
// How: token bytes are appended to a pending buffer; everything up to the last position where
// the bytes cannot change meaning is emitted (valid characters as they are, ill-formed subparts
// as U+FFFD exactly as Decode would), and a truncated but so-far-valid character (at most 3 bytes)
// is held until the next token completes or breaks it. Decoding bytes this way is prefix-stable,
// which is why the deltas add up to the one-shot decode, whatever the chunking.
#pragma once

#include <cstdint>
#include <string>

#include "tokenizer/tokenizer.h"

namespace kraken::tokenizer {

class IncrementalDetokenizer {
 public:
  /// `tokenizer` must outlive this object.
  IncrementalDetokenizer(const Tokenizer& tokenizer, bool skip_special)
      : tokenizer_(tokenizer), skip_special_(skip_special) {}

  /// Appends the newly final text of token `id` to `*delta`. INVALID_ARGUMENT for an unknown id
  /// (nothing is consumed then).
  Status Add(int32_t id, std::string* delta);
  /// Appends what is still held (an incomplete character becomes U+FFFD) and resets.
  void Finish(std::string* delta);
  /// Bytes held back, waiting for the rest of a character (0..3).
  size_t pending_bytes() const { return pending_.size(); }

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_;
  std::string pending_;
};

}  // namespace kraken::tokenizer
