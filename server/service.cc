#include "server/service.h"

#include "core/output_pump.h"
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

using Outputs = core::OutputPump<>;

// Streams one request's samples: whenever no write is outstanding, sends what the core has
// produced for the next sample with something new (the pump's round robin, so no sample starves
// another). `mu_` (this reactor's only lock) serialises the engine thread's pumps with gRPC's
// callbacks. A sample that fails ends the stream with its error (after what it had produced) and
// cancels the others.
class GenerateReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  explicit GenerateReactor(core::Handles hs) : n_(hs.size()) {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& h : hs) pump_.Add(std::move(h), core::Deltas::kTokens, [this] { Pump(); });
    PumpLocked();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> l(mu_);
    writing_ = false;
    if (!ok) {  // the client is gone
      pump_.CancelAll();
      if (!finish_called_) {
        finish_called_ = true;
        Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the stream was closed by the client"));
      }
      return;
    }
    PumpLocked();
  }
  void OnCancel() override {
    std::lock_guard<std::mutex> l(mu_);
    pump_.CancelAll();
  }
  void OnDone() override {
    for (const auto& h : pump_.handles()) h->Detach();  // the engine will not call Pump again
    delete this;
  }

 private:
  void Pump() {
    std::lock_guard<std::mutex> l(mu_);
    PumpLocked();
  }
  // Start the next write, or finish.
  void PumpLocked() {
    if (writing_ || finish_called_) return;  // (after StartWriteAndFinish, OnWriteDone is not called)
    pump_.TakeAll();
    if (Outputs::Slot* failed = pump_.Failed()) {
      finish_called_ = true;
      pump_.CancelAll();
      const grpc::Status status = ToGrpc(failed->taken.status);
      if (!failed->taken.text.empty() || !failed->taken.ids.empty()) {  // what it produced, then the error
        Send(*failed, /*last=*/false, &status);
      } else {
        Finish(status);
      }
      return;
    }
    if (Outputs::Slot* s = pump_.Next()) {
      Send(*s, /*last=*/s->taken.finished, nullptr);
      return;
    }
    if (pump_.AllSent()) {
      finish_called_ = true;
      Finish(grpc::Status::OK);
    }
  }
  // Writes what `s` has (the end's fields when `last`), then finishes with `finish` when set.
  void Send(Outputs::Slot& s, bool last, const grpc::Status* finish) {
    GenerateResponse msg;
    ToResponse(*s.handle, s.taken, !s.first_sent, last, &msg,
               n_ > 1 ? std::optional<uint32_t>(static_cast<uint32_t>(s.index)) : std::nullopt);
    if (finish == nullptr) pump_.Sent(s);
    wire_ = Serialize(msg);
    writing_ = true;
    if (finish != nullptr)
      StartWriteAndFinish(&wire_, grpc::WriteOptions(), *finish);
    else
      StartWrite(&wire_);
  }

  const size_t n_;
  std::mutex mu_;
  Outputs pump_;           // guarded by mu_
  grpc::ByteBuffer wire_;  // the message the write in flight sends
  bool writing_ = false, finish_called_ = false;
};

// Answers one request in a single message once every sample has ended: sample 0 in the message's
// own fields and, with n > 1, every sample in `samples`. A failed sample fails the call.
class CompleteReactor final : public grpc::ServerUnaryReactor {
 public:
  CompleteReactor(core::Handles hs, grpc::ByteBuffer* resp) : resp_(resp) {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& h : hs) pump_.Add(std::move(h), core::Deltas::kEndOnly, [this] { Pump(); });
    PumpLocked();
  }
  void OnCancel() override {
    std::lock_guard<std::mutex> l(mu_);
    pump_.CancelAll();
  }
  void OnDone() override {
    for (const auto& h : pump_.handles()) h->Detach();
    delete this;
  }

 private:
  void Pump() {
    std::lock_guard<std::mutex> l(mu_);
    PumpLocked();
  }
  void PumpLocked() {
    if (finish_called_) return;
    pump_.TakeAll();
    if (Outputs::Slot* failed = pump_.Failed()) {
      finish_called_ = true;
      pump_.CancelAll();
      Finish(ToGrpc(failed->taken.status));
      return;
    }
    if (!pump_.AllFinished()) return;
    finish_called_ = true;
    GenerateResponse msg;
    ToResponse(*pump_[0].handle, pump_[0].taken, /*first=*/true, /*last=*/true, &msg);
    if (pump_.size() > 1) {
      for (size_t i = 0; i < pump_.size(); ++i)
        ToResponse(*pump_[i].handle, pump_[i].taken, /*first=*/true, /*last=*/true, msg.add_samples(),
                   static_cast<uint32_t>(i));
    }
    *resp_ = Serialize(msg);
    Finish(grpc::Status::OK);
  }

  grpc::ByteBuffer* resp_;
  std::mutex mu_;
  Outputs pump_;  // guarded by mu_: per sample, everything taken
  bool finish_called_ = false;
};

}  // namespace

Status KrakenService::Authorize(grpc::CallbackServerContext* ctx) const {
  return door_.Authorize(Authorization(ctx));
}

StatusOr<core::Handles> KrakenService::Accept(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer& raw) {
  return door_.Accept(CallOf(ctx), [&](std::string* request_id) -> StatusOr<core::GenerationRequest> {
    kraken::v1::GenerateRequest req;
    KRAKEN_RETURN_IF_ERROR(ParseRequest(raw, options_.max_message_bytes, &req));
    *request_id = req.request_id();
    return FromProto(req);
  });
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* KrakenService::Generate(grpc::CallbackServerContext* ctx,
                                                                    const grpc::ByteBuffer* raw) {
  class Reject final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
   public:
    explicit Reject(const grpc::Status& s) { Finish(s); }
    void OnDone() override { delete this; }
  };
  StatusOr<core::Handles> r = Accept(ctx, *raw);
  if (!r.ok()) return new Reject(ToGrpc(r.status()));
  return new GenerateReactor(std::move(*r));
}

grpc::ServerUnaryReactor* KrakenService::Complete(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw,
                                                  grpc::ByteBuffer* resp) {
  StatusOr<core::Handles> r = Accept(ctx, *raw);
  if (!r.ok()) return FinishUnary(ctx, ToGrpc(r.status()));
  return new CompleteReactor(std::move(*r), resp);
}

grpc::ServerUnaryReactor* KrakenService::Tokenize(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw,
                                                  grpc::ByteBuffer* out) {
  kraken::v1::TokenizeResponse response;
  if (Status a = Authorize(ctx); !a.ok()) return FinishUnary(ctx, ToGrpc(a));
  kraken::v1::TokenizeRequest request;
  if (Status p = ParseRequest(*raw, options_.max_message_bytes, &request); !p.ok()) return FinishUnary(ctx, ToGrpc(p));
  if (static_cast<int>(request.text().size()) > door_.limits().max_prompt_bytes)
    return FinishUnary(ctx, ToGrpc(InvalidArgument("field 'text' must be at most ", door_.limits().max_prompt_bytes,
                                                   " bytes, got ", request.text().size())));
  size_t bad = 0;
  if (!tokenizer::IsValidUtf8(request.text(), &bad))
    return FinishUnary(
        ctx, ToGrpc(InvalidArgument("field 'text' is not valid UTF-8 (first invalid byte at offset ", bad, ")")));
  auto ids = door_.tokenizer().Encode(request.text(), request.add_special_tokens(), request.add_special_tokens());
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
    if (id < 0 || id >= door_.tokenizer().vocab_size())
      return FinishUnary(ctx, ToGrpc(InvalidArgument("field 'token_ids[", i, "]' must be in [0, ",
                                                     door_.tokenizer().vocab_size(), "), got ", id)));
  }
  std::vector<int32_t> ids(request.token_ids().begin(), request.token_ids().end());
  auto text = door_.tokenizer().Decode(ids, request.skip_special_tokens());
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
