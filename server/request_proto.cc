#include "server/request_proto.h"

namespace kraken::server {

core::GenerationRequest FromProto(const kraken::v1::GenerateRequest& req) {
  core::GenerationRequest g;
  g.request_id = req.request_id();
  if (req.prompt_case() == kraken::v1::GenerateRequest::kText) g.text = req.text();
  if (req.prompt_case() == kraken::v1::GenerateRequest::kTokenIds)
    g.token_ids.emplace(req.token_ids().ids().begin(), req.token_ids().ids().end());
  if (req.has_max_tokens()) g.max_tokens = req.max_tokens();
  g.min_tokens = req.min_tokens();
  if (req.has_temperature()) g.temperature = req.temperature();
  if (req.has_top_k()) g.top_k = req.top_k();
  if (req.has_top_p()) g.top_p = req.top_p();
  if (req.has_min_p()) g.min_p = req.min_p();
  if (req.has_typical_p()) g.typical_p = req.typical_p();
  if (req.has_repetition_penalty()) g.repetition_penalty = req.repetition_penalty();
  if (req.has_presence_penalty()) g.presence_penalty = req.presence_penalty();
  if (req.has_frequency_penalty()) g.frequency_penalty = req.frequency_penalty();
  if (req.has_seed()) g.seed = req.seed();
  g.stop.assign(req.stop().begin(), req.stop().end());
  g.stop_token_ids.assign(req.stop_token_ids().begin(), req.stop_token_ids().end());
  g.ignore_eos = req.ignore_eos();
  g.logprobs = req.logprobs();
  g.top_logprobs = req.top_logprobs();
  g.echo = req.echo();
  g.prompt_logprobs = req.prompt_logprobs();
  if (req.has_skip_special_tokens()) g.skip_special_tokens = req.skip_special_tokens();
  g.priority = req.priority();
  if (req.has_n()) g.n = req.n();
  for (const auto& [id, bias] : req.logit_bias()) g.logit_bias.emplace_back(id, bias);
  return g;
}

}  // namespace kraken::server
