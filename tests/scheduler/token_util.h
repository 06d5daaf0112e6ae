// Token sequences for the scheduler tests.
#pragma once

#include <cstdint>
#include <numeric>
#include <vector>

namespace kraken::scheduler {

/// `n` consecutive token ids starting at `first`: distinct tokens, so distinct block keys.
inline std::vector<int32_t> Iota(int n, int first = 1) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

}  // namespace kraken::scheduler
