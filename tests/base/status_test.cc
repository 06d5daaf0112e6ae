// A refusal's field travels as data: FieldError renders the message and carries the field and
// the detail, any layer re-renders it without parsing text, and Annotate keeps both.
#include "base/status.h"

#include <gtest/gtest.h>

namespace kraken {
namespace {

TEST(FieldError, RendersTheMessageAndCarriesTheFieldAndTheDetail) {
  const Status s = FieldError("top_p", "must be in (0, 1], got ", 1.5);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "field 'top_p' must be in (0, 1], got 1.5");
  EXPECT_EQ(ErrorField(s), "top_p");
  EXPECT_EQ(ErrorDetail(s), "must be in (0, 1], got 1.5");
  const Status scoped = ScopedFieldError("sampling ", "top_k", "must be >= -1, got ", -2);
  EXPECT_EQ(scoped.message(), "sampling field 'top_k' must be >= -1, got -2");
  // Another layer's words for the same refusal, from the data alone.
  EXPECT_EQ(FieldError(*ErrorField(scoped), ErrorDetail(scoped)).message(), "field 'top_k' must be >= -1, got -2");
}

TEST(FieldError, OnlyMarkedStatusesNameAField) {
  EXPECT_EQ(ErrorField(absl::InvalidArgumentError("field 'x' looks like one")), std::nullopt);
  EXPECT_EQ(ErrorDetail(absl::InvalidArgumentError("field 'x' looks like one")), "");
  const Status queue = WithField(absl::ResourceExhaustedError("the queue cannot take 3 samples"), "n");
  EXPECT_EQ(queue.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(ErrorField(queue), "n");
  const Status annotated = Annotate(FieldError("seed", "must be >= 0, got -4"), "request 7");
  EXPECT_EQ(annotated.message(), "request 7: field 'seed' must be >= 0, got -4");
  EXPECT_EQ(ErrorField(annotated), "seed") << "Annotate keeps the payloads";
}

}  // namespace
}  // namespace kraken
