// KServe v2 inference requests (inference.ModelInferRequest) in the tensor names of Triton's two
// LLM backends, turned into the core's terms, and the responses built back from the core's output.
//
// TensorRT-LLM backend (its "ensemble" model): BYTES `text_input`; scalars `max_tokens`, `stream`,
// `temperature`, `top_k`, `top_p`, `random_seed`, `min_length` (min_tokens), `repetition_penalty`,
// `presence_penalty`, `frequency_penalty`, `end_id`, `pad_id`, `beam_width` (1), `length_penalty`
// (no effect at beam width 1), `num_return_sequences` (1), `return_log_probs`,
// `exclude_input_in_output`; BYTES lists `stop_words` and `bad_words` (empty only) ->
// `text_output`, and `output_log_probs` and `cum_log_probs` with return_log_probs.
//
// vLLM backend: BYTES `text_input`, BOOL `stream`, BYTES `sampling_parameters` (vLLM's sampling
// parameters as a JSON object; numbers and booleans may be given as strings, as that backend
// accepts), BOOL `exclude_input_in_output` and `return_finish_reason`, `return_num_input_tokens`,
// `return_num_output_tokens`, `return_cumulative_logprob` -> `text_output` and the outputs asked
// for.
//
// A request is read as the vLLM interface when it has `sampling_parameters` or any input only
// that interface has, else as TensorRT-LLM's. Every tensor may have any shape holding the
// elements it needs (a batch dimension of 1 included); a batch above 1 is refused.
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "core/request.h"
#include "core/validation.h"
#include "inference/grpc_service.pb.h"

namespace kraken::server {

enum class KserveInterface { kTensorRtLlm, kVllm };

/// A parsed inference request, not yet validated against the model (core::ValidateGeneration
/// with kKserveFields does that).
struct KserveRequest {
  core::GenerationRequest generation;
  KserveInterface interface = KserveInterface::kTensorRtLlm;
  bool stream = false;         // one response per batch of new text (ModelStreamInfer)
  bool exclude_input = false;  // vLLM: text_output starts with the prompt unless this is set
  bool log_probs = false;      // TensorRT-LLM: output_log_probs and cum_log_probs
  bool finish_reason = false;  // vLLM: finish_reason
  bool num_input_tokens = false, num_output_tokens = false, cumulative_logprob = false;  // vLLM
  std::vector<std::string> outputs;  // the outputs asked for by name; empty: every output this request gives
};

/// How the KServe interfaces spell the fields core::ValidateGeneration names.
extern const core::FieldNames kKserveFields;

/// The inputs a model served here accepts, and the outputs it may give: (name, datatype).
const std::vector<std::pair<std::string, std::string>>& KserveInputs();
const std::vector<std::pair<std::string, std::string>>& KserveOutputs();
/// True for the inputs that hold a list (stop_words, bad_words); every other input holds one
/// value, declared with shape [1] (a client such as genai-perf sends no shape of its own).
bool KserveInputIsList(const std::string& name);

/// Reads the request's tensors. INVALID_ARGUMENT naming the input and the value for: an input
/// this model does not have (with the closest one), a datatype or element count that does not fit
/// the input, raw contents that do not match the declared shape, sampling_parameters that are not
/// a JSON object of known keys, an output this model does not have, and what is not offered
/// (bad_words, beam_width or num_return_sequences above 1, best_of other than n, batches). Asking for an output by
/// name (`outputs`) turns it on: output_log_probs or cum_log_probs computes the logprobs.
StatusOr<KserveRequest> ParseKserveRequest(const inference::ModelInferRequest& req);

/// One sample's part of a response: its new text (and, for TensorRT-LLM, new logprobs); at the
/// end, how it ended.
struct KserveSample {
  std::string_view text;
  bool first = false;  // the sample's first response: the vLLM interface leads with the prompt
  const std::vector<core::TokenLogprobs>* logprobs = nullptr;
  core::FinishReason finish_reason = core::FinishReason::kNone;
  uint32_t completion_tokens = 0;
  double cumulative_logprob = 0;  // of every token it generated (natural log)
};

/// The outputs of a response for a request of n = samples.size() samples, as Triton's vLLM
/// backend shapes them: text_output [n] (each sample's new text, "" for a sample with none) and,
/// with `last`, finish_reason, num_output_tokens and cumulative_logprob [n], num_input_tokens [1].
void AppendKserveOutputs(const KserveRequest& req, const core::RequestParams& params,
                         std::span<const KserveSample> samples, bool last, inference::ModelInferResponse* resp);

/// Adds to `resp` the outputs for `out` (what the request produced since the last response, or
/// all of it), in raw contents as Triton sends them. `first` adds the prompt to text_output when
/// the vLLM interface asks for it; `last` adds the outputs that are known only at the end, among
/// them `cumulative_logprob`, the sum of every generated token's logprob (natural log).
void AppendKserveOutputs(const KserveRequest& req, const core::RequestParams& params, const core::Output& out,
                         bool first, bool last, double cumulative_logprob, inference::ModelInferResponse* resp);

}  // namespace kraken::server
