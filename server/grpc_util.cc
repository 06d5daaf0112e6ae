#include "server/grpc_util.h"

namespace kraken::server {

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

std::optional<std::string> Authorization(grpc::CallbackServerContext* ctx) {
  const auto& md = ctx->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return std::nullopt;
  return std::string(it->second.data(), it->second.size());
}

core::Call CallOf(grpc::CallbackServerContext* ctx) {
  return core::Call{.authorization = Authorization(ctx), .deadline = ctx->deadline()};
}

}  // namespace kraken::server
