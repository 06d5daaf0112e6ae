// kraken-cli: a command-line client for kraken-server.
//
//   kraken-cli generate "And God said," --stream --max-tokens 64
//   kraken-cli tokenize "In the beginning"
//   kraken-cli info
//
// --target host:port (default localhost:8001; env KRAKEN_TARGET), --api-key (env KRAKEN_API_KEY),
// --tls-ca to verify a TLS server with this PEM root (and --tls-cert/--tls-key for mutual TLS).
// Exit status: 0 on success, 1 with the gRPC status code and message on stderr otherwise.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>

#include <grpcpp/grpcpp.h>
#include <CLI/CLI.hpp>

#include "kraken/v1/kraken.grpc.pb.h"
#include "server/read_file.h"

namespace {

int Fail(const grpc::Status& s) {
  std::fprintf(stderr, "error: %d %s\n", static_cast<int>(s.error_code()), s.error_message().c_str());
  return 1;
}

struct Connection {
  std::unique_ptr<kraken::v1::Kraken::Stub> stub;
  std::string api_key;
  // A context carrying the API key, if any.
  std::unique_ptr<grpc::ClientContext> Context() const {
    auto ctx = std::make_unique<grpc::ClientContext>();
    if (!api_key.empty()) ctx->AddMetadata("authorization", "Bearer " + api_key);
    return ctx;
  }
};

// Plain text, or TLS verified against `ca` (with a client certificate for mutual TLS).
std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials(const std::string& ca, const std::string& cert,
                                                             const std::string& key) {
  if (ca.empty()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions o;
  o.pem_root_certs = kraken::server::ReadWholeFile(ca);
  if (!cert.empty()) {
    o.pem_cert_chain = kraken::server::ReadWholeFile(cert);
    o.pem_private_key = kraken::server::ReadWholeFile(key);
  }
  return grpc::SslCredentials(o);
}

int Info(const Connection& c) {
  kraken::v1::ModelInfo m;
  grpc::Status s = c.stub->GetModelInfo(c.Context().get(), {}, &m);
  if (!s.ok()) return Fail(s);
  std::cout << m.DebugString();
  return 0;
}

int Tokenize(const Connection& c, const std::string& text) {
  kraken::v1::TokenizeRequest r;
  r.set_text(text);
  kraken::v1::TokenizeResponse out;
  grpc::Status s = c.stub->Tokenize(c.Context().get(), r, &out);
  if (!s.ok()) return Fail(s);
  for (int i = 0; i < out.token_ids_size(); ++i) std::printf("%s%d", i ? "," : "", out.token_ids(i));
  std::printf("\n");
  return 0;
}

int Generate(const Connection& c, const kraken::v1::GenerateRequest& req, bool stream) {
  kraken::v1::GenerateResponse last;
  if (stream) {
    auto ctx = c.Context();
    auto reader = c.stub->Generate(ctx.get(), req);
    kraken::v1::GenerateResponse msg;
    while (reader->Read(&msg)) {
      std::fwrite(msg.text().data(), 1, msg.text().size(), stdout);
      std::fflush(stdout);
      last = msg;
    }
    grpc::Status s = reader->Finish();
    if (!s.ok()) return Fail(s);
    std::printf("\n");
  } else {
    grpc::Status s = c.stub->Complete(c.Context().get(), req, &last);
    if (!s.ok()) return Fail(s);
    std::printf("%s\n", last.text().c_str());
  }
  std::fprintf(stderr, "[%s; %u prompt + %u generated tokens; TTFT %.1f ms; e2e %.1f ms; seed %llu]\n",
               kraken::v1::FinishReason_Name(last.finish_reason()).c_str(), last.usage().prompt_tokens(),
               last.usage().completion_tokens(), last.timings().ttft_seconds() * 1e3,
               last.timings().e2e_seconds() * 1e3, static_cast<unsigned long long>(last.seed()));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string target = "localhost:8001", api_key, tls_ca, tls_cert, tls_key;
  CLI::App app{"kraken-cli: client for kraken-server"};
  app.require_subcommand(1);
  app.add_option("--target", target, "server address")->envname("KRAKEN_TARGET")->capture_default_str();
  app.add_option("--api-key", api_key, "sent as 'authorization: Bearer <key>'")->envname("KRAKEN_API_KEY");
  app.add_option("--tls-ca", tls_ca, "PEM root certificate: connect with TLS");
  app.add_option("--tls-cert", tls_cert, "PEM client certificate (mutual TLS)");
  app.add_option("--tls-key", tls_key, "PEM client key (mutual TLS)");
  std::string prompt;
  bool do_stream = false;
  uint32_t max_tokens = 0;
  float temperature = -1;
  uint64_t seed = 0;
  bool has_seed = false;
  std::vector<std::string> stops;
  auto* gen = app.add_subcommand("generate", "generate a completion");
  gen->add_option("prompt", prompt, "prompt text")->required();
  gen->add_flag("--stream", do_stream, "print text as it is generated");
  gen->add_option("--max-tokens", max_tokens, "tokens to generate (default: the model's)");
  gen->add_option("--temperature", temperature, "0 = greedy (default: the model's)");
  gen->add_option("--seed", seed, "random seed")->each([&](const std::string&) { has_seed = true; });
  gen->add_option("--stop", stops, "stop string (repeatable)");
  std::string text;
  auto* tok = app.add_subcommand("tokenize", "print the token ids of a text");
  tok->add_option("text", text, "text")->required();
  auto* info = app.add_subcommand("info", "print the model and server limits");
  CLI11_PARSE(app, argc, argv);
  Connection c{.api_key = api_key};
  try {
    c.stub = kraken::v1::Kraken::NewStub(grpc::CreateChannel(target, ChannelCredentials(tls_ca, tls_cert, tls_key)));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  if (*info) return Info(c);
  if (*tok) return Tokenize(c, text);
  kraken::v1::GenerateRequest req;
  req.set_text(prompt);
  if (max_tokens > 0) req.set_max_tokens(max_tokens);
  if (temperature >= 0) req.set_temperature(temperature);
  if (has_seed) req.set_seed(seed);
  for (const auto& s : stops) req.add_stop(s);
  return Generate(c, req, do_stream);
}
