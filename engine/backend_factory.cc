// The backend factory: one backend per kind of device (engine/device.h).
#include "engine/backend.h"

namespace kraken::engine {

StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options) {
  switch (options.device.kind) {
    case Device::Kind::kCpu:
      return CreateCpuBackend(options);
    case Device::Kind::kCuda:
      return CreateCudaBackend(options);
  }
  return InvalidArgument("device '", options.device.ToString(), "' has no backend");
}

}  // namespace kraken::engine
