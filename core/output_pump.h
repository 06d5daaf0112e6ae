// The one output pump every front-end drives: it takes what the engine produced for a set of
// requests (the samples of one request, or the requests of one KServe stream) and says which to
// send next, round robin, so that a front-end with one write outstanding never lets one request
// starve another and never makes the engine wait (output coalesces in the slots while the client
// is slow).
//
//   OutputPump<> pump;                               // owned by a reactor, guarded by its lock
//   for (auto& h : handles) pump.Add(h, Deltas::kTokens, wake);
//   ...under the lock, whenever woken or a write is done:
//   pump.TakeAll();
//   if (auto* failed = pump.Failed()) { ...cancel the others, answer the error... }
//   if (auto* s = pump.Next()) { ...write s->taken...; pump.Sent(*s); }
//   else if (pump.AllSent()) { ...finish... }
//   ...when the call is done, outside the lock: for (auto& h : pump.handles()) h->Detach();
//
// Threading: none of its own. The owner serialises every call under its own lock; the engine
// calls `wake` holding no lock (core/request.h), so `wake` may take that lock. Detach waits for a
// listener call in flight, so it must run outside the owner's lock.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <variant>
#include <vector>

#include "core/request.h"

namespace kraken::core {

/// What makes a slot worth a write before it ends.
enum class Deltas {
  kEndOnly,         // nothing: one answer at the end (unary calls)
  kTextOrLogprobs,  // new text or logprobs (a protocol that sends text, not token ids)
  kTokens,          // new text or token ids (a token's logprobs come with its id)
};

/// `Extra`: what the front-end keeps beside each slot (the request as its protocol sent it).
template <typename Extra = std::monostate>
class OutputPump {
 public:
  struct Slot {
    std::shared_ptr<RequestHandle> handle;
    Deltas deltas = Deltas::kTokens;
    Extra extra{};
    size_t index = 0;         // its place in the order of Add (0, 1, ...)
    Output taken;             // taken from the handle, not yet sent (Sent clears the deltas)
    int64_t sent_tokens = 0;  // token ids in the writes sent so far
    bool first_sent = false;  // a write of this slot was sent
    bool end_sent = false;    // the write carrying its end was sent

    /// Something to write now: its end is new, or it has deltas its mode sends.
    bool has_news() const {
      if (end_sent) return false;
      if (taken.finished) return true;
      switch (deltas) {
        case Deltas::kEndOnly:
          return false;
        case Deltas::kTextOrLogprobs:
          return !taken.text.empty() || !taken.logprobs.empty();
        case Deltas::kTokens:
          return !taken.text.empty() || !taken.ids.empty();
      }
      return false;
    }
  };

  /// `retire_sent`: a slot whose end was sent leaves the pump, with its Output and its front-end
  /// data, so an open-ended stream of requests scans only those in flight; its handle (and the
  /// request's params) stays in handles() until the call is done, for Detach, which may not run
  /// under the owner's lock. A pump over one request's samples keeps them all (index order, a
  /// final answer of all).
  explicit OutputPump(bool retire_sent = false) : retire_sent_(retire_sent) {}

  /// Adds a request and sets its handle's listener to `wake` (may be empty). Returns its slot,
  /// valid until it is retired.
  Slot& Add(std::shared_ptr<RequestHandle> handle, Deltas deltas, std::function<void()> wake, Extra extra = {}) {
    auto slot = std::make_unique<Slot>();
    slot->handle = handle;
    slot->deltas = deltas;
    slot->extra = std::move(extra);
    slot->index = added_++;
    handles_.push_back(std::move(handle));
    if (wake) handles_.back()->Listen(std::move(wake));
    slots_.push_back(std::move(slot));
    return *slots_.back();
  }

  /// Takes what is new from every slot that has not ended (RequestHandle::Take).
  void TakeAll() {
    for (auto& s : slots_)
      if (!s->taken.finished) s->handle->Take(&s->taken);
  }

  /// The first slot (in order) that ended with an error and whose end was not sent; nullptr if none.
  Slot* Failed() {
    for (auto& s : slots_)
      if (s->taken.finished && !s->taken.status.ok() && !s->end_sent) return s.get();
    return nullptr;
  }

  /// The next slot with news (Slot::has_news), round robin from the one after the last returned;
  /// nullptr when none has any.
  Slot* Next() {
    const size_t n = slots_.size();
    for (size_t k = 0; k < n; ++k) {
      const size_t i = (cursor_ + k) % n;
      if (!slots_[i]->has_news()) continue;
      cursor_ = i + 1;
      return slots_[i].get();
    }
    return nullptr;
  }

  /// Records that a write carrying `s.taken` was sent: counts its token ids, clears its deltas,
  /// and marks its end sent when it had ended (retiring it under retire_sent: `s` is then gone).
  void Sent(Slot& s) {
    s.sent_tokens += static_cast<int64_t>(s.taken.ids.size());
    s.taken.text.clear();
    s.taken.ids.clear();
    s.taken.logprobs.clear();
    s.taken.prompt_logprobs.clear();
    s.first_sent = true;
    if (!s.taken.finished) return;
    s.end_sent = true;
    if (!retire_sent_) return;
    for (size_t i = 0; i < slots_.size(); ++i) {
      if (slots_[i].get() != &s) continue;
      slots_.erase(slots_.begin() + static_cast<std::ptrdiff_t>(i));
      if (i < cursor_) --cursor_;  // the slot after the retired one keeps its turn
      return;
    }
  }

  /// Every slot has ended (taken.finished), whether or not its end was sent.
  bool AllFinished() const {
    for (const auto& s : slots_)
      if (!s->taken.finished) return false;
    return true;
  }
  /// Every slot's end was sent (true with no slot).
  bool AllSent() const {
    for (const auto& s : slots_)
      if (!s->end_sent) return false;
    return true;
  }
  /// Cancels every request not yet ended (RequestHandle::Cancel).
  void CancelAll() {
    for (auto& s : slots_)
      if (!s->taken.finished) s->handle->Cancel();
  }

  /// The slots not retired, in the order of Add.
  size_t size() const { return slots_.size(); }
  Slot& operator[](size_t i) { return *slots_[i]; }
  const Slot& operator[](size_t i) const { return *slots_[i]; }
  /// Every handle ever added, retired ones included: to Detach when the call is done.
  const std::vector<std::shared_ptr<RequestHandle>>& handles() const { return handles_; }

 private:
  bool retire_sent_;
  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<std::shared_ptr<RequestHandle>> handles_;
  size_t cursor_ = 0;  // where the next round robin scan starts
  size_t added_ = 0;
};

}  // namespace kraken::core
