// The runtime tests start workers by re-executing this test binary in worker mode.
#include <gtest/gtest.h>

#include "runtime/worker.h"

int main(int argc, char** argv) {
  if (auto code = kraken::runtime::MaybeRunWorker(argc, argv)) return *code;
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
