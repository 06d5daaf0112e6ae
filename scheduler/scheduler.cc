#include "scheduler/scheduler.h"

#include <algorithm>
#include <cmath>

namespace kraken::scheduler {

Scheduler::Scheduler(const SchedulerOptions& o)
    : options_(o), blocks_(o.num_kv_blocks, o.block_size, o.prefix_caching) {
  KRAKEN_CHECK(o.max_batch_tokens >= 1 && o.max_batch_seqs >= 1 && o.max_waiting >= 0,
               "scheduler budgets must be positive");
  watermark_blocks_ = static_cast<int>(std::floor(o.watermark * o.num_kv_blocks));
}

Status Scheduler::Add(uint64_t id, std::vector<int32_t> tokens, int priority, bool use_prefix_cache, uint64_t fork_of) {
  if (tokens.empty()) return InvalidArgument("a sequence needs at least one token");
  if (seqs_.count(id)) return InvalidArgument("duplicate sequence id ", id);
  if (num_waiting() >= options_.max_waiting)
    return ResourceExhausted("waiting queue is full (", options_.max_waiting, " requests)");
  if (blocks_.BlocksFor(static_cast<int64_t>(tokens.size())) > blocks_.num_blocks())
    return InvalidArgument("sequence of ", tokens.size(), " tokens needs more KV blocks than the cache has (",
                           blocks_.num_blocks(), ")");
  auto s = std::make_unique<Sequence>();
  s->id = id;
  s->priority = priority;
  s->arrival = next_arrival_++;
  s->tokens = std::move(tokens);
  s->use_prefix_cache = use_prefix_cache;
  s->fork_of = fork_of;
  InsertWaiting(s.get());
  seqs_.emplace(id, std::move(s));
  return absl::OkStatus();
}

void Scheduler::InsertWaiting(Sequence* s) {
  auto it = std::upper_bound(waiting_.begin(), waiting_.end(), s,
                             [this](const Sequence* a, const Sequence* b) { return Before(a, b); });
  waiting_.insert(it, s);
}

void Scheduler::SortRunning() {
  std::stable_sort(running_.begin(), running_.end(),
                   [this](const Sequence* a, const Sequence* b) { return Before(a, b); });
}

void Scheduler::Preempt(Sequence* s) {
  blocks_.Free(&s->block_table);
  s->num_computed = 0;
  s->num_ready = 0;
  s->chain = {};
  s->running = false;
  ++s->preemptions;
  running_.erase(std::find(running_.begin(), running_.end(), s));
  InsertWaiting(s);  // keeps its arrival, so it goes back ahead of later arrivals
}

StepPlan Scheduler::Schedule() {
  StepPlan plan;
  int budget = options_.max_batch_tokens;
  SortRunning();
  std::vector<Sequence*> planned;
  auto is_planned = [&](const Sequence* s) { return std::find(planned.begin(), planned.end(), s) != planned.end(); };

  // Makes room for `need` more blocks for `s`, preempting from the back. False if `s` itself went.
  auto make_room = [&](Sequence* s, int need) {
    while (blocks_.num_free() < need) {
      Sequence* victim = nullptr;
      for (auto it = running_.rbegin(); it != running_.rend(); ++it)
        if (*it != s && !is_planned(*it)) {
          victim = *it;
          break;
        }
      if (victim == nullptr) victim = s;
      Preempt(victim);
      plan.preempted.push_back(victim->id);
      if (victim == s) return false;
    }
    return true;
  };

  auto plan_running = [&](bool decodes) {
    // Iterate over a snapshot: preemption edits running_.
    std::vector<Sequence*> order = running_;
    for (Sequence* s : order) {
      if (!s->running || is_planned(s)) continue;
      const int remaining = static_cast<int>(s->tokens.size()) - s->num_computed;
      if ((remaining == 1) != decodes) continue;
      if (budget == 0 || static_cast<int>(planned.size()) >= options_.max_batch_seqs) return;
      const int n = std::min(remaining, budget);
      const int need = blocks_.BlocksFor(s->num_computed + n) - static_cast<int>(s->block_table.size());
      if (need > 0) {
        if (!make_room(s, need)) continue;
        KRAKEN_CHECK(blocks_.Allocate(need, &s->block_table).ok(), "room was made");
      }
      plan.seqs.push_back({s, s->num_computed, n, s->num_computed + n == static_cast<int>(s->tokens.size())});
      s->num_computed += n;
      budget -= n;
      planned.push_back(s);
    }
  };
  plan_running(true);
  plan_running(false);

  while (!waiting_.empty() && budget > 0 && static_cast<int>(planned.size()) < options_.max_batch_seqs) {
    Sequence* s = waiting_.front();
    if (!plan.preempted.empty() &&
        std::find(plan.preempted.begin(), plan.preempted.end(), s->id) != plan.preempted.end())
      break;  // just preempted for lack of blocks: do not re-admit in the same step
    const int len = static_cast<int>(s->tokens.size());
    const int bs = blocks_.block_size();
    // A fork shares its origin's full prompt blocks, leaving at least the last token to compute,
    // and waits while their K/V are still being computed.
    const int fork_blocks = ForkBlocks(*s);
    if (fork_blocks < 0) break;
    // Otherwise, the longest cached prefix, leaving at least the last token to compute.
    const bool lookup = fork_blocks == 0 && blocks_.prefix_caching() && s->use_prefix_cache;
    BlockManager::Chain chain = blocks_.MatchPrefix(s->tokens, lookup ? (len - 1) / bs : 0, &matched_);
    if (fork_blocks > 0) {
      const std::vector<int32_t>& from = seqs_.at(s->fork_of)->block_table;
      matched_.assign(from.begin(), from.begin() + fork_blocks);
      chain = {};  // registration, if any, walks its shared blocks from the start
    }
    const int cached = fork_blocks > 0 ? fork_blocks * bs : chain.blocks * bs;
    const int n = std::min(len - cached, budget);
    const int need = blocks_.BlocksFor(cached + n) - static_cast<int>(matched_.size());
    // Matched blocks nobody holds are counted free now and stop being free once shared.
    int unheld = 0;
    for (int32_t b : matched_) unheld += blocks_.RefCount(b) == 0;
    const int free_after_share = blocks_.num_free() - unheld;
    if (free_after_share - need < watermark_blocks_ && !(running_.empty() && free_after_share >= need)) break;
    waiting_.pop_front();
    blocks_.Share(matched_);
    s->block_table = matched_;
    KRAKEN_CHECK(blocks_.Allocate(need, &s->block_table).ok(), "checked above");
    s->chain = chain;
    s->cached_tokens = fork_blocks > 0 ? 0 : cached;  // shared by a fork: not from the cache
    s->fork_of = 0;
    if (lookup) {
      prefix_queries_ += static_cast<uint64_t>(len);
      prefix_hits_ += static_cast<uint64_t>(cached);
    }
    s->running = true;
    running_.push_back(s);
    plan.seqs.push_back({s, cached, n, cached + n == len, /*admitted=*/true});
    s->num_computed = cached + n;
    budget -= n;
    planned.push_back(s);
  }
  plan.num_tokens = options_.max_batch_tokens - budget;
  return plan;
}

int Scheduler::ForkBlocks(const Sequence& s) const {
  if (s.fork_of == 0) return 0;
  auto it = seqs_.find(s.fork_of);
  if (it == seqs_.end() || !it->second->running) return 0;  // ended, or waiting itself
  const Sequence& from = *it->second;
  const int len = static_cast<int>(s.tokens.size());
  const int blocks = (len - 1) / blocks_.block_size();
  const int tokens = blocks * blocks_.block_size();
  if (blocks == 0 || static_cast<int>(from.tokens.size()) < tokens ||
      !std::equal(s.tokens.begin(), s.tokens.begin() + tokens, from.tokens.begin()))
    return 0;
  return from.num_ready >= tokens ? blocks : -1;
}

void Scheduler::CacheComputed() {
  for (Sequence* s : running_) {
    s->num_ready = s->num_computed;
    blocks_.CacheFullBlocks(s->tokens, s->num_computed, s->block_table, &s->chain);
  }
}

void Scheduler::AppendToken(uint64_t id, int32_t token) {
  auto it = seqs_.find(id);
  if (it != seqs_.end()) it->second->tokens.push_back(token);
}

void Scheduler::Remove(uint64_t id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return;
  Sequence* s = it->second.get();
  blocks_.Free(&s->block_table);
  if (s->running) {
    running_.erase(std::find(running_.begin(), running_.end(), s));
  } else {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), s));
  }
  seqs_.erase(it);
}

const Sequence* Scheduler::Find(uint64_t id) const {
  auto it = seqs_.find(id);
  return it == seqs_.end() ? nullptr : it->second.get();
}

std::vector<uint64_t> Scheduler::running_ids() const {
  std::vector<uint64_t> ids;
  for (const Sequence* s : running_) ids.push_back(s->id);
  return ids;
}

}  // namespace kraken::scheduler
