// JSON-lines logging for spdlog (--log-format json): every line is one object
// {"ts": "...", "level": "...", "msg": "..."} with the message escaped as a JSON string, so log
// shippers (Loki, Fluent Bit, Cloud Logging) parse it without rules.
#pragma once

namespace kraken::server {

/// Replaces the default logger's sinks with one writing JSON lines to stderr.
void UseJsonLogs();

}  // namespace kraken::server
