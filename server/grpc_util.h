// What both gRPC services (kraken.v1 in server/service.h, KServe in server/kserve_service.h) share:
// raw message parsing and serialising, unary answers, and a call's credential and deadline in the
// front door's terms (core/admission.h); the status mapping is proto/grpc_status.h's ToGrpc.
#pragma once

#include <google/protobuf/message_lite.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/proto_utils.h>

#include "base/status.h"
#include "core/admission.h"
#include "proto/grpc_status.h"  // ToGrpc

namespace kraken::server {

/// The wire form of a response message (for raw callback methods).
grpc::ByteBuffer Serialize(const google::protobuf::MessageLite& msg);
/// Ends a unary call with `s` through the call's default reactor.
grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* ctx, const grpc::Status& s);
/// The call as the front door sees it: its "authorization" metadata (nullopt when absent) and its
/// gRPC deadline.
core::Call CallOf(grpc::CallbackServerContext* ctx);
/// The call's "authorization" metadata, nullopt when it carried none.
std::optional<std::string> Authorization(grpc::CallbackServerContext* ctx);

/// gRPC's transport refuses request messages over this many times --max-message-bytes before any
/// handler runs (and so before they can be counted); between the two the services refuse them
/// themselves, by name and size, and count them. The factor bounds what one call can make the
/// server buffer.
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

}  // namespace kraken::server
