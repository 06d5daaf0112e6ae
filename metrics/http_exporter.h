// Serves a Registry at http://<host>:<port>/metrics (civetweb, Debian's libcivetweb-dev), with
// Content-Type "text/plain; version=0.0.4; charset=utf-8". Its own port and threads: a slow
// scraper never touches the gRPC server.
#pragma once

#include <memory>
#include <string>

#include "base/status.h"
#include "metrics/registry.h"

class CivetServer;

namespace kraken::metrics {

class HttpExporter {
 public:
  /// Listens on host:port (port 0 picks a free one). UNAVAILABLE naming the address when it
  /// cannot listen.
  static StatusOr<std::unique_ptr<HttpExporter>> Start(const std::string& host, int port, Registry* registry);
  ~HttpExporter();
  int port() const { return port_; }

 private:
  HttpExporter() = default;
  struct Handler;
  std::unique_ptr<Handler> handler_;
  std::unique_ptr<CivetServer> server_;
  int port_ = 0;
};

}  // namespace kraken::metrics
