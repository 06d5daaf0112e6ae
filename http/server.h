// An asynchronous HTTP/1.1 server (Boost.Beast over Boost.Asio, Debian's libboost1.81-dev) for the
// OpenAI-compatible API and /metrics. A few I/O threads serve every connection: a connection is a
// coroutine, never a thread, so thousands of open event streams cost memory, not threads.
//
// A request whose head already breaks a limit (a body over max_body_bytes, a malformed head) is
// answered at once and the connection closed after reading, for a moment, what the client still
// sends, so that the client reads the answer rather than a reset.
//
// A handler answers a request either at once (Response) or over time (Stream). A Stream is pulled:
// the connection asks it for the next piece whenever the previous one has been written, so a slow
// reader makes output coalesce in the producer and never blocks it (the same back-pressure as the
// gRPC reactors). A client that closes its connection while a response is pending is noticed at
// once on plain TCP (the connection watches its socket) and at the next write under TLS; the
// Stream is then aborted.
//
//   http::Server server(options);
//   server.Route("GET", "/health", [](const http::Request&) -> http::Reply { return http::Response{...}; });
//   KRAKEN_ASSIGN_OR_RETURN(int port, server.Listen("0.0.0.0", 8000));
//   ...
//   server.Stop(deadline);   // stops accepting, lets responses in flight end, closes the rest
//
// Threads: Route and Listen before Start; handlers run on the I/O threads and must not block.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

#include "base/status.h"

namespace kraken::http {

/// One HTTP request, its body read whole (at most ServerOptions::max_body_bytes).
struct Request {
  std::string method;  // "GET", "POST", ...; HEAD is served by the GET route, without the body
  int version = 11;    // HTTP version x 10 (10: HTTP/1.0, whose streamed answers are not chunked)
  std::string path;    // the target up to '?'
  std::string query;   // after '?', undecoded
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased, in arrival order
  std::string body;
  /// The first header named `name` (lower-case), or "" when absent.
  std::string_view Header(std::string_view name) const;
};

/// A complete response. Content-Length is set from the body.
struct Response {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;  // extra headers
};

/// A response produced over time. The connection calls Start once, then Next whenever it can write
/// (after Start, after each piece is written, and after each wake). Next runs on the connection's
/// strand, never concurrently with itself or Abort.
class Stream {
 public:
  virtual ~Stream() = default;

  struct Piece {
    /// Must be set by the first Next that does not return false; ignored afterwards.
    std::optional<Response> head;  // status and headers; its body is sent first
    std::string data;              // bytes to send next
    bool end = false;              // nothing follows `data`
  };
  /// Calls `wake` (from any thread, any number of times, also after the end and after the Server
  /// has stopped, when it does nothing) when Next has something new. Called once, before the
  /// first Next.
  virtual void Start(std::function<void()> wake) = 0;
  /// Fills `piece` and returns true, or returns false when nothing is ready (a wake will follow).
  /// A first piece with `end` set is sent as one response with Content-Length; otherwise the
  /// response is chunked and every later piece is one chunk.
  virtual bool Next(Piece* piece) = 0;
  /// The client has gone (or the server is stopping) before the end: stop the work behind the
  /// stream. At most once; Next is not called again.
  virtual void Abort() = 0;
};

using Reply = std::variant<Response, std::unique_ptr<Stream>>;
using Handler = std::function<Reply(const Request&)>;

struct TlsFiles {
  std::string cert_chain;   // PEM file
  std::string private_key;  // PEM file
  std::string client_ca;    // PEM file; when set, clients must present a certificate it signed
};

struct ServerOptions {
  int threads = 2;  // I/O threads
  /// Largest request body (bytes). A larger one is answered 413 through `too_large` and the
  /// connection is closed.
  size_t max_body_bytes = 4 << 20;
  /// How long a connection may wait for the next request, take to send one, or leave a response
  /// unread before it is closed (seconds).
  std::chrono::milliseconds idle_timeout{60'000};
  std::optional<TlsFiles> tls;  // unset: plain HTTP
  /// Builds the 413 answer from the body's size and the limit (bytes); the default is plain text.
  std::function<Response(uint64_t size, uint64_t limit)> too_large;
  /// Builds the 404/405 answer; the default is plain text.
  std::function<Response(int status, const Request&)> not_routed;
};

class Server {
 public:
  explicit Server(ServerOptions options);
  ~Server();  // Stop(now)
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  /// Serves `method path` (exact path match) with `handler`.
  void Route(const std::string& method, const std::string& path, Handler handler);
  /// Binds and listens (port 0 picks a free one) and returns the port. UNAVAILABLE naming the
  /// address when it cannot; INVALID_ARGUMENT naming the file when the TLS files cannot be read.
  StatusOr<int> Listen(const std::string& host, int port);
  /// Starts the I/O threads. Call once, after Listen.
  void Start();
  /// Stops accepting connections; responses in flight get until `deadline` to end, then the I/O
  /// threads are joined and every connection still open is closed, its Stream aborted, before
  /// Stop returns. Idempotent; Route, Listen and Start may not follow it.
  void Stop(std::chrono::steady_clock::time_point deadline);
  /// Responses begun and not yet ended.
  int in_flight() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// The reason phrase of an HTTP status code ("Not Found"), or "Unknown".
std::string_view ReasonPhrase(int status);

}  // namespace kraken::http
