#include "server/service.h"

#include <spdlog/spdlog.h>

#include "tokenizer/utf8.h"

namespace kraken::server {
namespace {

using kraken::v1::GenerateResponse;

// The wire form of a response message.
grpc::ByteBuffer Serialize(const google::protobuf::MessageLite& msg) {
  grpc::ByteBuffer out;
  bool own = false;
  (void)grpc::SerializationTraits<google::protobuf::MessageLite>::Serialize(msg, &out, &own);
  return out;
}

// Moves what is pending in `out` into `msg`. The first message carries the seed (and the echo);
// the last carries finish reason, usage and timings.
void TakeOutput(Request& r, GenerateResponse* msg, bool last) {
  Output& o = r.out;
  msg->set_request_id(r.request_id);
  msg->mutable_text()->append(o.text);
  o.text.clear();
  for (int32_t id : o.ids) msg->add_token_ids(id);
  o.ids.clear();
  for (auto& lp : o.logprobs) *msg->add_logprobs() = std::move(lp);
  o.logprobs.clear();
  if (!o.first_sent) {
    o.first_sent = true;
    msg->set_seed(r.params.sampling.seed);
    if (r.params.echo) {
      msg->set_prompt_text(r.params.prompt_text);
      for (int32_t id : r.params.prompt) msg->add_prompt_token_ids(id);
    }
  }
  if (last) {
    msg->set_seed(r.params.sampling.seed);
    msg->set_finish_reason(o.finish_reason);
    msg->set_stop_reason(o.stop_reason);
    msg->mutable_usage()->set_prompt_tokens(static_cast<uint32_t>(r.params.prompt.size()));
    msg->mutable_usage()->set_completion_tokens(o.completion_tokens);
    msg->mutable_timings()->set_queue_seconds(o.queue_s);
    msg->mutable_timings()->set_ttft_seconds(o.ttft_s);
    msg->mutable_timings()->set_e2e_seconds(o.e2e_s);
  }
}

bool HasPending(const Output& o) { return !o.text.empty() || !o.ids.empty() || !o.first_sent; }

// What both reactors share with the engine loop: the request, its wake-up hook, and the two
// ends of the call (the client cancels; gRPC is done with the reactor).
struct EngineLink {
  std::shared_ptr<Request> r;
  EngineLoop& engine;

  // With r->mu held by the caller: the engine calls `pump` (under r->mu) whenever output is new.
  void Attach(std::function<void()> pump) { r->notify = std::move(pump); }
  void Cancel() {
    r->cancelled = true;
    engine.Wake();
  }
  // The reactor is about to be deleted: the engine must not call into it again.
  void Detach() {
    std::lock_guard<std::recursive_mutex> l(r->mu);
    r->notify = nullptr;
  }
};

class GenerateReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  GenerateReactor(std::shared_ptr<Request> r, EngineLoop& engine) : link_{std::move(r), engine}, r_(link_.r) {
    std::lock_guard<std::recursive_mutex> l(r_->mu);
    link_.Attach([this] { Pump(); });
    Pump();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::recursive_mutex> l(r_->mu);
    writing_ = false;
    if (!ok) {  // the client is gone
      link_.Cancel();
      if (!finish_called_) {
        finish_called_ = true;
        Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the stream was closed by the client"));
      }
      return;
    }
    Pump();
  }
  void OnCancel() override { link_.Cancel(); }
  void OnDone() override {
    link_.Detach();
    delete this;
  }

 private:
  // With r_->mu held: start the next write, or finish.
  void Pump() {
    if (writing_ || finish_called_) return;  // (after StartWriteAndFinish, OnWriteDone is not called)
    Output& o = r_->out;
    if (o.finished && !o.status.ok()) {
      finish_called_ = true;
      if (!o.text.empty() || !o.ids.empty()) {  // deliver what was produced, then the error
        msg_.Clear();
        TakeOutput(*r_, &msg_, false);
        writing_ = true;
        wire_ = Serialize(msg_);
        StartWriteAndFinish(&wire_, grpc::WriteOptions(), ToGrpc(o.status));
      } else {
        Finish(ToGrpc(o.status));
      }
      return;
    }
    if (o.finished && !last_sent_) {
      msg_.Clear();
      TakeOutput(*r_, &msg_, true);
      last_sent_ = true;
      writing_ = true;
      wire_ = Serialize(msg_);
      StartWrite(&wire_);
      return;
    }
    if (o.finished) {
      finish_called_ = true;
      Finish(grpc::Status::OK);
      return;
    }
    if (HasPending(o) && (!o.text.empty() || !o.ids.empty())) {
      msg_.Clear();
      TakeOutput(*r_, &msg_, false);
      writing_ = true;
      wire_ = Serialize(msg_);
      StartWrite(&wire_);
    }
  }

  EngineLink link_;
  const std::shared_ptr<Request>& r_;
  GenerateResponse msg_;
  grpc::ByteBuffer wire_;  // msg_ serialized: what the write in flight sends
  bool writing_ = false, last_sent_ = false, finish_called_ = false;
};

class CompleteReactor final : public grpc::ServerUnaryReactor {
 public:
  CompleteReactor(std::shared_ptr<Request> r, EngineLoop& engine, grpc::ByteBuffer* resp)
      : link_{std::move(r), engine}, r_(link_.r), resp_(resp) {
    std::lock_guard<std::recursive_mutex> l(r_->mu);
    link_.Attach([this] { Pump(); });
    Pump();
  }
  void OnCancel() override { link_.Cancel(); }
  void OnDone() override {
    link_.Detach();
    delete this;
  }

 private:
  void Pump() {
    if (finish_called_ || !r_->out.finished) return;
    finish_called_ = true;
    if (!r_->out.status.ok()) {
      Finish(ToGrpc(r_->out.status));
      return;
    }
    GenerateResponse msg;
    TakeOutput(*r_, &msg, true);
    *resp_ = Serialize(msg);
    Finish(grpc::Status::OK);
  }
  EngineLink link_;
  const std::shared_ptr<Request>& r_;
  grpc::ByteBuffer* resp_;
  bool finish_called_ = false;
};

grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* ctx, const grpc::Status& s) {
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(s);
  return reactor;
}

}  // namespace

grpc::Status ToGrpc(const Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(static_cast<int>(s.code())), std::string(s.message()));
}

Status KrakenService::Authorize(grpc::CallbackServerContext* ctx) const {
  if (options_.api_key.empty()) return absl::OkStatus();
  const auto& md = ctx->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return absl::UnauthenticatedError("missing 'authorization: Bearer <key>' metadata");
  const std::string value(it->second.data(), it->second.size());
  if (value != "Bearer " + options_.api_key) return absl::UnauthenticatedError("invalid API key in 'authorization'");
  return absl::OkStatus();
}

StatusOr<std::shared_ptr<Request>> KrakenService::Accept(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer& raw,
                                                         kraken::v1::GenerateRequest* req) {
  if (draining_) return absl::UnavailableError("the server is shutting down");
  KRAKEN_RETURN_IF_ERROR(Authorize(ctx));
  KRAKEN_RETURN_IF_ERROR(ParseRequest(raw, options_.max_message_bytes, req));
  return MakeRequest(ctx, *req);
}

StatusOr<std::shared_ptr<Request>> KrakenService::MakeRequest(grpc::CallbackServerContext* ctx,
                                                              const kraken::v1::GenerateRequest& req) {
  // The deadline, read against both clocks at the same moment.
  const auto arrival = Clock::now();
  auto deadline = Clock::time_point::max();
  const auto sys_deadline = ctx->deadline();
  if (sys_deadline < std::chrono::system_clock::time_point::max() - std::chrono::hours(24 * 365))
    deadline = arrival + std::chrono::duration_cast<Clock::duration>(sys_deadline - std::chrono::system_clock::now());
  KRAKEN_ASSIGN_OR_RETURN(RequestParams params, ValidateGenerateRequest(req, options_.limits, tok_));
  auto r = std::make_shared<Request>(next_id_++, req.request_id(), std::move(params), tok_, arrival, deadline);
  if (r->params.max_tokens == 0) {  // nothing to generate: answer at once
    EngineLoop::FinishRequest(*r, absl::OkStatus(), kraken::v1::FINISH_REASON_LENGTH, "");
    if (options_.metrics != nullptr) options_.metrics->RecordSuccess("length", r->out.e2e_s);
    return r;
  }
  KRAKEN_RETURN_IF_ERROR(engine_.Submit(r));
  return r;
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
  StatusOr<std::shared_ptr<Request>> r = Accept(ctx, *raw, &req);
  if (!r.ok()) {
    Refused(req.request_id(), r.status());
    return new Reject(ToGrpc(r.status()));
  }
  return new GenerateReactor(std::move(*r), engine_);
}

grpc::ServerUnaryReactor* KrakenService::Complete(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw,
                                                  grpc::ByteBuffer* resp) {
  kraken::v1::GenerateRequest req;
  StatusOr<std::shared_ptr<Request>> r = Accept(ctx, *raw, &req);
  if (!r.ok()) {
    Refused(req.request_id(), r.status());
    return FinishUnary(ctx, ToGrpc(r.status()));
  }
  return new CompleteReactor(std::move(*r), engine_, resp);
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
    return FinishUnary(ctx, ToGrpc(InvalidArgument("field 'text' is not valid UTF-8 (first invalid byte at offset ",
                                                   bad, ")")));
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
      return FinishUnary(ctx, ToGrpc(InvalidArgument("field 'token_ids[", i, "]' must be in [0, ", tok_.vocab_size(),
                                                     "), got ", id)));
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
