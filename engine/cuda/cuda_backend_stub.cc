// Compiled when KRAKEN_ENABLE_CUDA is OFF: the CUDA device name is recognised but refused.
#include "engine/backend.h"

namespace kraken::engine {

StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions& options) {
  return Unimplemented("device '", options.device.ToString(),
                       "' needs the CUDA backend, but this binary was built without CUDA "
                       "(configure with -DKRAKEN_ENABLE_CUDA=ON)");
}

}  // namespace kraken::engine
