// libFuzzer target: the safetensors parser must reject or accept any byte string without
// reading out of bounds, and every accepted tensor must lie inside the input.
//   build: scripts/build.sh build-fuzz -DCMAKE_CXX_COMPILER=clang++ -DKRAKEN_BUILD_FUZZERS=ON
//   run:   build-fuzz/engine/safetensors_fuzzer engine/fuzz/corpus/safetensors
#include <cstdint>
#include <cstdlib>
#include <span>

#include "engine/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto f = kraken::engine::SafetensorsFile::Parse(std::span<const uint8_t>(data, size), "fuzz");
  if (!f.ok()) return 0;
  for (const auto& [name, t] : (*f)->tensors()) {
    if (t.data < data || t.data + t.nbytes > data + size) std::abort();
    uint8_t acc = 0;
    for (size_t i = 0; i < t.nbytes; ++i) acc ^= t.data[i];  // touch every byte (ASan checks)
    volatile uint8_t sink = acc;
    (void)sink;
  }
  return 0;
}
