#include "core/stop_matcher.h"

#include <algorithm>

namespace kraken::core {

StopMatcher::Result StopMatcher::Push(std::string_view delta) {
  Result r;
  if (done_) return r;
  held_.append(delta);
  if (stops_.empty()) {
    r.release.swap(held_);
    return r;
  }
  // The stop that completes first (smallest end; on a tie the longest, which starts earliest):
  // the result is the same however the text was split into deltas. Released text never holds
  // the start of a match, so it suffices to search what is held.
  size_t best_end = std::string::npos;
  const std::string* best_stop = nullptr;
  for (const std::string& s : stops_) {
    const size_t at = held_.find(s);
    if (at == std::string::npos) continue;
    const size_t end = at + s.size();
    if (end < best_end || (end == best_end && s.size() > best_stop->size())) {
      best_end = end;
      best_stop = &s;
    }
  }
  if (best_stop != nullptr) {
    r.release = held_.substr(0, best_end - best_stop->size());
    r.matched = true;
    r.stop = *best_stop;
    held_.clear();
    done_ = true;
    return r;
  }
  // Hold the longest suffix of held_ that is a proper prefix of some stop string.
  size_t keep = 0;
  for (const std::string& s : stops_) {
    const size_t max_len = std::min(s.size() - 1, held_.size());
    for (size_t len = max_len; len > keep; --len) {
      if (held_.compare(held_.size() - len, len, s, 0, len) == 0) {
        keep = len;
        break;
      }
    }
  }
  r.release = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return r;
}

std::string StopMatcher::Flush() {
  std::string out;
  out.swap(held_);
  done_ = true;
  return out;
}

}  // namespace kraken::core
