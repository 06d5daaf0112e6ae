// The kraken.v1.Kraken gRPC service on the callback API. Each Generate call gets a write reactor
// that sends what the engine has produced whenever no write is outstanding: while the client is
// slow, deltas coalesce in the request's Output and the engine never waits. A cancelled or
// disconnected call marks its request cancelled; the engine frees its KV blocks at the next
// iteration.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "core/engine.h"
#include "core/serving_metrics.h"
#include "core/validation.h"
#include "kraken/v1/kraken.grpc.pb.h"
#include "server/request_proto.h"

namespace kraken::server {

/// Maps our Status to grpc::Status, keeping the code and the message.
grpc::Status ToGrpc(const Status& s);

/// The wire form of a response message (for raw callback methods).
grpc::ByteBuffer Serialize(const google::protobuf::MessageLite& msg);
/// Ends a unary call with `s` through the call's default reactor.
grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* ctx, const grpc::Status& s);
/// OK when `api_key` is empty or the call carries "authorization: Bearer <api_key>";
/// UNAUTHENTICATED saying what is missing or wrong otherwise.
Status CheckApiKey(grpc::CallbackServerContext* ctx, const std::string& api_key);
/// When a call that arrived at `arrival` must end: its gRPC deadline (read against both clocks at
/// the same moment), shortened to `request_timeout` when that is set; Clock::time_point::max() for none.
core::Clock::time_point CallDeadline(grpc::CallbackServerContext* ctx, core::Clock::time_point arrival,
                                     std::chrono::milliseconds request_timeout);

struct ServiceOptions {
  core::RequestLimits limits;
  kraken::v1::ModelInfo info;
  std::string api_key;                           // empty: no authentication
  core::ServingMetrics* metrics = nullptr;       // optional
  int max_message_bytes = 4 << 20;               // largest request body the service accepts (bytes)
  std::chrono::milliseconds request_timeout{0};  // 0: none; else a request ends DEADLINE_EXCEEDED past it
};

// Every method of kraken.v1.Kraken on raw (grpc::ByteBuffer) callback handlers: the service
// parses each request body itself, so bytes that are not a valid message get INVALID_ARGUMENT
// with a message (gRPC's typed handlers answer UNIMPLEMENTED with no message), and a generation
// request over --max-message-bytes is refused by the service itself, so it is counted.
using RawKrakenService =
    kraken::v1::Kraken::WithRawCallbackMethod_Generate<kraken::v1::Kraken::WithRawCallbackMethod_Complete<
        kraken::v1::Kraken::WithRawCallbackMethod_Tokenize<kraken::v1::Kraken::WithRawCallbackMethod_Detokenize<
            kraken::v1::Kraken::WithRawCallbackMethod_GetModelInfo<kraken::v1::Kraken::Service>>>>>;

/// gRPC's transport refuses request messages over this many times --max-message-bytes before any
/// handler runs (and so before they can be counted); between the two the service refuses them
/// itself, by name and size, and counts them. The factor bounds what one call can make the server
/// buffer.
constexpr int kTransportLimitFactor = 4;

/// Parses a request body into `out`. RESOURCE_EXHAUSTED naming the size and the limit when it is
/// larger than `max_message_bytes`; INVALID_ARGUMENT naming the message type and the size when
/// the bytes are not a valid encoding of it (or no body arrived).
template <typename Message>
Status ParseRequest(const grpc::ByteBuffer& raw, int max_message_bytes, Message* out) {
  if (!raw.Valid()) return InvalidArgument("the call carried no request message (", out->GetTypeName(), ")");
  const size_t bytes = raw.Length();
  if (bytes > static_cast<size_t>(max_message_bytes)) {
    return ResourceExhausted("the request message is ", bytes, " bytes; the limit (--max-message-bytes) is ",
                             max_message_bytes);
  }
  grpc::ByteBuffer copy(raw);  // Deserialize consumes its input; the copy shares the slices
  if (!grpc::SerializationTraits<Message>::Deserialize(&copy, out).ok()) {
    return InvalidArgument("the request body (", bytes, " bytes) is not a valid ", out->GetTypeName(),
                           " protobuf message");
  }
  return absl::OkStatus();
}

class KrakenService final : public RawKrakenService {
 public:
  KrakenService(core::Engine& engine, const tokenizer::Tokenizer& tok, ServiceOptions options)
      : engine_(engine), tok_(tok), options_(std::move(options)) {}

  /// After this, new calls get UNAVAILABLE; calls already admitted go on.
  void StartDraining() { draining_ = true; }

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* ctx,
                                                       const grpc::ByteBuffer* req) override;
  grpc::ServerUnaryReactor* Complete(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                     grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                     grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                       grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                         grpc::ByteBuffer* resp) override;

 private:
  // A generation request refused before it reached the engine: logged and counted once.
  void Refused(const std::string& request_id, const Status& status) const;
  Status Authorize(grpc::CallbackServerContext* ctx) const;
  // Draining, authentication, parsing, validation, then the engine: its samples' handles (index order), or why not.
  StatusOr<std::vector<std::shared_ptr<core::RequestHandle>>> Accept(grpc::CallbackServerContext* ctx,
                                                                     const grpc::ByteBuffer& raw,
                                                                     kraken::v1::GenerateRequest* req);

  core::Engine& engine_;
  const tokenizer::Tokenizer& tok_;
  ServiceOptions options_;
  std::atomic<bool> draining_{false};
};

}  // namespace kraken::server
