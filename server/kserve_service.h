// KServe v2 (Open Inference Protocol) over gRPC, as Triton serves it: inference.GRPCInferenceService
// on the gRPC port beside kraken.v1, so tritonclient, perf_analyzer and genai-perf work unchanged.
// The one model is served as Triton serves an LLM behind its TensorRT-LLM or vLLM backend
// (server/kserve_request.h has the tensors): decoupled, so ModelStreamInfer gives one response per
// batch of new text, the last flagged `triton_final_response`; ModelInfer gives the whole answer.
//
// ModelStreamInfer carries any number of requests on one stream, answered as they progress; a
// request that fails gets a response with `error_message` and the stream goes on. Responses are
// written one at a time, whenever the previous write is done, round robin over the requests with
// something new (core/output_pump.h: a slow reader makes output coalesce, the engine never waits);
// a client that cancels the stream cancels its requests. Admission is the front door's
// (core/admission.h).
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "core/admission.h"
#include "inference/grpc_service.grpc.pb.h"
#include "server/kserve_request.h"

namespace kraken::server {

struct KserveOptions {
  std::string model_name;  // the one model's name; requests naming another get NOT_FOUND
  std::string server_version;
  int max_message_bytes = 4 << 20;  // largest request message (bytes)
};

// Typed callback handlers for the metadata calls, raw (grpc::ByteBuffer) ones for the two inference
// calls, which parse their bodies themselves (ParseRequest in server/grpc_util.h): bytes that are not
// a message get INVALID_ARGUMENT with a message, and a body over --max-message-bytes is refused
// and counted.
using KserveBase = inference::GRPCInferenceService;
using RawKserveService = KserveBase::WithCallbackMethod_ServerLive<KserveBase::WithCallbackMethod_ServerReady<
    KserveBase::WithCallbackMethod_ModelReady<KserveBase::WithCallbackMethod_ServerMetadata<
        KserveBase::WithCallbackMethod_ModelMetadata<KserveBase::WithCallbackMethod_ModelConfig<
            KserveBase::WithCallbackMethod_ModelStatistics<KserveBase::WithRawCallbackMethod_ModelInfer<
                KserveBase::WithRawCallbackMethod_ModelStreamInfer<KserveBase::Service>>>>>>>>>;

class KserveService final : public RawKserveService {
 public:
  /// `door` must outlive the service and every call it started. ServerLive, ServerReady and
  /// ModelReady need no API key; readiness is the door's Health.
  KserveService(const core::Admission& door, KserveOptions options);

  grpc::ServerUnaryReactor* ServerLive(grpc::CallbackServerContext* ctx, const inference::ServerLiveRequest* req,
                                       inference::ServerLiveResponse* resp) override;
  grpc::ServerUnaryReactor* ServerReady(grpc::CallbackServerContext* ctx, const inference::ServerReadyRequest* req,
                                        inference::ServerReadyResponse* resp) override;
  grpc::ServerUnaryReactor* ModelReady(grpc::CallbackServerContext* ctx, const inference::ModelReadyRequest* req,
                                       inference::ModelReadyResponse* resp) override;
  grpc::ServerUnaryReactor* ServerMetadata(grpc::CallbackServerContext* ctx,
                                           const inference::ServerMetadataRequest* req,
                                           inference::ServerMetadataResponse* resp) override;
  grpc::ServerUnaryReactor* ModelMetadata(grpc::CallbackServerContext* ctx, const inference::ModelMetadataRequest* req,
                                          inference::ModelMetadataResponse* resp) override;
  grpc::ServerUnaryReactor* ModelConfig(grpc::CallbackServerContext* ctx, const inference::ModelConfigRequest* req,
                                        inference::ModelConfigResponse* resp) override;
  grpc::ServerUnaryReactor* ModelStatistics(grpc::CallbackServerContext* ctx,
                                            const inference::ModelStatisticsRequest* req,
                                            inference::ModelStatisticsResponse* resp) override;
  grpc::ServerUnaryReactor* ModelInfer(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                       grpc::ByteBuffer* resp) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* ModelStreamInfer(
      grpc::CallbackServerContext* ctx) override;

  /// One accepted request: its samples' handles (n of them, in index order) and what it asked for.
  struct Accepted {
    core::Handles handles;
    KserveRequest request;
  };
  /// The front door (core::Admission::Accept) with this body's reader: the message, the model's
  /// name and version, the tensors. The request's id (for the error response) is filled in even
  /// when it fails; a refusal is logged, counted, and counted in ModelStatistics as a failure.
  StatusOr<Accepted> Accept(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer& raw, std::string* id);
  /// Counts a request that ended (for ModelStatistics): `ok`, and its duration from arrival.
  void Count(bool ok, double seconds);
  const KserveOptions& options() const { return options_; }

 private:
  Status Authorize(grpc::CallbackServerContext* ctx) const;
  Status CheckModel(const std::string& name) const;

  const core::Admission& door_;
  KserveOptions options_;
  std::atomic<uint64_t> success_count_{0}, success_ns_{0}, fail_count_{0}, fail_ns_{0}, last_ms_{0};
};

}  // namespace kraken::server
