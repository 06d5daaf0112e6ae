// kraken-generate: offline generation and scoring with one model directory. Generation goes
// through the serving core (core::Engine) on worker processes, as in the server; scoring runs the
// model in this process.
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
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <mutex>
#include <random>
#include <sstream>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "core/engine.h"
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
  std::string kv_cache_dtype = "auto";  // engine::KvCacheDType
  int prefill_chunk = 0;                // 0 = whole prompt in one step
  bool json = false;
  bool score = false;
  int score_window = 0;  // score in independent windows of this many predictions
  std::string prompt_ids_file;
  bool ignore_eos = false;
  std::string devices = "cpu:1";  // worker processes (runtime/) that generate
  int batch = 1;                  // sequences decoded together (seeds seed .. seed + batch - 1)
  SamplingParams sampling{.temperature = 0.f};
};

// The timings and the per-rank statistics of a generation, as JSON and as text.
void Report(const Options& o, const runtime::StepRunner& group, nlohmann::json out) {
  nlohmann::json ranks = nlohmann::json::array();
  for (const auto& st : group.Stats()) {
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
    return;
  }
  std::printf("model: %s on %s (%d workers), started in %.2f s\n", o.model_dir.c_str(),
              out["devices"].get<std::string>().c_str(), group.world_size(), out["load_seconds"].get<double>());
  std::printf("generated ids: ");
  for (int32_t t : out["generated_ids"]) std::printf("%d ", t);
  if (out.contains("text")) std::printf("\ntext:          %s", out["text"].get<std::string>().c_str());
  std::printf("\nfinish: %s\nprefill: %zu tokens in %.2f ms; decode: %.1f tokens/s\n",
              out["finish_reason"].get<std::string>().c_str(), out["prompt_ids"].size(),
              out["prefill_ms"].get<double>(), out["decode_tokens_per_second"].get<double>());
  for (const auto& st : group.Stats()) {
    std::printf("rank %d: busy %.3f s, waiting on collectives %.3f s, collectives in flight %.3f s, idle %.3f s\n",
                st.rank, st.busy_s, st.exposed_comm_s, st.collective_s, st.idle_s);
  }
}

// Waits until every handle has ended; returns what each produced, whole.
std::vector<core::Output> Collect(const std::vector<std::shared_ptr<core::RequestHandle>>& handles) {
  std::mutex mu;  // taken before a handle's own lock (Take), never after
  std::condition_variable cv;
  std::vector<core::Output> all(handles.size());
  int done = 0;
  auto take = [&](size_t b) {
    std::lock_guard<std::mutex> l(mu);
    const bool was_finished = all[b].finished;
    handles[b]->Take(&all[b]);
    if (all[b].finished && !was_finished) {
      ++done;
      cv.notify_all();
    }
  };
  for (size_t b = 0; b < handles.size(); ++b) {
    handles[b]->Listen([&take, b] { take(b); });
    take(b);  // what it produced (or how it ended) before the listener was set
  }
  std::unique_lock<std::mutex> l(mu);
  cv.wait(l, [&] { return done == static_cast<int>(handles.size()); });
  l.unlock();
  for (const auto& h : handles) h->Detach();
  return all;
}

// Generation through the serving core (core::Engine) on worker processes, one per device: the
// same loop the server runs. --batch decodes copies of the prompt together (seeds seed, seed + 1, ...).
Status Generate(const Options& o, const std::vector<int32_t>& prompt, const tokenizer::Tokenizer* tok,
                const ModelConfig& cfg) {
  const int total = static_cast<int>(prompt.size()) + o.max_tokens;
  const int B = o.batch;
  const int blocks_per_seq = (total + o.block_size - 1) / o.block_size;
  const int step_tokens = o.prefill_chunk > 0 ? std::max(o.prefill_chunk, B) : static_cast<int>(prompt.size()) * B;
  KRAKEN_ASSIGN_OR_RETURN(std::vector<Device> devices, runtime::ParseDevices(o.devices));
  runtime::WorkerGroupOptions wo{.model_dir = o.model_dir,
                                 .devices = devices,
                                 .threads_per_worker = o.threads,
                                 .max_tokens = step_tokens,
                                 .max_seqs = B,
                                 .max_context = std::min(total, cfg.n_positions),
                                 .block_size = o.block_size,
                                 .num_kv_blocks = blocks_per_seq * B,
                                 .max_history = total * B};
  KRAKEN_ASSIGN_OR_RETURN(wo.kv_sizing.kv_dtype, KvCacheDType(o.kv_cache_dtype, o.model_dir));
  const auto t_load = Clock::now();
  KRAKEN_ASSIGN_OR_RETURN(auto group, runtime::WorkerGroup::Start(wo));
  const double load_s = Seconds(t_load, Clock::now());
  core::EngineOptions eo{.scheduler = {.num_kv_blocks = blocks_per_seq * B,
                                       .block_size = o.block_size,
                                       .max_batch_tokens = step_tokens,
                                       .max_batch_seqs = B,
                                       .max_waiting = B,
                                       .watermark = 0},
                         .context_length = cfg.n_positions};
  core::Engine engine(std::move(group), tok, eo);
  std::vector<std::shared_ptr<core::RequestHandle>> handles;
  const auto t0 = core::Clock::now();
  for (int b = 0; b < B; ++b) {
    core::RequestParams p{
        .prompt = prompt, .max_tokens = static_cast<uint32_t>(o.max_tokens), .sampling = o.sampling, .logprobs = true};
    p.sampling.seed = o.sampling.seed + static_cast<uint64_t>(b);
    if (!o.ignore_eos) p.stop_token_ids = cfg.eos_token_ids;
    KRAKEN_ASSIGN_OR_RETURN(auto h, engine.Submit(std::move(p), t0, core::Clock::time_point::max()));
    handles.push_back(std::move(h));
  }
  const std::vector<core::Output> outs = Collect(handles);
  const double wall_s = std::chrono::duration<double>(core::Clock::now() - t0).count();
  int64_t decoded = 0;  // tokens sampled by decode steps, all sequences
  double first_token_s = 0;
  for (const core::Output& out : outs) {
    KRAKEN_RETURN_IF_ERROR(out.status);
    decoded += std::max<int64_t>(0, static_cast<int64_t>(out.ids.size()) - 1);
    first_token_s = std::max(first_token_s, out.ttft_s);
  }
  const core::Output& first = outs[0];
  nlohmann::json steps = nlohmann::json::array();
  for (const core::TokenLogprobs& lp : first.logprobs) {
    nlohmann::json js{{"token", lp.token}, {"logprob", lp.logprob}};
    if (!lp.top.empty()) {
      nlohmann::json top = nlohmann::json::array();
      for (const auto& t : lp.top) top.push_back({t.token, t.logprob});
      js["top_logprobs"] = top;
    }
    steps.push_back(js);
  }
  const double decode_s = wall_s - first_token_s;
  nlohmann::json out{{"model", o.model_dir},
                     {"devices", o.devices},
                     {"architecture", std::string(ArchitectureName(cfg.arch))},
                     {"prompt_ids", prompt},
                     {"generated_ids", first.ids},
                     {"finish_reason", core::FinishReasonName(first.finish_reason)},
                     {"seed", o.sampling.seed},
                     {"threads", o.threads},
                     {"load_seconds", load_s},
                     {"prefill_ms", first.ttft_s * 1e3},
                     {"batch", B},
                     {"steps", steps},
                     {"decode_tokens_per_second", decoded > 0 && decode_s > 0 ? decoded / decode_s : 0.0}};
  if (tok != nullptr) out["text"] = first.text;
  Report(o, engine.group(), std::move(out));
  return absl::OkStatus();
}

// Scoring (--score) runs the model in this process: one forward pass per window chunk, no
// generation. Everything else goes through Generate.
// The prompt's token ids from --prompt (tokenized: `tok` is loaded), --prompt-ids-file or --prompt-ids.
StatusOr<std::vector<int32_t>> LoadPrompt(const Options& o, std::unique_ptr<tokenizer::Tokenizer>* tok) {
  std::vector<int32_t> prompt;
  if (!o.prompt.empty()) {
    KRAKEN_ASSIGN_OR_RETURN(*tok, tokenizer::Tokenizer::FromModelDir(o.model_dir));
    KRAKEN_ASSIGN_OR_RETURN(prompt, (*tok)->Encode(o.prompt));
    if (prompt.empty()) return InvalidArgument("--prompt encodes to no tokens");
    return prompt;
  }
  if (!o.prompt_ids_file.empty()) {
    std::ifstream in(o.prompt_ids_file);
    if (!in) return NotFound("cannot read '", o.prompt_ids_file, "'");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::replace_if(
        text.begin(), text.end(), [](char c) { return std::isspace(static_cast<unsigned char>(c)); }, ',');
    return ParseIds(text);
  }
  return ParseIds(o.prompt_ids);
}

// Log-probability of ids[pos] under a logits row: log_softmax(row)[ids[pos]].
double RowLogprob(const float* row, int vocab, int32_t id) {
  double mx = -INFINITY, sum = 0.0;
  for (int v = 0; v < vocab; ++v) mx = std::max<double>(mx, row[v]);
  for (int v = 0; v < vocab; ++v) sum += std::exp(row[v] - mx);
  return row[id] - mx - std::log(sum);
}

// --score: per-token logprobs and perplexity of the prompt, in this process. Window w feeds
// tokens [w*C, (w+1)*C) from position 0 and scores the C tokens after each, i.e. predictions of
// ids w*C+1 .. (w+1)*C (the last window may be shorter), in chunks of --prefill-chunk.
Status Score(const Options& o, const std::vector<int32_t>& prompt, const ModelConfig& cfg) {
  if (o.devices != "cpu:1" || o.batch != 1)
    return InvalidArgument("--score runs in this process; drop --devices and --batch");
  // The last scored token is never fed to the model, so it needs no position.
  const int n_pred = static_cast<int>(prompt.size()) - 1;
  const int window = std::max(1, o.score_window > 0 ? std::min<int>(o.score_window, n_pred) : n_pred);
  if (window > cfg.n_positions) {
    return InvalidArgument("a scoring window of ", window, " predictions exceeds the context length ", cfg.n_positions,
                           ": use --score-window");
  }
  KRAKEN_ASSIGN_OR_RETURN(auto backend, CreateBackend({.device = Device::Cpu(), .threads = o.threads}));
  const int chunk = o.prefill_chunk > 0 ? o.prefill_chunk : window;
  const auto t_load = Clock::now();
  KRAKEN_ASSIGN_OR_RETURN(
      auto model, LoadModel(o.model_dir, backend.get(), {.max_tokens = chunk, .max_seqs = 1, .max_logit_rows = chunk}));
  const double load_s = Seconds(t_load, Clock::now());
  const int blocks = (window + o.block_size - 1) / o.block_size;
  KRAKEN_ASSIGN_OR_RETURN(const DType kv_dtype, KvCacheDType(o.kv_cache_dtype, o.model_dir));
  KRAKEN_ASSIGN_OR_RETURN(KvCache kv,
                          KvCache::Create(*backend, model->kv_layout(),
                                          {.num_blocks = blocks, .block_size = o.block_size, .dtype = kv_dtype}));
  std::vector<int32_t> table(blocks);
  for (int i = 0; i < blocks; ++i) table[i] = i;
  LocalCommunicator comm;
  const auto t0 = Clock::now();
  double nll = 0.0;
  nlohmann::json scores = nlohmann::json::array();
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
        const int pos = w0 + begin + j + 1;
        const double lp = RowLogprob(r.logits + static_cast<int64_t>(j) * r.vocab, r.vocab, prompt[pos]);
        nll -= lp;
        if (o.score_window == 0) scores.push_back({{"position", pos}, {"token", prompt[pos]}, {"logprob", lp}});
      }
    }
  }
  const double score_s = Seconds(t0, Clock::now());
  nlohmann::json out{{"model", o.model_dir},
                     {"architecture", std::string(ArchitectureName(cfg.arch))},
                     {"prompt_ids", prompt},
                     {"threads", o.threads == 0 ? omp_get_num_procs() : o.threads},
                     {"load_seconds", load_s},
                     {"seed", o.sampling.seed},
                     {"scored_tokens", n_pred},
                     {"mean_nll", n_pred > 0 ? nll / n_pred : 0.0},
                     {"perplexity", n_pred > 0 ? std::exp(nll / n_pred) : 1.0},
                     {"score_seconds", score_s}};
  if (o.score_window == 0) out["scores"] = scores;
  if (o.json) {
    std::cout << out.dump() << "\n";
  } else {
    std::printf("scored %d tokens: mean NLL %.6f nats, perplexity %.4f (%.2f s)\n", n_pred,
                out["mean_nll"].get<double>(), out["perplexity"].get<double>(), score_s);
  }
  return absl::OkStatus();
}

Status Run(const Options& o) {
  std::unique_ptr<tokenizer::Tokenizer> tok;
  KRAKEN_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, LoadPrompt(o, &tok));
  KRAKEN_ASSIGN_OR_RETURN(ModelConfig cfg, LoadModelConfig(o.model_dir));
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] >= cfg.vocab_size) {
      return InvalidArgument("prompt token ", i, " = ", prompt[i], " is outside the vocabulary [0, ", cfg.vocab_size,
                             ")");
    }
  }
  KRAKEN_RETURN_IF_ERROR(ValidateSamplingParams(o.sampling, cfg.vocab_size));
  if (o.score) return Score(o, prompt, cfg);
  // The serving core's rule: generation ends when prompt + output fill the context.
  if (static_cast<int64_t>(prompt.size()) + o.max_tokens > cfg.n_positions) {
    return InvalidArgument("prompt (", prompt.size(), " tokens) + --max-tokens (", o.max_tokens,
                           ") exceeds the context length ", cfg.n_positions);
  }
  return Generate(o, prompt, tok.get(), cfg);
}

}  // namespace
}  // namespace kraken::engine

int main(int argc, char** argv) {
  if (auto code = kraken::runtime::MaybeRunWorker(argc, argv)) return *code;
  spdlog::set_level(spdlog::level::warn);  // the core's per-request lines are for the server's log
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
  app.add_option("--kv-cache-dtype", o.kv_cache_dtype,
                 "KV-cache element type: auto (the weights' dtype), f32, bf16, f16")
      ->check(CLI::IsMember(kraken::engine::kKvCacheDTypeNames));
  app.add_option("--prefill-chunk", o.prefill_chunk, "Prefill in chunks of this many tokens (0 = all at once)");
  app.add_option("--devices", o.devices, "Generate on worker processes, one per device: cpu:N (cuda:0-7 with CUDA)")
      ->capture_default_str();
  app.add_option("--batch", o.batch,
                 "Decode this many copies of the prompt together (seeds seed, seed + 1, ...); decode tokens/s counts "
                 "all of them. The output shows the first.")
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
