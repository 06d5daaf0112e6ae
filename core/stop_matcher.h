// Stop strings over streamed text. Generated text arrives in deltas (whole UTF-8 characters, from
// the incremental detokenizer); a stop string may span any number of deltas. The matcher releases
// text only once no stop string can start inside it, holds back the longest tail that is still a
// prefix of some stop string, and on a match releases exactly the text before it: the stop string
// itself is never released. Generation stops at the first stop string to be completed (as if the
// text arrived one byte at a time), so the result does not depend on token boundaries.
//
//   StopMatcher m({"\n\n", "END"});
//   StopMatcher::Result r = m.Push("Hello E");  // r.release == "Hello ", "E" is held
//   r = m.Push("ND");                           // r.matched, r.stop == "END", r.release == ""
//   std::string rest = m.Flush();               // at EOS / length: what is held, unmatched
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace kraken::core {

class StopMatcher {
 public:
  struct Result {
    std::string release;  // text now final and safe to send
    bool matched = false;
    std::string stop;  // the stop string that completed first (longest on a tie)
  };

  explicit StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {}

  /// Adds `delta`; after a match, later calls release nothing.
  Result Push(std::string_view delta);
  /// Releases what is held (generation ended without completing a stop string).
  std::string Flush();
  size_t held_bytes() const { return held_.size(); }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool done_ = false;
};

}  // namespace kraken::core
