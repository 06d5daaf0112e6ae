// kraken-generate: offline generation and scoring with one model directory, in one process.
//
//   kraken-generate models/kraken-4way --prompt-ids 464,3290,318 --max-tokens 64
//   kraken-generate DIR --prompt-ids ... --temperature 0.8 --top-p 0.95 --seed 7 --json
//   kraken-generate DIR --prompt-ids ... --score         # per-token logprobs and perplexity
//   kraken-generate DIR --prompt "In the beginning"     # text, with the model's tokenizer
//
// Prints generated ids and timings (prefill ms, decode tokens/s); --json prints one JSON object
// with each step's chosen id, its logprob and the top-n alternatives.
#include <omp.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "engine/backend.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "runtime/worker.h"
#include "runtime/worker_group.h"
#include "tokenizer/detokenizer.h"
#include "tokenizer/tokenizer.h"

namespace kraken::engine {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

StatusOr<std::vector<int32_t>> ParseIds(const std::string& text) {
  std::vector<int32_t> ids;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    char* end = nullptr;
    const long v = std::strtol(item.c_str(), &end, 10);
    if (*end != '\0' || v < 0 || v > INT32_MAX) return InvalidArgument("--prompt-ids: '", item, "' is not a token id");
    ids.push_back(static_cast<int32_t>(v));
  }
  if (ids.empty()) return InvalidArgument("--prompt-ids is empty; give at least one token id");
  return ids;
}

struct Options {
  std::string model_dir;
  std::string prompt_ids;
  std::string prompt;
  int max_tokens = 32;
  int threads = 0;
  int block_size = 16;
  int prefill_chunk = 0;  // 0 = whole prompt in one step
  bool json = false;
  bool score = false;
  int score_window = 0;  // score in independent windows of this many predictions
  std::string prompt_ids_file;
  bool ignore_eos = false;
  std::string devices;  // set: run on worker processes (runtime/), e.g. "cpu:2"
  int batch = 1;        // with devices: sequences decoded together (seeds seed .. seed + batch - 1)
  SamplingParams sampling{.temperature = 0.f};
};

// Generation on worker processes, one per device: the multi-process runtime end to end.
Status RunOnWorkers(const Options& o, const std::vector<int32_t>& prompt, const tokenizer::Tokenizer* tok,
                    const ModelConfig& cfg) {
  const int total = static_cast<int>(prompt.size()) + o.max_tokens;
  const int B = o.batch;
  const int blocks_per_seq = (total + o.block_size - 1) / o.block_size;
  KRAKEN_ASSIGN_OR_RETURN(std::vector<Device> devices, runtime::ParseDevices(o.devices));
  runtime::WorkerGroupOptions wo{.model_dir = o.model_dir,
                                 .devices = devices,
                                 .threads_per_worker = o.threads,
                                 .max_tokens = static_cast<int>(prompt.size()) * B,
                                 .max_seqs = B,
                                 .max_context = std::min(total, cfg.n_positions),
                                 .block_size = o.block_size,
                                 .num_kv_blocks = blocks_per_seq * B,
                                 .max_history = total * B};
  const auto t_load = Clock::now();
  KRAKEN_ASSIGN_OR_RETURN(auto group, runtime::WorkerGroup::Start(wo));
  const double load_s = Seconds(t_load, Clock::now());
  // Sequence b owns blocks [b * blocks_per_seq, (b + 1) * blocks_per_seq) and samples with seed + b.
  std::vector<std::vector<int32_t>> blocks(B, std::vector<int32_t>(blocks_per_seq));
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < blocks_per_seq; ++i) blocks[b][i] = b * blocks_per_seq + i;
  const SamplingParams& p = o.sampling;
  const bool penalties = NeedsHistory(p);
  std::vector<std::vector<int32_t>> gen(B);
  std::vector<int32_t> next(B, -1);
  std::vector<bool> done(B, false);
  std::vector<runtime::SeqStep> steps;
  std::string finish = "length";
  const auto t0 = Clock::now();
  double prefill_s = 0;
  int64_t decoded = 0;  // tokens sampled by decode steps, all sequences
  for (int step = 0; step < o.max_tokens; ++step) {
    steps.clear();
    for (int b = 0; b < B; ++b) {
      if (done[b]) continue;
      runtime::SeqStep s{.seq_id = static_cast<uint64_t>(b + 1),
                         .kv_generation = group->generation(),
                         .tokens = step == 0 ? std::span<const int32_t>(prompt) : std::span<const int32_t>(&next[b], 1),
                         .start_pos = step == 0 ? 0 : static_cast<int32_t>(prompt.size() + gen[b].size() - 1),
                         .block_table = blocks[b],
                         .sampling = p,
                         .draw_index = static_cast<int64_t>(gen[b].size())};
      s.sampling.seed = p.seed + static_cast<uint64_t>(b);
      if (penalties) {
        s.history_prompt = prompt;
        s.history_generated = gen[b];
      }
      steps.push_back(s);
    }
    if (steps.empty()) break;
    KRAKEN_ASSIGN_OR_RETURN(runtime::StepResultView r, group->RunStep(steps));
    if (step == 0) prefill_s = Seconds(t0, Clock::now());
    for (const runtime::ResultSeq& res : r.seqs) {
      if (res.error != 0) return Annotate(res.status(), "sampling failed");
      const int b = static_cast<int>(res.seq_id) - 1;
      next[b] = res.token;
      gen[b].push_back(res.token);
      if (step > 0) ++decoded;
      if (!o.ignore_eos &&
          std::find(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end(), res.token) != cfg.eos_token_ids.end()) {
        done[b] = true;
        if (b == 0) finish = "stop";
      }
    }
  }
  const std::vector<int32_t>& generated = gen[0];
  const double decode_s = Seconds(t0, Clock::now()) - prefill_s;
  nlohmann::json out{{"model", o.model_dir},
                     {"devices", o.devices},
                     {"prompt_ids", prompt},
                     {"generated_ids", generated},
                     {"finish_reason", finish},
                     {"seed", p.seed},
                     {"load_seconds", load_s},
                     {"prefill_ms", prefill_s * 1e3},
                     {"batch", B},
                     {"decode_tokens_per_second", decoded > 0 ? decoded / decode_s : 0.0}};
  if (tok != nullptr) {
    tokenizer::IncrementalDetokenizer detok(*tok, /*skip_special=*/true);
    std::string text;
    for (int32_t id : generated) KRAKEN_RETURN_IF_ERROR(detok.Add(id, &text));
    detok.Finish(&text);
    out["text"] = text;
  }
  nlohmann::json ranks = nlohmann::json::array();
  for (const auto& st : group->Stats()) {
    ranks.push_back({{"rank", st.rank},
                     {"steps", st.steps},
                     {"busy_s", st.busy_s},
                     {"exposed_comm_s", st.exposed_comm_s},
                     {"collective_s", st.collective_s},
                     {"idle_s", st.idle_s}});
  }
  out["ranks"] = ranks;
  if (o.json) {
    std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    return absl::OkStatus();
  }
  std::printf("model: %s on %s (%d workers), started in %.2f s\n", o.model_dir.c_str(), o.devices.c_str(),
              group->world_size(), load_s);
  std::printf("generated ids: ");
  for (int32_t t : generated) std::printf("%d ", t);
  if (out.contains("text")) std::printf("\ntext:          %s", out["text"].get<std::string>().c_str());
  std::printf("\nfinish: %s\nprefill: %zu tokens in %.2f ms; decode: %.1f tokens/s\n", finish.c_str(), prompt.size(),
              prefill_s * 1e3, out["decode_tokens_per_second"].get<double>());
  for (const auto& st : group->Stats()) {
    std::printf("rank %d: busy %.3f s, waiting on collectives %.3f s, collectives in flight %.3f s, idle %.3f s\n",
                st.rank, st.busy_s, st.exposed_comm_s, st.collective_s, st.idle_s);
  }
  return absl::OkStatus();
}

Status Run(const Options& o) {
  std::unique_ptr<tokenizer::Tokenizer> tok;
  std::vector<int32_t> prompt;
  if (!o.prompt.empty()) {
    KRAKEN_ASSIGN_OR_RETURN(tok, tokenizer::Tokenizer::FromModelDir(o.model_dir));
    KRAKEN_ASSIGN_OR_RETURN(prompt, tok->Encode(o.prompt));
    if (prompt.empty()) return InvalidArgument("--prompt encodes to no tokens");
  } else if (!o.prompt_ids_file.empty()) {
    std::ifstream in(o.prompt_ids_file);
    if (!in) return NotFound("cannot read '", o.prompt_ids_file, "'");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::replace_if(
        text.begin(), text.end(), [](char c) { return std::isspace(static_cast<unsigned char>(c)); }, ',');
    KRAKEN_ASSIGN_OR_RETURN(prompt, ParseIds(text));
  } else {
    KRAKEN_ASSIGN_OR_RETURN(prompt, ParseIds(o.prompt_ids));
  }
  KRAKEN_ASSIGN_OR_RETURN(ModelConfig cfg, LoadModelConfig(o.model_dir));
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] >= cfg.vocab_size) {
      return InvalidArgument("prompt token ", i, " = ", prompt[i], " is outside the vocabulary [0, ", cfg.vocab_size,
                             ")");
    }
  }
  // The last token (generated, or scored) is never fed to the model, so it needs no position.
  const int window = o.score_window > 0 ? std::min<int>(o.score_window, static_cast<int>(prompt.size()) - 1)
                                        : static_cast<int>(prompt.size()) - 1;
  const int total = o.score ? std::max(window, 1) : static_cast<int>(prompt.size()) + o.max_tokens - 1;
  if (total > cfg.n_positions) {
    return InvalidArgument("prompt (", prompt.size(), " tokens) + --max-tokens (", o.max_tokens,
                           ") - 1 exceeds the context length ", cfg.n_positions);
  }
  KRAKEN_RETURN_IF_ERROR(ValidateSamplingParams(o.sampling, cfg.vocab_size));
  if (!o.devices.empty()) {
    if (o.score) return InvalidArgument("--score runs in this process; drop --devices");
  } else if (o.batch != 1) {
    return InvalidArgument("--batch needs --devices (worker processes)");
  }
  if (!o.devices.empty()) {
    return RunOnWorkers(o, prompt, tok.get(), cfg);
  }
  KRAKEN_ASSIGN_OR_RETURN(auto backend, CreateBackend({.device = Device::Cpu(), .threads = o.threads}));
  const int chunk =
      o.prefill_chunk > 0 ? o.prefill_chunk : std::max(o.score ? window : static_cast<int>(prompt.size()), 1);
  ModelOptions mo{.max_tokens = chunk, .max_seqs = 1, .max_logit_rows = o.score ? chunk : 1};
  const auto t_load = Clock::now();
  KRAKEN_ASSIGN_OR_RETURN(auto model, LoadModel(o.model_dir, backend.get(), mo));
  const double load_s = Seconds(t_load, Clock::now());
  KRAKEN_RETURN_IF_ERROR(ValidateSamplingParams(o.sampling, cfg.vocab_size));
  const int blocks = (total + o.block_size - 1) / o.block_size;
  KRAKEN_ASSIGN_OR_RETURN(
      KvCache kv, KvCache::Create(*backend, model->kv_layout(), {.num_blocks = blocks, .block_size = o.block_size}));
  std::vector<int32_t> table(blocks);
  for (int i = 0; i < blocks; ++i) table[i] = i;
  LocalCommunicator comm;
  Sampler sampler(cfg.vocab_size);
  nlohmann::json out;
  out["model"] = o.model_dir;
  out["architecture"] = std::string(ArchitectureName(cfg.arch));
  out["prompt_ids"] = prompt;
  out["threads"] = o.threads == 0 ? omp_get_num_procs() : o.threads;
  out["load_seconds"] = load_s;
  out["seed"] = o.sampling.seed;

  if (o.score) {
    // Window w feeds tokens [w*C, (w+1)*C) from position 0 and scores the C tokens after each,
    // i.e. predictions of ids w*C+1 .. (w+1)*C (the last window may be shorter).
    const auto t0 = Clock::now();
    double nll = 0.0;
    nlohmann::json scores = nlohmann::json::array();
    const int n_pred = static_cast<int>(prompt.size()) - 1;
    for (int w0 = 0; w0 < n_pred; w0 += window) {
      const int wn = std::min(window, n_pred - w0);
      for (int begin = 0; begin < wn; begin += chunk) {
        const int n = std::min(chunk, wn - begin);
        SequenceInput s{.tokens = {prompt.data() + w0 + begin, static_cast<size_t>(n)},
                        .start_pos = begin,
                        .block_table = table,
                        .all_logits = true};
        KRAKEN_ASSIGN_OR_RETURN(ForwardResult r, model->Forward({.seqs = {&s, 1}}, kv, comm));
        for (int j = 0; j < n; ++j) {  // row j predicts id w0 + begin + j + 1
          const float* row = r.logits + static_cast<int64_t>(j) * r.vocab;
          double mx = -INFINITY, sum = 0.0;
          for (int v = 0; v < r.vocab; ++v) mx = std::max<double>(mx, row[v]);
          for (int v = 0; v < r.vocab; ++v) sum += std::exp(row[v] - mx);
          const int pos = w0 + begin + j + 1;
          const double lp = row[prompt[pos]] - mx - std::log(sum);
          nll -= lp;
          if (o.score_window == 0) scores.push_back({{"position", pos}, {"token", prompt[pos]}, {"logprob", lp}});
        }
      }
    }
    const double score_s = Seconds(t0, Clock::now());
    if (o.score_window == 0) out["scores"] = scores;
    out["scored_tokens"] = n_pred;
    out["mean_nll"] = n_pred > 0 ? nll / n_pred : 0.0;
    out["perplexity"] = n_pred > 0 ? std::exp(nll / n_pred) : 1.0;
    out["score_seconds"] = score_s;
    if (o.json) {
      std::cout << out.dump() << "\n";
    } else {
      std::printf("scored %d tokens: mean NLL %.6f nats, perplexity %.4f (%.2f s)\n", n_pred,
                  out["mean_nll"].get<double>(), out["perplexity"].get<double>(), score_s);
    }
    return absl::OkStatus();
  }

  // Prefill (in chunks of --prefill-chunk tokens).
  const auto t0 = Clock::now();
  ForwardResult last{};
  for (int begin = 0; begin < static_cast<int>(prompt.size()); begin += chunk) {
    const int n = std::min(chunk, static_cast<int>(prompt.size()) - begin);
    SequenceInput s{
        .tokens = {prompt.data() + begin, static_cast<size_t>(n)}, .start_pos = begin, .block_table = table};
    KRAKEN_ASSIGN_OR_RETURN(last, model->Forward({.seqs = {&s, 1}}, kv, comm));
  }
  const double prefill_s = Seconds(t0, Clock::now());
  out["prefill_ms"] = prefill_s * 1e3;

  // Decode.
  std::vector<int32_t> generated;
  generated.reserve(o.max_tokens);
  nlohmann::json steps = nlohmann::json::array();
  const auto t1 = Clock::now();
  std::string finish = "length";
  for (int step = 0; step < o.max_tokens; ++step) {
    KRAKEN_ASSIGN_OR_RETURN(SampledToken t, sampler.Sample(last.logits, o.sampling, {prompt, generated}));
    generated.push_back(t.token);
    nlohmann::json js{{"token", t.token}, {"logprob", t.logprob}};
    if (t.num_top > 0) {
      nlohmann::json top = nlohmann::json::array();
      for (int i = 0; i < t.num_top; ++i) top.push_back({t.top[i].token, t.top[i].logprob});
      js["top_logprobs"] = top;
    }
    steps.push_back(js);
    const bool eos = !o.ignore_eos &&
                     std::find(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end(), t.token) != cfg.eos_token_ids.end();
    if (eos) {
      finish = "stop";
      break;
    }
    if (step + 1 == o.max_tokens) break;
    const int32_t next_id = t.token;
    SequenceInput s{.tokens = {&next_id, 1},
                    .start_pos = static_cast<int32_t>(prompt.size() + generated.size() - 1),
                    .block_table = table};
    KRAKEN_ASSIGN_OR_RETURN(last, model->Forward({.seqs = {&s, 1}}, kv, comm));
  }
  const double decode_s = Seconds(t1, Clock::now());
  const int decode_steps = static_cast<int>(generated.size()) - 1;  // forwards after the prefill
  const double tps = decode_steps > 0 && decode_s > 0 ? decode_steps / decode_s : 0.0;
  out["generated_ids"] = generated;
  if (tok != nullptr) {  // the text, through the streaming detokenizer
    tokenizer::IncrementalDetokenizer detok(*tok, /*skip_special=*/true);
    std::string text;
    for (int32_t id : generated) KRAKEN_RETURN_IF_ERROR(detok.Add(id, &text));
    detok.Finish(&text);
    out["text"] = text;
  }
  out["finish_reason"] = finish;
  out["steps"] = steps;
  out["decode_tokens_per_second"] = tps;
  if (o.json) {
    std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    return absl::OkStatus();
  }
  std::printf("model: %s (%s), %d threads, loaded in %.2f s\n", o.model_dir.c_str(),
              std::string(ArchitectureName(cfg.arch)).c_str(), out["threads"].get<int>(), load_s);
  std::printf("prompt ids:    ");
  for (int32_t t : prompt) std::printf("%d ", t);
  std::printf("\ngenerated ids: ");
  for (int32_t t : generated) std::printf("%d ", t);
  if (out.contains("text")) std::printf("\ntext:          %s", out["text"].get<std::string>().c_str());
  std::printf("\nfinish: %s\nprefill: %zu tokens in %.2f ms; decode: %d steps, %.1f tokens/s\n", finish.c_str(),
              prompt.size(), prefill_s * 1e3, decode_steps, tps);
  return absl::OkStatus();
}

}  // namespace
}  // namespace kraken::engine

int main(int argc, char** argv) {
  if (auto code = kraken::runtime::MaybeRunWorker(argc, argv)) return *code;
  using kraken::engine::Options;
  Options o;
  CLI::App app{"Offline generation and scoring with a Kraken Serve model directory"};
  app.add_option("model_dir", o.model_dir, "Model directory (config.json + safetensors)")->required();
  auto* prompt = app.add_option_group("prompt");
  prompt->add_option("--prompt-ids", o.prompt_ids, "Comma-separated prompt token ids");
  prompt->add_option("--prompt", o.prompt, "Prompt text, tokenized with the model's tokenizer");
  prompt->add_option("--prompt-ids-file", o.prompt_ids_file, "File of prompt token ids (comma or space separated)");
  prompt->require_option(1);
  app.add_option("--max-tokens", o.max_tokens, "Tokens to generate")->check(CLI::Range(1, 1 << 20));
  app.add_option("--temperature", o.sampling.temperature, "0 = greedy");
  app.add_option("--top-k", o.sampling.top_k, "0 or -1 = off");
  app.add_option("--top-p", o.sampling.top_p, "(0, 1]");
  app.add_option("--min-p", o.sampling.min_p, "[0, 1]");
  app.add_option("--repetition-penalty", o.sampling.repetition_penalty, "> 0, 1 = off");
  app.add_option("--presence-penalty", o.sampling.presence_penalty, "[-2, 2]");
  app.add_option("--frequency-penalty", o.sampling.frequency_penalty, "[-2, 2]");
  auto* seed = app.add_option("--seed", o.sampling.seed, "Random seed of the sequence (default: drawn at random)");
  app.add_option("--top-logprobs", o.sampling.top_logprobs, "Alternatives to report per step (--json)");
  app.add_option("--threads", o.threads, "CPU threads (0 = all cores)");
  app.add_option("--block-size", o.block_size, "KV-cache block size in tokens")->check(CLI::Range(1, 1024));
  app.add_option("--prefill-chunk", o.prefill_chunk, "Prefill in chunks of this many tokens (0 = all at once)");
  app.add_option("--devices", o.devices, "Run on worker processes, one per device: cpu:N (cuda:0-7 with CUDA)");
  app.add_option("--batch", o.batch,
                 "With --devices: decode this many copies of the prompt together (seeds seed, seed + 1, ...); "
                 "decode tokens/s counts all of them. The output shows the first.")
      ->check(CLI::Range(1, 1024));
  app.add_flag("--ignore-eos", o.ignore_eos, "Do not stop at the end-of-sequence token");
  app.add_flag("--json", o.json, "Print one JSON object");
  app.add_flag("--score", o.score, "Score the prompt: per-token logprobs and perplexity");
  app.add_option("--score-window", o.score_window,
                 "With --score: independent windows of this many predictions (no per-token output)");
  CLI11_PARSE(app, argc, argv);
  if (seed->count() == 0)
    o.sampling.seed = (static_cast<uint64_t>(std::random_device{}()) << 32) | std::random_device{}();
  const kraken::Status s = kraken::engine::Run(o);
  if (!s.ok()) {
    std::fprintf(stderr, "kraken-generate: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
