#include "cluster/credentials.h"

#include <fstream>
#include <sstream>

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

namespace kraken::cluster {
namespace {

StatusOr<std::string> ReadPem(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return InvalidArgument(flag, ": cannot read '", path, "'");
  std::ostringstream out;
  out << in.rdbuf();
  if (out.str().find("-----BEGIN ") == std::string::npos)
    return InvalidArgument(flag, ": '", path, "' holds no PEM block");
  return out.str();
}

}  // namespace

Status ClusterTls::Check() const {
  const int given = !cert_file.empty() + !key_file.empty() + !ca_file.empty();
  if (insecure && given > 0)
    return InvalidArgument("--cluster-insecure and --cluster-cert/--cluster-key/--cluster-ca exclude each other");
  if (insecure || given == 3) return absl::OkStatus();
  if (given == 0)
    return InvalidArgument(
        "a multi-node group needs mutual TLS on its cluster port: give --cluster-cert, --cluster-key and "
        "--cluster-ca (the group's CA; KRAKEN_CLUSTER_CERT etc. from a Kubernetes Secret), or --cluster-insecure "
        "where the network itself is trusted (anyone who reaches the port could otherwise join and read prompts)");
  return InvalidArgument("mutual TLS on the cluster port needs all of --cluster-cert, --cluster-key and --cluster-ca");
}

StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(const ClusterTls& tls) {
  KRAKEN_RETURN_IF_ERROR(tls.Check());
  if (tls.insecure) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions ssl(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  KRAKEN_ASSIGN_OR_RETURN(std::string cert, ReadPem(tls.cert_file, "--cluster-cert"));
  KRAKEN_ASSIGN_OR_RETURN(std::string key, ReadPem(tls.key_file, "--cluster-key"));
  KRAKEN_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPem(tls.ca_file, "--cluster-ca"));
  ssl.pem_key_cert_pairs.push_back({std::move(key), std::move(cert)});
  return grpc::SslServerCredentials(ssl);
}

StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(const ClusterTls& tls) {
  KRAKEN_RETURN_IF_ERROR(tls.Check());
  if (tls.insecure) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions ssl;
  KRAKEN_ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadPem(tls.cert_file, "--cluster-cert"));
  KRAKEN_ASSIGN_OR_RETURN(ssl.pem_private_key, ReadPem(tls.key_file, "--cluster-key"));
  KRAKEN_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPem(tls.ca_file, "--cluster-ca"));
  return grpc::SslCredentials(ssl);
}

}  // namespace kraken::cluster
