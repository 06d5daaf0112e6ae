#include "server/flags.h"

#include "base/closest.h"

#include <algorithm>
#include <cctype>
#include <cstring>

namespace kraken::server {
namespace {

constexpr const char* kPrefix = "KRAKEN_";

// The long names ("max-waiting") of every option that has one.
std::vector<std::string> LongNames(const CLI::App& app) {
  std::vector<std::string> out;
  for (const CLI::Option* o : app.get_options()) {
    if (!o->get_lnames().empty()) out.push_back(o->get_lnames().front());
  }
  return out;
}

std::vector<std::string> EnvNames(const CLI::App& app) {
  std::vector<std::string> out;
  for (const CLI::Option* o : app.get_options()) {
    if (!o->get_envname().empty()) out.push_back(o->get_envname());
  }
  return out;
}

}  // namespace

std::string EnvName(const std::string& long_flag) {
  std::string name = kPrefix;
  for (char c : long_flag.substr(long_flag.find_first_not_of('-'))) {
    name += c == '-' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  }
  return name;
}

std::vector<std::string> ArgsWithEnvironment(const CLI::App& app, int argc, const char* const* argv,
                                             const char* const* env) {
  std::vector<std::string> args;
  args.emplace_back(argc > 0 ? argv[0] : "kraken-server");
  for (const CLI::Option* o : app.get_options()) {
    const std::string& var = o->get_envname();
    if (var.empty() || o->get_lnames().empty()) continue;
    for (const char* const* e = env; e != nullptr && *e != nullptr; ++e) {
      const char* eq = std::strchr(*e, '=');
      if (eq == nullptr || static_cast<size_t>(eq - *e) != var.size() || std::strncmp(*e, var.c_str(), var.size()) != 0)
        continue;
      if (eq[1] != '\0') args.push_back("--" + o->get_lnames().front() + "=" + std::string(eq + 1));
    }
  }
  for (int i = 1; i < argc; ++i) args.emplace_back(argv[i]);
  return args;
}

Status CheckEnvironment(const CLI::App& app, const char* const* env) {
  std::vector<std::string> known = EnvNames(app);
  const std::vector<std::string> others(std::begin(kOtherProgramsVariables), std::end(kOtherProgramsVariables));
  for (const char* const* e = env; e != nullptr && *e != nullptr; ++e) {
    const std::string entry = *e;
    if (entry.rfind(kPrefix, 0) != 0) continue;
    const std::string name = entry.substr(0, entry.find('='));
    if (std::find(known.begin(), known.end(), name) != known.end()) continue;
    if (std::find(others.begin(), others.end(), name) != others.end()) continue;
    return InvalidArgument("environment variable ", name, " is not a kraken-server setting (did you mean ",
                           Closest(name, known), "?); every KRAKEN_* variable names a flag: see kraken-server --help");
  }
  return absl::OkStatus();
}

Status CheckConfigKeys(const CLI::App& app, const std::string& file) {
  if (file.empty()) return absl::OkStatus();
  std::vector<CLI::ConfigItem> items;
  try {
    items = app.get_config_formatter_base()->from_file(file);
  } catch (const CLI::Error& e) {
    return InvalidArgument("config file '", file, "': ", e.what());
  }
  const std::vector<std::string> known = LongNames(app);
  for (const CLI::ConfigItem& item : items) {
    if (item.name == "++" || item.name == "--") continue;  // section markers
    const std::string key = item.fullname();
    if (item.parents.empty() && std::find(known.begin(), known.end(), key) != known.end()) continue;
    return InvalidArgument("config file '", file, "': key '", key, "' is not a kraken-server setting (did you mean '",
                           Closest(key, known), "'?); keys are the long flag names: see kraken-server --help");
  }
  return absl::OkStatus();
}

std::string ExplainParseError(const CLI::App& app, const std::string& error, const char* const* env) {
  for (const CLI::Option* o : app.get_options()) {
    if (o->get_envname().empty() || o->get_lnames().empty()) continue;
    if (error.find("--" + o->get_lnames().front() + ":") == std::string::npos) continue;
    const std::string& var = o->get_envname();
    for (const char* const* e = env; e != nullptr && *e != nullptr; ++e) {
      if (std::strncmp(*e, var.c_str(), var.size()) == 0 && (*e)[var.size()] == '=') {
        return error + " (the value came from the environment variable " + var + ")";
      }
    }
  }
  return error;
}

}  // namespace kraken::server
