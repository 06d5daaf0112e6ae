// kraken.v1.GenerateRequest -> core::GenerationRequest: the kraken.v1 front-end's half of request
// validation (the other half, shared by every front-end, is core/validation.h).
#pragma once

#include "core/validation.h"
#include "kraken/v1/kraken.pb.h"

namespace kraken::server {

/// Copies what the client set; unset proto fields stay unset. Never fails: every check is
/// core::ValidateGeneration's.
core::GenerationRequest FromProto(const kraken::v1::GenerateRequest& req);

}  // namespace kraken::server
