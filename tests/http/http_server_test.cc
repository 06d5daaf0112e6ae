// The asynchronous HTTP server (http/server.h) driven over loopback by a plain POSIX-socket client
// that writes raw HTTP/1.1 and parses the raw answer, so the tests see exactly what goes on the wire
// (status lines, headers, chunk framing, when the server closes). Every read is bounded by poll()
// with a timeout of at most 10 s, so a server that misbehaves fails a test instead of hanging it.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "http/server.h"

namespace kraken::http {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// No single read waits longer than this, whatever a test asks for.
constexpr milliseconds kMaxRead = 10s;

std::string Lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return std::tolower(c); });
  return out;
}

// Polls `done` every 5 ms until it holds or `timeout` passes; returns its last value.
bool WaitFor(const std::function<bool()>& done, milliseconds timeout) {
  const auto until = Clock::now() + timeout;
  while (!done()) {
    if (Clock::now() >= until) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

// One response as it came off the wire.
struct WireReply {
  std::string status_line;                                   // "HTTP/1.1 200 OK"
  int status = 0;                                            // 200
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased
  std::string body;                                          // de-chunked when chunked
  std::vector<std::string> chunks;                           // the chunks' payloads, in order
  bool chunked = false;

  bool Has(std::string_view name) const {
    return std::any_of(headers.begin(), headers.end(), [&](const auto& h) { return h.first == name; });
  }
  std::string Header(std::string_view name) const {
    for (const auto& [k, v] : headers)
      if (k == name) return v;
    return "";
  }
};

// A blocking TCP client to 127.0.0.1 whose reads are bounded with poll(). Bytes read past one
// response stay buffered for the next (keep-alive, pipelining).
class Client {
 public:
  enum class Got { kData, kEof, kReset, kTimeout };
  friend std::ostream& operator<<(std::ostream& os, Got g) {
    constexpr const char* kNames[] = {"data", "EOF", "reset", "timeout"};
    return os << kNames[static_cast<int>(g)];
  }

  explicit Client(int port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    ::inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (fd_ >= 0 && ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      error_ = std::string("connect: ") + std::strerror(errno);
      Close();
    }
  }
  ~Client() { Close(); }
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  bool connected() const { return fd_ >= 0; }
  int fd() const { return fd_; }
  const std::string& error() const { return error_; }

  bool Send(std::string_view bytes) {
    while (!bytes.empty()) {
      const ssize_t n = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        error_ = std::string("send: ") + std::strerror(errno);
        return false;
      }
      bytes.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }

  // Reads one whole response: its head, then a body framed by Content-Length, by chunks, or by the
  // end of the connection. A 1xx response is returned on its own (it has no body). nullopt (with
  // error() saying why) when the connection ends first or `timeout` passes.
  std::optional<WireReply> Read(milliseconds timeout = kMaxRead) {
    const auto deadline = Clock::now() + std::min(timeout, kMaxRead);
    size_t end;
    while ((end = buf_.find("\r\n\r\n")) == std::string::npos)
      if (!Fill(deadline)) return std::nullopt;
    WireReply r;
    const std::string head = buf_.substr(0, end);
    buf_.erase(0, end + 4);
    size_t pos = head.find("\r\n");
    r.status_line = head.substr(0, pos);
    if (r.status_line.size() < 12 || r.status_line.compare(0, 9, "HTTP/1.1 ") != 0) {
      error_ = "bad status line: " + r.status_line;
      return std::nullopt;
    }
    r.status = std::atoi(r.status_line.c_str() + 9);
    while (pos != std::string::npos) {
      const size_t start = pos + 2;
      pos = head.find("\r\n", start);
      const std::string line = head.substr(start, pos == std::string::npos ? std::string::npos : pos - start);
      const size_t colon = line.find(':');
      if (colon == std::string::npos) continue;
      std::string value = line.substr(colon + 1);
      value.erase(0, value.find_first_not_of(' '));
      r.headers.emplace_back(Lower(line.substr(0, colon)), value);
    }
    if (r.status / 100 == 1 || r.status == 204 || r.status == 304) return r;
    r.chunked = Lower(r.Header("transfer-encoding")) == "chunked";
    if (r.chunked) {
      while (true) {
        size_t eol;
        while ((eol = buf_.find("\r\n")) == std::string::npos)
          if (!Fill(deadline)) return std::nullopt;
        const size_t size = std::strtoul(buf_.substr(0, eol).c_str(), nullptr, 16);
        buf_.erase(0, eol + 2);
        // The payload and its CRLF; the last chunk (size 0) is followed by an empty trailer line.
        while (buf_.size() < size + 2)
          if (!Fill(deadline)) return std::nullopt;
        if (buf_.compare(size, 2, "\r\n") != 0) {
          error_ = "chunk of " + std::to_string(size) + " bytes not followed by CRLF";
          return std::nullopt;
        }
        if (size == 0) {
          buf_.erase(0, 2);
          return r;
        }
        r.chunks.push_back(buf_.substr(0, size));
        r.body += r.chunks.back();
        buf_.erase(0, size + 2);
      }
    }
    if (r.Has("content-length")) {
      const size_t length = std::strtoul(r.Header("content-length").c_str(), nullptr, 10);
      while (buf_.size() < length)
        if (!Fill(deadline)) return std::nullopt;
      r.body = buf_.substr(0, length);
      buf_.erase(0, length);
      return r;
    }
    while (Fill(deadline)) {
    }
    if (last_ == Got::kTimeout) return std::nullopt;
    r.body = std::move(buf_);
    buf_.clear();
    return r;
  }

  // Waits until the server ends the connection or `timeout` passes, keeping any bytes that arrive
  // first in rest(). Returns how it ended: kEof (an orderly close), kReset or kTimeout.
  Got WaitClosed(milliseconds timeout) {
    const auto deadline = Clock::now() + std::min(timeout, kMaxRead);
    while (Fill(deadline)) {
    }
    return last_;
  }

  // Reads until `text` has arrived (true) or the connection ends or `timeout` passes (false). The
  // bytes stay in rest(), unparsed.
  bool ReadUntil(std::string_view text, milliseconds timeout) {
    const auto deadline = Clock::now() + std::min(timeout, kMaxRead);
    while (buf_.find(text) == std::string::npos)
      if (!Fill(deadline)) return false;
    return true;
  }

  // Bytes received and not yet consumed by Read.
  const std::string& rest() const { return buf_; }

  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  // Appends at least one received byte to buf_ and returns true, or returns false at the end of
  // the connection or at `deadline` (last_ says which).
  bool Fill(Clock::time_point deadline) {
    while (true) {
      const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
      pollfd p{.fd = fd_, .events = POLLIN, .revents = 0};
      const int ready = ::poll(&p, 1, static_cast<int>(std::clamp<int64_t>(left, 0, kMaxRead.count())));
      if (ready < 0 && errno == EINTR) continue;
      if (ready <= 0) {
        last_ = Got::kTimeout;
        error_ = "timed out waiting for the server";
        return false;
      }
      char tmp[16384];
      const ssize_t n = ::recv(fd_, tmp, sizeof tmp, 0);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n > 0) {
        buf_.append(tmp, static_cast<size_t>(n));
        last_ = Got::kData;
        return true;
      }
      last_ = n == 0 ? Got::kEof : Got::kReset;
      error_ = n == 0 ? "connection closed by the server" : std::string("recv: ") + std::strerror(errno);
      return false;
    }
  }

  int fd_ = -1;
  std::string buf_;
  Got last_ = Got::kData;
  std::string error_;
};

// The producer side of a TestStream, shared with the test: pieces pushed by any thread (each push
// calls the wake the stream was started with, as an engine thread would), and what the connection
// did to the stream. It outlives the stream, so the test can look after the server let go of it.
struct Feed {
  std::mutex mu;
  std::deque<Stream::Piece> queue;
  std::function<void()> wake;
  std::atomic<bool> started{false};
  std::atomic<bool> ended{false};  // Next handed out a piece with `end`
  std::atomic<bool> aborted{false};
  std::atomic<int> aborts{0};
  std::atomic<int> calls_after_end{0};  // Next or Abort after the end: the contract forbids both

  void Push(Stream::Piece piece) {
    std::function<void()> w;
    {
      std::lock_guard lock(mu);
      queue.push_back(std::move(piece));
      w = wake;
    }
    if (w) w();  // outside the lock, as the engine does: wake may run anything
  }
};

class TestStream : public Stream {
 public:
  explicit TestStream(std::shared_ptr<Feed> feed) : feed_(std::move(feed)) {}
  // The wake holds the connection's timer, which must not outlive the server's io_context: drop it
  // with the stream, as core::RequestHandle::Detach does in the real server.
  ~TestStream() override {
    std::lock_guard lock(feed_->mu);
    feed_->wake = nullptr;
  }

  void Start(std::function<void()> wake) override {
    std::lock_guard lock(feed_->mu);
    feed_->wake = std::move(wake);
    feed_->started = true;
  }
  bool Next(Piece* piece) override {
    if (feed_->ended) ++feed_->calls_after_end;
    std::lock_guard lock(feed_->mu);
    if (feed_->queue.empty()) return false;
    *piece = std::move(feed_->queue.front());
    feed_->queue.pop_front();
    if (piece->end) feed_->ended = true;
    return true;
  }
  void Abort() override {
    if (feed_->ended) ++feed_->calls_after_end;
    ++feed_->aborts;
    feed_->aborted = true;
  }

 private:
  std::shared_ptr<Feed> feed_;
};

// A stream that always has another 256 KiB ready: it can only be stopped by the connection.
class EndlessStream : public Stream {
 public:
  explicit EndlessStream(std::shared_ptr<Feed> feed) : feed_(std::move(feed)) {}
  void Start(std::function<void()>) override { feed_->started = true; }
  bool Next(Piece* piece) override {
    piece->data.assign(256 << 10, 'x');
    return true;
  }
  void Abort() override {
    ++feed_->aborts;
    feed_->aborted = true;
  }

 private:
  std::shared_ptr<Feed> feed_;
};

Handler StreamHandler(std::shared_ptr<Feed> feed) {
  return [feed](const Request&) -> Reply { return std::make_unique<TestStream>(feed); };
}

Stream::Piece Data(std::string data, bool end = false) {
  Stream::Piece p;
  p.data = std::move(data);
  p.end = end;
  return p;
}

// Listens on an ephemeral loopback port and starts the I/O threads; the port, or -1 after
// recording a failure.
int ListenAndStart(Server& server) {
  StatusOr<int> port = server.Listen("127.0.0.1", 0);
  if (!port.ok()) {
    ADD_FAILURE() << port.status();
    return -1;
  }
  server.Start();
  return *port;
}

// A server whose one route streams from `feed`, listening on a loopback port (0 when it could not).
struct FedServer {
  FedServer(const std::string& method, const std::string& path) {
    server.Route(method, path, StreamHandler(feed));
    port = ListenAndStart(server);
  }
  std::shared_ptr<Feed> feed = std::make_shared<Feed>();
  Server server{ServerOptions{}};
  int port = 0;
};

std::string Get(std::string_view path, std::string_view extra_headers = "") {
  return std::string("GET ") + std::string(path) + " HTTP/1.1\r\nHost: test\r\n" + std::string(extra_headers) + "\r\n";
}

std::string Post(std::string_view path, std::string_view body) {
  return std::string("POST ") + std::string(path) +
         " HTTP/1.1\r\nHost: test\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + std::string(body);
}

Response Text(std::string body) {
  return Response{.status = 200, .content_type = "text/plain", .body = std::move(body)};
}

// ---- 1. Routing ----------------------------------------------------------------------------------

TEST(HttpServer, RoutedGetIsAnsweredWithTheHandlersResponse) {
  std::mutex mu;
  Request seen;
  Server server(ServerOptions{});
  server.Route("GET", "/hello", [&](const Request& req) -> Reply {
    std::lock_guard lock(mu);
    seen = req;
    return Response{.status = 200,
                    .content_type = "text/plain; charset=utf-8",
                    .body = "hello, world",
                    .headers = {{"X-Answer", "42"}}};
  });
  const int port = ListenAndStart(server);
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send(Get("/hello?a=1&b=two", "X-Mixed-Case: Value\r\n")));
  const auto r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status_line, "HTTP/1.1 200 OK");
  EXPECT_EQ(r->Header("content-type"), "text/plain; charset=utf-8");
  EXPECT_EQ(r->Header("content-length"), "12");
  EXPECT_EQ(r->Header("x-answer"), "42");
  EXPECT_FALSE(r->chunked);
  EXPECT_EQ(r->body, "hello, world");
  {
    // The handler saw the target split at '?' and the header names lower-cased.
    std::lock_guard lock(mu);
    EXPECT_EQ(seen.method, "GET");
    EXPECT_EQ(seen.path, "/hello");
    EXPECT_EQ(seen.query, "a=1&b=two");
    EXPECT_EQ(seen.Header("x-mixed-case"), "Value");
    EXPECT_EQ(seen.Header("host"), "test");
    EXPECT_EQ(seen.Header("absent"), "");
  }
  // The count drops when the write completes on the server's side, which may be just after the
  // client has the bytes.
  EXPECT_TRUE(WaitFor([&] { return server.in_flight() == 0; }, 2s));
  server.Stop(Clock::now());
}

TEST(HttpServer, UnknownPathIs404AndWrongMethodIs405NamingTheRoutesMethods) {
  Server server(ServerOptions{});
  server.Route("GET", "/thing", [](const Request&) -> Reply { return Text("got"); });
  server.Route("PUT", "/thing", [](const Request&) -> Reply { return Text("put"); });
  const int port = ListenAndStart(server);
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send(Get("/nothing")));
  auto r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status_line, "HTTP/1.1 404 Not Found");
  EXPECT_EQ(r->body, "not found\n");
  EXPECT_EQ(r->Header("content-type"), "text/plain; charset=utf-8");
  EXPECT_FALSE(r->Has("allow"));

  // The 404 kept the connection open; a method the path does not serve is 405.
  ASSERT_TRUE(c.Send("DELETE /thing HTTP/1.1\r\nHost: test\r\n\r\n"));
  r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status_line, "HTTP/1.1 405 Method Not Allowed");
  EXPECT_EQ(r->body, "method not allowed\n");
  EXPECT_EQ(r->Header("allow"), "GET, PUT");
  server.Stop(Clock::now());
}

TEST(HttpServer, NotRoutedCallbackBuildsThe404And405Bodies) {
  std::atomic<int> calls{0};
  ServerOptions options;
  options.not_routed = [&](int status, const Request& req) {
    ++calls;
    return Response{.status = status,
                    .content_type = "application/json",
                    .body = "{\"status\":" + std::to_string(status) + ",\"path\":\"" + req.path + "\"}"};
  };
  Server server(options);
  server.Route("POST", "/v1/completions", [](const Request&) -> Reply { return Text("ok"); });
  const int port = ListenAndStart(server);
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send(Get("/v1/nope")));
  auto r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status, 404);
  EXPECT_EQ(r->Header("content-type"), "application/json");
  EXPECT_EQ(r->body, R"({"status":404,"path":"/v1/nope"})");

  ASSERT_TRUE(c.Send(Get("/v1/completions")));
  r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status, 405);
  EXPECT_EQ(r->body, R"({"status":405,"path":"/v1/completions"})");
  EXPECT_EQ(r->Header("allow"), "POST");  // added by the server on top of the callback's answer
  EXPECT_EQ(calls.load(), 2);
  server.Stop(Clock::now());
}

TEST(HttpServer, HandlerThatThrowsIs500AndTheServerGoesOn) {
  Server server(ServerOptions{});
  server.Route("GET", "/bug", [](const Request&) -> Reply { throw std::runtime_error("boom"); });
  server.Route("GET", "/fine", [](const Request&) -> Reply { return Text("fine"); });
  const int port = ListenAndStart(server);
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send(Get("/bug")));
  auto r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status_line, "HTTP/1.1 500 Internal Server Error");
  EXPECT_EQ(r->body, "internal error\n");
  ASSERT_TRUE(c.Send(Get("/fine")));
  r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "fine");
  server.Stop(Clock::now());
}

// ---- 2. Keep-alive -------------------------------------------------------------------------------

TEST(HttpServer, KeepAliveServesSeveralRequestsOnOneConnection) {
  std::atomic<int> n{0};
  Server server(ServerOptions{});
  server.Route("GET", "/count", [&](const Request&) -> Reply { return Text("call " + std::to_string(++n)); });
  const int port = ListenAndStart(server);
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send(Get("/count")));
  auto r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->body, "call 1");
  EXPECT_NE(Lower(r->Header("connection")), "close");

  ASSERT_TRUE(c.Send(Get("/count")));
  r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "call 2");

  // Two pipelined requests in one write are answered in order.
  ASSERT_TRUE(c.Send(Get("/count") + Get("/count")));
  r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->body, "call 3");
  r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->body, "call 4");

  // "Connection: close" is honoured: answered, then an orderly close.
  ASSERT_TRUE(c.Send(Get("/count", "Connection: close\r\n")));
  r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->body, "call 5");
  EXPECT_EQ(Lower(r->Header("connection")), "close");
  EXPECT_EQ(c.WaitClosed(5s), Client::Got::kEof) << c.error();
  EXPECT_EQ(c.rest(), "");
  server.Stop(Clock::now());
}

// ---- 3. Body limit -------------------------------------------------------------------------------

struct TooLargeCall {
  uint64_t size;
  uint64_t limit;
};

ServerOptions SmallBodyOptions(std::mutex* mu, std::vector<TooLargeCall>* calls) {
  ServerOptions options;
  options.max_body_bytes = 16;
  options.too_large = [mu, calls](uint64_t size, uint64_t limit) {
    std::lock_guard lock(*mu);
    calls->push_back({size, limit});
    return Response{.status = 413, .content_type = "text/plain", .body = "too large: " + std::to_string(size)};
  };
  return options;
}

TEST(HttpServer, DeclaredBodyOverTheLimitGetsTooLargeAndTheConnectionCloses) {
  std::mutex mu;
  std::vector<TooLargeCall> calls;
  std::atomic<int> handled{0};
  Server server(SmallBodyOptions(&mu, &calls));
  server.Route("POST", "/echo", [&](const Request& req) -> Reply {
    ++handled;
    return Text(req.body);
  });
  const int port = ListenAndStart(server);
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  // Only the head: the server must answer from Content-Length, without waiting for the body.
  ASSERT_TRUE(c.Send("POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 1000000\r\n\r\n"));
  const auto r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status_line, "HTTP/1.1 413 Payload Too Large");
  EXPECT_EQ(r->body, "too large: 1000000");
  EXPECT_EQ(Lower(r->Header("connection")), "close");
  EXPECT_EQ(c.WaitClosed(5s), Client::Got::kEof) << c.error();
  {
    std::lock_guard lock(mu);
    ASSERT_EQ(calls.size(), 1u);
    EXPECT_EQ(calls[0].size, 1000000u);
    EXPECT_EQ(calls[0].limit, 16u);
  }
  EXPECT_EQ(handled.load(), 0);
  server.Stop(Clock::now());
}

// What most clients do: send the head and the whole body at once without waiting (test_openai.py
// posts 5 MiB this way). The 413 must still reach them, not a reset.
TEST(HttpServer, BodyOverTheLimitSentWholeStillGetsTooLarge) {
  std::mutex mu;
  std::vector<TooLargeCall> calls;
  Server server(SmallBodyOptions(&mu, &calls));
  server.Route("POST", "/echo", [](const Request& req) -> Reply { return Text(req.body); });
  const int port = ListenAndStart(server);
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  const std::string body(1 << 20, 'a');
  // Sent from another thread: the server stops reading, so the send may block until it closes.
  // Raw send() on the descriptor, so the two threads share no Client state.
  std::jthread sender([fd = c.fd(), request = Post("/echo", body)] {
    std::string_view rest = request;
    while (!rest.empty()) {
      const ssize_t n = ::send(fd, rest.data(), rest.size(), MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return;  // the server closed (EPIPE or reset): expected once it has answered
      rest.remove_prefix(static_cast<size_t>(n));
    }
  });
  // Whatever happens below, a send still blocked ends when the socket is shut down.
  struct Unblock {
    int fd;
    std::jthread* sender;
    ~Unblock() {
      ::shutdown(fd, SHUT_RDWR);
      sender->join();
    }
  } unblock{c.fd(), &sender};
  const auto r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status, 413);
  EXPECT_EQ(r->body, "too large: 1048576");
}

TEST(HttpServer, ChunkedBodyOverTheLimitGetsTooLargeWithLimitPlusOne) {
  std::mutex mu;
  std::vector<TooLargeCall> calls;
  std::atomic<int> handled{0};
  Server server(SmallBodyOptions(&mu, &calls));
  server.Route("POST", "/echo", [&](const Request& req) -> Reply {
    ++handled;
    return Text(req.body);
  });
  const int port = ListenAndStart(server);
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  // No Content-Length: the size is only known once the 17th byte arrives.
  ASSERT_TRUE(
      c.Send("POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
             "11\r\n0123456789abcdefg\r\n0\r\n\r\n"));
  const auto r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status, 413);
  EXPECT_EQ(r->body, "too large: 17");
  {
    std::lock_guard lock(mu);
    ASSERT_EQ(calls.size(), 1u);
    EXPECT_EQ(calls[0].size, 17u);
    EXPECT_EQ(calls[0].limit, 16u);
  }
  EXPECT_EQ(handled.load(), 0);
  server.Stop(Clock::now());
}

TEST(HttpServer, BodyExactlyAtTheLimitIsServedWhole) {
  std::mutex mu;
  std::vector<TooLargeCall> calls;
  Server server(SmallBodyOptions(&mu, &calls));
  server.Route("POST", "/echo", [](const Request& req) -> Reply { return Text("got " + req.body); });
  const int port = ListenAndStart(server);
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send(Post("/echo", "0123456789abcdef")));  // 16 bytes
  auto r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "got 0123456789abcdef");
  // The same through chunks, and the connection is still usable.
  ASSERT_TRUE(
      c.Send("POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
             "6\r\nABCDEF\r\na\r\nGHIJKLMNOP\r\n0\r\n\r\n"));
  r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "got ABCDEFGHIJKLMNOP");
  std::lock_guard lock(mu);
  EXPECT_TRUE(calls.empty());
  server.Stop(Clock::now());
}

// ---- 4. Expect: 100-continue ---------------------------------------------------------------------

TEST(HttpServer, ExpectContinueGets100BeforeTheBodyIsSent) {
  Server server(ServerOptions{});
  server.Route("POST", "/echo", [](const Request& req) -> Reply { return Text("got " + req.body); });
  const int port = ListenAndStart(server);
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send("POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"));
  // The body is held back until the interim answer comes, as a real client would do.
  auto r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status_line, "HTTP/1.1 100 Continue");
  EXPECT_EQ(c.rest(), "");  // nothing else yet: the final answer needs the body
  ASSERT_TRUE(c.Send("hello"));
  r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status_line, "HTTP/1.1 200 OK");
  EXPECT_EQ(r->body, "got hello");
  server.Stop(Clock::now());
}

// ---- 5. Stream replies ---------------------------------------------------------------------------

TEST(HttpServer, StreamFedFromAnotherThreadIsSentChunkedInOrder) {
  FedServer fed("GET", "/events");
  auto& [feed, server, port] = fed;
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send(Get("/events")));
  // An "engine" thread: three pieces 20 ms apart, each announced through wake, then the end.
  std::jthread producer([feed] {
    Stream::Piece first = Data("one,");
    first.head = Response{.status = 201,
                          .content_type = "text/event-stream",
                          .body = "head:",
                          .headers = {{"Cache-Control", "no-cache"}}};
    feed->Push(std::move(first));
    std::this_thread::sleep_for(20ms);
    feed->Push(Data("two,"));
    std::this_thread::sleep_for(20ms);
    feed->Push(Data("three"));
    std::this_thread::sleep_for(20ms);
    feed->Push(Data("", /*end=*/true));
  });
  const auto r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status_line, "HTTP/1.1 201 Created");
  EXPECT_EQ(r->Header("content-type"), "text/event-stream");
  EXPECT_EQ(r->Header("cache-control"), "no-cache");
  EXPECT_TRUE(r->chunked);
  EXPECT_FALSE(r->Has("content-length"));
  EXPECT_EQ(r->body, "head:one,two,three");
  // One chunk per piece; the head's body goes out with the first piece.
  EXPECT_EQ(r->chunks, (std::vector<std::string>{"head:one,", "two,", "three"}));
  producer.join();

  // The connection is reusable after the last chunk (a fresh stream over the same feed).
  feed->ended = false;
  feed->Push(Data("again", /*end=*/true));
  ASSERT_TRUE(c.Send(Get("/events")));
  const auto r2 = c.Read();
  ASSERT_TRUE(r2) << c.error();
  EXPECT_EQ(r2->status, 200);
  EXPECT_EQ(r2->body, "again");
  EXPECT_EQ(feed->calls_after_end.load(), 0);
  EXPECT_FALSE(feed->aborted.load());
  server.Stop(Clock::now());
}

// HTTP/1.0 has no chunked encoding (RFC 9112 6.1): a streamed answer goes out as it is, without
// Transfer-Encoding, and the end of the connection ends it.
TEST(HttpServer, StreamToAnHttp10ClientIsNotChunkedAndEndsWithTheConnection) {
  FedServer fed("GET", "/events");
  auto& [feed, server, port] = fed;
  ASSERT_GT(port, 0);
  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send("GET /events HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
  std::jthread producer([feed] {
    Stream::Piece first = Data("one,");
    first.head = Response{.status = 200, .content_type = "text/event-stream", .body = "head:"};
    feed->Push(std::move(first));
    std::this_thread::sleep_for(20ms);
    feed->Push(Data("two", /*end=*/true));
  });
  const auto r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_FALSE(r->chunked);
  EXPECT_FALSE(r->Has("transfer-encoding"));
  EXPECT_FALSE(r->Has("content-length"));
  EXPECT_EQ(r->body, "head:one,two");
  EXPECT_FALSE(feed->aborted.load());
  server.Stop(Clock::now());
}

// HEAD is answered by the GET route (RFC 9110 9.3.2): the same status and headers, Content-Length
// included, and no body; the connection goes on.
TEST(HttpServer, HeadIsTheGetAnswerWithoutItsBody) {
  Server server(ServerOptions{});
  server.Route("GET", "/x", [](const Request&) -> Reply { return Text("hello"); });
  const int port = ListenAndStart(server);
  ASSERT_GT(port, 0);
  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send("HEAD /x HTTP/1.1\r\nHost: t\r\n\r\n" + Get("/x")));
  std::string raw;
  const auto deadline = Clock::now() + 5s;
  while (raw.find("hello") == std::string::npos && Clock::now() < deadline) {
    pollfd p{.fd = c.fd(), .events = POLLIN, .revents = 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    char buf[4096];
    const ssize_t n = ::recv(c.fd(), buf, sizeof buf, 0);
    if (n <= 0) break;
    raw.append(buf, static_cast<size_t>(n));
  }
  const size_t second = raw.find("HTTP/1.1 200", 1);
  ASSERT_NE(second, std::string::npos) << raw;
  const std::string head = raw.substr(0, second);
  EXPECT_EQ(head.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << head;
  EXPECT_NE(Lower(head).find("content-length: 5\r\n"), std::string::npos) << head;
  EXPECT_EQ(head.substr(head.size() - 4), "\r\n\r\n") << "the HEAD answer carried a body: " << head;
  EXPECT_EQ(raw.substr(raw.size() - 5), "hello");
  server.Stop(Clock::now());
}

TEST(HttpServer, StreamWhoseFirstPieceEndsIsAPlainResponseWithContentLength) {
  FedServer fed("POST", "/complete");
  auto& [feed, server, port] = fed;
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send(Post("/complete", "{}")));
  // The stream is pending at first (Next returns false); the whole answer comes later at once.
  ASSERT_TRUE(WaitFor([&] { return feed->started.load(); }, 5s));
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(server.in_flight(), 1);
  std::jthread producer([feed] {
    Stream::Piece whole = Data("\"text\":\"hi\"}", /*end=*/true);
    whole.head = Response{.status = 202, .content_type = "application/json", .body = "{\"id\":1,"};
    feed->Push(std::move(whole));
  });
  const auto r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status_line, "HTTP/1.1 202 Accepted");
  EXPECT_FALSE(r->chunked);
  EXPECT_FALSE(r->Has("transfer-encoding"));
  EXPECT_EQ(r->Header("content-type"), "application/json");
  const std::string want = R"({"id":1,"text":"hi"})";
  EXPECT_EQ(r->Header("content-length"), std::to_string(want.size()));
  EXPECT_EQ(r->body, want);
  EXPECT_TRUE(WaitFor([&] { return server.in_flight() == 0; }, 5s));
  server.Stop(Clock::now());
  EXPECT_FALSE(feed->aborted.load());
  EXPECT_EQ(feed->calls_after_end.load(), 0);
}

// ---- 6. Idle timeout -----------------------------------------------------------------------------

ServerOptions ShortIdle() {
  ServerOptions options;
  options.idle_timeout = 500ms;
  return options;
}

TEST(HttpServer, ConnectionIdleForLessThanTheTimeoutIsServed) {
  Server server(ShortIdle());
  server.Route("GET", "/x", [](const Request&) -> Reply { return Text("x"); });
  const int port = ListenAndStart(server);
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  std::this_thread::sleep_for(100ms);
  ASSERT_TRUE(c.Send(Get("/x")));
  auto r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->body, "x");
  // The timeout restarts for every request: five more 100 ms pauses add up to well over 500 ms.
  for (int i = 0; i < 5; ++i) {
    std::this_thread::sleep_for(100ms);
    ASSERT_TRUE(c.Send(Get("/x"))) << "request " << i;
    r = c.Read();
    ASSERT_TRUE(r) << "request " << i << ": " << c.error();
    EXPECT_EQ(r->body, "x");
  }
  server.Stop(Clock::now());
}

TEST(HttpServer, ConnectionIdleForLongerThanTheTimeoutIsClosedByTheServer) {
  Server server(ShortIdle());
  server.Route("GET", "/x", [](const Request&) -> Reply { return Text("x"); });
  const int port = ListenAndStart(server);
  ASSERT_GT(port, 0);

  // A fresh connection that never sends anything.
  {
    const auto t0 = Clock::now();
    Client c(port);
    ASSERT_TRUE(c.connected()) << c.error();
    EXPECT_EQ(c.WaitClosed(3s), Client::Got::kEof) << c.error();
    const auto took = Clock::now() - t0;
    EXPECT_GE(took, 450ms);  // not before the timeout (timers never fire early; 50 ms for the accept)
    EXPECT_LT(took, 3s);
    EXPECT_EQ(c.rest(), "");
  }
  // After one answered request, the wait for the next one is bounded the same way.
  {
    Client c(port);
    ASSERT_TRUE(c.connected()) << c.error();
    ASSERT_TRUE(c.Send(Get("/x")));
    const auto r = c.Read();
    ASSERT_TRUE(r) << c.error();
    EXPECT_EQ(r->body, "x");
    const auto t0 = Clock::now();
    EXPECT_EQ(c.WaitClosed(3s), Client::Got::kEof) << c.error();
    EXPECT_LT(Clock::now() - t0, 3s);
  }
  // A request that never finishes arriving (a slow or stuck client) is cut off too.
  {
    Client c(port);
    ASSERT_TRUE(c.connected()) << c.error();
    ASSERT_TRUE(c.Send("GET /x HTTP/1.1\r\nHost: te"));
    const auto t0 = Clock::now();
    EXPECT_EQ(c.WaitClosed(3s), Client::Got::kEof) << c.error();
    EXPECT_LT(Clock::now() - t0, 3s);
  }
  // Idle for twice the timeout: the connection is found already closed.
  {
    Client c(port);
    ASSERT_TRUE(c.connected()) << c.error();
    std::this_thread::sleep_for(1s);
    EXPECT_EQ(c.WaitClosed(100ms), Client::Got::kEof) << c.error();
  }
  server.Stop(Clock::now());
}

TEST(HttpServer, StreamLeftUnreadIsCutOffAfterTheIdleTimeout) {
  auto feed = std::make_shared<Feed>();
  Server server(ShortIdle());
  server.Route("GET", "/flood", [feed](const Request&) -> Reply { return std::make_unique<EndlessStream>(feed); });
  const int port = ListenAndStart(server);
  ASSERT_GT(port, 0);

  // The client asks and never reads: once the socket buffers are full a write waits, and after
  // 300 ms without progress the server gives up on the connection and aborts the stream.
  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send(Get("/flood")));
  ASSERT_TRUE(WaitFor([&] { return feed->started.load(); }, 5s));
  EXPECT_TRUE(WaitFor([&] { return feed->aborted.load(); }, 5s)) << "a reader that stalls holds the stream forever";
  EXPECT_TRUE(WaitFor([&] { return server.in_flight() == 0; }, 2s));
  server.Stop(Clock::now());
  EXPECT_EQ(feed->aborts.load(), 1);
}

// ---- 7. Client disconnects -----------------------------------------------------------------------

TEST(HttpServer, ClientClosingWhileAStreamIsPendingAbortsTheStream) {
  FedServer fed("GET", "/never");
  auto& [feed, server, port] = fed;
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send(Get("/never")));
  ASSERT_TRUE(WaitFor([&] { return feed->started.load(); }, 5s));
  ASSERT_TRUE(WaitFor([&] { return server.in_flight() == 1; }, 5s));
  // Still pending a while later: nothing is aborted while the client waits.
  std::this_thread::sleep_for(200ms);
  EXPECT_FALSE(feed->aborted.load());

  c.Close();
  EXPECT_TRUE(WaitFor([&] { return feed->aborted.load(); }, 2s)) << "Abort not called within 2 s of the close";
  EXPECT_TRUE(WaitFor([&] { return server.in_flight() == 0; }, 2s));
  server.Stop(Clock::now());
  EXPECT_EQ(feed->aborts.load(), 1);
}

TEST(HttpServer, ClientClosingAfterAStreamStartedAbortsTheStream) {
  FedServer fed("GET", "/events");
  auto& [feed, server, port] = fed;
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send(Get("/events")));
  feed->Push(Data("first"));
  // Read the head and the first chunk, then leave without waiting for the end.
  ASSERT_TRUE(c.ReadUntil("5\r\nfirst\r\n", 5s)) << c.error() << ": " << c.rest();
  c.Close();
  EXPECT_TRUE(WaitFor([&] { return feed->aborted.load(); }, 2s));
  EXPECT_TRUE(WaitFor([&] { return server.in_flight() == 0; }, 2s));
  server.Stop(Clock::now());
  EXPECT_EQ(feed->aborts.load(), 1);
}

TEST(HttpServer, StreamThatEndsNormallyIsNeverAborted) {
  FedServer fed("GET", "/events");
  auto& [feed, server, port] = fed;
  ASSERT_GT(port, 0);
  {
    Client c(port);
    ASSERT_TRUE(c.connected()) << c.error();
    ASSERT_TRUE(c.Send(Get("/events")));
    std::jthread producer([feed] {
      feed->Push(Data("a"));
      std::this_thread::sleep_for(20ms);
      feed->Push(Data("b", /*end=*/true));
    });
    const auto r = c.Read();
    ASSERT_TRUE(r) << c.error();
    EXPECT_EQ(r->body, "ab");
    ASSERT_TRUE(WaitFor([&] { return server.in_flight() == 0; }, 5s));
    // The client leaving after the end is no reason to abort either.
  }
  std::this_thread::sleep_for(200ms);
  server.Stop(Clock::now());
  EXPECT_TRUE(feed->ended.load());
  EXPECT_FALSE(feed->aborted.load());
  EXPECT_EQ(feed->calls_after_end.load(), 0);
}

// ---- 8. Stop -------------------------------------------------------------------------------------

TEST(HttpServer, StopWaitsForAStreamInFlightToEndBeforeTheDeadline) {
  FedServer fed("GET", "/events");
  auto& [feed, server, port] = fed;
  ASSERT_GT(port, 0);
  EXPECT_EQ(server.in_flight(), 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send(Get("/events")));
  feed->Push(Data("before stop,"));
  ASSERT_TRUE(c.ReadUntil("before stop,", 5s)) << c.error();
  EXPECT_EQ(server.in_flight(), 1);  // a pending Stream is one response in flight

  // The rest comes 200 ms after Stop is called; the deadline is 2 s away.
  std::jthread producer([feed] {
    std::this_thread::sleep_for(200ms);
    feed->Push(Data("after stop"));
    feed->Push(Data("", /*end=*/true));
  });
  const auto t0 = Clock::now();
  server.Stop(t0 + 2s);
  const auto took = Clock::now() - t0;
  EXPECT_GE(took, 190ms);  // it waited for the stream ...
  EXPECT_LT(took, 2s);     // ... and no longer than needed
  EXPECT_EQ(server.in_flight(), 0);

  const auto r = c.Read();
  ASSERT_TRUE(r) << c.error();
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "before stop,after stop");
  EXPECT_EQ(r->chunks, (std::vector<std::string>{"before stop,", "after stop"}));
  EXPECT_FALSE(feed->aborted.load());
}

TEST(HttpServer, StopGivesUpOnAStreamAtTheDeadline) {
  auto feed = std::make_shared<Feed>();
  std::optional<Server> server(std::in_place, ServerOptions{});
  server->Route("GET", "/never", StreamHandler(feed));
  const int port = ListenAndStart(*server);
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send(Get("/never")));
  ASSERT_TRUE(WaitFor([&] { return server->in_flight() == 1; }, 5s));
  const auto t0 = Clock::now();
  server->Stop(t0 + 300ms);
  const auto took = Clock::now() - t0;
  EXPECT_GE(took, 290ms);  // it waited for the deadline ...
  EXPECT_LT(took, 2s);     // ... and gave up there
  // By the time the server is gone the stream has been aborted, once, and the client sees its
  // connection end without an answer.
  server.reset();
  EXPECT_EQ(feed->aborts.load(), 1);
  EXPECT_NE(c.WaitClosed(3s), Client::Got::kTimeout) << "the connection outlived the server";
  EXPECT_EQ(c.rest(), "");
}

// Stop itself, not the Server's destruction, closes the connections left at the deadline and
// aborts their streams: the engine must not go on generating for a client nobody serves.
TEST(HttpServer, StopClosesConnectionsAndAbortsStreamsBeforeItReturns) {
  FedServer fed("GET", "/never");
  auto& [feed, server, port] = fed;
  ASSERT_GT(port, 0);

  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send(Get("/never")));
  ASSERT_TRUE(WaitFor([&] { return server.in_flight() == 1; }, 5s));
  server.Stop(Clock::now() + 100ms);
  EXPECT_EQ(feed->aborts.load(), 1);
  EXPECT_NE(c.WaitClosed(3s), Client::Got::kTimeout) << "the connection is still open after Stop";
}

// A Stream's owner may keep its wake function past the Server (the engine thread may hold a copy
// while the front-end goes away): calling it then does nothing, and destroying it touches nothing
// of the gone io_context (AddressSanitizer in CI checks the second).
TEST(HttpServer, AWakeKeptPastTheServerIsHarmlessToCallAndToDestroy) {
  auto feed = std::make_shared<Feed>();
  auto server = std::make_unique<Server>(ServerOptions{});
  server->Route("GET", "/never", StreamHandler(feed));
  const int port = ListenAndStart(*server);
  ASSERT_GT(port, 0);
  Client c(port);
  ASSERT_TRUE(c.connected()) << c.error();
  ASSERT_TRUE(c.Send(Get("/never")));
  ASSERT_TRUE(WaitFor([&] { return feed->started.load(); }, 5s));
  std::function<void()> kept;
  {
    std::lock_guard lock(feed->mu);
    kept = feed->wake;
  }
  ASSERT_TRUE(kept);
  server->Stop(Clock::now());
  server.reset();
  EXPECT_EQ(feed->aborts.load(), 1);
  kept();          // after the server: nothing happens
  kept = nullptr;  // and its last copy goes
}

TEST(HttpServer, StopRefusesNewConnections) {
  Server server(ServerOptions{});
  server.Route("GET", "/x", [](const Request&) -> Reply { return Text("x"); });
  const int port = ListenAndStart(server);
  ASSERT_GT(port, 0);
  server.Stop(Clock::now());
  server.Stop(Clock::now());  // idempotent
  // Either the connect is refused or the connection ends at once without an answer; a client
  // must not be left waiting on a listening socket nobody accepts from.
  Client c(port);
  if (c.connected()) {
    c.Send(Get("/x"));
    EXPECT_NE(c.WaitClosed(3s), Client::Got::kTimeout) << "connected after Stop and left hanging";
    EXPECT_EQ(c.rest(), "");
  }
}

// ---- 9. TLS --------------------------------------------------------------------------------------

bool Have(const char* tool) {
  return std::system((std::string("command -v ") + tool + " >/dev/null 2>&1").c_str()) == 0;
}

// Runs `command` and returns what it printed on stdout.
std::string Capture(const std::string& command) {
  std::string out;
  FILE* p = ::popen(command.c_str(), "r");
  if (p == nullptr) return out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  ::pclose(p);
  return out;
}

// A temporary directory removed with the object.
struct TempDir {
  TempDir() {
    std::string templ = (std::filesystem::temp_directory_path() / "kraken_http_test_XXXXXX").string();
    if (::mkdtemp(templ.data()) != nullptr) path = templ;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path.empty()) std::filesystem::remove_all(path, ec);
  }
  std::string path;
};

TEST(HttpServer, ServesHttpsWithACertificateAndKeyFromFiles) {
  if (!Have("openssl") || !Have("curl")) GTEST_SKIP() << "needs the openssl and curl command-line tools";
  TempDir dir;
  ASSERT_FALSE(dir.path.empty());
  const std::string cert = dir.path + "/cert.pem", key = dir.path + "/key.pem";
  ASSERT_EQ(std::system(("openssl req -x509 -newkey rsa:2048 -nodes -keyout " + key + " -out " + cert +
                         " -days 1 -subj /CN=localhost >/dev/null 2>&1")
                            .c_str()),
            0);

  auto feed = std::make_shared<Feed>();
  ServerOptions options;
  options.tls = TlsFiles{.cert_chain = cert, .private_key = key};
  Server server(options);
  server.Route("GET", "/x", [](const Request&) -> Reply { return Text("secret handler body"); });
  server.Route("GET", "/events", StreamHandler(feed));
  const int port = ListenAndStart(server);
  ASSERT_GT(port, 0);

  const std::string url = "https://127.0.0.1:" + std::to_string(port);
  EXPECT_EQ(Capture("curl -s -k --max-time 10 " + url + "/x"), "secret handler body");
  // A chunked stream over TLS, ended by a producer thread.
  std::jthread producer([feed] {
    std::this_thread::sleep_for(50ms);
    feed->Push(Data("tls "));
    std::this_thread::sleep_for(20ms);
    feed->Push(Data("stream", /*end=*/true));
  });
  EXPECT_EQ(Capture("curl -s -k --max-time 10 " + url + "/events"), "tls stream");
  producer.join();
  // Plain HTTP on the TLS port gets no answer.
  EXPECT_EQ(Capture("curl -s --max-time 5 http://127.0.0.1:" + std::to_string(port) + "/x"), "");
  server.Stop(Clock::now());
  EXPECT_FALSE(feed->aborted.load());

  // A readable certificate with a missing key names the key file.
  ServerOptions no_key;
  no_key.tls = TlsFiles{.cert_chain = cert, .private_key = dir.path + "/missing-key.pem"};
  Server bad(no_key);
  const StatusOr<int> r = bad.Listen("127.0.0.1", 0);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find(dir.path + "/missing-key.pem"), std::string_view::npos) << r.status();
}

TEST(HttpServer, ListenNamesAMissingCertificateFile) {
  ServerOptions options;
  options.tls = TlsFiles{.cert_chain = "/nonexistent/kraken/cert.pem", .private_key = "/nonexistent/kraken/key.pem"};
  Server server(options);
  const StatusOr<int> r = server.Listen("127.0.0.1", 0);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("/nonexistent/kraken/cert.pem"), std::string_view::npos) << r.status();
}

TEST(HttpServer, ListenOnAPortInUseIsUnavailable) {
  Server first(ServerOptions{});
  const StatusOr<int> port = first.Listen("127.0.0.1", 0);
  ASSERT_TRUE(port.ok()) << port.status();
  Server second(ServerOptions{});
  const StatusOr<int> r = second.Listen("127.0.0.1", *port);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(r.status().message().find("127.0.0.1:" + std::to_string(*port)), std::string_view::npos) << r.status();
}

TEST(HttpServer, ReasonPhrases) {
  EXPECT_EQ(ReasonPhrase(200), "OK");
  EXPECT_EQ(ReasonPhrase(404), "Not Found");
  EXPECT_EQ(ReasonPhrase(413), "Payload Too Large");
  EXPECT_EQ(ReasonPhrase(799), "Unknown");
}

}  // namespace
}  // namespace kraken::http
