#include "http/server.h"

#include <sys/socket.h>

#include <spdlog/spdlog.h>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>

#include <algorithm>
#include <cctype>
#include <mutex>
#include <optional>

namespace kraken::http {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace bhttp = beast::http;
using tcp = net::ip::tcp;
using boost::system::error_code;

constexpr auto kAwait = net::use_awaitable;

std::string Lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return std::tolower(c); });
  return out;
}

Response PlainText(int status, std::string body) {
  return Response{.status = status, .content_type = "text/plain; charset=utf-8", .body = std::move(body)};
}

// What wakes a connection that waits for its Stream: the Stream's wake (any thread) and the
// socket watcher (the connection's strand). The flag closes the window between a Next that found
// nothing and the wait: a wake in between is seen by the flag, one after by the timer.
struct Waker {
  explicit Waker(const net::any_io_executor& ex) : timer(ex) {}
  net::steady_timer timer;
  std::atomic<bool> woken{false};
  bool client_gone = false;  // strand only
  bool watching = false;     // strand only: a socket watch is pending
};

// Lets wakes through while the server's io_context exists. A Stream's wake may be called from any
// thread at any time, even after the Server is gone (the Stream's owner may keep the function);
// Stop closes the gate, under the mutex, before it destroys the io_context.
struct WakeGate {
  std::mutex mu;
  bool open = true;
};

// Bytes and time a connection spends reading what a refused client still sends, before closing,
// so that the client reads the refusal instead of a reset (a "lingering close", as nginx does).
constexpr size_t kLingerBytes = 64 << 20;
constexpr auto kLingerTime = std::chrono::seconds(2);

// What reading one request came to.
enum class ReadResult { kRequest, kClosed, kRefused };

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// The refusal a request head earns by its framing (RFC 9112 section 6), or nothing. The body's
// end must be unambiguous, or the bytes after it could be read as another request (request
// smuggling): Transfer-Encoding may only be a lone "chunked" (a final coding other than chunked:
// 400, section 6.1; chunked after a coding this server does not decode: 501), and never beside
// Content-Length (section 6.1 lets a server refuse that; it must close the connection either way).
template <class Header>
std::optional<Response> FramingRefusal(const Header& head) {
  std::vector<std::string> codings;
  for (const auto& field : head) {
    if (field.name() != bhttp::field::transfer_encoding) continue;
    std::string_view value(field.value().data(), field.value().size());
    while (true) {
      const size_t comma = value.find(',');
      codings.emplace_back(Lower(Trim(value.substr(0, comma))));
      if (comma == std::string_view::npos) break;
      value.remove_prefix(comma + 1);
    }
  }
  if (codings.empty()) return std::nullopt;
  if (head.version() < 11)  // HTTP/1.0 has no transfer codings: its framing is faulty (section 6.1)
    return PlainText(400, "malformed HTTP request: Transfer-Encoding in an HTTP/1.0 request (RFC 9112 section 6.1)\n");
  std::string listed;
  for (const std::string& c : codings) listed += (listed.empty() ? "" : ", ") + c;
  if (head.count(bhttp::field::content_length) > 0)
    return PlainText(400, "malformed HTTP request: Transfer-Encoding ('" + listed +
                              "') and Content-Length together (RFC 9112 section 6.1)\n");
  if (codings.back() != "chunked")
    return PlainText(400, "malformed HTTP request: Transfer-Encoding '" + listed +
                              "' does not end in chunked, so the body's length is unknown (RFC 9112 section 6.1)\n");
  if (codings.size() > 1)
    return PlainText(501, "Transfer-Encoding '" + listed + "' is not supported: only 'chunked' alone is\n");
  return std::nullopt;
}

// Calls Abort on a Stream that did not reach its end when the connection lets go of it (the
// client left, a write failed, or the server stopped).
struct AbortUnlessEnded {
  Stream* stream;
  bool ended = false;
  ~AbortUnlessEnded() {
    if (!ended) stream->Abort();
  }
};

}  // namespace

struct Server::Impl {
  explicit Impl(ServerOptions o)
      : options(std::move(o)), ioc(std::make_unique<net::io_context>()), work(net::make_work_guard(*ioc)) {}

  ServerOptions options;
  // Destroyed by Stop, which destroys every connection (and aborts its Stream) with it.
  std::unique_ptr<net::io_context> ioc;
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work;
  std::shared_ptr<WakeGate> gate = std::make_shared<WakeGate>();
  std::optional<net::ssl::context> ssl;
  std::map<std::string, std::map<std::string, Handler>> routes;  // path -> method -> handler
  std::vector<std::shared_ptr<tcp::acceptor>> acceptors;
  std::vector<std::thread> threads;
  std::atomic<int> in_flight{0};
  std::atomic<bool> stopping{false};
  std::once_flag stopped;

  Reply Dispatch(const Request& req);
  net::awaitable<void> AcceptLoop(std::shared_ptr<tcp::acceptor> acceptor);
  template <class S>
  net::awaitable<void> Session(S stream);
  template <class S>
  net::awaitable<ReadResult> ReadRequest(S& stream, beast::flat_buffer& buffer, Request* req, bool* keep_alive);
  template <class S>
  net::awaitable<void> Refuse(S& stream, Response r);
  template <class S>
  net::awaitable<void> Close(S& stream);
  template <class S>
  net::awaitable<bool> Serve(S& stream, const Request& req, bool keep_alive);
  template <class S>
  net::awaitable<bool> WriteResponse(S& stream, Response r, bool keep_alive, bool head_only = false);
  template <class S>
  net::awaitable<bool> WriteStream(S& stream, Stream& body, bool keep_alive, bool chunked);
  void Watch(tcp::socket& socket, const std::shared_ptr<Waker>& waker);
};

std::string_view Request::Header(std::string_view name) const {
  for (const auto& [k, v] : headers)
    if (k == name) return v;
  return {};
}

Reply Server::Impl::Dispatch(const Request& req) {
  auto path = routes.find(req.path);
  if (path == routes.end()) {
    return options.not_routed ? options.not_routed(404, req) : PlainText(404, "not found\n");
  }
  // HEAD is GET without the body (RFC 9110 9.3.2).
  auto method = path->second.find(req.method == "HEAD" ? std::string("GET") : req.method);
  if (method == path->second.end()) {
    Response r = options.not_routed ? options.not_routed(405, req) : PlainText(405, "method not allowed\n");
    std::string allow;
    for (const auto& [m, h] : path->second) allow += (allow.empty() ? "" : ", ") + m;
    r.headers.emplace_back("Allow", allow);
    return r;
  }
  try {
    return method->second(req);
  } catch (const std::exception& e) {  // a handler bug: this request fails, the server goes on
    spdlog::error("HTTP handler for {} {} threw: {}", req.method, req.path, e.what());
    return PlainText(500, "internal error\n");
  }
}

// Waits for the client's side of the socket to become readable while a response is pending: end
// of stream or an error means the client has gone. Bytes (a pipelined request, a TLS alert) end
// the watch without a verdict; the next write decides then.
void Server::Impl::Watch(tcp::socket& socket, const std::shared_ptr<Waker>& waker) {
  waker->watching = true;
  socket.async_wait(tcp::socket::wait_read, [waker, fd = socket.native_handle()](const error_code& ec) {
    waker->watching = false;
    if (ec) return;  // cancelled: the response ended
    char c;
    const ssize_t n = ::recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
      waker->client_gone = true;
      waker->timer.cancel();
    }
  });
}

namespace {

// The status line and headers of `r` on `res` (any body type).
template <class Body>
void SetHead(bhttp::response<Body>& res, const Response& r, bool keep_alive) {
  res.result(static_cast<bhttp::status>(r.status));
  res.version(11);
  res.set(bhttp::field::content_type, r.content_type);
  for (const auto& [k, v] : r.headers) res.set(k, v);
  res.keep_alive(keep_alive);
}

}  // namespace

template <class S>
net::awaitable<bool> Server::Impl::WriteResponse(S& stream, Response r, bool keep_alive, bool head_only) {
  bhttp::response<bhttp::string_body> res;
  SetHead(res, r, keep_alive);
  res.body() = std::move(r.body);
  res.prepare_payload();
  error_code ec;
  beast::get_lowest_layer(stream).expires_after(options.idle_timeout);
  if (head_only) {  // HEAD: the GET answer's headers, Content-Length included, and no body
    bhttp::response_serializer<bhttp::string_body> sr{res};
    co_await bhttp::async_write_header(stream, sr, net::redirect_error(kAwait, ec));
  } else {
    co_await bhttp::async_write(stream, res, net::redirect_error(kAwait, ec));
  }
  co_return !ec;
}

// `chunked` false (an HTTP/1.0 client, which knows no chunked encoding): the body goes out as it
// is and the end of the response is the end of the connection.
template <class S>
net::awaitable<bool> Server::Impl::WriteStream(S& stream, Stream& body, bool keep_alive, bool chunked) {
  auto& tcp_stream = beast::get_lowest_layer(stream);
  auto waker = std::make_shared<Waker>(tcp_stream.get_executor());
  AbortUnlessEnded guard{&body};
  // The wake function holds nothing of the io_context (no executor copy): its owner may keep it,
  // and destroy it, after the Server is gone. Under the gate the io_context still exists.
  body.Start([w = std::weak_ptr<Waker>(waker), gate = gate] {
    std::lock_guard<std::mutex> l(gate->mu);
    if (!gate->open) return;
    if (auto live = w.lock()) {
      live->woken.store(true);
      net::post(live->timer.get_executor(), [live] { live->timer.cancel(); });
    }
  });
  Watch(tcp_stream.socket(), waker);
  bool started = false;
  error_code ec;
  while (true) {
    waker->woken.store(false);
    Stream::Piece piece;
    if (!body.Next(&piece)) {
      if (waker->client_gone) break;
      if (waker->woken.load()) continue;
      waker->timer.expires_at(net::steady_timer::time_point::max());
      co_await waker->timer.async_wait(net::redirect_error(kAwait, ec));
      if (waker->client_gone) break;
      continue;
    }
    std::string data = std::move(piece.data);
    if (!started) {
      Response head = piece.head.value_or(Response{});
      data = head.body + data;
      if (piece.end) {  // the whole answer at once: a plain response
        guard.ended = true;
        if (waker->watching) tcp_stream.socket().cancel();
        head.body = std::move(data);
        co_return co_await WriteResponse(stream, std::move(head), keep_alive);
      }
      bhttp::response<bhttp::empty_body> res;
      SetHead(res, head, keep_alive && chunked);
      res.chunked(chunked);
      bhttp::response_serializer<bhttp::empty_body> sr{res};
      tcp_stream.expires_after(options.idle_timeout);
      co_await bhttp::async_write_header(stream, sr, net::redirect_error(kAwait, ec));
      if (ec) break;
      started = true;
    }
    if (!data.empty()) {
      tcp_stream.expires_after(options.idle_timeout);
      if (chunked)
        co_await net::async_write(stream, bhttp::make_chunk(net::buffer(data)), net::redirect_error(kAwait, ec));
      else
        co_await net::async_write(stream, net::buffer(data), net::redirect_error(kAwait, ec));
      if (ec) break;
    }
    if (piece.end) {
      guard.ended = true;
      if (chunked) {
        tcp_stream.expires_after(options.idle_timeout);
        co_await net::async_write(stream, bhttp::make_chunk_last(), net::redirect_error(kAwait, ec));
      }
      break;
    }
  }
  if (waker->watching) tcp_stream.socket().cancel();
  co_return guard.ended && !ec && !waker->client_gone && chunked;
}

// Answers one request; false when the connection must close afterwards.
template <class S>
net::awaitable<bool> Server::Impl::Serve(S& stream, const Request& req, bool keep_alive) {
  in_flight.fetch_add(1);
  const bool head = req.method == "HEAD";
  Reply reply = Dispatch(req);
  bool ok;
  if (auto* r = std::get_if<Response>(&reply)) {
    ok = co_await WriteResponse(stream, std::move(*r), keep_alive, head);
  } else if (head) {  // a streamed GET has no headers to give ahead of its body
    std::get<std::unique_ptr<Stream>>(reply)->Abort();
    ok = co_await WriteResponse(stream, PlainText(405, ""), keep_alive, true);
  } else {
    ok = co_await WriteStream(stream, *std::get<std::unique_ptr<Stream>>(reply), keep_alive, req.version >= 11);
  }
  in_flight.fetch_sub(1);
  co_return ok;
}

// Answers a request refused before its body was read (413, 400) and closes the connection after
// reading what the client still sends, for at most kLingerTime and kLingerBytes.
template <class S>
net::awaitable<void> Server::Impl::Refuse(S& stream, Response r) {
  if (!co_await WriteResponse(stream, std::move(r), /*keep_alive=*/false)) co_return;
  auto& tcp_stream = beast::get_lowest_layer(stream);
  error_code ec;
  if constexpr (std::is_same_v<S, beast::tcp_stream>) stream.socket().shutdown(tcp::socket::shutdown_send, ec);
  tcp_stream.expires_after(kLingerTime);
  std::vector<char> sink(64 << 10);
  for (size_t total = 0; total < kLingerBytes;) {
    const size_t n = co_await stream.async_read_some(net::buffer(sink), net::redirect_error(kAwait, ec));
    if (ec) break;
    total += n;
  }
}

// Reads one request's head and body into `req`. kClosed: the client closed or went quiet; kRefused:
// the request was answered with an error (and the connection must close).
template <class S>
net::awaitable<ReadResult> Server::Impl::ReadRequest(S& stream, beast::flat_buffer& buffer, Request* req,
                                                     bool* keep_alive) {
  auto& tcp_stream = beast::get_lowest_layer(stream);
  error_code ec;
  bhttp::request_parser<bhttp::string_body> parser;
  // No limit while the head is read: Beast fails a Content-Length over the limit inside
  // async_read_header (error::body_limit), which would make it a 400 before the 413 below could
  // answer it. The limit is set once the head is in, for bodies of undeclared size (chunked).
  parser.body_limit(boost::none);
  tcp_stream.expires_after(options.idle_timeout);
  co_await bhttp::async_read_header(stream, buffer, parser, net::redirect_error(kAwait, ec));
  if (ec == bhttp::error::end_of_stream || ec == beast::error::timeout || ec == net::error::eof)
    co_return ReadResult::kClosed;
  if (ec) {
    co_await Refuse(stream, PlainText(400, "malformed HTTP request: " + ec.message() + "\n"));
    co_return ReadResult::kRefused;
  }
  if (std::optional<Response> bad = FramingRefusal(parser.get())) {
    co_await Refuse(stream, std::move(*bad));
    co_return ReadResult::kRefused;
  }
  auto too_large = [&](uint64_t size) {
    return options.too_large ? options.too_large(size, options.max_body_bytes)
                             : PlainText(413, "request body too large\n");
  };
  const boost::optional<uint64_t> length = parser.content_length();
  if (length && *length > options.max_body_bytes) {
    co_await Refuse(stream, too_large(*length));
    co_return ReadResult::kRefused;
  }
  parser.body_limit(options.max_body_bytes);
  if (beast::iequals(parser.get()[bhttp::field::expect], "100-continue")) {
    bhttp::response<bhttp::empty_body> cont{bhttp::status::continue_, 11};
    co_await bhttp::async_write(stream, cont, net::redirect_error(kAwait, ec));
    if (ec) co_return ReadResult::kClosed;
  }
  co_await bhttp::async_read(stream, buffer, parser, net::redirect_error(kAwait, ec));
  if (ec == bhttp::error::body_limit) {
    co_await Refuse(stream, too_large(options.max_body_bytes + 1));
    co_return ReadResult::kRefused;
  }
  if (ec && ec.category() == bhttp::make_error_code(bhttp::error::bad_chunk).category() &&
      ec != bhttp::error::end_of_stream && ec != bhttp::error::partial_message) {
    // A malformed body (a bad chunk size or extension, a chunk that does not end where it said):
    // its end is unknown, so nothing after it on this connection can be trusted.
    co_await Refuse(stream, PlainText(400, "malformed HTTP request body: " + ec.message() + "\n"));
    co_return ReadResult::kRefused;
  }
  if (ec) co_return ReadResult::kClosed;
  auto& msg = parser.get();
  req->method = std::string(msg.method_string());
  const std::string_view target = msg.target();
  const size_t q = target.find('?');
  req->path = std::string(target.substr(0, q));
  if (q != std::string_view::npos) req->query = std::string(target.substr(q + 1));
  for (const auto& field : msg) req->headers.emplace_back(Lower(field.name_string()), std::string(field.value()));
  req->body = std::move(msg.body());
  req->version = static_cast<int>(msg.version());
  *keep_alive = msg.keep_alive();
  co_return ReadResult::kRequest;
}

template <class S>
net::awaitable<void> Server::Impl::Close(S& stream) {
  error_code ec;
  if constexpr (std::is_same_v<S, beast::tcp_stream>) {
    stream.socket().shutdown(tcp::socket::shutdown_send, ec);
  } else {
    beast::get_lowest_layer(stream).expires_after(std::chrono::seconds(2));
    co_await stream.async_shutdown(net::redirect_error(kAwait, ec));
  }
}

// One connection: TLS handshake when configured, then requests one after another while the client
// keeps the connection alive.
template <class S>
net::awaitable<void> Server::Impl::Session(S stream) {
  beast::flat_buffer buffer;
  if constexpr (!std::is_same_v<S, beast::tcp_stream>) {
    error_code ec;
    beast::get_lowest_layer(stream).expires_after(options.idle_timeout);
    co_await stream.async_handshake(net::ssl::stream_base::server, net::redirect_error(kAwait, ec));
    if (ec) co_return;
  }
  while (!stopping.load()) {
    Request req;
    bool keep_alive = false;
    const ReadResult read = co_await ReadRequest(stream, buffer, &req, &keep_alive);
    if (read == ReadResult::kRefused) co_return;
    if (read == ReadResult::kClosed) break;
    keep_alive = keep_alive && !stopping.load();
    if (!co_await Serve(stream, req, keep_alive) || !keep_alive) break;
  }
  co_await Close(stream);
}

net::awaitable<void> Server::Impl::AcceptLoop(std::shared_ptr<tcp::acceptor> acceptor) {
  while (true) {
    error_code ec;
    tcp::socket socket = co_await acceptor->async_accept(net::make_strand(*ioc), net::redirect_error(kAwait, ec));
    if (stopping.load() || !acceptor->is_open()) co_return;
    if (ec) {
      // Out of descriptors or a connection reset before it was taken: pause briefly, go on.
      spdlog::warn("HTTP accept failed: {}", ec.message());
      net::steady_timer pause(acceptor->get_executor(), std::chrono::milliseconds(50));
      co_await pause.async_wait(net::redirect_error(kAwait, ec));
      continue;
    }
    socket.set_option(tcp::no_delay(true), ec);
    const net::any_io_executor ex = socket.get_executor();
    if (ssl) {
      co_spawn(ex, Session(beast::ssl_stream<beast::tcp_stream>(std::move(socket), *ssl)), net::detached);
    } else {
      co_spawn(ex, Session(beast::tcp_stream(std::move(socket))), net::detached);
    }
  }
}

Server::Server(ServerOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}

Server::~Server() {
  Stop(std::chrono::steady_clock::now());
}

void Server::Route(const std::string& method, const std::string& path, Handler handler) {
  impl_->routes[path][method] = std::move(handler);
}

StatusOr<int> Server::Listen(const std::string& host, int port) {
  if (impl_->options.tls && !impl_->ssl) {
    const TlsFiles& t = *impl_->options.tls;
    std::string file;
    try {
      net::ssl::context ctx(net::ssl::context::tls_server);
      ctx.set_options(net::ssl::context::default_workarounds | net::ssl::context::no_sslv2 |
                      net::ssl::context::no_sslv3 | net::ssl::context::no_tlsv1 | net::ssl::context::no_tlsv1_1);
      file = t.cert_chain;
      ctx.use_certificate_chain_file(t.cert_chain);
      file = t.private_key;
      ctx.use_private_key_file(t.private_key, net::ssl::context::pem);
      if (!t.client_ca.empty()) {
        file = t.client_ca;
        ctx.load_verify_file(t.client_ca);
        ctx.set_verify_mode(net::ssl::verify_peer | net::ssl::verify_fail_if_no_peer_cert);
      }
      impl_->ssl.emplace(std::move(ctx));
    } catch (const std::exception& e) {
      return InvalidArgument("TLS: cannot use ", file, ": ", e.what());
    }
  }
  error_code ec;
  net::ip::address address = net::ip::make_address(host, ec);
  if (ec) {
    tcp::resolver resolver(*impl_->ioc);
    auto results = resolver.resolve(host, std::to_string(port), ec);
    if (ec || results.empty()) return absl::UnavailableError(StrCat("cannot resolve '", host, "': ", ec.message()));
    address = results.begin()->endpoint().address();
  }
  auto acceptor = std::make_shared<tcp::acceptor>(net::make_strand(*impl_->ioc));
  const tcp::endpoint endpoint(address, static_cast<unsigned short>(port));
  acceptor->open(endpoint.protocol(), ec);
  if (!ec) acceptor->set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) acceptor->bind(endpoint, ec);
  if (!ec) acceptor->listen(net::socket_base::max_listen_connections, ec);
  if (ec) return absl::UnavailableError(StrCat("cannot listen on ", host, ":", port, ": ", ec.message()));
  const int bound = acceptor->local_endpoint().port();
  impl_->acceptors.push_back(acceptor);
  co_spawn(acceptor->get_executor(), impl_->AcceptLoop(acceptor), net::detached);
  return bound;
}

void Server::Start() {
  for (int i = 0; i < std::max(1, impl_->options.threads); ++i)
    impl_->threads.emplace_back([this] { impl_->ioc->run(); });
}

void Server::Stop(std::chrono::steady_clock::time_point deadline) {
  std::call_once(impl_->stopped, [&] {
    impl_->stopping.store(true);
    for (auto& a : impl_->acceptors) net::post(a->get_executor(), [a] { a->close(); });
    while (impl_->in_flight.load() > 0 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    impl_->work.reset();
    impl_->ioc->stop();
    for (auto& t : impl_->threads) t.join();
    impl_->threads.clear();
    {
      std::lock_guard<std::mutex> l(impl_->gate->mu);
      impl_->gate->open = false;  // no wake posts to the io_context from here on
    }
    // Destroying the io_context destroys every connection still open: sockets close, and each
    // Stream that did not end is aborted (AbortUnlessEnded).
    for (auto& a : impl_->acceptors) {
      error_code ec;
      a->close(ec);
    }
    impl_->acceptors.clear();
    impl_->ioc.reset();
  });
}

int Server::in_flight() const {
  return impl_->in_flight.load();
}

std::string_view ReasonPhrase(int status) {
  // obsolete_reason answers "<unknown-status>" for a code Beast does not know.
  if (bhttp::int_to_status(static_cast<unsigned>(status)) == bhttp::status::unknown) return "Unknown";
  const auto reason = bhttp::obsolete_reason(static_cast<bhttp::status>(status));
  return reason.empty() ? std::string_view("Unknown") : std::string_view(reason.data(), reason.size());
}

}  // namespace kraken::http
