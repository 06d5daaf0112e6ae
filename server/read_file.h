// Reads a whole file (TLS keys and certificates, generation_config.json) for the server and the
// CLI. Throws std::runtime_error naming the path when it cannot be read; both callers turn that
// into a startup error message.
#pragma once

#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

namespace kraken::server {

/// The bytes of `path`. Throws std::runtime_error("cannot read <path>").
inline std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace kraken::server
