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

bool Scheduler::TryAdmit(Sequence* s, int* budget, StepPlan* plan) {
  const int len = static_cast<int>(s->tokens.size());
  const int bs = blocks_.block_size();
  // A fork shares its origin's full prompt blocks, leaving at least the last token to compute,
  // and waits while their K/V are still being computed.
  const int fork_blocks = ForkBlocks(*s);
  if (fork_blocks < 0) return false;
  // Otherwise, the longest cached prefix, leaving at least the last token to compute.
  const bool lookup = fork_blocks == 0 && blocks_.prefix_caching() && s->use_prefix_cache;
  BlockManager::Chain chain = blocks_.MatchPrefix(s->tokens, lookup ? (len - 1) / bs : 0, &matched_);
  if (fork_blocks > 0) {
    const std::vector<int32_t>& from = seqs_.at(s->fork_of)->block_table;
    matched_.assign(from.begin(), from.begin() + fork_blocks);
    chain = {};  // registration, if any, walks its shared blocks from the start
  }
  const int cached = fork_blocks > 0 ? fork_blocks * bs : chain.blocks * bs;
  const int n = std::min(len - cached, *budget);
  const int need = blocks_.BlocksFor(cached + n) - static_cast<int>(matched_.size());
  // Matched blocks nobody holds are counted free now and stop being free once shared.
  int unheld = 0;
  for (int32_t b : matched_) unheld += blocks_.RefCount(b) == 0;
  const int free_after_share = blocks_.num_free() - unheld;
  if (free_after_share - need < watermark_blocks_ && !(running_.empty() && free_after_share >= need)) return false;
  waiting_.erase(std::find(waiting_.begin(), waiting_.end(), s));
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
  plan->seqs.push_back({s, cached, n, cached + n == len, /*admitted=*/true});
  s->num_computed = cached + n;
  *budget -= n;
  return true;
}

bool Scheduler::ScheduleSolo(StepPlan* plan) {
  int budget = options_.max_batch_tokens;
  auto running = std::find_if(running_.begin(), running_.end(), [](const Sequence* s) { return s->solo; });
  if (running != running_.end()) {
    Sequence* s = *running;
    const int n = std::min(static_cast<int>(s->tokens.size()) - s->num_computed, budget);
    if (n <= 0) return true;  // nothing to compute until its next token is known: an empty step
    const int need = blocks_.BlocksFor(s->num_computed + n) - static_cast<int>(s->block_table.size());
    while (blocks_.num_free() < need) {  // room from the back, as Schedule makes it
      Sequence* victim = s;
      for (auto it = running_.rbegin(); it != running_.rend(); ++it)
        if (*it != s) {
          victim = *it;
          break;
        }
      Preempt(victim);
      plan->preempted.push_back(victim->id);
      if (victim == s) return true;  // an empty plan: it waits, alone at the head, for its blocks
    }
    if (need > 0) KRAKEN_CHECK(blocks_.Allocate(need, &s->block_table).ok(), "room was made");
    plan->seqs.push_back({s, s->num_computed, n, s->num_computed + n == static_cast<int>(s->tokens.size())});
    s->num_computed += n;
    plan->num_tokens = n;
    return true;
  }
  for (Sequence* s : waiting_) {
    if (!s->solo) continue;
    if (!TryAdmit(s, &budget, plan)) return false;  // its blocks are taken: the others run and free them
    plan->num_tokens = options_.max_batch_tokens - budget;
    return true;
  }
  return false;
}

StepPlan Scheduler::Schedule() {
  StepPlan plan;
  SortRunning();
  if (ScheduleSolo(&plan)) return plan;
  int budget = options_.max_batch_tokens;
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
    if (s->solo || !TryAdmit(s, &budget, &plan)) break;  // a suspect waits for a step of its own
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

void Scheduler::Requeue(uint64_t id, bool solo) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return;
  Sequence* s = it->second.get();
  s->solo = s->solo || solo;
  if (s->running) Preempt(s);
}

void Scheduler::SetSolo(uint64_t id, bool solo) {
  auto it = seqs_.find(id);
  if (it != seqs_.end()) it->second->solo = solo;
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
