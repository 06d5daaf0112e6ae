#include "tokenizer/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <queue>

#include <nlohmann/json.hpp>

#include "base/json_util.h"

#include "tokenizer/utf8.h"

namespace kraken::tokenizer {
namespace {

using json = nlohmann::json;

// GPT-2's pre-tokenizer (Radford et al. 2019; Hugging Face ByteLevel with use_regex):
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// with `\s` spelled out as Unicode's White_Space property, which is what Hugging Face's `\s`
// matches; PCRE2's own `\s` (with UCP) leaves out U+0085.
std::string Gpt2Pattern() {
  const std::string ws =
      R"(\t\n\x{0B}\f\r \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";
  return R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^)" + ws + R"(\p{L}\p{N}]+|[)" + ws + "]+(?![^" + ws + "])|[" +
         ws + "]+";
}

// GPT-2's reversible byte <-> printable-character map: printable Latin-1 bytes map to
// themselves, the other 68 bytes to U+0100 upward in byte order.
struct ByteLevelTables {
  char32_t byte_to_cp[256];
  absl::flat_hash_map<char32_t, uint8_t> cp_to_byte;
  std::string byte_to_utf8[256];
  ByteLevelTables() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      byte_to_cp[b] = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
      cp_to_byte[byte_to_cp[b]] = static_cast<uint8_t>(b);
      AppendCodePoint(byte_to_cp[b], &byte_to_utf8[b]);
    }
  }
};

const ByteLevelTables& Tables() {
  static const ByteLevelTables t;
  return t;
}

// Next code point of valid UTF-8 at s[*i]; advances *i.
char32_t NextCodePoint(std::string_view s, size_t* i) {
  const auto b = static_cast<uint8_t>(s[*i]);
  int len = b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
  char32_t cp = len == 1 ? b : len == 2 ? (b & 0x1F) : len == 3 ? (b & 0x0F) : (b & 0x07);
  for (int k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<uint8_t>(s[*i + k]) & 0x3F);
  *i += len;
  return cp;
}

// Bytes a token string decodes to under Hugging Face's ByteLevel decoder: the byte of each
// character when every character is in the byte-level alphabet, else the string's own UTF-8.
std::string DecodeTokenString(std::string_view token) {
  const auto& t = Tables();
  std::string out;
  size_t i = 0;
  while (i < token.size()) {
    auto it = t.cp_to_byte.find(NextCodePoint(token, &i));
    if (it == t.cp_to_byte.end()) return std::string(token);
    out.push_back(static_cast<char>(it->second));
  }
  return out;
}

uint64_t PairKey(int32_t a, int32_t b) {
  return static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32 | static_cast<uint32_t>(b);
}

StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound("cannot read '", path, "'");
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace

struct Tokenizer::Regex {
  pcre2_code* code = nullptr;
  ~Regex() {
    if (code != nullptr) pcre2_code_free(code);
  }
};

Tokenizer::~Tokenizer() = default;

namespace {

StatusOr<std::unique_ptr<pcre2_code, void (*)(pcre2_code*)>> CompileRegex(const std::string& pattern,
                                                                          std::string_view label) {
  int err = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
                                   &err, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    return InvalidArgument(label, ": pre-tokenizer regex does not compile at offset ", offset, ": ",
                           reinterpret_cast<const char*>(msg));
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter if JIT is unavailable
  return std::unique_ptr<pcre2_code, void (*)(pcre2_code*)>(code, pcre2_code_free);
}

Status Unsupported(std::string_view label, std::string_view field, const json& value, std::string_view accepted) {
  return Unimplemented(label, ": ", field, " is ", DescribeJson(value), "; only ", accepted, " is supported");
}

// The pipeline around the BPE model: no normalizer; a ByteLevel pre-tokenizer, or
// Sequence[Split(regex, Isolated), ByteLevel(use_regex=false)]; a ByteLevel decoder (the
// post-processor is ReadPostProcessor's). Returns the pre-tokenizer's split pattern; UNIMPLEMENTED
// naming the part this tokenizer does not implement otherwise.
StatusOr<std::string> ReadPipeline(const json& j, std::string_view label, bool* add_prefix_space) {
  std::string pattern = Gpt2Pattern();
  auto null_or_absent = [&](const char* k) { return !j.contains(k) || j[k].is_null(); };
  if (!null_or_absent("normalizer")) return Unsupported(label, "'normalizer'", j["normalizer"], "null");

  // Pre-tokenizer: ByteLevel, or Sequence[Split(regex, Isolated), ByteLevel(use_regex=false)].
  if (null_or_absent("pre_tokenizer")) return Unsupported(label, "'pre_tokenizer'", nullptr, "ByteLevel");
  const json& pre = j["pre_tokenizer"];
  auto byte_level = [&](const json& p, bool want_regex) -> Status {
    if (!p.is_object() || p.value("type", "") != "ByteLevel") {
      return Unsupported(label, "'pre_tokenizer'", p, "ByteLevel");
    }
    if (p.value("use_regex", true) != want_regex) {  // (a const json's [] may not read a missing key)
      return Unsupported(label, "'pre_tokenizer.use_regex'", p.contains("use_regex") ? p["use_regex"] : json(true),
                         want_regex ? "true" : "false");
    }
    *add_prefix_space = p.value("add_prefix_space", false);
    return absl::OkStatus();
  };
  if (pre.is_object() && pre.value("type", "") == "Sequence") {
    const json& seq = pre.contains("pretokenizers") ? pre["pretokenizers"] : json::object();
    if (!seq.is_array() || seq.size() != 2 || !seq[0].is_object() || seq[0].value("type", "") != "Split") {
      return Unsupported(label, "'pre_tokenizer'", pre, "ByteLevel or Sequence[Split, ByteLevel]");
    }
    const json& split = seq[0];
    if (split.value("behavior", "") != "Isolated" || split.value("invert", false) || !split.contains("pattern") ||
        !split["pattern"].is_object() || !split["pattern"].contains("Regex") ||
        !split["pattern"]["Regex"].is_string()) {
      return Unsupported(label, "'pre_tokenizer.pretokenizers[0]'", split, "a Regex Split with behavior Isolated");
    }
    pattern = split["pattern"]["Regex"].get<std::string>();
    KRAKEN_RETURN_IF_ERROR(byte_level(seq[1], /*want_regex=*/false));
    if (*add_prefix_space) {  // Hugging Face would add the space to every split piece
      return Unsupported(label, "'pre_tokenizer.pretokenizers[1].add_prefix_space'", true, "false after a Split");
    }
  } else {
    KRAKEN_RETURN_IF_ERROR(byte_level(pre, /*want_regex=*/true));
  }
  if (null_or_absent("decoder") || !j["decoder"].is_object() || j["decoder"].value("type", "") != "ByteLevel") {
    return Unsupported(label, "'decoder'", j.value("decoder", json()), "ByteLevel");
  }
  return pattern;
}

// The single-sequence template of one post-processor `p` (at `field`) into prefix/suffix:
// TemplateProcessing ("single": special tokens around one Sequence "A", each special token's ids
// from "special_tokens"), RobertaProcessing and BertProcessing (cls A sep), ByteLevel (offsets
// only: no ids). Hugging Face `tokenizers` post_processors, applied when add_special_tokens.
Status ReadOneProcessor(const json& p, std::string_view label, const std::string& field, std::vector<int32_t>* prefix,
                        std::vector<int32_t>* suffix) {
  const std::string type = p.is_object() ? p.value("type", "") : "";
  if (type == "ByteLevel") return absl::OkStatus();
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    auto id_of = [&](const char* k, int32_t* id) -> Status {
      if (!p.contains(k) || !p[k].is_array() || p[k].size() != 2 || !p[k][1].is_number_integer())
        return InvalidArgument(label, ": '", field, ".", k, "' must be [token, id], got ",
                               p.contains(k) ? DescribeJson(p[k]) : "nothing");
      *id = p[k][1].get<int32_t>();
      return absl::OkStatus();
    };
    int32_t cls = 0, sep = 0;
    KRAKEN_RETURN_IF_ERROR(id_of("cls", &cls));
    KRAKEN_RETURN_IF_ERROR(id_of("sep", &sep));
    prefix->push_back(cls);
    suffix->push_back(sep);
    return absl::OkStatus();
  }
  if (type != "TemplateProcessing") {
    return Unsupported(label, "'" + field + "'", p, "ByteLevel, TemplateProcessing, RobertaProcessing, BertProcessing");
  }
  if (!p.contains("single") || !p["single"].is_array())
    return InvalidArgument(label, ": '", field, ".single' must be an array");
  const json& specials = p.contains("special_tokens") ? p["special_tokens"] : json::object();
  bool seen_a = false;
  for (const json& piece : p["single"]) {
    if (piece.is_object() && piece.contains("Sequence") && piece["Sequence"].is_object()) {
      if (piece["Sequence"].value("id", "") != "A" || seen_a)
        return Unsupported(label, "'" + field + ".single'", p["single"], "one Sequence A");
      seen_a = true;
      continue;
    }
    const json* name = piece.is_object() && piece.contains("SpecialToken") && piece["SpecialToken"].is_object() &&
                               piece["SpecialToken"].contains("id") && piece["SpecialToken"]["id"].is_string()
                           ? &piece["SpecialToken"]["id"]
                           : nullptr;
    if (name == nullptr)
      return InvalidArgument(label, ": '", field, ".single' holds ", DescribeJson(piece),
                             ", neither a Sequence nor a SpecialToken");
    const std::string key = name->get<std::string>();
    if (!specials.is_object() || !specials.contains(key) || !specials[key].is_object() ||
        !specials[key].contains("ids") || !specials[key]["ids"].is_array())
      return InvalidArgument(label, ": '", field, ".special_tokens' has no ids for '", key, "'");
    for (const json& id : specials[key]["ids"]) {
      if (!id.is_number_integer())
        return InvalidArgument(label, ": special token '", key, "' has id ", DescribeJson(id));
      (seen_a ? suffix : prefix)->push_back(id.get<int32_t>());
    }
  }
  if (!seen_a) return Unsupported(label, "'" + field + ".single'", p["single"], "one Sequence A");
  return absl::OkStatus();
}

// The post-processor (absent, null, one of ReadOneProcessor's, or a Sequence of ByteLevels and at
// most one of the others): the ids added before and after a single sequence's own when
// add_special_tokens.
Status ReadPostProcessor(const json& j, std::string_view label, std::vector<int32_t>* prefix,
                         std::vector<int32_t>* suffix) {
  if (!j.contains("post_processor") || j["post_processor"].is_null()) return absl::OkStatus();
  const json& p = j["post_processor"];
  if (!p.is_object() || p.value("type", "") != "Sequence")
    return ReadOneProcessor(p, label, "post_processor", prefix, suffix);
  if (!p.contains("processors") || !p["processors"].is_array())
    return InvalidArgument(label, ": 'post_processor.processors' must be an array");
  // At most one processor that adds tokens: `tokenizers` runs a second template over what the
  // first returned in a way no single template describes.
  int templates = 0;
  for (size_t i = 0; i < p["processors"].size(); ++i) {
    const json& one = p["processors"][i];
    const std::string field = StrCat("post_processor.processors[", i, "]");
    if (one.is_object() && one.value("type", "") != "ByteLevel" && ++templates > 1)
      return Unimplemented(label, ": '", field, "' is a second template; only one template in a Sequence is supported");
    KRAKEN_RETURN_IF_ERROR(ReadOneProcessor(one, label, field, prefix, suffix));
  }
  return absl::OkStatus();
}

// The added tokens: each an id and a non-empty content that agrees with the vocabulary, without
// single_word, lstrip or rstrip: INVALID_ARGUMENT naming a malformed token, UNIMPLEMENTED one of
// those options.
Status ReadAddedTokens(const json& j, std::string_view label, const absl::flat_hash_map<std::string, int32_t>& vocab,
                       std::vector<AddedToken>* added) {
  if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
    if (!j["added_tokens"].is_array()) return InvalidArgument(label, ": 'added_tokens' must be an array");
    for (const json& a : j["added_tokens"]) {
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || !a.contains("content") ||
          !a["content"].is_string() || a["id"].get<int64_t>() < 0 || a["id"].get<int64_t>() >= (1 << 24)) {
        return InvalidArgument(label, ": added token ", DescribeJson(a),
                               " needs an integer 'id' and a string 'content'");
      }
      for (const char* k : {"single_word", "lstrip", "rstrip"}) {
        if (a.value(k, false)) {
          return Unsupported(label,
                             std::string("added token '") + a["content"].get<std::string>() + "' field '" + k + "'",
                             true, "false");
        }
      }
      const std::string content = a["content"].get<std::string>();
      if (content.empty()) return InvalidArgument(label, ": added token with id ", DescribeJson(a["id"]), " is empty");
      auto in_vocab = vocab.find(content);
      if (in_vocab != vocab.end() && in_vocab->second != a["id"].get<int32_t>()) {
        return InvalidArgument(label, ": added token '", content, "' has id ", DescribeJson(a["id"]),
                               " but the vocabulary gives it id ", in_vocab->second);
      }
      const bool special = a.value("special", false);
      added->push_back({a["id"].get<int32_t>(), content, special, a.value("normalized", !special)});
    }
  }
  return absl::OkStatus();
}

}  // namespace

StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromTokenizerJson(std::string_view text, std::string_view label) {
  KRAKEN_ASSIGN_OR_RETURN(json j, ParseJsonStrict(text, label, /*max_depth=*/16));
  if (!j.is_object()) return InvalidArgument(label, ": not a JSON object");
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  bool add_prefix_space = false;
  KRAKEN_ASSIGN_OR_RETURN(std::string pattern, ReadPipeline(j, label, &add_prefix_space));
  t->add_prefix_space_ = add_prefix_space;

  // Model.
  if (!j.contains("model") || !j["model"].is_object()) return InvalidArgument(label, ": missing object 'model'");
  const json& m = j["model"];
  if (m.value("type", "BPE") != "BPE") return Unsupported(label, "'model.type'", m["type"], "\"BPE\"");
  for (const char* k : {"dropout", "unk_token"}) {
    if (m.contains(k) && !m[k].is_null()) return Unsupported(label, std::string("'model.") + k + "'", m[k], "null");
  }
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (m.contains(k) && !m[k].is_null() && m[k] != "") {
      return Unsupported(label, std::string("'model.") + k + "'", m[k], "null");
    }
  }
  if (m.value("byte_fallback", false)) return Unsupported(label, "'model.byte_fallback'", true, "false");
  t->ignore_merges_ = m.value("ignore_merges", false);
  if (!m.contains("vocab") || !m["vocab"].is_object()) return InvalidArgument(label, ": missing object 'model.vocab'");
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() >= (1 << 24)) {
      return InvalidArgument(label, ": vocab entry '", it.key(), "' has id ", DescribeJson(it.value()),
                             "; ids must be integers in [0, 16777216)");
    }
    t->vocab_[it.key()] = it.value().get<int32_t>();
  }
  if (!m.contains("merges") || !m["merges"].is_array()) return InvalidArgument(label, ": missing array 'model.merges'");
  int32_t rank = 0;
  for (const json& mg : m["merges"]) {
    std::string a, b;
    if (mg.is_string()) {  // "a b" (tokenizers < 0.20)
      const std::string s = mg.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos) return InvalidArgument(label, ": merge '", s, "' is not two tokens");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string()) {
      a = mg[0].get<std::string>();
      b = mg[1].get<std::string>();
    } else {
      return InvalidArgument(label, ": merge ", DescribeJson(mg), " is neither \"a b\" nor [\"a\", \"b\"]");
    }
    auto ia = t->vocab_.find(a), ib = t->vocab_.find(b), ic = t->vocab_.find(a + b);
    if (ia == t->vocab_.end() || ib == t->vocab_.end() || ic == t->vocab_.end()) {
      return InvalidArgument(label, ": merge '", a, " ", b, "' uses a token missing from the vocabulary");
    }
    // A repeated merge takes its last rank, as Hugging Face's map of merges does.
    t->merges_.insert_or_assign(PairKey(ia->second, ib->second), Merge{rank, ic->second});
    ++rank;
  }

  KRAKEN_RETURN_IF_ERROR(ReadAddedTokens(j, label, t->vocab_, &t->added_));
  KRAKEN_ASSIGN_OR_RETURN(auto re, CompileRegex(pattern, label));
  t->regex_ = std::make_unique<Regex>();
  t->regex_->code = re.release();
  KRAKEN_RETURN_IF_ERROR(ReadPostProcessor(j, label, &t->template_prefix_, &t->template_suffix_));
  KRAKEN_RETURN_IF_ERROR(t->Finish(label));
  for (const auto* ids : {&t->template_prefix_, &t->template_suffix_}) {
    for (int32_t id : *ids) {
      if (id < 0 || id >= t->vocab_size() || !t->valid_id_[id])
        return InvalidArgument(label, ": 'post_processor' adds id ", id, ", which names no token");
    }
  }
  return t;
}

StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  KRAKEN_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  return FromTokenizerJson(text, path);
}

StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromVocabMerges(const std::string& vocab_path,
                                                                const std::string& merges_path,
                                                                const std::vector<std::string>& special_tokens) {
  KRAKEN_ASSIGN_OR_RETURN(std::string vocab_text, ReadFile(vocab_path));
  KRAKEN_ASSIGN_OR_RETURN(std::string merges_text, ReadFile(merges_path));
  KRAKEN_ASSIGN_OR_RETURN(json vocab, ParseJsonStrict(vocab_text, vocab_path, /*max_depth=*/4));
  if (!vocab.is_object()) return InvalidArgument(vocab_path, ": not a JSON object");
  json merges = json::array();
  size_t line_start = 0;
  int line_no = 0;
  while (line_start < merges_text.size()) {
    size_t end = merges_text.find('\n', line_start);
    if (end == std::string::npos) end = merges_text.size();
    std::string line = merges_text.substr(line_start, end - line_start);
    line_start = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
    merges.push_back(line);
  }
  json added = json::array();
  for (const std::string& s : special_tokens) {
    if (!vocab.contains(s)) return InvalidArgument(vocab_path, ": special token '", s, "' is not in the vocabulary");
    added.push_back({{"id", vocab[s]}, {"content", s}, {"special", true}});
  }
  json j = {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
            {"decoder", {{"type", "ByteLevel"}}},
            {"added_tokens", added}};
  return FromTokenizerJson(j.dump(), vocab_path);
}

StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromModelDir(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path tj = fs::path(dir) / "tokenizer.json";
  std::error_code ec;
  if (fs::exists(tj, ec)) return FromFile(tj.string());
  const fs::path v = fs::path(dir) / "vocab.json", m = fs::path(dir) / "merges.txt";
  if (fs::exists(v, ec) && fs::exists(m, ec)) return FromVocabMerges(v.string(), m.string(), {"<|endoftext|>"});
  return NotFound("no tokenizer.json, nor vocab.json + merges.txt, in '", dir, "'");
}

Status Tokenizer::Finish(std::string_view label) {
  int32_t max_id = -1;
  for (const auto& [s, id] : vocab_) max_id = std::max(max_id, id);
  for (const AddedToken& a : added_) max_id = std::max(max_id, a.id);
  token_bytes_.assign(max_id + 1, std::string());
  valid_id_.assign(max_id + 1, 0);
  special_id_.assign(max_id + 1, 0);
  for (const auto& [s, id] : vocab_) {
    token_bytes_[id] = DecodeTokenString(s);
    valid_id_[id] = 1;
  }
  for (const AddedToken& a : added_) {
    token_bytes_[a.id] = DecodeTokenString(a.content);
    valid_id_[a.id] = 1;
    special_id_[a.id] = a.special ? 1 : 0;
  }
  const auto& t = Tables();
  for (int b = 0; b < 256; ++b) {
    auto it = vocab_.find(t.byte_to_utf8[b]);
    if (it == vocab_.end()) {
      return InvalidArgument(label, ": the vocabulary lacks the byte-level symbol for byte ", b,
                             "; a byte-level BPE must contain all 256");
    }
    byte_token_[b] = it->second;
  }
  // Longer added tokens first, so the first match at a position is the longest.
  std::stable_sort(added_.begin(), added_.end(),
                   [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
  for (const AddedToken& a : added_) added_first_byte_[static_cast<unsigned char>(a.content[0])] = 1;
  return absl::OkStatus();
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < vocab_size() && special_id_[id] != 0;
}

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  for (const AddedToken& a : added_) {
    if (a.content == token) return a.id;
  }
  auto it = vocab_.find(std::string(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

void Tokenizer::SplitAdded(std::string_view text, bool parse_special, bool normalized_pass,
                           std::vector<Segment>* segments) const {
  std::vector<Segment> out;
  for (const Segment& seg : *segments) {
    if (seg.token >= 0) {
      out.push_back(seg);
      continue;
    }
    size_t start = seg.begin, i = seg.begin;
    while (i < seg.end) {
      const AddedToken* hit = nullptr;
      if (added_first_byte_[static_cast<unsigned char>(text[i])]) {
        for (const AddedToken& a : added_) {  // longest first: the first hit is the longest
          if (a.normalized == normalized_pass && a.content.size() <= seg.end - i &&
              text.compare(i, a.content.size(), a.content) == 0) {
            hit = &a;
            break;
          }
        }
      }
      if (hit == nullptr) {
        ++i;
        continue;
      }
      if (hit->special && !parse_special) {  // matched, but stays plain text (HF encode_special_tokens)
        i += hit->content.size();
        continue;
      }
      if (i > start) out.push_back({start, i, -1});
      out.push_back({i, i + hit->content.size(), hit->id});
      i += hit->content.size();
      start = i;
    }
    if (seg.end > start) out.push_back({start, seg.end, -1});
  }
  segments->swap(out);
}

StatusOr<std::vector<int32_t>> Tokenizer::Encode(std::string_view text, bool parse_special,
                                                 bool add_special_tokens) const {
  size_t bad = 0;
  if (!IsValidUtf8(text, &bad)) return InvalidArgument("text is not valid UTF-8 (first bad byte at offset ", bad, ")");
  // Added tokens as Hugging Face splits them: leftmost-longest, first those matched on the raw
  // text (normalized = false), then those matched on the normalized text (no normalizer here).
  std::vector<Segment> segments = {{0, text.size(), -1}};
  if (!added_.empty()) {
    SplitAdded(text, parse_special, /*normalized_pass=*/false, &segments);
    SplitAdded(text, parse_special, /*normalized_pass=*/true, &segments);
  }
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 1);
  if (add_special_tokens) out = template_prefix_;
  for (const Segment& s : segments) {
    if (s.token >= 0) {
      out.push_back(s.token);
    } else {
      KRAKEN_RETURN_IF_ERROR(EncodeText(text.substr(s.begin, s.end - s.begin), &out));
    }
  }
  if (add_special_tokens) out.insert(out.end(), template_suffix_.begin(), template_suffix_.end());
  return out;
}

Status Tokenizer::EncodeText(std::string_view text, std::vector<int32_t>* out) const {
  if (text.empty()) return absl::OkStatus();
  std::string prefixed;
  if (add_prefix_space_ && text.front() != ' ') {
    prefixed.reserve(text.size() + 1);
    prefixed.push_back(' ');
    prefixed.append(text);
    text = prefixed;
  }
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(regex_->code, nullptr);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t pos = 0;
  while (pos < text.size()) {
    const int rc = pcre2_match(regex_->code, subject, text.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) {  // no further match: the rest is one piece (Isolated split)
      EncodeWord(text.substr(pos), out);
      break;
    }
    if (rc < 0) {  // match or JIT stack limits: refuse rather than tokenize differently
      pcre2_match_data_free(md);
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      return ResourceExhausted("pre-tokenizer regex failed at byte ", pos, ": ", reinterpret_cast<const char*>(msg));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    size_t b = ov[0], e = ov[1];
    if (b > pos) EncodeWord(text.substr(pos, b - pos), out);  // unmatched gap
    if (e == b) {  // an empty match cannot happen with these patterns; step one character
      size_t next = b;
      NextCodePoint(text, &next);
      e = next;
    }
    EncodeWord(text.substr(b, e - b), out);
    pos = e;
  }
  pcre2_match_data_free(md);
  return absl::OkStatus();
}

void Tokenizer::EncodeWord(std::string_view word, std::vector<int32_t>* out) const {
  const auto& tables = Tables();
  if (ignore_merges_) {
    std::string form;
    for (unsigned char c : word) form += tables.byte_to_utf8[c];
    auto it = vocab_.find(form);
    if (it != vocab_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() < kCacheWordBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu_);
    auto it = cache_.find(absl::string_view(word.data(), word.size()));
    if (it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  // Symbols as a linked list over the word's bytes; candidate merges in a min-heap ordered by
  // (rank, position), re-checked when popped: the leftmost lowest-rank pair merges first.
  const int n = static_cast<int>(word.size());
  std::vector<int32_t> id(n), prev(n), next(n);
  for (int i = 0; i < n; ++i) {
    id[i] = byte_token_[static_cast<unsigned char>(word[i])];
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Candidate {
    int32_t rank, pos, left, right;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  auto consider = [&](int i) {
    if (i < 0 || next[i] < 0) return;
    auto it = merges_.find(PairKey(id[i], id[next[i]]));
    if (it != merges_.end()) heap.push({it->second.rank, i, id[i], id[next[i]]});
  };
  for (int i = 0; i + 1 < n; ++i) consider(i);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    const int j = c.pos < 0 ? -1 : next[c.pos];
    if (id[c.pos] != c.left || j < 0 || id[j] != c.right) continue;  // stale
    id[c.pos] = merges_.find(PairKey(c.left, c.right))->second.id;
    next[c.pos] = next[j];
    if (next[j] >= 0) prev[next[j]] = c.pos;
    id[j] = -1;  // merged away
    consider(prev[c.pos]);
    consider(c.pos);
  }
  std::vector<int32_t> result;
  for (int i = 0; i >= 0 && n > 0; i = next[i]) result.push_back(id[i]);
  out->insert(out->end(), result.begin(), result.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu_);
    if (cache_.size() < kCacheEntries) cache_.emplace(std::string(word), std::move(result));
  }
}

Status Tokenizer::AppendTokenBytes(int32_t id, bool skip_special, std::string* out) const {
  if (id < 0 || id >= vocab_size() || !valid_id_[id]) {
    return InvalidArgument("token id ", id, " is not in the vocabulary [0, ", vocab_size(), ")");
  }
  if (skip_special && special_id_[id]) return absl::OkStatus();
  out->append(token_bytes_[id]);
  return absl::OkStatus();
}

StatusOr<std::string> Tokenizer::Decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string bytes;
  for (int32_t id : ids) KRAKEN_RETURN_IF_ERROR(AppendTokenBytes(id, skip_special, &bytes));
  return LossyUtf8(bytes);
}

}  // namespace kraken::tokenizer
