// The front door (core/admission.h) without an engine: a fake submit records what reaches it. The
// order of its checks, each refusal's exact message, that a refusal never reaches the parser or
// the engine past the step that refused it, that every refusal is counted once by its code, the
// deadline arithmetic, and readiness.
#include "core/admission.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "metrics/registry.h"
#include "tests/core/test_tokenizer.h"

namespace kraken::core {
namespace {

using std::chrono::milliseconds;

const tokenizer::Tokenizer& Tok() {
  return KjvTokenizer();
}

// A door over a fake engine that records each submission.
struct Door {
  struct Submitted {
    RequestParams params;
    Clock::time_point arrival, deadline;
  };
  explicit Door(AdmissionOptions options = {}) : metrics(registry, 1, "v", "m", "cpu", "avx2") {
    options.limits = {.context_length = 64, .vocab_size = 4096, .eos_token_id = 0};
    options.metrics = &metrics;
    health.SetServing(true);
    door.emplace(
        Tok(), health,
        [this](RequestParams p, Clock::time_point arrival, Clock::time_point deadline) -> StatusOr<Handles> {
          if (!submit_error.ok()) return submit_error;
          if (static_cast<int>(submitted.size()) == fail_at)
            return absl::ResourceExhaustedError("the waiting queue is full");
          submitted.push_back({p, arrival, deadline});
          auto h = std::make_shared<RequestHandle>(submitted.size(), std::move(p), arrival, deadline);
          given.push_back(h);
          return Handles{h};
        },
        std::move(options));
  }
  // Accept with a parser that counts its calls and returns `g`.
  StatusOr<Handles> Accept(const Call& call, GenerationRequest g, const FieldNames& names = {}) {
    return door->Accept(
        call,
        [&](std::string* id) -> StatusOr<GenerationRequest> {
          ++parsed;
          if (!g.request_id.empty()) *id = g.request_id;
          return g;
        },
        names);
  }
  // AcceptBatch with a parser that returns `gs`.
  StatusOr<Handles> AcceptBatch(std::vector<GenerationRequest> gs, const FieldNames& names = {}) {
    return door->AcceptBatch(
        Call{}, [&](std::string*) -> StatusOr<std::vector<GenerationRequest>> { return gs; }, names);
  }
  // kraken_request_failure_total{reason="<reason>"}.
  std::string Failures(const std::string& reason) {
    const std::string text = registry.Serialize();
    const std::string key = "kraken_request_failure_total{reason=\"" + reason + "\"} ";
    const size_t at = text.find(key);
    if (at == std::string::npos) return "absent";
    return text.substr(at + key.size(), text.find('\n', at) - at - key.size());
  }

  metrics::Registry registry;
  ServingMetrics metrics;
  Health health;
  std::optional<Admission> door;
  std::vector<Submitted> submitted;
  Status submit_error;
  int fail_at = -1;  // the submission (0-based) that finds the queue full
  std::vector<std::shared_ptr<RequestHandle>> given;
  int parsed = 0;
};

GenerationRequest Valid() {
  return GenerationRequest{.text = "In the beginning", .max_tokens = 4};
}

TEST(Admission, AValidCallReachesTheEngineValidatedWithItsIdArrivalAndNoDeadline) {
  Door d;
  const auto before = Clock::now();
  GenerationRequest g = Valid();
  g.request_id = "req-7";
  auto handles = d.Accept(Call{}, g);
  ASSERT_TRUE(handles.ok()) << handles.status();
  ASSERT_EQ(d.submitted.size(), 1u);
  const Door::Submitted& s = d.submitted[0];
  EXPECT_EQ(s.params.request_id, "req-7");
  EXPECT_EQ(s.params.prompt, Tok().Encode("In the beginning").value());
  EXPECT_EQ(s.params.max_tokens, 4u);
  EXPECT_GE(s.arrival, before);
  EXPECT_LE(s.arrival, Clock::now());
  EXPECT_EQ(s.deadline, Clock::time_point::max());
  EXPECT_EQ(d.parsed, 1);
  EXPECT_EQ(d.Failures("invalid_argument"), "0");
}

TEST(Admission, AnIdTheProtocolCarriedOutsideTheBodyReachesTheEngineAndItsRefusals) {
  Door d;
  auto ok = d.Accept(Call{.request_id = "hdr-1"}, Valid());  // the parser leaves the id alone
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(d.submitted[0].params.request_id, "hdr-1");
  EXPECT_EQ((*ok)[0]->params().request_id, "hdr-1");
}

TEST(Admission, TheRequestTimeoutAndTheCallsOwnDeadlineBoundTheRequestTheEarlierWins) {
  Door d(AdmissionOptions{.request_timeout = milliseconds(5000)});
  ASSERT_TRUE(d.Accept(Call{}, Valid()).ok());
  EXPECT_EQ(d.submitted[0].deadline - d.submitted[0].arrival, milliseconds(5000));
  // A gRPC deadline 1 s out is earlier than the timeout: it wins (within the clocks' reading skew).
  ASSERT_TRUE(d.Accept(Call{.deadline = std::chrono::system_clock::now() + milliseconds(1000)}, Valid()).ok());
  const auto within = d.submitted[1].deadline - d.submitted[1].arrival;
  EXPECT_LE(within, milliseconds(1000));
  EXPECT_GT(within, milliseconds(900));
  // One 60 s out is later: the timeout wins.
  ASSERT_TRUE(d.Accept(Call{.deadline = std::chrono::system_clock::now() + milliseconds(60000)}, Valid()).ok());
  EXPECT_EQ(d.submitted[2].deadline - d.submitted[2].arrival, milliseconds(5000));
}

TEST(Admission, AGrpcDeadlineIsTheRequestsWhenNoTimeoutIsSetAndTheFarFutureMeansNone) {
  Door d;
  const auto now = Clock::now();
  const auto sys = std::chrono::system_clock::now();
  const auto deadline = d.door->Deadline(now, sys + milliseconds(2000));
  EXPECT_LE(deadline - now, milliseconds(2000));
  EXPECT_GT(deadline - now, milliseconds(1900));
  EXPECT_EQ(d.door->Deadline(now, std::chrono::system_clock::time_point::max()), Clock::time_point::max());
}

TEST(Admission, DrainingRefusesBeforeTheKeyAndTheBodyAndCountsItUnavailable) {
  Door d(AdmissionOptions{.api_key = "k"});
  d.health.StartDraining();
  auto r = d.Accept(Call{}, Valid());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status(), absl::UnavailableError("the server is shutting down"));
  EXPECT_EQ(d.parsed, 0);
  EXPECT_TRUE(d.submitted.empty());
  EXPECT_EQ(d.Failures("unavailable"), "1");
  EXPECT_EQ(d.Failures("unauthenticated"), "0");
}

TEST(Admission, TheApiKeyIsCheckedBeforeTheBodyInEachProtocolsSpelling) {
  Door d(AdmissionOptions{.api_key = "s3cret"});
  auto missing = d.Accept(Call{}, Valid());
  EXPECT_EQ(missing.status(), absl::UnauthenticatedError("missing 'authorization: Bearer <key>' metadata"));
  auto wrong = d.Accept(
      Call{.authorization = "Bearer nope", .spelling = {.name = "Authorization", .carrier = "header"}}, Valid());
  EXPECT_EQ(wrong.status(), absl::UnauthenticatedError("invalid API key in 'Authorization'"));
  auto http_missing = d.Accept(Call{.spelling = {.name = "Authorization", .carrier = "header"}}, Valid());
  EXPECT_EQ(http_missing.status(), absl::UnauthenticatedError("missing 'Authorization: Bearer <key>' header"));
  EXPECT_EQ(d.parsed, 0);
  EXPECT_EQ(d.Failures("unauthenticated"), "3");
  ASSERT_TRUE(d.Accept(Call{.authorization = "Bearer s3cret"}, Valid()).ok());
  EXPECT_EQ(d.parsed, 1);
  // The key check alone (tokenize, metadata) says the same and counts nothing.
  EXPECT_EQ(d.door->Authorize(std::nullopt),
            absl::UnauthenticatedError("missing 'authorization: Bearer <key>' metadata"));
  EXPECT_TRUE(d.door->Authorize(std::string("Bearer s3cret")).ok());
  EXPECT_EQ(d.Failures("unauthenticated"), "3");
}

TEST(Admission, NoKeyConfiguredAdmitsCallsWithoutOne) {
  Door d;
  EXPECT_TRUE(d.Accept(Call{}, Valid()).ok());
  EXPECT_TRUE(d.Accept(Call{.authorization = "Bearer anything"}, Valid()).ok());
}

TEST(Admission, AParseErrorIsReturnedAsTheParserSaidItCountedAndNothingIsSubmitted) {
  Door d;
  auto r = d.door->Accept(Call{}, [](std::string* id) -> StatusOr<GenerationRequest> {
    *id = "from-body";
    return FieldError("prompt", "must be a string or an array of token ids");
  });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), "field 'prompt' must be a string or an array of token ids");
  EXPECT_EQ(ErrorField(r.status()), "prompt");
  EXPECT_TRUE(d.submitted.empty());
  EXPECT_EQ(d.Failures("invalid_argument"), "1");
}

TEST(Admission, AValidationErrorNamesTheFieldInTheFrontEndsSpelling) {
  Door d;
  GenerationRequest g = Valid();
  g.min_tokens = -1;
  auto r = d.Accept(Call{}, g, FieldNames{.min_tokens = "min_length"});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("'min_length'"), std::string::npos) << r.status();
  EXPECT_EQ(ErrorField(r.status()), "min_length");
  EXPECT_TRUE(d.submitted.empty());
  EXPECT_EQ(d.Failures("invalid_argument"), "1");
}

TEST(Admission, TheEnginesRefusalIsReturnedAndCountedByItsCode) {
  Door d;
  d.submit_error = ResourceExhausted("the waiting queue is full (256 requests; --max-waiting)");
  auto r = d.Accept(Call{}, Valid());
  EXPECT_EQ(r.status(), d.submit_error);
  EXPECT_EQ(d.Failures("resource_exhausted"), "1");
  EXPECT_EQ(d.Failures("invalid_argument"), "0");
}

TEST(Health, ReadyOnlyWhileServingAndNotDrainingAndEveryChangeIsPublishedInOrder) {
  Health h;
  std::vector<bool> seen;
  h.OnChange([&](bool ready) { seen.push_back(ready); });  // publishes the state it finds
  EXPECT_FALSE(h.ready());
  h.SetServing(true);
  EXPECT_TRUE(h.ready());
  h.SetServing(false);  // a worker restart
  EXPECT_FALSE(h.ready());
  h.SetServing(true);
  h.StartDraining();
  EXPECT_FALSE(h.ready());
  EXPECT_TRUE(h.draining());
  h.SetServing(true);  // the workers coming back does not undo the drain
  EXPECT_FALSE(h.ready());
  EXPECT_EQ(seen, (std::vector<bool>{false, true, false, true, false, false}));
  h.OnChange(nullptr);
  h.SetServing(false);  // nothing to tell
  EXPECT_EQ(seen.size(), 6u);
}

TEST(Admission, APromptBatchIsValidatedWholeBeforeAnyPromptRuns) {
  Door d;
  auto prompt = [](const char* text) { return GenerationRequest{.text = text, .max_tokens = 4, .n = 2}; };
  auto ok = d.AcceptBatch({prompt("In the"), prompt("beginning"), prompt("God")});
  ASSERT_TRUE(ok.ok()) << ok.status();
  ASSERT_EQ(ok->size(), 3u) << "the fake engine answers one handle per prompt";
  ASSERT_EQ(d.submitted.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ((*ok)[i]->params().prompt_text, d.submitted[i].params.prompt_text);
  EXPECT_EQ(d.submitted[1].params.prompt_text, "beginning") << "in the body's order";

  // A bad prompt anywhere refuses the call, naming it, before anything is submitted.
  d.submitted.clear();
  auto bad = d.AcceptBatch({prompt("a"), prompt("")}, {.text = "prompt", .token_ids = "prompt"});
  EXPECT_EQ(bad.status().message(), "field 'prompt[1]' must not be empty");
  EXPECT_EQ(ErrorField(bad.status()), "prompt[1]");
  EXPECT_TRUE(d.submitted.empty());
  EXPECT_EQ(d.Failures("invalid_argument"), "1");

  // One prompt keeps the field's own name.
  EXPECT_EQ(d.AcceptBatch({prompt("")}, {.text = "prompt"}).status().message(), "field 'prompt' must not be empty");
}

TEST(Admission, APromptBatchPastTheSampleLimitIsRefusedAndAFullQueueCancelsThePromptsAdmitted) {
  Door d;
  std::vector<GenerationRequest> many(129, GenerationRequest{.text = "a", .max_tokens = 1, .n = 2});
  auto big = d.AcceptBatch(many, {.text = "prompt"});
  EXPECT_EQ(big.status().message(),
            "field 'prompt' holds 129 prompts of n = 2 samples each, 258 samples in all; the limit per request is 256 "
            "(the waiting queue's capacity, --max-waiting)");
  EXPECT_TRUE(d.submitted.empty());
  many.pop_back();
  EXPECT_TRUE(d.AcceptBatch(many).ok()) << "256 samples fit";

  d.submitted.clear();
  d.given.clear();
  d.fail_at = 2;
  auto full = d.AcceptBatch(std::vector<GenerationRequest>(4, Valid()));
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_EQ(d.given.size(), 2u);
  EXPECT_TRUE(d.given[0]->cancelled() && d.given[1]->cancelled()) << "the admitted prompts run for nobody";
  EXPECT_EQ(d.Failures("resource_exhausted"), "1") << "one call, one refusal";
}

}  // namespace
}  // namespace kraken::core
