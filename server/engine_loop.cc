#include "server/engine_loop.h"

#include <algorithm>

#include <spdlog/spdlog.h>

namespace kraken::server {
namespace {

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

EngineLoop::EngineLoop(std::unique_ptr<runtime::WorkerGroup> group, const tokenizer::Tokenizer& tok,
                       const EngineOptions& options)
    : group_(std::move(group)), tok_(tok), options_(options), sched_([&] {
        scheduler::SchedulerOptions s = options.scheduler;
        // Admission control happens in Submit; preempted sequences re-enter the scheduler's
        // waiting queue without counting against it.
        s.max_waiting = s.max_waiting + s.max_batch_seqs + 1;  // never the binding limit
        return s;
      }()) {
  group_->set_recovery_callback([this](bool recovering, const Status& cause) {
    if (options_.on_serving) options_.on_serving(!recovering);
    if (!recovering) return;
    // Every worker is about to be replaced: none is up until the restart completes (the gauges
    // are refreshed from the new workers after it).
    if (options_.metrics != nullptr) {
      for (auto* up : options_.metrics->worker_up) up->Set(0);
    }
    // Fail the streams whose KV caches are being lost now, not after the restart; the
    // sequences leave the scheduler when the failed step returns.
    const Status fail = absl::UnavailableError(StrCat("a worker failed during generation: ", std::string(cause.message())));
    for (uint64_t id : sched_.running_ids()) {
      auto it = active_.find(id);
      if (it != active_.end()) FinishRequest(*it->second, fail, kraken::v1::FINISH_REASON_UNSPECIFIED, "");
    }
  });
  rank_base_.resize(group_->world_size());
  // The workers are idle from the start: count it as no_work until the first request.
  last_step_end_ = idle_begin_ = Clock::now();
  stats_generation_ = group_->generation();
  thread_ = std::thread([this] { Loop(); });
}

EngineLoop::~EngineLoop() { Stop(); }

void EngineLoop::Stop() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void EngineLoop::Wake() {
  {
    std::lock_guard<std::mutex> l(mu_);
    wake_ = true;
  }
  cv_.notify_all();
}

Status EngineLoop::Submit(std::shared_ptr<Request> r) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stop_ || fatal_) return absl::UnavailableError("the server is shutting down");
    if (queued_.load() >= options_.scheduler.max_waiting)
      return ResourceExhausted("field 'request': the waiting queue is full (", options_.scheduler.max_waiting,
                               " requests waiting); retry later");
    incoming_.push_back(std::move(r));
    ++active_count_;
    ++queued_;
  }
  cv_.notify_all();
  return absl::OkStatus();
}

void EngineLoop::FinishRequest(Request& r, const Status& status, kraken::v1::FinishReason reason,
                               std::string stop_reason) {
  const auto now = Clock::now();
  std::lock_guard<std::recursive_mutex> l(r.mu);
  if (r.out.finished) return;
  r.out.finished = true;
  r.out.status = status;
  r.out.finish_reason = reason;
  r.out.stop_reason = std::move(stop_reason);
  r.out.completion_tokens = static_cast<uint32_t>(r.generated.size());
  r.out.queue_s = r.scheduled ? Seconds(*r.scheduled - r.arrival) : Seconds(now - r.arrival);
  r.out.ttft_s = r.first_token ? Seconds(*r.first_token - r.arrival) : 0.0;
  r.out.e2e_s = Seconds(now - r.arrival);
  if (r.notify) r.notify();
}

void EngineLoop::End(uint64_t id, const Status& status, kraken::v1::FinishReason reason, std::string stop_reason) {
  auto it = active_.find(id);
  if (it == active_.end()) return;
  std::shared_ptr<Request> r = it->second;
  sched_.Remove(id);
  if (!r->scheduled) --queued_;
  active_.erase(it);
  --active_count_;
  FinishRequest(*r, status, reason, std::move(stop_reason));
  if (options_.metrics != nullptr) {
    if (status.ok()) {
      options_.metrics->RecordSuccess(reason == kraken::v1::FINISH_REASON_STOP ? "stop" : "length", r->out.e2e_s);
    } else {
      options_.metrics->RecordFailure(status);
    }
  }
  if (status.ok()) {
    spdlog::info("request {} ({}) finished: prompt {} tokens, generated {}, ttft {:.4f} s, e2e {:.4f} s, reason {}",
                 r->request_id.empty() ? "-" : r->request_id, r->id, r->params.prompt.size(), r->generated.size(), r->out.ttft_s, r->out.e2e_s,
                 kraken::v1::FinishReason_Name(reason));
  } else {
    spdlog::info("request {} ({}) ended: {}", r->request_id.empty() ? "-" : r->request_id, r->id, status.ToString());
  }
}

void EngineLoop::Admit() {
  std::deque<std::shared_ptr<Request>> batch;
  {
    std::lock_guard<std::mutex> l(mu_);
    batch.swap(incoming_);
  }
  if (!batch.empty() && active_.empty() && idle_begin_ && !idle_end_) idle_end_ = Clock::now();
  for (auto& r : batch) {
    active_.emplace(r->id, r);
    Status s = sched_.Add(r->id, r->params.prompt, r->params.priority);
    if (!s.ok()) {
      active_.erase(r->id);
      --active_count_;
      --queued_;
      FinishRequest(*r, s, kraken::v1::FINISH_REASON_UNSPECIFIED, "");
      if (options_.metrics != nullptr) options_.metrics->RecordFailure(s);
      continue;
    }
  }
}

void EngineLoop::Reap(Clock::time_point now) {
  std::vector<std::pair<uint64_t, Status>> ending;
  for (auto& [id, r] : active_) {
    if (now >= r->deadline) {
      ending.emplace_back(id, absl::DeadlineExceededError(StrCat(
                                  "deadline exceeded after ", Seconds(now - r->arrival), " s (",
                                  r->scheduled ? "while generating" : "while queued", ")")));
    } else if (r->cancelled.load()) {
      ending.emplace_back(id, absl::CancelledError("the client cancelled the request"));
    }
  }
  for (auto& [id, s] : ending) End(id, s);
}

void EngineLoop::Loop() {
  while (true) {
    {
      std::unique_lock<std::mutex> l(mu_);
      // Sleep while there is nothing to do, waking every supervision interval to check the
      // workers (and, with requests pending, their deadlines).
      cv_.wait_for(l, active_.empty() ? options_.supervise_interval : std::chrono::milliseconds(50),
                   [&] { return stop_ || !incoming_.empty() || !active_.empty(); });
      wake_ = false;
      if (stop_) break;
    }
    Admit();
    Reap(Clock::now());
    if (active_.empty()) {
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
      Supervise();
      UpdateGauges();
      UpdateRankMetrics();  // no_work idle accrues while nothing runs
      if (fatal_) break;
      continue;
    }
    const bool ran = RunOneStep();
    if (!ran) Supervise();  // blocked behind the KV watermark: the workers still get checked
    if (active_.empty() && last_step_end_ && !idle_begin_) idle_begin_ = Clock::now();  // no_work starts
    if (!ran) {
      // Nothing could be scheduled (all waiting behind the watermark): wait for a change.
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait_for(l, std::chrono::milliseconds(5), [&] { return stop_ || wake_ || !incoming_.empty(); });
      wake_ = false;
    }
    if (fatal_) break;
  }
  // Whatever is left ends now.
  Admit();
  std::vector<uint64_t> ids;
  for (auto& [id, r] : active_) ids.push_back(id);
  for (uint64_t id : ids)
    End(id, fatal_ ? absl::UnavailableError("the server's workers failed and could not be restarted")
                   : absl::UnavailableError("the server is shutting down"));
}

void EngineLoop::Supervise() {
  const auto now = Clock::now();
  if (now - last_supervised_ < options_.supervise_interval) return;
  last_supervised_ = now;
  const Status s = group_->Supervise();
  if (s.ok()) return;
  if (s.code() == absl::StatusCode::kAborted) {
    spdlog::critical("workers failed between steps and could not be restarted: {}", s.ToString());
    fatal_ = true;
    return;
  }
  spdlog::warn("{}", std::string(s.message()));
}

bool EngineLoop::RunOneStep() {
  scheduler::StepPlan plan = sched_.Schedule();
  for (uint64_t id : plan.preempted) {
    spdlog::debug("request {} preempted (KV cache full); it will be recomputed", id);
  }
  if (plan.empty()) return false;
  const auto now = Clock::now();
  steps_.clear();
  banned_.clear();
  // Spans into banned_ must stay valid: size it first.
  for (const auto& ss : plan.seqs) {
    const Request& r = *active_.at(ss.seq->id);
    if (ss.sample && r.generated.size() < r.params.min_tokens) banned_.insert(banned_.end(), r.params.stop_token_ids.begin(), r.params.stop_token_ids.end());
  }
  size_t banned_at = 0;
  for (const auto& ss : plan.seqs) {
    Request& r = *active_.at(ss.seq->id);
    if (!r.scheduled) {
      r.scheduled = now;
      --queued_;
      if (options_.metrics != nullptr) options_.metrics->queue_time.Observe(Seconds(now - r.arrival));
    }
    if (ss.start_pos == 0) r.kv_generation = group_->generation();
    runtime::SeqStep st;
    st.seq_id = r.id;
    st.kv_generation = r.kv_generation;
    st.tokens = std::span<const int32_t>(ss.seq->tokens.data() + ss.start_pos, ss.num_tokens);
    st.start_pos = ss.start_pos;
    st.block_table = ss.seq->block_table;
    st.sample = ss.sample;
    st.sampling = r.params.sampling;
    st.draw_index = static_cast<int64_t>(r.generated.size());
    if (ss.sample && engine::NeedsHistory(r.params.sampling)) {
      st.history_prompt = r.params.prompt;
      st.history_generated = r.generated;
    }
    if (ss.sample && r.generated.size() < r.params.min_tokens) {
      st.banned = std::span<const int32_t>(banned_.data() + banned_at, r.params.stop_token_ids.size());
      banned_at += r.params.stop_token_ids.size();
    }
    steps_.push_back(st);
  }
  AccountIdle(Clock::now());
  auto result = group_->RunStep(steps_);
  last_step_end_ = Clock::now();
  idle_begin_.reset();
  idle_end_.reset();
  if (!result.ok()) {
    const Status& s = result.status();
    spdlog::error("step of {} sequences failed: {}", plan.seqs.size(), s.ToString());
    if (s.code() == absl::StatusCode::kAborted) {
      fatal_ = true;
      return true;
    }
    // The workers were restarted (UNAVAILABLE) or the plan was refused: the KV caches of every
    // running sequence are gone or suspect. Fail those; waiting requests go on.
    const Status fail = s.code() == absl::StatusCode::kUnavailable || s.code() == absl::StatusCode::kFailedPrecondition
                            ? absl::UnavailableError(StrCat("a worker failed during generation: ", std::string(s.message())))
                            : absl::InternalError(StrCat("the step failed: ", std::string(s.message())));
    for (uint64_t id : sched_.running_ids()) End(id, fail);
    UpdateRankMetrics();
    UpdateGauges();
    return true;
  }
  if (options_.metrics != nullptr) options_.metrics->iteration_tokens.Observe(plan.num_tokens);
  for (const runtime::ResultSeq& res : result->seqs) {
    auto it = active_.find(res.seq_id);
    if (it == active_.end()) continue;
    if (res.error != 0) {
      End(res.seq_id, absl::InternalError(StrCat("sampling failed: ", std::string(res.status().message()))));
      continue;
    }
    if (res.token >= 0) OnToken(*it->second, res);
  }
  UpdateRankMetrics();
  UpdateGauges();
  return true;
}

void EngineLoop::AccountIdle(Clock::time_point step_start) {
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

void EngineLoop::UpdateGauges() {
  ServerMetrics* m = options_.metrics;
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
}

void EngineLoop::UpdateRankMetrics() {
  ServerMetrics* m = options_.metrics;
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
  }
  m->restarts.SetTotal(group_->restarts());
}

void EngineLoop::OnToken(Request& r, const runtime::ResultSeq& res) {
  const auto now = Clock::now();
  const int32_t tok = res.token;
  r.generated.push_back(tok);
  sched_.AppendToken(r.id, tok);

  kraken::v1::FinishReason reason = kraken::v1::FINISH_REASON_UNSPECIFIED;
  std::string stop_reason;
  std::string text;
  const bool stop_id = std::find(r.params.stop_token_ids.begin(), r.params.stop_token_ids.end(), tok) !=
                       r.params.stop_token_ids.end();
  if (stop_id && r.generated.size() > r.params.min_tokens) {
    reason = kraken::v1::FINISH_REASON_STOP;
    stop_reason = StrCat("token:", tok);
  } else {
    std::string delta;
    if (Status s = r.detok.Add(tok, &delta); !s.ok()) {
      End(r.id, absl::InternalError(StrCat("detokenizing token ", tok, ": ", std::string(s.message()))));
      return;
    }
    StopMatcher::Result m = r.stops.Push(delta);
    text = std::move(m.release);
    if (m.matched) {
      reason = kraken::v1::FINISH_REASON_STOP;
      stop_reason = m.stop;
    }
  }
  const size_t total = r.params.prompt.size() + r.generated.size();
  const bool by_string = reason == kraken::v1::FINISH_REASON_STOP && !stop_id;
  if (reason == kraken::v1::FINISH_REASON_UNSPECIFIED &&
      (r.generated.size() >= r.params.max_tokens || total >= static_cast<size_t>(options_.context_length)))
    reason = kraken::v1::FINISH_REASON_LENGTH;
  if (reason != kraken::v1::FINISH_REASON_UNSPECIFIED && !by_string) {
    // Ended by a stop token or by length: flush the detokenizer and whatever the stop matcher
    // holds; the flushed text may still complete a stop string, which then ends the text.
    std::string rest;
    r.detok.Finish(&rest);
    StopMatcher::Result m = r.stops.Push(rest);
    text += m.release;
    if (m.matched) {
      reason = kraken::v1::FINISH_REASON_STOP;
      stop_reason = m.stop;
    } else {
      text += r.stops.Flush();
    }
  }
  if (ServerMetrics* m = options_.metrics) {
    if (!r.first_token) {
      m->ttft.Observe(Seconds(now - r.arrival));
      if (r.scheduled) m->prefill_time.Observe(Seconds(now - *r.scheduled));
      m->prompt_tokens.Inc(static_cast<double>(r.params.prompt.size()));
    } else {
      m->itl.Observe(Seconds(now - r.last_token));
    }
    m->generation_tokens.Inc();
  }
  r.last_token = now;
  {
    std::lock_guard<std::recursive_mutex> l(r.mu);
    if (!r.first_token) r.first_token = now;
    r.out.text += text;
    r.out.ids.push_back(tok);
    if (r.params.logprobs) {
      kraken::v1::TokenLogprob lp;
      lp.set_token_id(tok);
      lp.set_logprob(res.logprob);
      for (int i = 0; i < res.num_top; ++i) {
        auto* t = lp.add_top();
        t->set_token_id(res.top[i].token);
        t->set_logprob(res.top[i].logprob);
      }
      r.out.logprobs.push_back(std::move(lp));
    }
    if (reason == kraken::v1::FINISH_REASON_UNSPECIFIED && r.notify) r.notify();
  }
  if (reason != kraken::v1::FINISH_REASON_UNSPECIFIED) End(r.id, absl::OkStatus(), reason, std::move(stop_reason));
}

}  // namespace kraken::server
