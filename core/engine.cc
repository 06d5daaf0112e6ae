#include "core/engine.h"

#include <algorithm>

#include <spdlog/spdlog.h>

#include "core/finish.h"

namespace kraken::core {
namespace {

double Seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

}  // namespace

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kNone:
      break;
  }
  return "none";
}

Engine::Engine(std::unique_ptr<runtime::StepRunner> group, const tokenizer::Tokenizer* tok,
               const EngineOptions& options)
    : group_(std::move(group)), tok_(tok), options_(options), sched_([&] {
        scheduler::SchedulerOptions s = options.scheduler;
        // Admission control happens in Submit; preempted sequences re-enter the scheduler's
        // waiting queue without counting against it.
        s.max_waiting = s.max_waiting + s.max_batch_seqs + 1;  // never the binding limit
        return s;
      }()) {
  group_->set_recovery_callback([this](bool recovering, const Status& cause) { OnRecovery(recovering, cause); });
  rank_base_.resize(group_->world_size());
  // The workers are idle from the start: count it as no_work until the first request.
  last_step_end_ = idle_begin_ = Clock::now();
  stats_generation_ = cache_generation_ = group_->generation();
  thread_ = std::thread([this] { Loop(); });
}

Engine::~Engine() {
  Stop();
}

void Engine::Stop() {
  if (group_) group_->CancelRestarts();  // a restart under way must not hold the loop past the grace period
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Engine::Wake() {
  {
    std::lock_guard<std::mutex> l(mu_);
    wake_ = true;
  }
  cv_.notify_all();
}

StatusOr<std::shared_ptr<RequestHandle>> Engine::Submit(RequestParams params, Clock::time_point arrival,
                                                        Clock::time_point deadline) {
  if (params.n != 1) return InvalidArgument("Engine::Submit takes one sample (n = ", params.n, "); use SubmitSamples");
  KRAKEN_ASSIGN_OR_RETURN(auto handles, SubmitSamples(std::move(params), arrival, deadline));
  return std::move(handles[0]);
}

StatusOr<std::vector<std::shared_ptr<RequestHandle>>> Engine::SubmitSamples(RequestParams params,
                                                                            Clock::time_point arrival,
                                                                            Clock::time_point deadline) {
  if (tok_ == nullptr && !params.stop.empty()) {
    return WithField(InvalidArgument("field 'stop': stop strings need the model's tokenizer, and this engine has none"),
                     "stop");
  }
  if (params.n < 1) return FieldError("n", "must be at least 1, got ", params.n);
  const uint32_t n = params.n;
  std::vector<std::shared_ptr<RequestHandle>> handles;
  handles.reserve(n);
  const uint64_t first = next_id_.fetch_add(n);
  for (uint32_t i = 0; i < n; ++i) {
    RequestParams p = i + 1 < n ? params : std::move(params);
    p.sampling.seed += i;  // wraps modulo 2^64
    handles.push_back(std::make_shared<RequestHandle>(first + i, std::move(p), arrival, deadline, i > 0 ? first : 0));
  }
  // Nothing to generate: answer at once (prompt logprobs need the prefill, which then ends it).
  if (handles[0]->params().max_tokens == 0 && !handles[0]->params().prompt_logprobs) {
    for (auto& h : handles) {
      Finish(*h, 0, std::nullopt, std::nullopt, absl::OkStatus(), FinishReason::kLength, "");
      if (options_.metrics != nullptr) options_.metrics->RecordSuccess("length", Seconds(Clock::now() - arrival));
    }
    return handles;
  }
  for (auto& h : handles) h->set_on_cancel([this] { Wake(); });
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stop_ || fatal_) return absl::UnavailableError("the server is shutting down");
    if (queued_.load() + static_cast<int>(n) > options_.scheduler.max_waiting) {
      if (n == 1)
        return ResourceExhausted("the waiting queue is full (", options_.scheduler.max_waiting,
                                 " requests waiting); retry later");
      return WithField(
          ResourceExhausted("field 'n': the waiting queue cannot take ", n, " more samples (", queued_.load(), " of ",
                            options_.scheduler.max_waiting, " places taken); retry later"),
          "n");
    }
    for (auto& h : handles) incoming_.push_back(h);
    active_count_ += static_cast<int>(n);
    queued_ += static_cast<int>(n);
  }
  cv_.notify_all();
  return handles;
}

std::span<const int32_t> Engine::Generated(const Request& r) const {
  const scheduler::Sequence* s = sched_.Find(r.handle->id());
  if (s == nullptr) return {};
  return std::span<const int32_t>(s->tokens).subspan(r.params.prompt.size());
}

void Engine::Finish(RequestHandle& h, size_t num_generated, const std::optional<Clock::time_point>& scheduled,
                    const std::optional<Clock::time_point>& first_token, const Status& status, FinishReason reason,
                    std::string stop_reason) {
  const auto now = Clock::now();
  h.Finish(status, reason, std::move(stop_reason), static_cast<uint32_t>(num_generated),
           Seconds((scheduled ? *scheduled : now) - h.arrival()),
           first_token ? Seconds(*first_token - h.arrival()) : 0.0, Seconds(now - h.arrival()));
}

void Engine::End(uint64_t id, const Status& status, FinishReason reason, std::string stop_reason) {
  auto it = active_.find(id);
  if (it == active_.end()) return;
  std::unique_ptr<Request> r = std::move(it->second);
  active_.erase(it);
  const size_t generated = Generated(*r).size();
  sched_.Remove(id);
  if (!r->scheduled) --queued_;
  --active_count_;
  if (r->handle->finished()) return;  // the pause watch ended it (and counted and logged it)
  Finish(*r->handle, generated, r->scheduled, r->first_token, status, reason, std::move(stop_reason));
  const double e2e = Seconds(Clock::now() - r->handle->arrival());
  const std::string& rid = r->params.request_id;
  if (options_.metrics != nullptr) {
    if (status.ok())
      options_.metrics->RecordSuccess(FinishReasonName(reason), e2e);
    else
      options_.metrics->RecordFailure(status);
  }
  if (status.ok()) {
    spdlog::info("request {} ({}) finished: prompt {} tokens, generated {}, ttft {:.4f} s, e2e {:.4f} s, reason {}",
                 rid.empty() ? "-" : rid, id, r->params.prompt.size(), generated,
                 r->first_token ? Seconds(*r->first_token - r->handle->arrival()) : 0.0, e2e, FinishReasonName(reason));
  } else {
    spdlog::info("request {} ({}) ended: {}", rid.empty() ? "-" : rid, id, status.ToString());
  }
}

void Engine::EndAll(const Status& status) {
  std::vector<uint64_t> ids;
  for (auto& [id, r] : active_) ids.push_back(id);
  for (uint64_t id : ids) End(id, status);
}

void Engine::Admit() {
  std::deque<std::shared_ptr<RequestHandle>> batch;
  {
    std::lock_guard<std::mutex> l(mu_);
    batch.swap(incoming_);
  }
  if (!batch.empty() && active_.empty() && idle_begin_ && !idle_end_) idle_end_ = Clock::now();
  for (auto& h : batch) {
    const uint64_t id = h->id();
    // Prompt logprobs need the logits of every prompt position: such a request computes them all.
    Status s = sched_.Add(id, h->params().prompt, h->params().priority,
                          /*use_prefix_cache=*/!h->params().prompt_logprobs, h->fork_of());
    if (!s.ok()) {
      --active_count_;
      --queued_;
      Finish(*h, 0, std::nullopt, std::nullopt, s, FinishReason::kNone, "");
      if (options_.metrics != nullptr) options_.metrics->RecordFailure(s);
      continue;
    }
    active_.emplace(id, std::make_unique<Request>(std::move(h), tok_));
  }
}

void Engine::Reap(Clock::time_point now) {
  std::vector<std::pair<uint64_t, Status>> ending;
  for (auto& [id, r] : active_) {
    const RequestHandle& h = *r->handle;
    if (now >= h.deadline()) {
      ending.emplace_back(
          id, absl::DeadlineExceededError(StrCat("deadline exceeded after ", Seconds(now - h.arrival()), " s (",
                                                 r->scheduled ? "while generating" : "while queued", ")")));
    } else if (h.cancelled()) {
      ending.emplace_back(id, absl::CancelledError("the client cancelled the request"));
    } else if (h.finished()) {
      ending.emplace_back(id, absl::OkStatus());  // ended by the pause watch: End only drops it
    }
  }
  for (auto& [id, s] : ending) End(id, s);
}

void Engine::DropEnded() {
  std::vector<uint64_t> ended;
  for (auto& [id, r] : active_)
    if (r->handle->finished()) ended.push_back(id);
  for (uint64_t id : ended) End(id, absl::OkStatus());
}

bool Engine::WaitForWork() {
  std::unique_lock<std::mutex> l(mu_);
  // Sleep while there is nothing to do, waking every supervision interval to check the workers
  // (and, with requests pending, their deadlines).
  cv_.wait_for(l, active_.empty() ? options_.supervise_interval : std::chrono::milliseconds(50),
               [&] { return stop_ || !incoming_.empty() || !active_.empty(); });
  wake_ = false;
  return !stop_;
}

void Engine::Loop() {
  while (WaitForWork()) {
    Admit();
    Reap(Clock::now());
    if (active_.empty()) {
      AccountNoWork();
      Supervise();
      UpdateGauges();
      UpdateRankMetrics();  // no_work idle accrues while nothing runs
      if (fatal_) break;
      continue;
    }
    const bool ran = RunOneStep();
    if (active_.empty() && last_step_end_ && !idle_begin_) idle_begin_ = Clock::now();  // no_work starts
    if (!ran) {
      Supervise();  // blocked behind the KV watermark: the workers still get checked
      // Nothing could be scheduled (all waiting behind the watermark): wait for a change.
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait_for(l, std::chrono::milliseconds(5), [&] { return stop_ || wake_ || !incoming_.empty(); });
      wake_ = false;
    }
    if (fatal_) break;
  }
  // Whatever is left ends now.
  StopPauseWatch();
  Admit();
  EndAll(fatal_ ? absl::UnavailableError("the server's workers failed and could not be restarted")
                : absl::UnavailableError("the server is shutting down"));
}

void Engine::AccountNoWork() {
  const auto now = Clock::now();
  if (idle_begin_ && idle_end_) {
    // Requests came and went without a step (refused, cancelled, past their deadline): the
    // front-end's time on them is host time; idleness resumes now.
    const auto from = std::max(*idle_begin_, no_work_accounted_);
    if (*idle_end_ > from) no_work_s_ += Seconds(*idle_end_ - from);
    host_idle_s_ += Seconds(now - *idle_end_);
    no_work_accounted_ = now;
    idle_end_.reset();
  }
  if (last_step_end_ && !idle_begin_) idle_begin_ = now;
}

void Engine::Supervise() {
  const auto now = Clock::now();
  if (now - last_supervised_ < options_.supervise_interval) return;
  last_supervised_ = now;
  const Status s = group_->Supervise();
  if (s.ok()) return;
  if (s.code() == absl::StatusCode::kAborted) {
    spdlog::critical("workers failed between steps and could not be restarted: {}", s.ToString());
    StopPauseWatch();
    fatal_ = true;
    return;
  }
  spdlog::warn("{}", std::string(s.message()));
  // The next step finds the new generation and resumes the requests in flight (RunOneStep).
}

void Engine::OnRecovery(bool recovering, const Status& cause) {
  if (options_.on_serving) options_.on_serving(!recovering);
  if (!recovering) {
    StopPauseWatch();  // the workers are back: Resume takes over
    return;
  }
  spdlog::warn("{}; restarting the workers (health NOT_SERVING until they are ready)", std::string(cause.message()));
  // Every worker is about to be replaced: none is up until the restart completes (the gauges are
  // refreshed from the new workers after it).
  if (options_.metrics != nullptr) {
    for (auto* up : options_.metrics->worker_up) up->Set(0);
  }
  // The requests in flight pause until the workers are back (Resume); meanwhile the pause watch
  // ends those whose resume timeout or deadline passes, or whose client goes.
  StartPauseWatch(std::string(cause.message()));
}

void Engine::StartPauseWatch(const std::string& cause) {
  StopPauseWatch();
  const auto now = Clock::now();
  std::lock_guard<std::mutex> l(pause_mu_);
  paused_.clear();
  for (auto& [id, r] : active_) {
    // In flight: scheduled at least once (running now, or preempted and waiting to be recomputed).
    const bool in_flight = r->scheduled.has_value();
    if (in_flight && !r->paused_at) r->paused_at = now;
    paused_.push_back({r->handle, in_flight, Generated(*r).size(), r->scheduled, r->first_token});
  }
  pause_begin_ = now;
  pause_cause_ = cause;
  pause_stop_ = false;
  pause_thread_ = std::thread([this] { PauseWatch(); });
}

void Engine::StopPauseWatch() {
  {
    std::lock_guard<std::mutex> l(pause_mu_);
    pause_stop_ = true;
  }
  pause_cv_.notify_all();
  if (pause_thread_.joinable()) pause_thread_.join();
  paused_.clear();
}

void Engine::PauseWatch() {
  // paused_ changes only while this thread is not running (Start/StopPauseWatch), so it is read
  // without the lock; the lock guards pause_stop_. Handles are finished holding no lock (their
  // listeners' contract, core/request.h).
  for (;;) {
    {
      std::unique_lock<std::mutex> l(pause_mu_);
      if (pause_cv_.wait_for(l, std::chrono::milliseconds(20), [&] { return pause_stop_; })) return;
    }
    const auto now = Clock::now();
    for (const Paused& p : paused_) {
      RequestHandle& h = *p.handle;
      if (h.finished()) continue;
      Status status;
      const char* reason = nullptr;
      if (h.cancelled()) {
        status = absl::CancelledError("the client cancelled the request");
      } else if (now >= h.deadline()) {
        status = absl::DeadlineExceededError(StrCat("deadline exceeded after ", Seconds(now - h.arrival()),
                                                    " s (while the workers were being restarted)"));
        reason = p.in_flight ? "deadline" : nullptr;
      } else if (p.in_flight && now - pause_begin_ >= options_.resume_timeout) {
        status = absl::UnavailableError(StrCat("the workers did not come back within --resume-timeout ",
                                               Seconds(options_.resume_timeout), " s after: ", pause_cause_));
        reason = "timeout";
      } else {
        continue;
      }
      Finish(h, p.generated, p.scheduled, p.first_token, status, FinishReason::kNone, "");
      if (ServingMetrics* m = options_.metrics) {
        m->RecordFailure(status);
        if (reason != nullptr) m->RecordResumeFailure(reason);
      }
      const std::string& rid = h.params().request_id;
      spdlog::info("request {} ({}) ended: {}", rid.empty() ? "-" : rid, h.id(), status.ToString());
    }
  }
}

void Engine::Resume(const Status& cause, bool in_step) {
  StopPauseWatch();
  DropEnded();
  const auto now = Clock::now();
  for (uint64_t id : sched_.running_ids()) {
    Request& r = *active_.at(id);
    const bool was_in_step = in_step && std::any_of(steps_.begin(), steps_.end(),
                                                    [&](const runtime::SeqStep& st) { return st.seq_id == id; });
    const std::string& rid = r.params.request_id;
    if (was_in_step && r.solo && steps_.size() == 1) {
      End(id, absl::UnavailableError(StrCat("request ", rid.empty() ? "-" : rid, " (", id,
                                            ") was alone in the step when the workers failed (failed step ",
                                            r.step_failures + 1,
                                            " in a row with it in the batch): it is not resumed, "
                                            "as it may be what makes them fail (",
                                            std::string(cause.message()), ")")));
      if (options_.metrics != nullptr) options_.metrics->RecordResumeFailure("suspect");
      continue;
    }
    if (was_in_step) ++r.step_failures;
    r.solo = r.step_failures >= kSuspectAfter;
    sched_.Requeue(id, r.solo);
    if (!r.paused_at) r.paused_at = now;
    if (options_.metrics != nullptr) options_.metrics->resumed.Inc();
    spdlog::info("request {} ({}) resumes: {} prompt and {} generated tokens to recompute{}", rid.empty() ? "-" : rid,
                 id, r.params.prompt.size(), Generated(r).size(),
                 r.solo ? StrCat(", alone (", r.step_failures, " failed steps in a row)") : "");
  }
}

void Engine::BuildSteps(const scheduler::StepPlan& plan) {
  const auto now = Clock::now();
  steps_.clear();
  banned_.clear();
  // Spans into banned_ must stay valid: size it first.
  for (const auto& ss : plan.seqs) {
    const Request& r = *active_.at(ss.seq->id);
    if (ss.sample && ss.seq->tokens.size() - r.params.prompt.size() < r.params.min_tokens) {
      banned_.insert(banned_.end(), r.params.stop_token_ids.begin(), r.params.stop_token_ids.end());
    }
  }
  size_t banned_at = 0;
  for (const auto& ss : plan.seqs) {
    Request& r = *active_.at(ss.seq->id);
    if (!r.scheduled) {
      r.scheduled = now;
      --queued_;
      // Usage reports the prompt tokens the first admission found cached (set before any token,
      // read by the front-end at the end).
      if (ss.seq->cached_tokens > 0) {
        const auto cached = static_cast<uint32_t>(ss.seq->cached_tokens);
        r.handle->Publish([cached](Output& out) { out.cached_tokens = cached; }, /*notify=*/false);
      }
      if (options_.metrics != nullptr) options_.metrics->queue_time.Observe(Seconds(now - r.handle->arrival()));
    }
    if (ss.admitted) r.kv_generation = group_->generation();
    // The sequence's output tokens (the scheduler's sequence owns them; see Generated).
    const std::span<const int32_t> generated = std::span<const int32_t>(ss.seq->tokens).subspan(r.params.prompt.size());
    runtime::SeqStep st{.seq_id = r.handle->id(),
                        .kv_generation = r.kv_generation,
                        .tokens = std::span<const int32_t>(ss.seq->tokens.data() + ss.start_pos, ss.num_tokens),
                        .start_pos = ss.start_pos,
                        .block_table = ss.seq->block_table,
                        .sample = ss.sample,
                        .sampling = r.params.sampling,
                        .draw_index = static_cast<int64_t>(generated.size())};
    const size_t prompt_len = r.params.prompt.size();
    if (r.params.prompt_logprobs && r.handle->fork_of() == 0 && r.prompt_scored < prompt_len &&
        static_cast<size_t>(ss.start_pos) < prompt_len) {
      // Scores tokens[start + 1, start + n) and, unless the chunk ends the prompt, the token after it.
      const size_t end = static_cast<size_t>(ss.start_pos + ss.num_tokens);
      st.prompt_logprobs = true;
      st.next_token = end < prompt_len ? r.params.prompt[end] : -1;
    }
    if (ss.sample && engine::NeedsHistory(r.params.sampling)) {
      st.history_prompt = r.params.prompt;
      st.history_generated = generated;
    }
    if (ss.sample) st.logit_bias = r.params.logit_bias;
    if (ss.sample && generated.size() < r.params.min_tokens) {
      st.banned = std::span<const int32_t>(banned_.data() + banned_at, r.params.stop_token_ids.size());
      banned_at += r.params.stop_token_ids.size();
    }
    steps_.push_back(st);
  }
}

bool Engine::ForgetLostCache() {
  if (group_->generation() == cache_generation_) return false;
  // The workers were restarted: their KV pools, and every cached block, are gone.
  sched_.ResetPrefixCache();
  cache_generation_ = group_->generation();
  return true;
}

bool Engine::RunOneStep() {
  if (ForgetLostCache())  // the requests in flight are recomputed
    Resume(absl::UnavailableError("the workers were restarted between steps"), /*in_step=*/false);
  scheduler::StepPlan plan = sched_.Schedule();
  for (uint64_t id : plan.preempted) {
    spdlog::debug("request {} preempted (KV cache full); it will be recomputed", id);
  }
  if (plan.empty()) return false;
  BuildSteps(plan);
  AccountIdle(Clock::now());
  auto result = group_->RunStep(steps_);
  last_step_end_ = Clock::now();
  idle_begin_.reset();
  idle_end_.reset();
  if (!result.ok()) {
    OnStepFailed(result.status(), plan.seqs.size());
    return true;
  }
  if (options_.metrics != nullptr) options_.metrics->iteration_tokens.Observe(plan.num_tokens);
  sched_.CacheComputed();  // before any sequence ends below: its blocks stay cached
  for (size_t i = 0; i < result->seqs.size(); ++i) {
    const runtime::ResultSeq& res = result->seqs[i];
    auto it = active_.find(res.seq_id);
    if (it == active_.end()) continue;
    if (res.error != 0) {
      End(res.seq_id, absl::InternalError(StrCat("sampling failed: ", std::string(res.status().message()))));
      continue;
    }
    Request& r = *it->second;
    if (res.token >= 0 && (r.step_failures > 0 || r.solo)) {  // it completed a step: not the culprit
      r.step_failures = 0;
      r.solo = false;
      sched_.SetSolo(res.seq_id, false);
    }
    if (res.num_prompt_logprobs > 0)
      OnPromptLogprobs(
          r, steps_[i].start_pos,
          {result->prompt_logprobs + res.prompt_logprob_offset, static_cast<size_t>(res.num_prompt_logprobs)});
    if (res.token < 0) continue;
    if (r.params.max_tokens == 0) {  // it ran for its prompt logprobs only
      End(res.seq_id, absl::OkStatus(), FinishReason::kLength);
      continue;
    }
    OnToken(r, res);
  }
  UpdateRankMetrics();
  UpdateGauges();
  return true;
}

void Engine::OnStepFailed(const Status& s, size_t planned) {
  spdlog::error("step of {} sequences failed: {}", planned, s.ToString());
  StopPauseWatch();
  if (s.code() == absl::StatusCode::kAborted) {
    fatal_ = true;
    return;
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stop_) return;  // abandoned for shutdown, not failed: the loop ends every request
  }
  if (s.code() == absl::StatusCode::kUnavailable || s.code() == absl::StatusCode::kFailedPrecondition) {
    // The workers were restarted (UNAVAILABLE; FAILED_PRECONDITION: a step planned on KV caches a
    // restart lost): the requests in flight are recomputed on the new workers.
    ForgetLostCache();
    Resume(s, /*in_step=*/s.code() == absl::StatusCode::kUnavailable);
  } else {
    // The workers refused the plan: its sequences' KV caches are suspect. Fail those; waiting
    // requests go on.
    const Status fail = absl::InternalError(StrCat("the step failed: ", std::string(s.message())));
    for (uint64_t id : sched_.running_ids()) End(id, fail);
  }
  UpdateRankMetrics();
  UpdateGauges();
}

void Engine::AccountIdle(Clock::time_point step_start) {
  if (!last_step_end_) return;
  if (idle_begin_) {
    const auto end = idle_end_ ? *idle_end_ : step_start;
    host_idle_s_ += Seconds(*idle_begin_ - *last_step_end_) + Seconds(step_start - end);
    const auto from = std::max(*idle_begin_, no_work_accounted_);
    if (end > from) no_work_s_ += Seconds(end - from);
  } else {
    host_idle_s_ += Seconds(step_start - *last_step_end_);
  }
}

void Engine::UpdateGauges() {
  ServingMetrics* m = options_.metrics;
  if (m == nullptr) return;
  m->running.Set(sched_.num_running());
  int incoming = 0;
  {
    std::lock_guard<std::mutex> l(mu_);
    incoming = static_cast<int>(incoming_.size());
  }
  // queued_ counts accepted requests never scheduled (incoming or in the scheduler's queue); the
  // rest of the scheduler's queue are preempted sequences waiting to be recomputed.
  const int never_scheduled_in_queue = queued_.load() - incoming;
  m->waiting.Set(queued_.load() + std::max(0, sched_.num_waiting() - never_scheduled_in_queue));
  m->kv_usage.Set(sched_.blocks().usage());
  m->prefix_cache_queries.SetTotal(static_cast<double>(sched_.prefix_cache_queries()));
  m->prefix_cache_hits.SetTotal(static_cast<double>(sched_.prefix_cache_hits()));
}

void Engine::UpdateRankMetrics() {
  ServingMetrics* m = options_.metrics;
  if (m == nullptr) return;
  // Live no_work idle while nothing runs.
  if (idle_begin_ && !idle_end_) {
    const auto now = Clock::now();
    const auto from = std::max(*idle_begin_, no_work_accounted_);
    if (now > from) no_work_s_ += Seconds(now - from);
    no_work_accounted_ = now;
  }
  const std::vector<runtime::RankStatsSnapshot> stats = group_->Stats();
  if (group_->generation() != stats_generation_) {  // restarted: the workers' totals began again
    for (auto& b : rank_base_) {
      b.busy += b.last.busy_s;
      b.exposed += b.last.exposed_comm_s;
      b.collective += b.last.collective_s;
      b.last = {};
    }
    stats_generation_ = group_->generation();
  }
  for (size_t r = 0; r < stats.size() && r < rank_base_.size(); ++r) {
    RankBase& b = rank_base_[r];
    b.last = stats[r];
    m->busy[r]->SetTotal(b.busy + stats[r].busy_s);
    m->exposed[r]->SetTotal(b.exposed + stats[r].exposed_comm_s);
    m->idle_collective[r]->SetTotal(b.exposed + stats[r].exposed_comm_s);
    m->allreduce[r]->SetTotal(b.collective + stats[r].collective_s);
    m->idle_host[r]->SetTotal(host_idle_s_);
    m->idle_no_work[r]->SetTotal(no_work_s_);
    m->worker_up[r]->Set(stats[r].up ? 1 : 0);
    const runtime::WorkerMemory& mem = stats[r].memory;
    m->memory_weights[r]->Set(static_cast<double>(mem.weight_bytes));
    m->memory_kv_cache[r]->Set(static_cast<double>(mem.kv_bytes));
    m->memory_activations[r]->Set(static_cast<double>(mem.activation_bytes));
    m->memory_scratch[r]->Set(static_cast<double>(mem.scratch_bytes));
  }
  m->restarts.SetTotal(group_->restarts());
}

void Engine::OnPromptLogprobs(Request& r, int32_t start_pos, std::span<const runtime::PromptLogprob> scored) {
  std::vector<TokenLogprobs> add;
  // Entry j scores position start_pos + 1 + j; a recomputed chunk (after preemption) repeats some.
  for (size_t j = 0; j < scored.size(); ++j) {
    const size_t pos = static_cast<size_t>(start_pos) + 1 + j;
    if (pos != r.prompt_scored || pos >= r.params.prompt.size()) continue;
    const runtime::PromptLogprob& lp = scored[j];
    add.push_back({.token = lp.token, .logprob = lp.logprob, .top = {lp.top, lp.top + lp.num_top}});
    ++r.prompt_scored;
  }
  if (add.empty()) return;
  r.handle->Publish(
      [&](Output& out) {
        for (TokenLogprobs& lp : add) out.prompt_logprobs.push_back(std::move(lp));
      },
      /*notify=*/false);  // the first token (or the end) follows and notifies
}

void Engine::OnToken(Request& r, const runtime::ResultSeq& res) {
  const auto now = Clock::now();
  const int32_t tok = res.token;
  sched_.AppendToken(r.handle->id(), tok);
  const size_t generated = Generated(r).size();
  const RequestParams& p = r.params;
  // The text this token adds (unless it is a stop token), held back while it may begin a stop string.
  std::string text;
  StopMatcher::Result matched;
  if (!StopsOnToken(p, tok, generated)) {
    std::string delta;
    if (Status s = r.detok ? r.detok->Add(tok, &delta) : absl::OkStatus(); !s.ok()) {
      End(r.handle->id(), absl::InternalError(StrCat("detokenizing token ", tok, ": ", std::string(s.message()))));
      return;
    }
    matched = r.stops.Push(delta);
    text = std::move(matched.release);
  }
  StopCheck check = CheckStop(p, tok, generated, static_cast<size_t>(options_.context_length),
                              matched.matched ? &matched.stop : nullptr);
  if (check.reason != FinishReason::kNone && !matched.matched) {
    // Ended by a stop token or by length: flush the detokenizer and whatever the stop matcher
    // holds; the flushed text may still complete a stop string, which then ends the text.
    std::string rest;
    if (r.detok) r.detok->Finish(&rest);
    StopMatcher::Result m = r.stops.Push(rest);
    text += m.release;
    if (m.matched)
      check = {FinishReason::kStop, m.stop};
    else
      text += r.stops.Flush();
  }
  if (ServingMetrics* m = options_.metrics) {
    if (!r.first_token) {
      m->ttft.Observe(Seconds(now - r.handle->arrival()));
      if (r.scheduled) m->prefill_time.Observe(Seconds(now - *r.scheduled));
      m->prompt_tokens.Inc(static_cast<double>(p.prompt.size()));
    } else {
      m->itl.Observe(Seconds(now - r.last_token));
    }
    m->generation_tokens.Inc();
  }
  if (r.paused_at) {
    if (ServingMetrics* m = options_.metrics) m->resume_pause.Observe(Seconds(now - *r.paused_at));
    r.paused_at.reset();
  }
  r.last_token = now;
  if (!r.first_token) r.first_token = now;
  r.handle->Publish(
      [&](Output& out) {
        out.text += text;
        out.ids.push_back(tok);
        if (p.logprobs) {
          TokenLogprobs lp{.token = tok, .logprob = res.logprob, .top = {res.top, res.top + res.num_top}};
          out.logprobs.push_back(std::move(lp));
        }
      },
      /*notify=*/check.reason == FinishReason::kNone);
  if (check.reason != FinishReason::kNone)
    End(r.handle->id(), absl::OkStatus(), check.reason, std::move(check.stop_reason));
}

}  // namespace kraken::core
