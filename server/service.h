// The kraken.v1.Kraken gRPC service on the callback API. Each Generate call gets a write reactor
// that sends what the engine has produced whenever no write is outstanding: while the client is
// slow, deltas coalesce in the request's Output and the engine never waits. A cancelled or
// disconnected call marks its request cancelled; the engine frees its KV blocks at the next
// iteration.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "kraken/v1/kraken.grpc.pb.h"
#include "server/engine_loop.h"
#include "server/server_metrics.h"
#include "server/validation.h"

namespace kraken::server {

/// Maps our Status to grpc::Status, keeping the code and the message.
grpc::Status ToGrpc(const Status& s);

struct ServiceOptions {
  RequestLimits limits;
  kraken::v1::ModelInfo info;
  std::string api_key;  // empty: no authentication
  ServerMetrics* metrics = nullptr;  // optional
};

class KrakenService final : public kraken::v1::Kraken::CallbackService {
 public:
  KrakenService(EngineLoop& engine, const tokenizer::Tokenizer& tok, ServiceOptions options)
      : engine_(engine), tok_(tok), options_(std::move(options)) {}

  /// After this, new calls get UNAVAILABLE; calls already admitted go on.
  void StartDraining() { draining_ = true; }

  grpc::ServerWriteReactor<kraken::v1::GenerateResponse>* Generate(grpc::CallbackServerContext* ctx,
                                                                    const kraken::v1::GenerateRequest* req) override;
  grpc::ServerUnaryReactor* Complete(grpc::CallbackServerContext* ctx, const kraken::v1::GenerateRequest* req,
                                     kraken::v1::GenerateResponse* resp) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx, const kraken::v1::TokenizeRequest* req,
                                     kraken::v1::TokenizeResponse* resp) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* ctx, const kraken::v1::DetokenizeRequest* req,
                                       kraken::v1::DetokenizeResponse* resp) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* ctx, const kraken::v1::GetModelInfoRequest* req,
                                         kraken::v1::ModelInfo* resp) override;

 private:
  Status Authorize(grpc::CallbackServerContext* ctx) const;
  StatusOr<std::shared_ptr<Request>> MakeRequest(grpc::CallbackServerContext* ctx, const kraken::v1::GenerateRequest& req);

  EngineLoop& engine_;
  const tokenizer::Tokenizer& tok_;
  ServiceOptions options_;
  std::atomic<bool> draining_{false};
  std::atomic<uint64_t> next_id_{1};
};

}  // namespace kraken::server
