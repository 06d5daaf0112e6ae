#include "server/service.h"

#include <spdlog/spdlog.h>

#include "tokenizer/utf8.h"

namespace kraken::server {
namespace {

using kraken::v1::GenerateResponse;

kraken::v1::FinishReason ToProto(core::FinishReason r) {
  switch (r) {
    case core::FinishReason::kStop:
      return kraken::v1::FINISH_REASON_STOP;
    case core::FinishReason::kLength:
      return kraken::v1::FINISH_REASON_LENGTH;
    case core::FinishReason::kNone:
      break;
  }
  return kraken::v1::FINISH_REASON_UNSPECIFIED;
}

using Handles = std::vector<std::shared_ptr<core::RequestHandle>>;

// Turns a chunk taken from the core into `msg`. The first message carries the seed (and the
// echo); the last carries finish reason, usage and timings. `index`: the sample (set when the
// request has n > 1).
void ToResponse(const core::RequestHandle& h, const core::Output& o, bool first, bool last, GenerateResponse* msg,
                std::optional<uint32_t> index = std::nullopt) {
  const core::RequestParams& p = h.params();
  msg->set_request_id(p.request_id);
  if (index) msg->set_index(*index);
  msg->mutable_text()->append(o.text);
  for (int32_t id : o.ids) msg->add_token_ids(id);
  auto add = [](const core::TokenLogprobs& lp, kraken::v1::TokenLogprob* out) {
    out->set_token_id(lp.token);
    out->set_logprob(lp.logprob);
    for (const engine::TokenLogprob& t : lp.top) {
      auto* alt = out->add_top();
      alt->set_token_id(t.token);
      alt->set_logprob(t.logprob);
    }
  };
  for (const core::TokenLogprobs& lp : o.logprobs) add(lp, msg->add_logprobs());
  for (const core::TokenLogprobs& lp : o.prompt_logprobs) add(lp, msg->add_prompt_logprobs());
  if (first || last) msg->set_seed(p.sampling.seed);
  if (first && p.echo) {
    msg->set_prompt_text(p.prompt_text);
    for (int32_t id : p.prompt) msg->add_prompt_token_ids(id);
  }
  if (last) {
    msg->set_finish_reason(ToProto(o.finish_reason));
    msg->set_stop_reason(o.stop_reason);
    msg->mutable_usage()->set_prompt_tokens(static_cast<uint32_t>(p.prompt.size()));
    msg->mutable_usage()->set_completion_tokens(o.completion_tokens);
    msg->mutable_usage()->set_cached_prompt_tokens(o.cached_tokens);
    msg->mutable_timings()->set_queue_seconds(o.queue_s);
    msg->mutable_timings()->set_ttft_seconds(o.ttft_s);
    msg->mutable_timings()->set_e2e_seconds(o.e2e_s);
  }
}

void CancelAll(const Handles& hs) {
  for (const auto& h : hs) h->Cancel();
}

// Streams one request's samples: whenever no write is outstanding, sends what the core has
// produced for the next sample with something new (round robin, so no sample starves another).
// While the client is slow, output coalesces in the handles and the engine never waits. `mu_`
// (this reactor's only lock) serialises the engine thread's pumps with gRPC's callbacks; the core
// calls the listeners holding none of its own locks. A sample that fails ends the stream with its
// error (after what it had produced) and cancels the others.
class GenerateReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  explicit GenerateReactor(Handles hs)
      : hs_(std::move(hs)), taken_(hs_.size()), first_sent_(hs_.size()), last_sent_(hs_.size()) {
    for (auto& h : hs_) h->Listen([this] { Pump(); });
    Pump();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> l(mu_);
    writing_ = false;
    if (!ok) {  // the client is gone
      CancelAll(hs_);
      if (!finish_called_) {
        finish_called_ = true;
        Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the stream was closed by the client"));
      }
      return;
    }
    PumpLocked();
  }
  void OnCancel() override { CancelAll(hs_); }
  void OnDone() override {
    for (auto& h : hs_) h->Detach();  // the engine will not call Pump again
    delete this;
  }

 private:
  void Pump() {
    std::lock_guard<std::mutex> l(mu_);
    PumpLocked();
  }
  bool HasTokens(size_t i) const { return !taken_[i].text.empty() || !taken_[i].ids.empty(); }
  // Start the next write, or finish.
  void PumpLocked() {
    if (writing_ || finish_called_) return;  // (after StartWriteAndFinish, OnWriteDone is not called)
    const size_t n = hs_.size();
    for (size_t i = 0; i < n; ++i)
      if (!taken_[i].finished) hs_[i]->Take(&taken_[i]);
    for (size_t i = 0; i < n; ++i) {
      if (!taken_[i].finished || taken_[i].status.ok()) continue;
      finish_called_ = true;
      CancelAll(hs_);
      if (HasTokens(i)) {  // deliver what was produced, then the error
        Send(i, /*last=*/false, /*and_finish=*/true, ToGrpc(taken_[i].status));
      } else {
        Finish(ToGrpc(taken_[i].status));
      }
      return;
    }
    for (size_t k = 0; k < n; ++k) {
      const size_t i = (next_ + k) % n;
      if (taken_[i].finished && !last_sent_[i]) {
        last_sent_[i] = true;
        next_ = i + 1;
        Send(i, /*last=*/true, /*and_finish=*/false, grpc::Status::OK);
        return;
      }
      if (!taken_[i].finished && HasTokens(i)) {
        next_ = i + 1;
        Send(i, /*last=*/false, /*and_finish=*/false, grpc::Status::OK);
        return;
      }
    }
    if (std::all_of(last_sent_.begin(), last_sent_.end(), [](bool b) { return b; })) {
      finish_called_ = true;
      Finish(grpc::Status::OK);
    }
  }
  void Send(size_t i, bool last, bool and_finish, const grpc::Status& status) {
    GenerateResponse msg;
    ToResponse(*hs_[i], taken_[i], !first_sent_[i], last, &msg,
               hs_.size() > 1 ? std::optional<uint32_t>(static_cast<uint32_t>(i)) : std::nullopt);
    first_sent_[i] = true;
    taken_[i].text.clear();
    taken_[i].ids.clear();
    taken_[i].logprobs.clear();
    taken_[i].prompt_logprobs.clear();
    wire_ = Serialize(msg);
    writing_ = true;
    if (and_finish)
      StartWriteAndFinish(&wire_, grpc::WriteOptions(), status);
    else
      StartWrite(&wire_);
  }

  Handles hs_;
  std::mutex mu_;
  std::vector<core::Output> taken_;  // per sample: taken from its handle, not yet sent
  std::vector<bool> first_sent_, last_sent_;
  grpc::ByteBuffer wire_;  // the message the write in flight sends
  size_t next_ = 0;        // the sample to look at first for the next write
  bool writing_ = false, finish_called_ = false;
};

// Answers one request in a single message once every sample has ended: sample 0 in the message's
// own fields and, with n > 1, every sample in `samples`. A failed sample fails the call.
class CompleteReactor final : public grpc::ServerUnaryReactor {
 public:
  CompleteReactor(Handles hs, grpc::ByteBuffer* resp) : hs_(std::move(hs)), resp_(resp), all_(hs_.size()) {
    for (auto& h : hs_) h->Listen([this] { Pump(); });
    Pump();
  }
  void OnCancel() override { CancelAll(hs_); }
  void OnDone() override {
    for (auto& h : hs_) h->Detach();
    delete this;
  }

 private:
  void Pump() {
    std::lock_guard<std::mutex> l(mu_);
    if (finish_called_) return;
    bool all_finished = true;
    for (size_t i = 0; i < hs_.size(); ++i) {
      hs_[i]->Take(&all_[i]);
      if (all_[i].finished && !all_[i].status.ok()) {
        finish_called_ = true;
        CancelAll(hs_);
        Finish(ToGrpc(all_[i].status));
        return;
      }
      all_finished = all_finished && all_[i].finished;
    }
    if (!all_finished) return;
    finish_called_ = true;
    GenerateResponse msg;
    ToResponse(*hs_[0], all_[0], /*first=*/true, /*last=*/true, &msg);
    if (hs_.size() > 1) {
      for (size_t i = 0; i < hs_.size(); ++i)
        ToResponse(*hs_[i], all_[i], /*first=*/true, /*last=*/true, msg.add_samples(), static_cast<uint32_t>(i));
    }
    *resp_ = Serialize(msg);
    Finish(grpc::Status::OK);
  }

  Handles hs_;
  grpc::ByteBuffer* resp_;
  std::mutex mu_;
  std::vector<core::Output> all_;  // per sample: everything taken so far
  bool finish_called_ = false;
};

}  // namespace

grpc::Status ToGrpc(const Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(static_cast<int>(s.code())), std::string(s.message()));
}

grpc::ByteBuffer Serialize(const google::protobuf::MessageLite& msg) {
  grpc::ByteBuffer out;
  bool own = false;
  (void)grpc::SerializationTraits<google::protobuf::MessageLite>::Serialize(msg, &out, &own);
  return out;
}

grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* ctx, const grpc::Status& s) {
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(s);
  return reactor;
}

Status CheckApiKey(grpc::CallbackServerContext* ctx, const std::string& api_key) {
  if (api_key.empty()) return absl::OkStatus();
  const auto& md = ctx->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return absl::UnauthenticatedError("missing 'authorization: Bearer <key>' metadata");
  std::string expected = "Bearer ";
  expected += api_key;
  if (std::string_view(it->second.data(), it->second.size()) != expected)
    return absl::UnauthenticatedError("invalid API key in 'authorization'");
  return absl::OkStatus();
}

core::Clock::time_point CallDeadline(grpc::CallbackServerContext* ctx, core::Clock::time_point arrival,
                                     std::chrono::milliseconds request_timeout) {
  auto deadline = core::Clock::time_point::max();
  const auto sys_deadline = ctx->deadline();
  if (sys_deadline < std::chrono::system_clock::time_point::max() - std::chrono::hours(24 * 365))
    deadline =
        arrival + std::chrono::duration_cast<core::Clock::duration>(sys_deadline - std::chrono::system_clock::now());
  if (request_timeout.count() > 0) deadline = std::min(deadline, arrival + request_timeout);
  return deadline;
}

Status KrakenService::Authorize(grpc::CallbackServerContext* ctx) const {
  return CheckApiKey(ctx, options_.api_key);
}

StatusOr<Handles> KrakenService::Accept(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer& raw,
                                        kraken::v1::GenerateRequest* req) {
  const auto arrival = core::Clock::now();
  const auto deadline = CallDeadline(ctx, arrival, options_.request_timeout);
  if (draining_) return absl::UnavailableError("the server is shutting down");
  KRAKEN_RETURN_IF_ERROR(Authorize(ctx));
  KRAKEN_RETURN_IF_ERROR(ParseRequest(raw, options_.max_message_bytes, req));
  KRAKEN_ASSIGN_OR_RETURN(core::RequestParams params, core::ValidateGeneration(FromProto(*req), options_.limits, tok_));
  return engine_.SubmitSamples(std::move(params), arrival, deadline);
}

void KrakenService::Refused(const std::string& request_id, const Status& status) const {
  spdlog::info("request {} rejected: {}", request_id.empty() ? "-" : request_id, status.ToString());
  if (options_.metrics != nullptr) options_.metrics->RecordFailure(status);
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* KrakenService::Generate(grpc::CallbackServerContext* ctx,
                                                                    const grpc::ByteBuffer* raw) {
  class Reject final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
   public:
    explicit Reject(const grpc::Status& s) { Finish(s); }
    void OnDone() override { delete this; }
  };
  kraken::v1::GenerateRequest req;
  StatusOr<Handles> r = Accept(ctx, *raw, &req);
  if (!r.ok()) {
    Refused(req.request_id(), r.status());
    return new Reject(ToGrpc(r.status()));
  }
  return new GenerateReactor(std::move(*r));
}

grpc::ServerUnaryReactor* KrakenService::Complete(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw,
                                                  grpc::ByteBuffer* resp) {
  kraken::v1::GenerateRequest req;
  StatusOr<Handles> r = Accept(ctx, *raw, &req);
  if (!r.ok()) {
    Refused(req.request_id(), r.status());
    return FinishUnary(ctx, ToGrpc(r.status()));
  }
  return new CompleteReactor(std::move(*r), resp);
}

grpc::ServerUnaryReactor* KrakenService::Tokenize(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw,
                                                  grpc::ByteBuffer* out) {
  kraken::v1::TokenizeResponse response;
  if (Status a = Authorize(ctx); !a.ok()) return FinishUnary(ctx, ToGrpc(a));
  kraken::v1::TokenizeRequest request;
  if (Status p = ParseRequest(*raw, options_.max_message_bytes, &request); !p.ok()) return FinishUnary(ctx, ToGrpc(p));
  if (static_cast<int>(request.text().size()) > options_.limits.max_prompt_bytes)
    return FinishUnary(ctx, ToGrpc(InvalidArgument("field 'text' must be at most ", options_.limits.max_prompt_bytes,
                                                   " bytes, got ", request.text().size())));
  size_t bad = 0;
  if (!tokenizer::IsValidUtf8(request.text(), &bad))
    return FinishUnary(
        ctx, ToGrpc(InvalidArgument("field 'text' is not valid UTF-8 (first invalid byte at offset ", bad, ")")));
  auto ids = tok_.Encode(request.text(), request.add_special_tokens());
  if (!ids.ok()) return FinishUnary(ctx, ToGrpc(ids.status()));
  for (int32_t id : *ids) response.add_token_ids(id);
  *out = Serialize(response);
  return FinishUnary(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* KrakenService::Detokenize(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw,
                                                    grpc::ByteBuffer* out) {
  if (Status a = Authorize(ctx); !a.ok()) return FinishUnary(ctx, ToGrpc(a));
  kraken::v1::DetokenizeRequest request;
  if (Status p = ParseRequest(*raw, options_.max_message_bytes, &request); !p.ok()) return FinishUnary(ctx, ToGrpc(p));
  for (int i = 0; i < request.token_ids_size(); ++i) {
    const int32_t id = request.token_ids(i);
    if (id < 0 || id >= tok_.vocab_size())
      return FinishUnary(
          ctx, ToGrpc(InvalidArgument("field 'token_ids[", i, "]' must be in [0, ", tok_.vocab_size(), "), got ", id)));
  }
  std::vector<int32_t> ids(request.token_ids().begin(), request.token_ids().end());
  auto text = tok_.Decode(ids, request.skip_special_tokens());
  if (!text.ok()) return FinishUnary(ctx, ToGrpc(text.status()));
  kraken::v1::DetokenizeResponse response;
  response.set_text(*text);
  *out = Serialize(response);
  return FinishUnary(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* KrakenService::GetModelInfo(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw,
                                                      grpc::ByteBuffer* out) {
  if (Status a = Authorize(ctx); !a.ok()) return FinishUnary(ctx, ToGrpc(a));
  kraken::v1::GetModelInfoRequest request;
  if (Status p = ParseRequest(*raw, options_.max_message_bytes, &request); !p.ok()) return FinishUnary(ctx, ToGrpc(p));
  *out = Serialize(options_.info);
  return FinishUnary(ctx, grpc::Status::OK);
}

}  // namespace kraken::server
