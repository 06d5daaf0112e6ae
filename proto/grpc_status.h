// The one mapping from our Status to grpc::Status, for every gRPC service of the project (the
// kraken.v1 and KServe front-ends in server/, the cluster port in cluster/).
#pragma once

#include <string>

#include <grpcpp/support/status.h>

#include "base/status.h"

namespace kraken {

/// Keeps the code and the message: absl::StatusCode and grpc::StatusCode are the same numbers
/// (both are the canonical codes of google.rpc.Code).
inline grpc::Status ToGrpc(const Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(static_cast<int>(s.code())), std::string(s.message()));
}

}  // namespace kraken
