// Byte-level BPE tokenizer, token for token identical to Hugging Face `tokenizers` for the
// configurations it accepts (GPT-2's, and byte-level BPEs trained with `tokenizers`).
//
//   KRAKEN_ASSIGN_OR_RETURN(auto tok, Tokenizer::FromModelDir("models/kraken-4way"));
//   KRAKEN_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tok->Encode("Hello world"));
//   KRAKEN_ASSIGN_OR_RETURN(std::string text, tok->Decode(ids, /*skip_special=*/true));
//
// Encoding (the order Hugging Face applies): added tokens are split out first (leftmost-longest
// match; special tokens only when `parse_special`), the rest is cut into pre-tokens by the GPT-2
// regex (PCRE2 with Unicode classes and JIT), each pre-token's bytes are mapped to GPT-2's
// byte-level alphabet and merged by BPE rank (lowest rank first, leftmost on ties), with a cache
// of recent words. Decoding concatenates each token's bytes and turns them into text with
// Rust's from_utf8_lossy rule (tokenizer/utf8.h), as Hugging Face's ByteLevel decoder does.
// Accepted: model BPE (no dropout, unk, prefixes, byte fallback), pre-tokenizer ByteLevel (or a
// Sequence of an isolating regex Split and a regex-less ByteLevel), decoder ByteLevel, no
// normalizer; post-processor absent, ByteLevel, TemplateProcessing (its single-sequence template:
// special tokens such as a BOS around the text), RobertaProcessing, BertProcessing, or a Sequence
// of these. Anything else is refused at load by name.
// Thread-safe: Encode and Decode may run concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "base/status.h"

namespace kraken::tokenizer {

using kraken::Status;
using kraken::StatusOr;

/// A token matched in the text before BPE (Hugging Face "added token").
struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool normalized = false;  // matched after normalization (no normalizer here: only the order differs)
};

class Tokenizer {
 public:
  /// Parses a Hugging Face tokenizer.json. INVALID_ARGUMENT for malformed JSON or fields;
  /// UNIMPLEMENTED, naming the field and value, for configurations outside the accepted set.
  static StatusOr<std::unique_ptr<Tokenizer>> FromTokenizerJson(std::string_view json,
                                                                std::string_view label = "tokenizer.json");
  /// Reads and parses a tokenizer.json file. NOT_FOUND if it cannot be read.
  static StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  /// GPT-2's original pair: vocab.json (token -> id) and merges.txt ("a b" per line, optional
  /// "#version" header). `special_tokens` must be in the vocabulary (GPT-2: "<|endoftext|>").
  static StatusOr<std::unique_ptr<Tokenizer>> FromVocabMerges(const std::string& vocab_path,
                                                              const std::string& merges_path,
                                                              const std::vector<std::string>& special_tokens);
  /// `dir`/tokenizer.json, else `dir`/vocab.json + `dir`/merges.txt with "<|endoftext|>" special.
  static StatusOr<std::unique_ptr<Tokenizer>> FromModelDir(const std::string& dir);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  /// Token ids of `text`. INVALID_ARGUMENT when `text` is not valid UTF-8 (naming the byte
  /// offset). With `parse_special` false, special tokens in the text are encoded as plain text.
  /// With `add_special_tokens` (Hugging Face's default) the post-processor's single-sequence
  /// template wraps the ids (template_prefix() + ids + template_suffix()); a chat template that
  /// writes its own BOS passes false.
  StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool parse_special = true,
                                        bool add_special_tokens = true) const;
  /// The ids the post-processor puts before / after a single sequence (often a BOS / nothing).
  const std::vector<int32_t>& template_prefix() const { return template_prefix_; }
  const std::vector<int32_t>& template_suffix() const { return template_suffix_; }

  /// Appends the bytes token `id` decodes to (nothing for a special token when `skip_special`).
  /// INVALID_ARGUMENT for an id that names no token.
  Status AppendTokenBytes(int32_t id, bool skip_special, std::string* out) const;
  /// Text of `ids` (U+FFFD for bytes that do not form UTF-8). INVALID_ARGUMENT for unknown ids.
  StatusOr<std::string> Decode(std::span<const int32_t> ids, bool skip_special) const;

  /// One past the largest token id.
  int32_t vocab_size() const { return static_cast<int32_t>(token_bytes_.size()); }
  /// True for ids of special added tokens.
  bool IsSpecial(int32_t id) const;
  /// The id of a vocabulary or added token given in its stored form, if any.
  std::optional<int32_t> TokenToId(std::string_view token) const;
  const std::vector<AddedToken>& added_tokens() const { return added_; }

 private:
  Tokenizer() = default;
  struct Regex;
  struct Merge {
    int32_t rank;
    int32_t id;
  };

  // A piece of the input: plain text [begin, end), or an added token (token >= 0).
  struct Segment {
    size_t begin, end;
    int32_t token;
  };

  // Builds the derived tables once vocab_, merges_ and added_ are filled.
  Status Finish(std::string_view label);
  // Splits the plain segments around the added tokens of one pass.
  void SplitAdded(std::string_view text, bool parse_special, bool normalized_pass,
                  std::vector<Segment>* segments) const;
  Status EncodeText(std::string_view text, std::vector<int32_t>* out) const;
  void EncodeWord(std::string_view word, std::vector<int32_t>* out) const;

  absl::flat_hash_map<std::string, int32_t> vocab_;  // byte-level form -> id
  absl::flat_hash_map<uint64_t, Merge> merges_;      // (left id, right id) -> rank, merged id
  std::vector<AddedToken> added_;
  std::vector<std::string> token_bytes_;  // id -> decoded bytes
  std::vector<uint8_t> valid_id_;         // id names a token
  std::vector<uint8_t> special_id_;
  int32_t byte_token_[256] = {};        // id of each single-byte symbol
  uint8_t added_first_byte_[256] = {};  // some added token starts with this byte
  std::unique_ptr<Regex> regex_;
  bool add_prefix_space_ = false;
  bool ignore_merges_ = false;
  std::vector<int32_t> template_prefix_, template_suffix_;  // post-processor, single sequence

  // Words of fewer than kCacheWordBytes bytes, up to kCacheEntries of them (as Hugging Face).
  static constexpr size_t kCacheWordBytes = 256;
  static constexpr size_t kCacheEntries = 10000;
  mutable std::mutex cache_mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace kraken::tokenizer
