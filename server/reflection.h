// gRPC server reflection v1 (grpc.reflection.v1.ServerReflection, grpc/reflection/v1/reflection.proto),
// beside the v1alpha service Debian's grpc++_reflection provides: grpcurl and other reflection
// clients ask v1 first. Both describe every service the server lists, the health service included
// (its descriptors are linked in from grpc-proto's health.proto).
#pragma once

#include <string>
#include <vector>

#include "grpc/reflection/v1/reflection.grpc.pb.h"

namespace kraken::server {

/// Answers reflection v1 from the process's generated descriptor pool: list_services (the names
/// given), file_by_filename, file_containing_symbol, file_containing_extension and
/// all_extension_numbers_of_type. Each file answer carries the file and, once per stream, each file
/// it imports (transitively), serialized FileDescriptorProtos as the protocol defines. A name or
/// symbol the pool does not know gets an error_response NOT_FOUND naming it; the stream goes on.
class ReflectionV1 final : public grpc::reflection::v1::ServerReflection::Service {
 public:
  explicit ReflectionV1(std::vector<std::string> services);

  grpc::Status ServerReflectionInfo(
      grpc::ServerContext* ctx,
      grpc::ServerReaderWriter<grpc::reflection::v1::ServerReflectionResponse,
                               grpc::reflection::v1::ServerReflectionRequest>* stream) override;

 private:
  std::vector<std::string> services_;
};

/// The health service's full name, from its linked descriptor (which also keeps that descriptor
/// in the binary for reflection to find).
const std::string& HealthServiceName();

}  // namespace kraken::server
