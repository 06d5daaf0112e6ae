#include "core/request.h"

namespace kraken::core {

bool RequestHandle::Take(Output* out) {
  std::lock_guard<std::mutex> l(mu_);
  const bool news = !pending_.empty() || (pending_.finished && !out->finished);
  out->text += pending_.text;
  out->ids.insert(out->ids.end(), pending_.ids.begin(), pending_.ids.end());
  for (TokenLogprobs& lp : pending_.logprobs) out->logprobs.push_back(std::move(lp));
  for (TokenLogprobs& lp : pending_.prompt_logprobs) out->prompt_logprobs.push_back(std::move(lp));
  pending_.text.clear();
  pending_.ids.clear();
  pending_.logprobs.clear();
  pending_.prompt_logprobs.clear();
  out->cached_tokens = pending_.cached_tokens;  // known from the first schedule on
  if (pending_.finished) {
    out->finished = true;
    out->status = pending_.status;
    out->finish_reason = pending_.finish_reason;
    out->stop_reason = pending_.stop_reason;
    out->completion_tokens = pending_.completion_tokens;
    out->queue_s = pending_.queue_s;
    out->ttft_s = pending_.ttft_s;
    out->e2e_s = pending_.e2e_s;
  }
  return news;
}

void RequestHandle::Cancel() {
  cancelled_.store(true, std::memory_order_release);
  if (on_cancel_) on_cancel_();
}

void RequestHandle::Listen(std::function<void()> listener) {
  std::lock_guard<std::mutex> l(mu_);
  listener_ = std::move(listener);
}

void RequestHandle::Detach() {
  std::unique_lock<std::mutex> l(mu_);
  listener_ = nullptr;
  idle_.wait(l, [&] { return listener_calls_ == 0; });
}

void RequestHandle::Notify() {
  std::function<void()> listener;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!listener_) return;
    listener = listener_;
    ++listener_calls_;
  }
  listener();  // no lock held: the listener may Take, and its owner may Detach meanwhile
  // The copy goes before the count drops: once Detach returns, nothing of the listener (or what it
  // captured) is left on this thread.
  listener = nullptr;
  std::lock_guard<std::mutex> l(mu_);
  if (--listener_calls_ == 0) idle_.notify_all();
}

void RequestHandle::Publish(const std::function<void(Output&)>& add, bool notify) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (pending_.finished) return;
    add(pending_);
  }
  if (notify) Notify();
}

void RequestHandle::Finish(const Status& status, FinishReason reason, std::string stop_reason,
                           uint32_t completion_tokens, double queue_s, double ttft_s, double e2e_s) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (pending_.finished) return;
    pending_.finished = true;
    pending_.status = status;
    pending_.finish_reason = reason;
    pending_.stop_reason = std::move(stop_reason);
    pending_.completion_tokens = completion_tokens;
    pending_.queue_s = queue_s;
    pending_.ttft_s = ttft_s;
    pending_.e2e_s = e2e_s;
  }
  Notify();
}

bool RequestHandle::finished() const {
  std::lock_guard<std::mutex> l(mu_);
  return pending_.finished;
}

}  // namespace kraken::core
