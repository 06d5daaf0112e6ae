// kraken-tokenize: the tokenizer from the command line.
//
//   kraken-tokenize models/kraken-4way --encode "Hello world"        # ids, comma-separated
//   kraken-tokenize models/kraken-4way --decode 15496,995
//   kraken-tokenize --vocab encoder.json --merges vocab.bpe --encode "..."   # GPT-2's own files
//   kraken-tokenize DIR --jsonl-encode docs.jsonl   # {"text": ...} per line -> {"ids": [...]}
//   kraken-tokenize DIR --jsonl-decode ids.jsonl    # {"ids": [...], "chunks": [2, 1, ...]} per line ->
//                                                   # {"text": ..., "deltas": [...]} (streamed in those chunks)
//   kraken-tokenize DIR --bench corpus.txt          # encode every line, one thread: MB/s as JSON
//   kraken-tokenize --jsonl-chat renders.jsonl      # {"template": ..., "context": {...}} per line ->
//                                                   # {"text": ...} or {"error": ...} (chat templates)
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "tokenizer/chat_template.h"
#include "tokenizer/detokenizer.h"
#include "tokenizer/tokenizer.h"

namespace kraken::tokenizer {
namespace {

using json = nlohmann::json;

struct Args {
  std::string model;
  std::string vocab, merges;
  std::string encode, decode, jsonl_encode, jsonl_decode, bench, jsonl_chat;
  bool skip_special = false;
  bool no_special = false;
};

std::string Dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

Status JsonlEncode(const Tokenizer& t, const Args& a) {
  std::ifstream in(a.jsonl_encode);
  if (!in) return NotFound("cannot read '", a.jsonl_encode, "'");
  std::string line;
  while (std::getline(in, line)) {
    json j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("text")) return InvalidArgument("bad input line: ", line.substr(0, 80));
    KRAKEN_ASSIGN_OR_RETURN(std::vector<int32_t> ids, t.Encode(j["text"].get<std::string>(), !a.no_special));
    std::cout << Dump(json{{"ids", ids}}) << "\n";
  }
  return absl::OkStatus();
}

Status JsonlDecode(const Tokenizer& t, const Args& a) {
  std::ifstream in(a.jsonl_decode);
  if (!in) return NotFound("cannot read '", a.jsonl_decode, "'");
  std::string line;
  while (std::getline(in, line)) {
    json j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("ids")) return InvalidArgument("bad input line: ", line.substr(0, 80));
    const std::vector<int32_t> ids = j["ids"].get<std::vector<int32_t>>();
    std::vector<int> chunks = j.value("chunks", std::vector<int>{});
    KRAKEN_ASSIGN_OR_RETURN(std::string text, t.Decode(ids, a.skip_special));
    IncrementalDetokenizer d(t, a.skip_special);
    json deltas = json::array();
    size_t at = 0, c = 0;
    while (at < ids.size()) {
      const size_t n = c < chunks.size() && chunks[c] > 0 ? static_cast<size_t>(chunks[c]) : 1;
      ++c;
      std::string delta;
      for (size_t k = 0; k < n && at < ids.size(); ++k, ++at) KRAKEN_RETURN_IF_ERROR(d.Add(ids[at], &delta));
      deltas.push_back(delta);
    }
    std::string tail;
    d.Finish(&tail);
    deltas.push_back(tail);
    std::cout << Dump(json{{"text", text}, {"deltas", deltas}}) << "\n";
  }
  return absl::OkStatus();
}

Status Bench(const Tokenizer& t, const Args& a) {
  std::ifstream in(a.bench);
  if (!in) return NotFound("cannot read '", a.bench, "'");
  std::vector<std::string> lines;
  std::string line;
  size_t bytes = 0;
  while (std::getline(in, line)) {
    bytes += line.size();
    lines.push_back(std::move(line));
  }
  double best = 1e30;
  size_t tokens = 0;
  for (int rep = 0; rep < 5; ++rep) {  // the first pass also warms the word cache
    const auto t0 = std::chrono::steady_clock::now();
    tokens = 0;
    for (const std::string& l : lines) {
      KRAKEN_ASSIGN_OR_RETURN(std::vector<int32_t> ids, t.Encode(l));
      tokens += ids.size();
    }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::cout << Dump(json{{"bytes", bytes},
                         {"documents", lines.size()},
                         {"tokens", tokens},
                         {"seconds", best},
                         {"mb_per_second", bytes / best / 1e6}})
            << "\n";
  return absl::OkStatus();
}

// Renders each line's chat template with its context (no tokenizer needed).
Status JsonlChat(const Args& a) {
  std::ifstream in(a.jsonl_chat);
  if (!in) return NotFound("cannot read '", a.jsonl_chat, "'");
  std::string line;
  while (std::getline(in, line)) {
    nlohmann::ordered_json j = nlohmann::ordered_json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("template") || !j.contains("context"))
      return InvalidArgument("bad input line: ", line.substr(0, 80));
    const StatusOr<ChatTemplate> parsed = ChatTemplate::Parse(j["template"].get<std::string>());
    const StatusOr<std::string> text = parsed.ok() ? parsed->Render(j["context"]) : parsed.status();
    std::cout << Dump(text.ok() ? json{{"text", *text}} : json{{"error", std::string(text.status().message())}})
              << "\n";
  }
  return absl::OkStatus();
}

Status Run(const Args& a) {
  if (!a.jsonl_chat.empty()) return JsonlChat(a);
  std::unique_ptr<Tokenizer> t;
  if (!a.vocab.empty()) {
    KRAKEN_ASSIGN_OR_RETURN(t, Tokenizer::FromVocabMerges(a.vocab, a.merges, {"<|endoftext|>"}));
  } else if (a.model.size() > 5 && a.model.substr(a.model.size() - 5) == ".json") {
    KRAKEN_ASSIGN_OR_RETURN(t, Tokenizer::FromFile(a.model));
  } else {
    KRAKEN_ASSIGN_OR_RETURN(t, Tokenizer::FromModelDir(a.model));
  }
  if (!a.jsonl_encode.empty()) return JsonlEncode(*t, a);
  if (!a.jsonl_decode.empty()) return JsonlDecode(*t, a);
  if (!a.bench.empty()) return Bench(*t, a);
  if (!a.decode.empty()) {
    std::vector<int32_t> ids;
    std::stringstream ss(a.decode);
    std::string item;
    while (std::getline(ss, item, ',')) ids.push_back(std::stoi(item));
    KRAKEN_ASSIGN_OR_RETURN(std::string text, t->Decode(ids, a.skip_special));
    std::cout << text << "\n";
    return absl::OkStatus();
  }
  KRAKEN_ASSIGN_OR_RETURN(std::vector<int32_t> ids, t->Encode(a.encode, !a.no_special));
  for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? "," : "") << ids[i];
  std::cout << "\n";
  return absl::OkStatus();
}

}  // namespace
}  // namespace kraken::tokenizer

int main(int argc, char** argv) {
  kraken::tokenizer::Args a;
  CLI::App app{"Encode and decode with a byte-level BPE tokenizer"};
  app.add_option("model", a.model, "Model directory or tokenizer.json");
  app.add_option("--vocab", a.vocab, "vocab.json (GPT-2 pair; with --merges)");
  app.add_option("--merges", a.merges, "merges.txt (GPT-2 pair; with --vocab)");
  auto* group = app.add_option_group("action");
  group->add_option("--encode", a.encode, "Text to encode");
  group->add_option("--decode", a.decode, "Comma-separated ids to decode");
  group->add_option("--jsonl-encode", a.jsonl_encode, "Encode each {\"text\"} line of a file");
  group->add_option("--jsonl-chat", a.jsonl_chat, "Render each {\"template\", \"context\"} line of a file");
  group->add_option("--jsonl-decode", a.jsonl_decode,
                    "Decode each {\"ids\", \"chunks\"} line of a file, also streamed");
  group->add_option("--bench", a.bench, "Encode every line of a text file; print MB/s");
  group->require_option(1);
  app.add_flag("--skip-special", a.skip_special, "Decode without special tokens");
  app.add_flag("--no-special", a.no_special, "Encode special-token text as plain text");
  CLI11_PARSE(app, argc, argv);
  const kraken::Status s = kraken::tokenizer::Run(a);
  if (!s.ok()) {
    std::fprintf(stderr, "kraken-tokenize: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
