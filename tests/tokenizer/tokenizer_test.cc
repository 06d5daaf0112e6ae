// Tokenizer loading errors, encode errors, and the streaming detokenizer's contract. (Exact ids
// against Hugging Face are checked in tools/tests/test_tokenizer.py on >= 1 MB of text.)
#include "tokenizer/tokenizer.h"

#include <gtest/gtest.h>

#include <random>

#include "tokenizer/detokenizer.h"
#include "tokenizer/utf8.h"

namespace kraken::tokenizer {
namespace {

std::string Mixed() {
  const char* s = std::getenv("KRAKEN_SOURCE_DIR");
  return std::string(s ? s : ".") + "/tests/data/tokenizers/mixed-4k/tokenizer.json";
}

class TokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto t = Tokenizer::FromFile(Mixed());
    ASSERT_TRUE(t.ok()) << t.status();
    tok_ = std::move(t).value();
  }
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(TokenizerTest, RoundTripsTextAndRefusesInvalidUtf8) {
  const std::string text = "In the beginning 你好 \xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9 it's  \t\n x";
  auto ids = tok_->Encode(text);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_GT(ids->size(), 5u);
  EXPECT_EQ(*tok_->Decode(*ids, false), text);
  auto bad = tok_->Encode("abc\xC3(");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().message(), "text is not valid UTF-8 (first bad byte at offset 3)");
  EXPECT_TRUE(tok_->Encode("")->empty());
  auto unknown = tok_->Decode(std::vector<int32_t>{5, 4096}, false);
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.status().message(), "token id 4096 is not in the vocabulary [0, 4096)");
}

TEST_F(TokenizerTest, SpecialTokensSplitOutUnlessDisabled) {
  const int32_t eot = *tok_->TokenToId("<|endoftext|>");
  EXPECT_TRUE(tok_->IsSpecial(eot));
  auto with = tok_->Encode("a<|endoftext|>b");
  ASSERT_EQ(with->size(), 3u);
  EXPECT_EQ((*with)[1], eot);
  auto without = tok_->Encode("a<|endoftext|>b", /*parse_special=*/false);
  EXPECT_EQ(std::count(without->begin(), without->end(), eot), 0);
  EXPECT_EQ(*tok_->Decode(*with, /*skip_special=*/true), "ab");
  EXPECT_EQ(*tok_->Decode(*with, /*skip_special=*/false), "a<|endoftext|>b");
}

TEST_F(TokenizerTest, LongRunsAreLinearNotQuadratic) {
  // One pre-token of 200k spaces: the merge loop must be O(n log n).
  const std::string spaces(200000, ' ');
  auto ids = tok_->Encode(spaces);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(*tok_->Decode(*ids, false), spaces);
}

TEST_F(TokenizerTest, StreamedDeltasAreWholeCharactersAndAddUpToTheDecode) {
  std::mt19937 rng(20241130);
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<int32_t> ids(rng() % 40);
    for (auto& id : ids) id = static_cast<int32_t>(trial % 3 == 0 ? rng() % 256 : rng() % tok_->vocab_size());
    for (bool skip : {false, true}) {
      IncrementalDetokenizer d(*tok_, skip);
      std::string all;
      for (size_t i = 0; i < ids.size(); ++i) {
        std::string delta;
        ASSERT_TRUE(d.Add(ids[i], &delta).ok());
        ASSERT_TRUE(IsValidUtf8(delta)) << "delta of token " << i;
        ASSERT_LE(d.pending_bytes(), 3u);
        all += delta;
      }
      std::string tail;
      d.Finish(&tail);
      ASSERT_EQ(all + tail, *tok_->Decode(ids, skip));
      ASSERT_EQ(d.pending_bytes(), 0u);
    }
  }
}

TEST_F(TokenizerTest, ACharacterSplitAcrossTokensIsHeldThenReleasedWhole) {
  // 你 = E4 BD A0: feed it byte token by byte token.
  const std::string ni = "\xE4\xBD\xA0";
  std::vector<int32_t> bytes;
  for (unsigned char c : ni) {
    // The id of the single-byte symbol for c: the token whose bytes are exactly c.
    for (int32_t id = 0; id < tok_->vocab_size(); ++id) {
      std::string b;
      if (tok_->AppendTokenBytes(id, false, &b).ok() && b == std::string(1, static_cast<char>(c))) {
        bytes.push_back(id);
        break;
      }
    }
  }
  ASSERT_EQ(bytes.size(), 3u);
  IncrementalDetokenizer d(*tok_, false);
  std::string out;
  ASSERT_TRUE(d.Add(bytes[0], &out).ok());
  ASSERT_TRUE(d.Add(bytes[1], &out).ok());
  EXPECT_EQ(out, "");  // held: nothing broken is streamed
  EXPECT_EQ(d.pending_bytes(), 2u);
  ASSERT_TRUE(d.Add(bytes[2], &out).ok());
  EXPECT_EQ(out, ni);
  // A character left unfinished at the end is flushed as U+FFFD, as the one-shot decode gives.
  IncrementalDetokenizer e(*tok_, false);
  std::string partial;
  ASSERT_TRUE(e.Add(bytes[0], &partial).ok());
  e.Finish(&partial);
  EXPECT_EQ(partial, std::string(kReplacement));
  EXPECT_EQ(partial, *tok_->Decode(std::vector<int32_t>{bytes[0]}, false));
  // An unknown id is refused and consumes nothing.
  std::string none;
  EXPECT_FALSE(e.Add(-1, &none).ok());
  EXPECT_EQ(none, "");
}

TEST(TokenizerLoad, RefusesConfigurationsItWouldMisTokenize) {
  const std::string base = R"({"model":{"type":"BPE","vocab":{},"merges":[]},"pre_tokenizer":{"type":"ByteLevel"},
                               "decoder":{"type":"ByteLevel"})";
  auto err = [](const std::string& j) {
    auto t = Tokenizer::FromTokenizerJson(j);
    return t.ok() ? std::string() : std::string(t.status().message());
  };
  EXPECT_EQ(err(base + R"(,"normalizer":{"type":"NFC"}})"),
            "tokenizer.json: 'normalizer' is {\"type\":\"NFC\"}; only null is supported");
  EXPECT_EQ(
      err(R"({"model":{"type":"WordPiece"},"pre_tokenizer":{"type":"ByteLevel"},"decoder":{"type":"ByteLevel"}})"),
      "tokenizer.json: 'model.type' is \"WordPiece\"; only \"BPE\" is supported");
  EXPECT_EQ(
      err(R"({"model":{"type":"BPE","vocab":{},"merges":[]},"pre_tokenizer":{"type":"Metaspace"},"decoder":{"type":"ByteLevel"}})"),
      "tokenizer.json: 'pre_tokenizer' is {\"type\":\"Metaspace\"}; only ByteLevel is supported");
  EXPECT_EQ(
      err(R"({"model":{"type":"BPE","byte_fallback":true,"vocab":{},"merges":[]},"pre_tokenizer":{"type":"ByteLevel"},"decoder":{"type":"ByteLevel"}})"),
      "tokenizer.json: 'model.byte_fallback' is true; only false is supported");
  EXPECT_NE(err(base + "}").find("lacks the byte-level symbol for byte 0"), std::string::npos);
  EXPECT_EQ(err("[1]"), "tokenizer.json: not a JSON object");
  // Keys a Sequence pre-tokenizer leaves out are read as absent, never looked up in a const object.
  const std::string split = R"({"type":"Split","behavior":"Isolated","pattern":{"Regex":"a"}})";
  EXPECT_EQ(err(R"({"model":{"type":"BPE","vocab":{},"merges":[]},"decoder":{"type":"ByteLevel"},"pre_tokenizer":)"
                R"({"type":"Sequence","pretokenizers":[)" +
                split + R"(,{"type":"ByteLevel"}]}})"),
            "tokenizer.json: 'pre_tokenizer.use_regex' is true; only false is supported");
  EXPECT_EQ(err(R"({"model":{"type":"BPE","vocab":{},"merges":[]},"decoder":{"type":"ByteLevel"},)"
                R"("pre_tokenizer":{"type":"Sequence"}})"),
            "tokenizer.json: 'pre_tokenizer' is {\"type\":\"Sequence\"}; only ByteLevel or Sequence[Split, "
            "ByteLevel] is supported");
  auto missing = Tokenizer::FromModelDir("/nonexistent");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace kraken::tokenizer
