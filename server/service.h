// The kraken.v1.Kraken gRPC service on the callback API: it reads kraken.v1 messages into the
// core's terms and writes the core's output back as kraken.v1 messages; admission is the front
// door's (core/admission.h). Each Generate call gets a write reactor driving an output pump
// (core/output_pump.h) that sends what the engine has produced whenever no write is outstanding:
// while the client is slow, deltas coalesce and the engine never waits. A cancelled or
// disconnected call marks its requests cancelled; the engine frees their KV blocks at the next
// iteration.
#pragma once

#include <memory>

#include <grpcpp/grpcpp.h>

#include "core/admission.h"
#include "kraken/v1/kraken.grpc.pb.h"
#include "server/grpc_util.h"
#include "server/request_proto.h"

namespace kraken::server {

struct ServiceOptions {
  kraken::v1::ModelInfo info;
  int max_message_bytes = 4 << 20;  // largest request body the service accepts (bytes)
};

// Every method of kraken.v1.Kraken on raw (grpc::ByteBuffer) callback handlers: the service
// parses each request body itself, so bytes that are not a valid message get INVALID_ARGUMENT
// with a message (gRPC's typed handlers answer UNIMPLEMENTED with no message), and a generation
// request over --max-message-bytes is refused by the service itself, so it is counted.
using RawKrakenService =
    kraken::v1::Kraken::WithRawCallbackMethod_Generate<kraken::v1::Kraken::WithRawCallbackMethod_Complete<
        kraken::v1::Kraken::WithRawCallbackMethod_Tokenize<kraken::v1::Kraken::WithRawCallbackMethod_Detokenize<
            kraken::v1::Kraken::WithRawCallbackMethod_GetModelInfo<kraken::v1::Kraken::Service>>>>>;

class KrakenService final : public RawKrakenService {
 public:
  /// `door` must outlive the service and every call it started.
  KrakenService(const core::Admission& door, ServiceOptions options) : door_(door), options_(std::move(options)) {}

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
  Status Authorize(grpc::CallbackServerContext* ctx) const;
  // The front door (core::Admission::Accept) with this body's reader: its samples' handles (index
  // order), or why not (already logged and counted).
  StatusOr<core::Handles> Accept(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer& raw);

  const core::Admission& door_;
  ServiceOptions options_;
};

}  // namespace kraken::server
