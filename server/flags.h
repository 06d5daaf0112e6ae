// Where kraken-server's settings come from, in order of precedence: the command line, then the
// KRAKEN_* environment (KRAKEN_ + the flag's long name upper-cased, '-' as '_': --max-waiting is
// KRAKEN_MAX_WAITING), then the --config file (TOML/INI, the long names as keys), then the
// defaults. CLI11 on its own lets the file beat the environment; ArgsWithEnvironment puts every
// set variable on the command line ahead of the user's own flags instead, so the file fills only
// what neither gave. A KRAKEN_* variable or config key that names no flag is refused, with the
// closest valid name, so a misspelling cannot be silently ignored.
//
//   CLI::App app;  ... options added with ->envname(EnvName(name)) and TakeLast ...
//   KRAKEN_RETURN_IF_ERROR(CheckEnvironment(app, environ));
//   std::vector<std::string> args = ArgsWithEnvironment(app, argc, argv, environ);
//   ... app.parse(...) ...
//   KRAKEN_RETURN_IF_ERROR(CheckConfigKeys(app, config_path));
#pragma once

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "base/status.h"

namespace kraken::server {

/// "--max-waiting" -> "KRAKEN_MAX_WAITING".
std::string EnvName(const std::string& long_flag);

/// The arguments to parse: argv[0], then "--name=value" for each option of `app` whose
/// environment variable is set and non-empty in `env` (a NULL-terminated "NAME=value" array, as
/// environ), then argv[1..]. Every option must take the last value given
/// (MultiOptionPolicy::TakeLast) for the command line to win.
std::vector<std::string> ArgsWithEnvironment(const CLI::App& app, int argc, const char* const* argv,
                                             const char* const* env);

/// KRAKEN_* variables that belong to the project's other programs (kraken-cli's KRAKEN_TARGET),
/// which a shell may set for both, or to its workers (KRAKEN_TEST_CRASH_ON_TOKEN, the test hook
/// of runtime/worker.cc): the server leaves them alone.
inline constexpr const char* kOtherProgramsVariables[] = {"KRAKEN_TARGET", "KRAKEN_TEST_CRASH_ON_TOKEN"};

/// INVALID_ARGUMENT naming the first variable in `env` that starts with KRAKEN_ but is no option's
/// environment name (nor in kOtherProgramsVariables), and the closest valid name; OK otherwise.
Status CheckEnvironment(const CLI::App& app, const char* const* env);

/// Reads `file` with the app's config parser; INVALID_ARGUMENT naming the first key that is no
/// option's long name, with the file and the closest valid key, or the parser's complaint when
/// the file cannot be read. OK for an empty `file` (none given).
Status CheckConfigKeys(const CLI::App& app, const std::string& file);

/// `error` (CLI11's message for a bad value), followed by which KRAKEN_* variable supplied the
/// value when the flag it names was set from the environment in `env`.
std::string ExplainParseError(const CLI::App& app, const std::string& error, const char* const* env);

}  // namespace kraken::server
