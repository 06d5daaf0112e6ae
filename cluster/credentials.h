// The cluster port's mutual TLS: every node of a group, the leader included, proves itself with a
// certificate the group's own CA signed, and checks the other's. A peer without one cannot
// complete the handshake, so it learns nothing (no version, layout, model or address) and can take
// no place in the group; everything between nodes (plans, hence users' tokens; rendezvous keys)
// is encrypted. Files are PEM: the node's certificate chain, its key, and the CA's certificate.
// The leader's certificate must name the address the followers dial (LeaderWorkerSet: the leader
// pod's DNS name; docs/deploy.md shows cert-manager and openssl recipes).
//
//   ClusterTls tls{.cert_file = "tls.crt", .key_file = "tls.key", .ca_file = "ca.crt"};
//   KRAKEN_ASSIGN_OR_RETURN(auto creds, ServerCredentials(tls));   // the leader's hub
//   KRAKEN_ASSIGN_OR_RETURN(auto channel, ChannelCredentials(tls)); // a follower
#pragma once

#include <memory>
#include <string>

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include "base/status.h"

namespace kraken::cluster {

struct ClusterTls {
  std::string cert_file;  // this node's certificate chain (PEM)
  std::string key_file;   // its private key (PEM)
  std::string ca_file;    // the group's CA certificate (PEM): peers must present one it signed
  bool insecure = false;  // plaintext, explicitly: only where the network itself is trusted
  /// OK when the settings name all three files, or none with `insecure`; INVALID_ARGUMENT naming
  /// the flags otherwise.
  Status Check() const;
};

/// The hub's credentials: mutual TLS requiring and verifying a client certificate signed by the
/// CA, or plaintext when `insecure`. INVALID_ARGUMENT naming a file that cannot be read.
StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(const ClusterTls& tls);

/// A follower's credentials: it verifies the leader's certificate against the CA and presents its
/// own. Errors as ServerCredentials.
StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(const ClusterTls& tls);

}  // namespace kraken::cluster
