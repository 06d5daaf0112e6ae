#include "engine/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <vector>

namespace kraken::engine {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

std::string Err(const SamplingParams& p) {
  Status s = ValidateSamplingParams(p, 100);
  return s.ok() ? "" : std::string(s.message());
}

TEST(Sampler, ValidationNamesFieldRangeAndValue) {
  EXPECT_EQ(Err({}), "");
  EXPECT_EQ(Err({.temperature = -0.5f}), "sampling field 'temperature' must be >= 0, got -0.5");
  EXPECT_EQ(Err({.temperature = std::nanf("")}), "sampling field 'temperature' must be finite, got nan");
  EXPECT_EQ(Err({.top_p = 0.f}), "sampling field 'top_p' must be in (0, 1], got 0");
  EXPECT_EQ(Err({.top_p = 1.5f}), "sampling field 'top_p' must be in (0, 1], got 1.5");
  EXPECT_EQ(Err({.min_p = kInf}), "sampling field 'min_p' must be finite, got inf");
  EXPECT_EQ(Err({.repetition_penalty = 0.f}), "sampling field 'repetition_penalty' must be > 0, got 0");
  EXPECT_EQ(Err({.presence_penalty = 2.5f}), "sampling field 'presence_penalty' must be in [-2, 2], got 2.5");
  EXPECT_EQ(Err({.top_k = -2}), "sampling field 'top_k' must be >= -1 (0 or -1 = off), got -2");
  EXPECT_EQ(Err({.top_logprobs = 21}), "sampling field 'top_logprobs' must be in [0, 20], got 21");
  EXPECT_EQ(Err({.typical_p = 0.f}), "sampling field 'typical_p' must be in (0, 1], got 0");
  EXPECT_EQ(Err({.typical_p = std::nanf("")}), "sampling field 'typical_p' must be finite, got nan");
}

TEST(Sampler, GreedyPicksArgmaxLowestIdOnTiesAndReportsRawLogprobs) {
  Sampler s(4);
  const float logits[4] = {1.f, 3.f, 3.f, -2.f};
  auto t = s.Sample(logits, {.temperature = 0.f, .top_logprobs = 3}, {});
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->token, 1);
  const double z = std::log(std::exp(1.0) + 2 * std::exp(3.0) + std::exp(-2.0));
  EXPECT_NEAR(t->logprob, 3.0 - z, 1e-6);
  ASSERT_EQ(t->num_top, 3);
  EXPECT_EQ(t->top[0].token, 1);
  EXPECT_EQ(t->top[1].token, 2);
  EXPECT_EQ(t->top[2].token, 0);
  EXPECT_NEAR(t->top[2].logprob, 1.0 - z, 1e-6);
}

TEST(Sampler, TheChosenTokenIsAlwaysAmongTheReportedAlternatives) {
  // OpenAI's completions API: top_logprobs holds up to logprobs + 1 entries, the sampled token
  // among them. Token 2 is the least likely; with top_logprobs = 2 it is reported third.
  Sampler s(4);
  const float logits[4] = {1.f, 3.f, -1.f, 2.f};
  const double z = std::log(std::exp(1.0) + std::exp(3.0) + std::exp(-1.0) + std::exp(2.0));
  int outside = 0;
  for (uint64_t seed = 1; seed < 200; ++seed) {
    auto t = s.Sample(logits, {.temperature = 3.f, .top_logprobs = 2, .seed = seed}, {});
    ASSERT_TRUE(t.ok());
    ASSERT_EQ(t->top[0].token, 1);
    ASSERT_EQ(t->top[1].token, 3);
    if (t->token == 1 || t->token == 3) {
      EXPECT_EQ(t->num_top, 2) << "a chosen token among the top is not repeated";
      continue;
    }
    ++outside;
    ASSERT_EQ(t->num_top, 3);
    EXPECT_EQ(t->top[2].token, t->token);
    EXPECT_EQ(t->top[2].logprob, t->logprob);
    EXPECT_NEAR(t->top[2].logprob, logits[t->token] - z, 1e-6);
  }
  EXPECT_GT(outside, 10) << "at temperature 3 tokens 0 and 2 are drawn often";
  auto given = s.Score(logits, 2, 1);
  ASSERT_TRUE(given.ok());
  ASSERT_EQ(given->num_top, 2);
  EXPECT_EQ(given->top[0].token, 1);
  EXPECT_EQ(given->top[1].token, 2);
  EXPECT_NEAR(given->top[1].logprob, -1.0 - z, 1e-6);
  EXPECT_EQ(s.Score(logits, 2, 0)->num_top, 0) << "no alternatives asked, none reported";
  EXPECT_EQ(s.Sample(logits, {.temperature = 0.f, .top_logprobs = 1}, {})->num_top, 1);
}

TEST(Sampler, LogitBiasMovesTheChoiceBeforePenaltiesAndLeavesTheReportedLogprobsRaw) {
  Sampler s(4);
  const float logits[4] = {1.f, 3.f, 2.f, -kInf};
  const double z = std::log(std::exp(1.0) + std::exp(3.0) + std::exp(2.0));
  const TokenBias up[] = {{.token = 2, .bias = 1.5f}};
  auto t = s.Sample(logits, {.temperature = 0.f, .top_logprobs = 1}, {.logit_bias = up});
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->token, 2) << "2 + 1.5 beats 3";
  EXPECT_NEAR(t->logprob, 2.0 - z, 1e-6) << "the model's own distribution";
  // -100 rules a token out in practice, at any temperature; a -inf logit stays out whatever its bias.
  const TokenBias ban[] = {{.token = 1, .bias = -100.f}, {.token = 3, .bias = 100.f}, {.token = 9, .bias = 5.f}};
  for (uint64_t seed = 1; seed < 100; ++seed) {
    auto d = s.Sample(logits, {.temperature = 2.f, .seed = seed}, {.logit_bias = ban});
    ASSERT_TRUE(d.ok());
    EXPECT_TRUE(d->token == 0 || d->token == 2) << d->token;
  }
  // Before penalties, as vLLM orders them. Token 1 (3) was generated; a repetition penalty of 2
  // halves it: (3 + 0.75) / 2 = 1.875 loses to token 2 (2), where 3 / 2 + 0.75 = 2.25 would win;
  // (3 + 1.25) / 2 = 2.125 wins.
  const float three[4] = {0.f, 3.f, 2.f, -kInf};
  const int32_t seen[] = {1};
  const TokenBias small[] = {{.token = 1, .bias = 0.75f}}, large[] = {{.token = 1, .bias = 1.25f}};
  EXPECT_EQ(
      s.Sample(three, {.temperature = 0.f, .repetition_penalty = 2.f}, {.generated = seen, .logit_bias = small})->token,
      2);
  EXPECT_EQ(
      s.Sample(three, {.temperature = 0.f, .repetition_penalty = 2.f}, {.generated = seen, .logit_bias = large})->token,
      1);
}

TEST(Sampler, ScoringAGivenTokenGivesTheBitsSamplingIt) {
  Sampler s(6);
  const float logits[6] = {0.5f, 2.25f, -1.f, 2.25f, 7.f / 3.f, -kInf};
  for (uint64_t seed = 1; seed < 40; ++seed) {
    auto drawn = s.Sample(logits, {.temperature = 1.5f, .top_logprobs = 4, .seed = seed}, {});
    ASSERT_TRUE(drawn.ok());
    auto given = s.Score(logits, drawn->token, 4);
    ASSERT_TRUE(given.ok());
    EXPECT_EQ(given->token, drawn->token);
    EXPECT_EQ(given->logprob, drawn->logprob) << "exactly";
    ASSERT_EQ(given->num_top, drawn->num_top);
    for (int k = 0; k < drawn->num_top; ++k) {
      EXPECT_EQ(given->top[k].token, drawn->top[k].token);
      EXPECT_EQ(given->top[k].logprob, drawn->top[k].logprob);
    }
  }
  const double z = std::log(std::exp(0.5) + 2 * std::exp(2.25) + std::exp(-1.0) + std::exp(7.0 / 3.0));
  auto t = s.Score(logits, 2, 0);
  ASSERT_TRUE(t.ok());
  EXPECT_NEAR(t->logprob, -1.0 - z, 1e-6);
  EXPECT_EQ(t->num_top, 0);
  EXPECT_EQ(s.Score(logits, 5, 0)->logprob, -kInf) << "a token the model rules out";
  EXPECT_EQ(s.Score(logits, 6, 0).status().message(), "token 6 is not in the vocabulary [0, 6)");
  EXPECT_EQ(s.Score(logits, -1, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.Score(logits, 0, 21).status().message(), "top_logprobs must be in [0, 20], got 21");
  const float none[6] = {-kInf, -kInf, -kInf, -kInf, -kInf, -kInf};
  EXPECT_EQ(s.Score(none, 0, 0).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Sampler, SeededDrawsAreReproducibleAndFollowTheDistribution) {
  const int V = 5;
  const float logits[V] = {0.f, std::log(2.f), std::log(3.f), std::log(4.f), -kInf};
  Sampler s(V);
  std::map<int, int> counts;
  const int n = 20000;
  std::vector<int32_t> generated;
  for (int i = 0; i < n; ++i) {
    auto t = s.Sample(logits, {.temperature = 1.f, .seed = 7}, {{}, generated});
    ASSERT_TRUE(t.ok());
    counts[t->token]++;
    generated.push_back(0);  // index advances; penalties are off so history content is irrelevant
  }
  EXPECT_EQ(counts[4], 0) << "a -inf logit was sampled";
  for (int k = 0; k < 4; ++k) {
    const double want = (k + 1) / 10.0;
    EXPECT_NEAR(counts[k] / static_cast<double>(n), want, 0.015) << "token " << k;
  }
  // Same seed and index -> same token; different seeds differ somewhere.
  auto a = s.Sample(logits, {.seed = 99}, {{}, {}});
  auto b = s.Sample(logits, {.seed = 99}, {{}, {}});
  EXPECT_EQ(a->token, b->token);
  int differ = 0;
  for (uint64_t seed = 0; seed < 50; ++seed) {
    differ += s.Sample(logits, {.seed = seed}, {})->token != a->token;
  }
  EXPECT_GT(differ, 10);
}

TEST(Sampler, TruncationTopKTopPMinP) {
  const int V = 6;
  const float logits[V] = {5.f, 4.f, 3.f, 2.f, 1.f, 0.f};
  Sampler s(V);
  for (uint64_t seed = 0; seed < 300; ++seed) {
    EXPECT_LT(s.Sample(logits, {.top_k = 2, .seed = seed}, {})->token, 2);
    EXPECT_EQ(s.Sample(logits, {.top_k = 1, .seed = seed}, {})->token, 0);
    // p = softmax: 0.636, 0.234, 0.086, ... ; top_p 0.8 keeps {0, 1}.
    EXPECT_LT(s.Sample(logits, {.top_p = 0.8f, .seed = seed}, {})->token, 2);
    // min_p 0.3: keeps p >= 0.3 * 0.636 = 0.19 -> {0, 1}.
    EXPECT_LT(s.Sample(logits, {.min_p = 0.3f, .seed = seed}, {})->token, 2);
    // top_k larger than the vocabulary means no truncation, not a crash.
    EXPECT_LT(s.Sample(logits, {.top_k = 9999999, .seed = seed}, {})->token, V);
  }
}

TEST(Sampler, TopKKeepsEveryTokenTiedWithTheKth) {
  const float logits[5] = {3.f, 1.f, 1.f, 1.f, 0.f};
  Sampler s(5);
  std::map<int, int> seen;
  for (uint64_t seed = 0; seed < 2000; ++seed) seen[s.Sample(logits, {.top_k = 2, .seed = seed}, {})->token]++;
  EXPECT_EQ(seen.count(4), 0u);
  EXPECT_GT(seen[1], 0);
  EXPECT_GT(seen[2], 0);  // tied with the 2nd largest: kept
  EXPECT_GT(seen[3], 0);
}

TEST(Sampler, ExtremePenaltiesStayWellDefined) {
  // Repetition penalty 1e-38 multiplies a positive logit past the float range; the token must
  // then dominate (it is the most encouraged), not fall through to an arbitrary choice.
  const float logits[8] = {10.f, 1.f, 2.f, 3.f, .5f, .1f, -1.f, -2.f};
  const std::vector<int32_t> prompt = {0};
  Sampler s(8);
  for (uint64_t seed = 0; seed < 200; ++seed) {
    auto t = s.Sample(logits, {.temperature = 1.f, .repetition_penalty = 1e-38f, .seed = seed}, {prompt, {}});
    ASSERT_TRUE(t.ok());
    ASSERT_EQ(t->token, 0);
  }
}

TEST(Sampler, PenaltiesFollowTheirDefinitions) {
  Sampler s(3);
  const float logits[3] = {2.f, 1.9f, -1.f};
  const std::vector<int32_t> prompt = {0};
  // Repetition penalty 2 halves token 0's positive logit: 1 < 1.9, so token 1 wins greedily.
  EXPECT_EQ(s.Sample(logits, {.temperature = 0.f, .repetition_penalty = 2.f}, {prompt, {}})->token, 1);
  // Presence/frequency apply to generated tokens only: the prompt alone changes nothing.
  EXPECT_EQ(s.Sample(logits, {.temperature = 0.f, .presence_penalty = 1.f}, {prompt, {}})->token, 0);
  const std::vector<int32_t> gen = {0, 0};
  // frequency 0.06 x 2 occurrences = 0.12 > 0.1 gap.
  EXPECT_EQ(s.Sample(logits, {.temperature = 0.f, .frequency_penalty = 0.06f}, {{}, gen})->token, 1);
  EXPECT_EQ(s.Sample(logits, {.temperature = 0.f, .frequency_penalty = 0.04f}, {{}, gen})->token, 0);
  // The scratch state is clean between calls.
  EXPECT_EQ(s.Sample(logits, {.temperature = 0.f}, {{}, gen})->token, 0);
}

TEST(Sampler, NonFiniteLogitsAndParametersNeverCrash) {
  Sampler s(4);
  const float nan = std::nanf("");
  const float mixed[4] = {nan, 1.f, nan, 0.5f};
  auto t = s.Sample(mixed, {.temperature = 0.7f, .seed = 1}, {});
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE(t->token == 1 || t->token == 3);
  const float all_bad[4] = {nan, -kInf, nan, -kInf};
  auto bad = s.Sample(all_bad, {}, {});
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().message(), "logits hold no finite value (all -inf or NaN)");
  const float pos_inf[4] = {0.f, kInf, kInf, 1.f};
  EXPECT_EQ(s.Sample(pos_inf, {}, {})->token, 1);
  EXPECT_FALSE(s.Sample(mixed, {.top_p = nan}, {}).ok());
  const std::vector<int32_t> junk_history = {-5, 1000, 2};  // out-of-range ids are ignored
  EXPECT_TRUE(
      s.Sample(mixed, {.repetition_penalty = 1.3f, .frequency_penalty = 1.f}, {junk_history, junk_history}).ok());
}

TEST(Sampler, UniformIsInUnitIntervalAndWellSpread) {
  double sum = 0;
  for (uint64_t i = 0; i < 100000; ++i) {
    const double u = UniformForIndex(42, i);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
  }
  EXPECT_NEAR(sum / 100000, 0.5, 0.005);
}

}  // namespace
}  // namespace kraken::engine

namespace kraken::engine {
namespace {

TEST(Sampler, BannedTokensAreNeverDrawnUnlessNothingElseIsLeft) {
  Sampler s(4);
  const float logits[4] = {5.f, 1.f, 0.f, -1.f};
  const int32_t ban[] = {0};
  // Greedy would pick 0; banned, the next best is 1.
  EXPECT_EQ(s.Sample(logits, {.temperature = 0.f}, {{}, {}, ban})->token, 1);
  for (uint64_t seed = 0; seed < 200; ++seed) {
    auto t = s.Sample(logits, {.temperature = 1.f, .seed = seed}, {{}, {}, ban});
    ASSERT_TRUE(t.ok());
    EXPECT_NE(t->token, 0);
    // The logprob is the raw model's, before the ban.
    if (t->token == 1) {
      EXPECT_NEAR(t->logprob, 1.f - (5.f + std::log(1 + std::exp(-4.f) + std::exp(-5.f) + std::exp(-6.f))), 1e-5);
    }
  }
  // Every finite token banned: the ban is dropped rather than leaving nothing to draw.
  const float one[4] = {2.f, -INFINITY, -INFINITY, -INFINITY};
  EXPECT_EQ(s.Sample(one, {.temperature = 0.f}, {{}, {}, ban})->token, 0);
  // Out-of-range ids in the ban list are ignored.
  const int32_t odd[] = {-5, 99};
  EXPECT_EQ(s.Sample(logits, {.temperature = 0.f}, {{}, {}, odd})->token, 0);
}

TEST(Sampler, TopPNucleusMatchesAFullSortOnLargeVocabularies) {
  // A flat distribution over 5000 ids needs the slices to grow past 64 and 256 before the
  // nucleus is complete; the kept set must be the (probability, id)-ordered prefix.
  const int V = 5000;
  std::vector<float> logits(V);
  for (int i = 0; i < V; ++i) logits[i] = static_cast<float>((i * 7919) % 1000) * 1e-3f;
  Sampler s(V);
  std::vector<int> order(V);
  for (int i = 0; i < V; ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  double total = 0;
  for (int i = 0; i < V; ++i) total += std::exp(static_cast<double>(logits[i]) - 0.999);
  double cum = 0;
  int keep = 0;
  while (keep < V) {
    cum += std::exp(static_cast<double>(logits[order[keep]]) - 0.999) / total;
    ++keep;
    if (cum >= 0.5) break;
  }
  std::vector<bool> in(V, false);
  for (int i = 0; i < keep; ++i) in[order[i]] = true;
  ASSERT_GT(keep, 1000);
  int outside = 0;
  for (uint64_t seed = 0; seed < 500; ++seed) {
    auto t = s.Sample(logits.data(), {.temperature = 1.f, .top_p = 0.5f, .seed = seed}, {});
    ASSERT_TRUE(t.ok());
    outside += !in[t->token];
  }
  // Summation order may move the boundary by a token or two of equal weight, never more.
  EXPECT_LE(outside, 2);
}

}  // namespace
}  // namespace kraken::engine

namespace kraken::engine {
namespace {

// Truncation pinned token by token. Each case names the exact set of ids a setting keeps and
// draws many tokens; the draws must stay inside the set and follow softmax(logits / temperature)
// renormalised over it. The rarest kept token has a renormalised probability of 0.43% (86 of
// 20000 draws expected), so a set that lacks a token misses that token's count by at least 9
// binomial standard deviations, while the bound is 5; a token kept that should not be is drawn
// outside the set. The draws are a pure function of (seed, index), so the outcome is fixed.

/// softmax(logits / temperature) restricted to `kept` (other ids 0), in double.
std::vector<double> RenormalisedOver(const std::vector<float>& logits, float temperature, const std::set<int>& kept) {
  double m = -std::numeric_limits<double>::infinity();
  for (int id : kept) m = std::max(m, static_cast<double>(logits[id]) / temperature);
  std::vector<double> p(logits.size(), 0.0);
  double total = 0;
  for (int id : kept) total += p[id] = std::exp(static_cast<double>(logits[id]) / temperature - m);
  for (double& x : p) x /= total;
  return p;
}

/// Draws `n` tokens (draw indices 0..n-1 of seed 11, penalties off) and expects: no id outside
/// `kept` is ever drawn; each id of `kept` is drawn a number of times within 5 binomial standard
/// deviations, 5·sqrt(n·p·(1 - p)), of n·p, p its renormalised probability.
void ExpectKeptSet(const std::vector<float>& logits, const SamplingParams& params, const std::set<int>& kept,
                   int n = 20000) {
  const int V = static_cast<int>(logits.size());
  Sampler s(V);
  std::vector<int> counts(V, 0);
  for (int i = 0; i < n; ++i) {
    SamplingParams q = params;
    q.seed = 11;
    auto t = s.Sample(logits.data(), q, {}, i);
    ASSERT_TRUE(t.ok()) << t.status();
    ++counts[t->token];
  }
  std::ostringstream setting;
  setting << "temperature " << params.temperature << ", top_k " << params.top_k << ", top_p " << params.top_p
          << ", min_p " << params.min_p << ", typical_p " << params.typical_p << ", kept {";
  for (int id : kept) setting << " " << id;
  setting << " }";
  SCOPED_TRACE(setting.str());
  const std::vector<double> p = RenormalisedOver(logits, params.temperature, kept);
  for (int id = 0; id < V; ++id) {
    if (!kept.count(id)) {
      EXPECT_EQ(counts[id], 0) << "token " << id << " is outside the kept set but was drawn";
      continue;
    }
    const double want = n * p[id], sigma = std::sqrt(n * p[id] * (1 - p[id]));
    EXPECT_NEAR(counts[id], want, 5 * sigma) << "token " << id << " (renormalised p " << p[id] << ")";
  }
}

// p = softmax: 0.6337, 0.2331, 0.0858, 0.0315, 0.0116, 0.0043 (cumulative 0.6337, 0.8668,
// 0.9526, 0.9841, 0.9957, 1).
const std::vector<float> kDescending = {5.f, 4.f, 3.f, 2.f, 1.f, 0.f};

TEST(Sampler, TopPKeepsTheTokenThatCrossesTopP) {
  // The nucleus is the smallest prefix whose mass reaches top_p: the token that crosses is in.
  ExpectKeptSet(kDescending, {.top_p = 0.6f}, {0});            // 0.6337 >= 0.6 already
  ExpectKeptSet(kDescending, {.top_p = 0.7f}, {0, 1});         // 0.6337 < 0.7 <= 0.8668
  ExpectKeptSet(kDescending, {.top_p = 0.9f}, {0, 1, 2});      // 0.8668 < 0.9 <= 0.9526
  ExpectKeptSet(kDescending, {.top_p = 0.96f}, {0, 1, 2, 3});  // 0.9526 < 0.96 <= 0.9841
  // Not in kDescending's order: the nucleus follows probability, not id.
  ExpectKeptSet({0.f, 2.f, 5.f, 1.f, 4.f, 3.f}, {.top_p = 0.9f}, {2, 4, 5});
}

TEST(Sampler, TopPBreaksTiesByLowerIdAndStopsWhenTheSumEqualsTopP) {
  // Ids 1, 2 and 4 tie at p = e^2 / (3e^2 + e + 1) = 0.2855: the lower ids come first.
  const std::vector<float> tied = {0.f, 2.f, 2.f, 1.f, 2.f};
  ExpectKeptSet(tied, {.top_p = 0.2f}, {1});
  ExpectKeptSet(tied, {.top_p = 0.5f}, {1, 2});
  ExpectKeptSet(tied, {.top_p = 0.8f}, {1, 2, 4});
  ExpectKeptSet(tied, {.top_p = 0.9f}, {1, 2, 3, 4});  // 0.8564 + 0.1050 crosses 0.9
  // Equal logits give probabilities that are exact in binary (1/4, 1/8), so the cumulative sum
  // equals top_p exactly: reaching top_p is enough, the next token is not taken.
  ExpectKeptSet({3.f, 3.f, 3.f, 3.f}, {.top_p = 0.5f}, {0, 1});
  ExpectKeptSet({3.f, 3.f, 3.f, 3.f}, {.top_p = 0.75f}, {0, 1, 2});
  ExpectKeptSet({1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f}, {.top_p = 0.375f}, {0, 1, 2});
  const float ninf = -std::numeric_limits<float>::infinity();
  ExpectKeptSet({1.f, ninf, 1.f, 1.f, 1.f}, {.top_p = 0.5f}, {0, 2});  // -inf has p 0 and never counts
}

TEST(Sampler, TopPOneKeepsEveryTokenAndTopPUsesTemperedProbabilities) {
  ExpectKeptSet(kDescending, {.top_p = 1.f}, {0, 1, 2, 3, 4, 5});
  ExpectKeptSet(kDescending, {.top_p = 0.999f}, {0, 1, 2, 3, 4, 5});  // 0.9957 < 0.999
  // Temperature 2: p = 0.4141, 0.2512, 0.1523, 0.0924, 0.0560, 0.0340 (cumulative 0.4141,
  // 0.6652, 0.8176, ...). Untempered, 0.7 would keep {0, 1}.
  ExpectKeptSet(kDescending, {.temperature = 2.f, .top_p = 0.7f}, {0, 1, 2});
  // Temperature 0.5: p0 = 0.8647, p1 = 0.1170. Untempered, 0.9 would keep {0, 1, 2}.
  ExpectKeptSet(kDescending, {.temperature = 0.5f, .top_p = 0.9f}, {0, 1});
}

TEST(Sampler, TopPNucleusCrossingASortSliceBoundary) {
  // 100 ids (every third) at logit 2, 200 at 0: each high id has p = e^2 / (100e^2 + 200) =
  // 0.00787, and 64 of them sum to 0.5036 < 0.51 <= 0.5115: the 65th, the first past the
  // sampler's first sorted slice of 64, crosses and is kept; ties go by id.
  std::vector<float> logits(300, 0.f);
  std::set<int> kept;
  for (int id = 0; id < 300; id += 3) {
    logits[id] = 2.f;
    if (kept.size() < 65) kept.insert(id);
  }
  ExpectKeptSet(logits, {.top_p = 0.51f}, kept, 40000);
}

TEST(Sampler, TopKKeepsExactlyTheKMostLikelyPlusTiesAndRenormalisesForTopP) {
  ExpectKeptSet(kDescending, {.top_k = 1}, {0});
  ExpectKeptSet(kDescending, {.top_k = 2}, {0, 1});
  ExpectKeptSet(kDescending, {.top_k = 3}, {0, 1, 2});
  ExpectKeptSet(kDescending, {.top_k = 6}, {0, 1, 2, 3, 4, 5});
  ExpectKeptSet({0.f, 2.f, 5.f, 1.f, 4.f, 3.f}, {.top_k = 2}, {2, 4});
  // Every token tied with the k-th is kept, whether the tie is at the top or below it.
  ExpectKeptSet({1.f, 2.f, 2.f, 0.f}, {.top_k = 1}, {1, 2});
  ExpectKeptSet({3.f, 1.f, 1.f, 1.f, 0.f}, {.top_k = 2}, {0, 1, 2, 3});
  // top-p then measures mass within the top k: renormalised over {0, 1, 2}, p = 0.6652, 0.2447,
  // 0.0900, so 0.9 is crossed by id 1 (over the whole vocabulary it would take id 2 as well).
  ExpectKeptSet(kDescending, {.top_k = 3, .top_p = 0.9f}, {0, 1});
}

TEST(Sampler, MinPKeepsTokensAtLeastMinPTimesTheMostLikely) {
  // p_i / p_0 = e^-i: 0.368, 0.135, 0.050, ...
  ExpectKeptSet(kDescending, {.min_p = 0.3f}, {0, 1});
  ExpectKeptSet(kDescending, {.min_p = 0.1f}, {0, 1, 2});
  ExpectKeptSet(kDescending, {.min_p = 0.04f}, {0, 1, 2, 3});
  // The comparison is >=: min_p 1 keeps every token tied with the most likely.
  ExpectKeptSet({2.f, 2.f, 1.f}, {.min_p = 1.f}, {0, 1});
  // On tempered probabilities: at temperature 2 the ratios are e^(-i/2): 0.607, 0.368, 0.223.
  ExpectKeptSet(kDescending, {.temperature = 2.f, .min_p = 0.3f}, {0, 1, 2});
  // After top-p: 0.96 keeps {0, 1, 2, 3}, min_p 0.1 then drops id 3 (ratio 0.050).
  ExpectKeptSet(kDescending, {.top_p = 0.96f, .min_p = 0.1f}, {0, 1, 2});
}

TEST(Sampler, TypicalPKeepsTheTokensWhoseSurprisalIsClosestToTheEntropy) {
  // p = 0.5, 0.25, 0.125, 0.125: entropy H = 1.75 ln 2 = 1.213 nats; surprisals ln 2, ln 4, ln 8,
  // ln 8 lie 0.520, 0.173, 0.866, 0.866 from H, so the typical order is 1, 0, 2, 3 (ties by id),
  // with cumulative probability 0.25, 0.75, 0.875, 1.
  const std::vector<float> logits = {std::log(4.f), std::log(2.f), 0.f, 0.f};
  ExpectKeptSet(logits, {.typical_p = 0.25f}, {1});         // 0.25 reaches 0.25 exactly
  ExpectKeptSet(logits, {.typical_p = 0.3f}, {0, 1});       // the crossing token is kept
  ExpectKeptSet(logits, {.typical_p = 0.8f}, {0, 1, 2});    // 0.75 < 0.8 <= 0.875: id 2 before 3
  ExpectKeptSet(logits, {.typical_p = 1.f}, {0, 1, 2, 3});  // off
  // After min-p, over the renormalised survivors: min_p 0.3 leaves {0, 1} (q = 2/3, 1/3, H = 0.637;
  // surprisals 0.405, 1.099 lie 0.232, 0.462 away), so typical_p 0.5 keeps id 0 alone.
  ExpectKeptSet(logits, {.min_p = 0.3f, .typical_p = 0.5f}, {0});
}

}  // namespace
}  // namespace kraken::engine
