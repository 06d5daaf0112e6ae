#include "server/kserve_service.h"

#include <deque>

#include "core/output_pump.h"
#include "server/grpc_util.h"

namespace kraken::server {
namespace {

using inference::ModelInferRequest;
using inference::ModelInferResponse;
using inference::ModelStreamInferResponse;

constexpr const char* kVersion = "1";

// The samples of one request of n > 1 (Triton's vLLM backend answers them together, as outputs of
// shape [n]): what each ended with, and, for an answer sent only at the end, each one's text.
struct Group {
  explicit Group(size_t n) : ends(n), texts(n) {}
  std::vector<KserveSample> ends;  // finish fields of the samples that ended (text unused)
  std::vector<std::string> texts;  // end-only answers: each sample's whole text
  size_t ended = 0;
  bool failed = false;  // one sample failed: its error was answered, the others are cancelled
  bool done() const { return ended == ends.size(); }
};

// What the stream keeps beside each request (each sample, for n > 1) in flight.
struct Entry {
  KserveRequest request;
  std::string id;
  double cumulative_logprob = 0;
  std::shared_ptr<Group> group;  // null for n = 1
  size_t sample = 0;             // its index in the group
};
using Outputs = core::OutputPump<Entry>;

ModelInferResponse Base(const KserveService& svc, const std::string& id, bool last) {
  ModelInferResponse r;
  r.set_model_name(svc.options().model_name);
  r.set_model_version(kVersion);
  r.set_id(id);
  (*r.mutable_parameters())["triton_final_response"].set_bool_param(last);
  return r;
}

// The response for what `s` took since its last one (`last`: with the end's outputs and the final
// flag). The caller then marks it sent (Outputs::Sent).
ModelInferResponse Response(const KserveService& svc, Outputs::Slot& s, bool last) {
  ModelInferResponse r = Base(svc, s.extra.id, last);
  for (const core::TokenLogprobs& lp : s.taken.logprobs) s.extra.cumulative_logprob += lp.logprob;
  AppendKserveOutputs(s.extra.request, s.handle->params(), s.taken, !s.first_sent, last, s.extra.cumulative_logprob,
                      &r);
  return r;
}

// A grouped sample's news: records its end in the group (and, for an end-only answer, its text).
// Returns the response to write now, or nullopt when there is nothing to write yet (an end-only
// sample whose group has not ended). The caller then marks the slot sent.
std::optional<ModelInferResponse> GroupResponse(const KserveService& svc, Outputs::Slot& s) {
  Group& g = *s.extra.group;
  for (const core::TokenLogprobs& lp : s.taken.logprobs) s.extra.cumulative_logprob += lp.logprob;
  const bool end_only = s.deltas == core::Deltas::kEndOnly;
  if (end_only) g.texts[s.extra.sample] += s.taken.text;
  if (s.taken.finished) {
    g.ends[s.extra.sample] = KserveSample{.finish_reason = s.taken.finish_reason,
                                          .completion_tokens = s.taken.completion_tokens,
                                          .cumulative_logprob = s.extra.cumulative_logprob};
    ++g.ended;
  }
  if (end_only && !g.done()) return std::nullopt;
  std::vector<KserveSample> samples = g.done() ? g.ends : std::vector<KserveSample>(g.ends.size());
  for (size_t i = 0; i < samples.size(); ++i) {
    samples[i].first = end_only;
    samples[i].text = end_only ? std::string_view(g.texts[i]) : std::string_view();
  }
  if (!end_only) {  // this sample's delta, the others' empty
    samples[s.extra.sample].text = s.taken.text;
    samples[s.extra.sample].first = !s.first_sent;
  }
  ModelInferResponse r = Base(svc, s.extra.id, g.done());
  AppendKserveOutputs(s.extra.request, s.handle->params(), samples, g.done(), &r);
  return r;
}

// ModelInfer: the whole answer in one response once the request (every sample) has ended.
class InferReactor final : public grpc::ServerUnaryReactor {
 public:
  InferReactor(KserveService* svc, core::Handles handles, Entry entry, grpc::ByteBuffer* resp)
      : svc_(svc), resp_(resp) {
    std::lock_guard<std::mutex> l(mu_);
    if (handles.size() > 1) entry.group = std::make_shared<Group>(handles.size());
    for (size_t i = 0; i < handles.size(); ++i) {
      entry.sample = i;
      pump_.Add(
          std::move(handles[i]), core::Deltas::kEndOnly, [this] { Pump(); }, entry);
    }
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
    if (finished_) return;
    pump_.TakeAll();
    if (const Outputs::Slot* failed = pump_.Failed()) {  // one sample's failure fails the request
      finished_ = true;
      pump_.CancelAll();
      svc_->Count(false, failed->taken.e2e_s);
      Finish(ToGrpc(failed->taken.status));
      return;
    }
    if (!pump_.AllFinished()) return;
    finished_ = true;
    Outputs::Slot& s = pump_[0];
    svc_->Count(true, s.taken.e2e_s);
    if (pump_.size() == 1) {
      *resp_ = Serialize(Response(*svc_, s, /*last=*/true));
    } else {
      std::optional<ModelInferResponse> r;
      for (size_t i = 0; i < pump_.size(); ++i) r = GroupResponse(*svc_, pump_[i]);
      *resp_ = Serialize(*r);  // the last sample's call completes the group
    }
    Finish(grpc::Status::OK);
  }

  KserveService* svc_;
  grpc::ByteBuffer* resp_;
  std::mutex mu_;
  Outputs pump_;  // guarded by mu_
  bool finished_ = false;
};

// ModelStreamInfer: reads requests while the client sends them, and writes the responses of all
// of them, one write at a time, round-robin over the requests with something new.
class StreamReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  StreamReactor(KserveService* svc, grpc::CallbackServerContext* ctx) : svc_(svc), ctx_(ctx) { StartRead(&in_); }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client has sent its last request
      std::lock_guard<std::mutex> l(mu_);
      reads_done_ = true;
      PumpLocked();
      return;
    }
    std::string id;
    auto accepted = svc_->Accept(ctx_, in_, &id);
    std::lock_guard<std::mutex> l(mu_);
    if (cancelled_ || finish_called_) {  // the call ended while this request was being accepted
      if (accepted.ok())
        for (const auto& h : accepted->handles) h->Cancel();
      reads_done_ = true;  // no more reads; finish once the requests still open have ended
      PumpLocked();
      return;
    }
    if (accepted.ok()) {
      const core::Deltas deltas = accepted->request.stream ? core::Deltas::kTextOrLogprobs : core::Deltas::kEndOnly;
      Entry entry{.request = std::move(accepted->request), .id = id};
      if (accepted->handles.size() > 1) entry.group = std::make_shared<Group>(accepted->handles.size());
      for (size_t i = 0; i < accepted->handles.size(); ++i) {
        entry.sample = i;
        pump_.Add(
            std::move(accepted->handles[i]), deltas, [this] { Pump(); }, entry);
      }
    } else {
      ModelStreamInferResponse r;
      r.set_error_message(std::string(accepted.status().message()));
      r.mutable_infer_response()->set_id(id);
      r.mutable_infer_response()->set_model_name(svc_->options().model_name);
      errors_.push_back(std::move(r));
    }
    // A client that sends refused requests faster than it reads their errors is read no further
    // until the errors are written (the stream's memory stays bounded).
    if (errors_.size() >= kMaxPendingErrors)
      read_paused_ = true;
    else
      StartRead(&in_);
    PumpLocked();
  }
  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> l(mu_);
    writing_ = false;
    if (read_paused_ && ok && errors_.size() < kMaxPendingErrors && !finish_called_) {
      read_paused_ = false;
      StartRead(&in_);
    }
    if (!ok) {  // the client is gone
      cancelled_ = true;
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
    cancelled_ = true;
    pump_.CancelAll();
  }
  void OnDone() override {
    std::vector<std::shared_ptr<core::RequestHandle>> all;
    {
      std::lock_guard<std::mutex> l(mu_);
      done_ = true;  // a listener call that waits for the lock does nothing after this
      all = pump_.handles();
    }
    for (auto& h : all) h->Detach();  // outside the lock: Detach waits for listener calls
    delete this;
  }

 private:
  void Pump() {
    std::lock_guard<std::mutex> l(mu_);
    PumpLocked();
  }
  // Starts the next write: an error response first, else the next request with something new;
  // finishes the stream when the client is done sending and every request has ended.
  void PumpLocked() {
    if (done_ || writing_ || finish_called_) return;
    ModelStreamInferResponse r;
    if (!errors_.empty()) {
      r = std::move(errors_.front());
      errors_.pop_front();
      Write(r);
      return;
    }
    pump_.TakeAll();
    while (Outputs::Slot* s = pump_.Next()) {
      const bool ended = s->taken.finished;
      Group* group = s->extra.group.get();
      if (group != nullptr && group->failed) {  // a sample of a request already answered with an error
        pump_.Sent(*s);
        continue;
      }
      if (ended && !s->taken.status.ok()) {
        svc_->Count(false, s->taken.e2e_s);
        r.set_error_message(std::string(s->taken.status.message()));
        r.mutable_infer_response()->set_id(s->extra.id);
        r.mutable_infer_response()->set_model_name(svc_->options().model_name);
        if (group != nullptr) {
          group->failed = true;
          CancelGroup(*group);
        }
      } else if (group != nullptr) {
        std::optional<ModelInferResponse> grouped = GroupResponse(*svc_, *s);
        if (group->done()) svc_->Count(true, s->taken.e2e_s);
        if (!grouped) {  // an end-only sample whose group has not ended
          pump_.Sent(*s);
          continue;
        }
        *r.mutable_infer_response() = std::move(*grouped);
      } else {
        if (ended) svc_->Count(true, s->taken.e2e_s);
        *r.mutable_infer_response() = Response(*svc_, *s, ended);
      }
      pump_.Sent(*s);  // an ended request leaves the pump
      Write(r);
      return;
    }
    if (reads_done_ && pump_.size() == 0) {
      finish_called_ = true;
      Finish(grpc::Status::OK);
    }
  }
  // Cancels the samples of `g` still in the pump (a sibling failed).
  void CancelGroup(const Group& g) {
    for (size_t i = 0; i < pump_.size(); ++i)
      if (pump_[i].extra.group.get() == &g) pump_[i].handle->Cancel();
  }
  void Write(const ModelStreamInferResponse& r) {
    out_ = Serialize(r);
    writing_ = true;
    StartWrite(&out_);
  }

  KserveService* svc_;
  grpc::CallbackServerContext* ctx_;
  grpc::ByteBuffer in_, out_;
  std::mutex mu_;
  Outputs pump_{/*retire_sent=*/true};           // guarded by mu_: the requests not yet ended
  std::deque<ModelStreamInferResponse> errors_;  // refused requests' responses, not yet written
  static constexpr size_t kMaxPendingErrors = 64;
  bool writing_ = false, reads_done_ = false, finish_called_ = false, done_ = false;
  bool cancelled_ = false;    // the client cancelled or left: requests still arriving are cancelled
  bool read_paused_ = false;  // too many errors wait to be written
};

}  // namespace

KserveService::KserveService(const core::Admission& door, KserveOptions options)
    : door_(door), options_(std::move(options)) {}

Status KserveService::Authorize(grpc::CallbackServerContext* ctx) const {
  return door_.Authorize(Authorization(ctx));
}

Status KserveService::CheckModel(const std::string& name) const {
  if (name == options_.model_name) return absl::OkStatus();
  return absl::NotFoundError(
      StrCat("model '", name, "' is not served here (this server serves '", options_.model_name, "')"));
}

void KserveService::Count(bool ok, double seconds) {
  const auto ns = static_cast<uint64_t>(std::max(0.0, seconds) * 1e9);
  (ok ? success_count_ : fail_count_).fetch_add(1);
  (ok ? success_ns_ : fail_ns_).fetch_add(ns);
  last_ms_.store(static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count()));
}

StatusOr<KserveService::Accepted> KserveService::Accept(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer& raw,
                                                        std::string* id) {
  const auto arrival = core::Clock::now();
  KserveRequest request;
  auto handles = door_.Accept(
      CallOf(ctx),
      [&](std::string* request_id) -> StatusOr<core::GenerationRequest> {
        ModelInferRequest req;
        KRAKEN_RETURN_IF_ERROR(ParseRequest(raw, options_.max_message_bytes, &req));
        *request_id = *id = req.id();
        KRAKEN_RETURN_IF_ERROR(CheckModel(req.model_name()));
        if (!req.model_version().empty() && req.model_version() != kVersion)
          return absl::NotFoundError(StrCat("model '", req.model_name(), "' has no version '", req.model_version(),
                                            "' (this server serves version ", kVersion, ")"));
        KRAKEN_ASSIGN_OR_RETURN(request, ParseKserveRequest(req));
        return request.generation;
      },
      kKserveFields);
  if (!handles.ok()) {  // ModelStatistics' fail counts refusals too
    Count(/*ok=*/false, std::chrono::duration<double>(core::Clock::now() - arrival).count());
    return handles.status();
  }
  return Accepted{.handles = std::move(*handles), .request = std::move(request)};
}

grpc::ServerUnaryReactor* KserveService::ServerLive(grpc::CallbackServerContext* ctx,
                                                    const inference::ServerLiveRequest*,
                                                    inference::ServerLiveResponse* resp) {
  resp->set_live(true);
  return FinishUnary(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* KserveService::ServerReady(grpc::CallbackServerContext* ctx,
                                                     const inference::ServerReadyRequest*,
                                                     inference::ServerReadyResponse* resp) {
  resp->set_ready(door_.health().ready());
  return FinishUnary(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* KserveService::ModelReady(grpc::CallbackServerContext* ctx,
                                                    const inference::ModelReadyRequest* req,
                                                    inference::ModelReadyResponse* resp) {
  resp->set_ready(req->name() == options_.model_name && door_.health().ready());
  return FinishUnary(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* KserveService::ServerMetadata(grpc::CallbackServerContext* ctx,
                                                        const inference::ServerMetadataRequest*,
                                                        inference::ServerMetadataResponse* resp) {
  if (Status a = Authorize(ctx); !a.ok()) return FinishUnary(ctx, ToGrpc(a));
  resp->set_name("kraken-serve");
  resp->set_version(options_.server_version);
  return FinishUnary(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* KserveService::ModelMetadata(grpc::CallbackServerContext* ctx,
                                                       const inference::ModelMetadataRequest* req,
                                                       inference::ModelMetadataResponse* resp) {
  if (Status a = Authorize(ctx); !a.ok()) return FinishUnary(ctx, ToGrpc(a));
  if (Status m = CheckModel(req->name()); !m.ok()) return FinishUnary(ctx, ToGrpc(m));
  resp->set_name(options_.model_name);
  *resp->add_versions() = std::string(kVersion);
  resp->set_platform("kraken");
  for (const auto& [name, type] : KserveInputs()) {
    auto* t = resp->add_inputs();
    t->set_name(name);
    t->set_datatype(type);
    t->add_shape(KserveInputIsList(name) ? -1 : 1);
  }
  for (const auto& [name, type] : KserveOutputs()) {
    auto* t = resp->add_outputs();
    t->set_name(name);
    t->set_datatype(type);
    t->add_shape(-1);
  }
  return FinishUnary(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* KserveService::ModelConfig(grpc::CallbackServerContext* ctx,
                                                     const inference::ModelConfigRequest* req,
                                                     inference::ModelConfigResponse* resp) {
  if (Status a = Authorize(ctx); !a.ok()) return FinishUnary(ctx, ToGrpc(a));
  if (Status m = CheckModel(req->name()); !m.ok()) return FinishUnary(ctx, ToGrpc(m));
  auto type_of = [](const std::string& t) {
    return t == "BYTES"    ? inference::TYPE_STRING
           : t == "BOOL"   ? inference::TYPE_BOOL
           : t == "INT32"  ? inference::TYPE_INT32
           : t == "UINT32" ? inference::TYPE_UINT32
           : t == "UINT64" ? inference::TYPE_UINT64
                           : inference::TYPE_FP32;
  };
  inference::ModelConfig* c = resp->mutable_config();
  c->set_name(options_.model_name);
  c->set_platform("kraken");
  c->set_backend("kraken");
  c->set_max_batch_size(0);
  c->mutable_model_transaction_policy()->set_decoupled(true);
  for (const auto& [name, type] : KserveInputs()) {
    auto* in = c->add_input();
    in->set_name(name);
    in->set_data_type(type_of(type));
    in->add_dims(KserveInputIsList(name) ? -1 : 1);  // one value, as Triton's LLM backends declare them
    in->set_optional(name != "text_input");
  }
  for (const auto& [name, type] : KserveOutputs()) {
    auto* out = c->add_output();
    out->set_name(name);
    out->set_data_type(type_of(type));
    out->add_dims(-1);
  }
  return FinishUnary(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* KserveService::ModelStatistics(grpc::CallbackServerContext* ctx,
                                                         const inference::ModelStatisticsRequest* req,
                                                         inference::ModelStatisticsResponse* resp) {
  if (Status a = Authorize(ctx); !a.ok()) return FinishUnary(ctx, ToGrpc(a));
  if (!req->name().empty())
    if (Status m = CheckModel(req->name()); !m.ok()) return FinishUnary(ctx, ToGrpc(m));
  auto* s = resp->add_model_stats();
  s->set_name(options_.model_name);
  s->set_version(kVersion);
  s->set_last_inference(last_ms_.load());
  s->set_inference_count(success_count_.load());
  s->set_execution_count(success_count_.load());
  s->mutable_inference_stats()->mutable_success()->set_count(success_count_.load());
  s->mutable_inference_stats()->mutable_success()->set_ns(success_ns_.load());
  s->mutable_inference_stats()->mutable_fail()->set_count(fail_count_.load());
  s->mutable_inference_stats()->mutable_fail()->set_ns(fail_ns_.load());
  return FinishUnary(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* KserveService::ModelInfer(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw,
                                                    grpc::ByteBuffer* resp) {
  std::string id;
  auto accepted = Accept(ctx, *raw, &id);
  if (!accepted.ok()) return FinishUnary(ctx, ToGrpc(accepted.status()));
  return new InferReactor(this, std::move(accepted->handles), Entry{.request = std::move(accepted->request), .id = id},
                          resp);
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* KserveService::ModelStreamInfer(
    grpc::CallbackServerContext* ctx) {
  return new StreamReactor(this, ctx);
}

}  // namespace kraken::server
