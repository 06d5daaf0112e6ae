// Error handling for every module: absl::Status and absl::StatusOr<T> (absl is already a gRPC
// dependency), plus the two propagation macros and a check for broken invariants.
//
//   absl::StatusOr<int> ParsePositive(int v) {
//     if (v <= 0) return InvalidArgument("field 'n_layer' must be > 0, got ", v);
//     return v;
//   }
//   absl::Status Load() {
//     KRAKEN_ASSIGN_OR_RETURN(int n, ParsePositive(3));
//     KRAKEN_RETURN_IF_ERROR(Other(n));
//     return absl::OkStatus();
//   }
//
// Exceptions never cross a module or thread boundary; KRAKEN_CHECK aborts only for programmer
// errors (a broken invariant), naming the condition and the place.
#pragma once

#include <charconv>
#include <concepts>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/cord.h"

namespace kraken {

using absl::Status;
using absl::StatusOr;

namespace internal {
inline void AppendPart(std::string& out, std::string_view s) {
  out.append(s);
}
inline void AppendPart(std::string& out, const char* s) {
  out.append(s);
}
inline void AppendPart(std::string& out, const std::string& s) {
  out.append(s);
}
inline void AppendPart(std::string& out, char c) {
  out.push_back(c);
}
inline void AppendPart(std::string& out, bool b) {
  out.append(b ? "true" : "false");
}
template <std::integral T>
void AppendPart(std::string& out, T v) {
  out.append(std::to_string(v));
}
template <std::floating_point T>
void AppendPart(std::string& out, T v) {
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v);  // shortest round-trip form
  out.append(buf, r.ptr);
}
}  // namespace internal

/// Concatenates strings, string views, characters, integers and floats (shortest round-trip
/// form) into one string. (Debian's absl::StrCat does not accept std::string_view.)
template <typename... Args>
std::string StrCat(const Args&... parts) {
  std::string out;
  (internal::AppendPart(out, parts), ...);
  return out;
}

/// Appends the concatenation of `parts` to `*out`.
template <typename... Args>
void StrAppend(std::string* out, const Args&... parts) {
  (internal::AppendPart(*out, parts), ...);
}

/// Builds an INVALID_ARGUMENT status from the concatenation of `parts` (StrCat rules).
template <typename... Args>
Status InvalidArgument(const Args&... parts) {
  return absl::InvalidArgumentError(StrCat(parts...));
}
/// Builds a NOT_FOUND status from the concatenation of `parts`.
template <typename... Args>
Status NotFound(const Args&... parts) {
  return absl::NotFoundError(StrCat(parts...));
}
/// Builds a FAILED_PRECONDITION status from the concatenation of `parts`.
template <typename... Args>
Status FailedPrecondition(const Args&... parts) {
  return absl::FailedPreconditionError(StrCat(parts...));
}
/// Builds an UNIMPLEMENTED status from the concatenation of `parts`.
template <typename... Args>
Status Unimplemented(const Args&... parts) {
  return absl::UnimplementedError(StrCat(parts...));
}
/// Builds a RESOURCE_EXHAUSTED status from the concatenation of `parts`.
template <typename... Args>
Status ResourceExhausted(const Args&... parts) {
  return absl::ResourceExhaustedError(StrCat(parts...));
}
/// Builds an INTERNAL status from the concatenation of `parts`.
template <typename... Args>
Status Internal(const Args&... parts) {
  return absl::InternalError(StrCat(parts...));
}

/// Returns `status` with `context + ": "` prepended to its message (code and payloads unchanged).
inline Status Annotate(const Status& status, std::string_view context) {
  if (status.ok()) return status;
  Status out(status.code(), StrCat(context, ": ", std::string(status.message())));
  status.ForEachPayload([&](absl::string_view url, const absl::Cord& payload) { out.SetPayload(url, payload); });
  return out;
}

// A refusal that concerns one field of a request carries the field's name and what is wrong with
// it as data (absl::Status payloads), beside the message it renders: a front-end reads the field
// (OpenAI's error `param`) and re-renders the message in its own terms without parsing text.
inline constexpr char kFieldPayload[] = "kraken.dev/field";
inline constexpr char kFieldDetailPayload[] = "kraken.dev/field-detail";

/// `s` (any code) marked as concerning request field `field`.
inline Status WithField(Status s, std::string_view field) {
  s.SetPayload(kFieldPayload, absl::Cord(std::string(field)));
  return s;
}

/// INVALID_ARGUMENT "<scope>field '<field>' <detail>", carrying `field` and `detail` (StrCat of
/// `parts`). `scope` names whose field it is when not the request's ("sampling ").
template <typename... Args>
Status ScopedFieldError(std::string_view scope, std::string_view field, const Args&... parts) {
  const std::string detail = StrCat(parts...);
  Status s = WithField(absl::InvalidArgumentError(StrCat(scope, "field '", field, "' ", detail)), field);
  s.SetPayload(kFieldDetailPayload, absl::Cord(detail));
  return s;
}

/// INVALID_ARGUMENT "field '<field>' <detail>" (ScopedFieldError without a scope).
template <typename... Args>
Status FieldError(std::string_view field, const Args&... parts) {
  return ScopedFieldError("", field, parts...);
}

/// The request field `s` concerns (WithField, FieldError), or nullopt.
inline std::optional<std::string> ErrorField(const Status& s) {
  const auto p = s.GetPayload(kFieldPayload);  // absl::optional (not std:: in every absl)
  if (!p) return std::nullopt;
  return std::string(*p);
}

/// What FieldError said is wrong with the field ("must be >= 0, got -1"); "" when it is not one.
inline std::string ErrorDetail(const Status& s) {
  const auto p = s.GetPayload(kFieldDetailPayload);
  return p ? std::string(*p) : std::string();
}

[[noreturn]] inline void CheckFailed(const char* cond, const char* file, int line, const char* msg) {
  std::fprintf(stderr, "kraken: invariant violated at %s:%d: %s%s%s\n", file, line, cond, msg[0] ? " — " : "", msg);
  std::abort();
}

}  // namespace kraken

#define KRAKEN_STATUS_CONCAT_INNER(a, b) a##b
#define KRAKEN_STATUS_CONCAT(a, b) KRAKEN_STATUS_CONCAT_INNER(a, b)

/// Returns from the enclosing function if `expr` (a Status) is not OK.
#define KRAKEN_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    ::absl::Status kraken_status_ = (expr);          \
    if (!kraken_status_.ok()) return kraken_status_; \
  } while (0)

#define KRAKEN_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return std::move(tmp).status();     \
  lhs = std::move(tmp).value()

/// `lhs = value of expr` (a StatusOr), or returns its error from the enclosing function.
#define KRAKEN_ASSIGN_OR_RETURN(lhs, expr) \
  KRAKEN_ASSIGN_OR_RETURN_IMPL(KRAKEN_STATUS_CONCAT(kraken_statusor_, __LINE__), lhs, expr)

/// Aborts with a message when `cond` is false. For programmer errors only, never for input.
#define KRAKEN_CHECK(cond, ...)                                                    \
  do {                                                                             \
    if (!(cond)) ::kraken::CheckFailed(#cond, __FILE__, __LINE__, "" __VA_ARGS__); \
  } while (0)
