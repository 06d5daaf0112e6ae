#include "core/admission.h"

#include <algorithm>

#include <spdlog/spdlog.h>

namespace kraken::core {

void Health::OnChange(std::function<void(bool ready)> f) {
  std::lock_guard<std::mutex> l(mu_);
  on_change_ = std::move(f);
  Publish();
}

void Health::SetServing(bool serving) {
  std::lock_guard<std::mutex> l(mu_);
  serving_ = serving;
  Publish();
}

void Health::StartDraining() {
  std::lock_guard<std::mutex> l(mu_);
  draining_ = true;
  Publish();
}

bool Health::draining() const {
  return draining_.load();
}

bool Health::ready() const {
  return serving_.load() && !draining_.load();
}

void Health::Publish() {
  if (on_change_) on_change_(serving_.load() && !draining_.load());
}

Admission::Admission(const tokenizer::Tokenizer& tok, const Health& health, SubmitFn submit, AdmissionOptions options)
    : tok_(tok), health_(health), submit_(std::move(submit)), options_(std::move(options)) {}

Status Admission::Authorize(const std::optional<std::string>& authorization, const CredentialSpelling& spelling) const {
  if (options_.api_key.empty()) return absl::OkStatus();
  if (!authorization)
    return absl::UnauthenticatedError(StrCat("missing '", spelling.name, ": Bearer <key>' ", spelling.carrier));
  if (*authorization != StrCat("Bearer ", options_.api_key))
    return absl::UnauthenticatedError(StrCat("invalid API key in '", spelling.name, "'"));
  return absl::OkStatus();
}

Status Admission::Refuse(std::string_view request_id, const Status& s) const {
  spdlog::info("request {} rejected: {}", request_id.empty() ? "-" : request_id, s.ToString());
  if (options_.metrics != nullptr) options_.metrics->RecordFailure(s);
  return s;
}

Clock::time_point Admission::Deadline(Clock::time_point arrival,
                                      std::chrono::system_clock::time_point call_deadline) const {
  auto deadline = Clock::time_point::max();
  // gRPC reports "no deadline" as a far-future time point; a year out is treated as none.
  if (call_deadline < std::chrono::system_clock::time_point::max() - std::chrono::hours(24 * 365))
    deadline = arrival + std::chrono::duration_cast<Clock::duration>(call_deadline - std::chrono::system_clock::now());
  if (options_.request_timeout.count() > 0) deadline = std::min(deadline, arrival + options_.request_timeout);
  return deadline;
}

StatusOr<Handles> Admission::Accept(const Call& call, const ParseFn& parse, const FieldNames& names) const {
  return AcceptBatch(
      call,
      [&](std::string* id) -> StatusOr<std::vector<GenerationRequest>> {
        KRAKEN_ASSIGN_OR_RETURN(GenerationRequest one, parse(id));
        std::vector<GenerationRequest> all;
        all.push_back(std::move(one));
        return all;
      },
      names);
}

StatusOr<Handles> Admission::AcceptBatch(const Call& call, const ParseBatchFn& parse, const FieldNames& names) const {
  const Clock::time_point arrival = Clock::now();
  const Clock::time_point deadline = Deadline(arrival, call.deadline);
  std::string request_id = call.request_id;
  if (health_.draining()) return Refuse(request_id, absl::UnavailableError("the server is shutting down"));
  if (Status a = Authorize(call.authorization, call.spelling); !a.ok()) return Refuse(request_id, a);
  StatusOr<std::vector<GenerationRequest>> requests = parse(&request_id);
  if (!requests.ok()) return Refuse(request_id, requests.status());
  if (requests->empty()) return Refuse(request_id, FieldError(names.text, "must hold a prompt"));
  // The samples asked for fit the queue before any prompt is tokenized.
  const int64_t asked = static_cast<int64_t>(requests->size()) * std::max<int64_t>(requests->front().n.value_or(1), 1);
  if (requests->size() > 1 && asked > options_.limits.max_samples)
    return Refuse(request_id, FieldError(names.text, "holds ", requests->size(),
                                         " prompts of n = ", requests->front().n.value_or(1), " samples each, ", asked,
                                         " samples in all; the limit per request is ", options_.limits.max_samples,
                                         " (the waiting queue's capacity, --max-waiting)"));
  // Every prompt is checked before any runs (n was counted above; validation keeps it).
  std::vector<RequestParams> all;
  for (size_t i = 0; i < requests->size(); ++i) {
    GenerationRequest& request = (*requests)[i];
    request.request_id = request_id;
    FieldNames indexed = names;
    if (requests->size() > 1) {
      indexed.text = StrCat(names.text, "[", i, "]");
      indexed.token_ids = StrCat(names.token_ids, "[", i, "]");
    }
    StatusOr<RequestParams> params = ValidateGeneration(request, options_.limits, tok_, indexed);
    if (!params.ok()) return Refuse(request_id, params.status());
    all.push_back(std::move(*params));
  }
  Handles handles;
  for (RequestParams& params : all) {
    StatusOr<Handles> more = submit_(std::move(params), arrival, deadline);
    if (!more.ok()) {
      for (const auto& h : handles) h->Cancel();  // the prompts admitted so far run for nobody
      return Refuse(request_id, more.status());
    }
    for (auto& h : *more) handles.push_back(std::move(h));
  }
  return handles;
}

}  // namespace kraken::core
