#include "metrics/http_exporter.h"

#include <CivetServer.h>

#include <vector>

namespace kraken::metrics {

struct HttpExporter::Handler : public CivetHandler {
  explicit Handler(Registry* r) : registry(r) {}
  bool handleGet(CivetServer*, mg_connection* conn) override {
    const std::string body = registry->Serialize();
    mg_printf(conn,
              "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
              "Content-Length: %zu\r\nConnection: close\r\n\r\n",
              body.size());
    mg_write(conn, body.data(), body.size());
    return true;
  }
  Registry* registry;
};

StatusOr<std::unique_ptr<HttpExporter>> HttpExporter::Start(const std::string& host, int port, Registry* registry) {
  auto self = std::unique_ptr<HttpExporter>(new HttpExporter());
  self->handler_ = std::make_unique<Handler>(registry);
  const std::string addr = (host.empty() || host == "0.0.0.0" ? std::string() : host + ":") + std::to_string(port);
  const std::vector<std::string> options = {"listening_ports", addr, "num_threads", "2"};
  try {
    self->server_ = std::make_unique<CivetServer>(options);
  } catch (const std::exception& e) {
    return absl::UnavailableError(StrCat("metrics: cannot listen on ", host, ":", port, ": ", e.what()));
  }
  self->server_->addHandler("/metrics", self->handler_.get());
  const std::vector<int> ports = self->server_->getListeningPorts();
  self->port_ = ports.empty() ? port : ports.front();
  return self;
}

HttpExporter::~HttpExporter() {
  if (server_) server_->close();
}

}  // namespace kraken::metrics
