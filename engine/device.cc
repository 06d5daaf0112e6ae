#include "engine/device.h"

#include <algorithm>

namespace kraken::engine {

StatusOr<Device> Device::Parse(std::string_view text) {
  if (text == "cpu") return Cpu();
  if (text == "cuda") return Cuda(0);
  constexpr std::string_view kCudaPrefix = "cuda:";
  const std::string_view digits =
      text.substr(0, kCudaPrefix.size()) == kCudaPrefix ? text.substr(kCudaPrefix.size()) : std::string_view();
  if (digits.empty() || digits.size() > 4 ||
      !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return InvalidArgument("device '", text, "' is not 'cpu', 'cuda' or 'cuda:<index>'");
  }
  return Cuda(std::stoi(std::string(digits)));
}

std::string Device::ToString() const {
  return is_cuda() ? StrCat("cuda:", index) : "cpu";
}

}  // namespace kraken::engine
