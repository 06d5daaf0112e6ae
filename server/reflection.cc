#include "server/reflection.h"

#include <set>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>

#include "grpc/health/v1/health.pb.h"

namespace kraken::server {
namespace {

namespace pb = google::protobuf;
using grpc::reflection::v1::ServerReflectionRequest;
using grpc::reflection::v1::ServerReflectionResponse;

// Adds `file` and, transitively, the files it imports that this stream has not sent yet.
void AddFile(const pb::FileDescriptor* file, std::set<std::string>* sent,
             grpc::reflection::v1::FileDescriptorResponse* out) {
  if (!sent->insert(file->name()).second) return;
  pb::FileDescriptorProto proto;
  file->CopyTo(&proto);
  out->add_file_descriptor_proto(proto.SerializeAsString());
  for (int i = 0; i < file->dependency_count(); ++i) AddFile(file->dependency(i), sent, out);
}

void NotFound(const std::string& what, ServerReflectionResponse* resp) {
  resp->mutable_error_response()->set_error_code(static_cast<int>(grpc::StatusCode::NOT_FOUND));
  resp->mutable_error_response()->set_error_message(what);
}

// One request's answer; `sent`: the files this stream has sent already.
void Answer(const ServerReflectionRequest& req, const std::vector<std::string>& services, std::set<std::string>* sent,
            ServerReflectionResponse* resp) {
  const pb::DescriptorPool* pool = pb::DescriptorPool::generated_pool();
  *resp->mutable_original_request() = req;
  resp->set_valid_host(req.host());
  // A file already sent is sent again when asked for by name or symbol: the client asked.
  auto file_answer = [&](const pb::FileDescriptor* file) {
    sent->erase(file->name());
    AddFile(file, sent, resp->mutable_file_descriptor_response());
  };
  switch (req.message_request_case()) {
    case ServerReflectionRequest::kListServices:
      for (const std::string& s : services) resp->mutable_list_services_response()->add_service()->set_name(s);
      return;
    case ServerReflectionRequest::kFileByFilename:
      if (const pb::FileDescriptor* f = pool->FindFileByName(req.file_by_filename())) return file_answer(f);
      return NotFound("file '" + req.file_by_filename() + "' not found", resp);
    case ServerReflectionRequest::kFileContainingSymbol:
      if (const pb::FileDescriptor* f = pool->FindFileContainingSymbol(req.file_containing_symbol()))
        return file_answer(f);
      return NotFound("symbol '" + req.file_containing_symbol() + "' not found", resp);
    case ServerReflectionRequest::kFileContainingExtension: {
      const auto& ext = req.file_containing_extension();
      const pb::Descriptor* type = pool->FindMessageTypeByName(ext.containing_type());
      const pb::FieldDescriptor* field =
          type != nullptr ? pool->FindExtensionByNumber(type, ext.extension_number()) : nullptr;
      if (field != nullptr) return file_answer(field->file());
      return NotFound(
          "extension " + std::to_string(ext.extension_number()) + " of '" + ext.containing_type() + "' not found",
          resp);
    }
    case ServerReflectionRequest::kAllExtensionNumbersOfType: {
      const pb::Descriptor* type = pool->FindMessageTypeByName(req.all_extension_numbers_of_type());
      if (type == nullptr) return NotFound("type '" + req.all_extension_numbers_of_type() + "' not found", resp);
      std::vector<const pb::FieldDescriptor*> fields;
      pool->FindAllExtensions(type, &fields);
      auto* out = resp->mutable_all_extension_numbers_response();
      out->set_base_type_name(type->full_name());
      for (const pb::FieldDescriptor* f : fields) out->add_extension_number(f->number());
      return;
    }
    case ServerReflectionRequest::MESSAGE_REQUEST_NOT_SET:
      break;
  }
  resp->mutable_error_response()->set_error_code(static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  resp->mutable_error_response()->set_error_message("the request names no reflection question");
}

}  // namespace

ReflectionV1::ReflectionV1(std::vector<std::string> services) : services_(std::move(services)) {}

grpc::Status ReflectionV1::ServerReflectionInfo(
    grpc::ServerContext*, grpc::ServerReaderWriter<ServerReflectionResponse, ServerReflectionRequest>* stream) {
  std::set<std::string> sent;
  ServerReflectionRequest req;
  while (stream->Read(&req)) {
    ServerReflectionResponse resp;
    Answer(req, services_, &sent, &resp);
    if (!stream->Write(resp)) break;
  }
  return grpc::Status::OK;
}

const std::string& HealthServiceName() {
  static const std::string name =
      grpc::health::v1::HealthCheckRequest::descriptor()->file()->FindServiceByName("Health")->full_name();
  return name;
}

}  // namespace kraken::server
