#include "server/kserve_request.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <map>

#include <nlohmann/json.hpp>

#include "base/closest.h"
#include "base/json_util.h"

namespace kraken::server {
namespace {

using inference::ModelInferRequest;
using nlohmann::json;

const std::vector<std::string> kTrtllmOnly = {"max_tokens",
                                              "temperature",
                                              "top_k",
                                              "top_p",
                                              "random_seed",
                                              "min_length",
                                              "repetition_penalty",
                                              "presence_penalty",
                                              "frequency_penalty",
                                              "end_id",
                                              "pad_id",
                                              "beam_width",
                                              "length_penalty",
                                              "num_return_sequences",
                                              "return_log_probs",
                                              "stop_words",
                                              "bad_words"};
const std::vector<std::string> kVllmOnly = {"sampling_parameters", "return_finish_reason", "return_num_input_tokens",
                                            "return_num_output_tokens", "return_cumulative_logprob"};

// One input tensor: its declaration and, when the request carries raw contents, its bytes.
struct Tensor {
  const ModelInferRequest::InferInputTensor* meta = nullptr;
  const std::string* raw = nullptr;
  int64_t elements = 0;
};

// A numeric element, exactly as sent.
struct Scalar {
  bool integral = false, is_unsigned = false;
  int64_t i = 0;
  uint64_t u = 0;
  double d = 0;
};

Status Bad(const std::string& input, const std::string& what) {
  return InvalidArgument("input '", input, "' ", what);
}

std::string ShapeText(const Tensor& t) {
  std::string s = "[";
  for (int k = 0; k < t.meta->shape_size(); ++k) {
    if (k > 0) s += ',';
    s += std::to_string(t.meta->shape(k));
  }
  s += ']';
  return s;
}

size_t ElementBytes(const std::string& type) {
  static const std::map<std::string, size_t> sizes = {{"BOOL", 1},   {"INT8", 1},  {"UINT8", 1},  {"INT16", 2},
                                                      {"UINT16", 2}, {"INT32", 4}, {"UINT32", 4}, {"INT64", 8},
                                                      {"UINT64", 8}, {"FP32", 4},  {"FP64", 8}};
  auto it = sizes.find(type);
  return it == sizes.end() ? 0 : it->second;
}

template <typename T>
T Load(const std::string& raw) {
  T v;
  std::memcpy(&v, raw.data(), sizeof v);  // KServe raw contents are little-endian, as x86-64
  return v;
}

StatusOr<Scalar> RawScalar(const Tensor& t, const std::string& type) {
  const std::string& raw = *t.raw;
  if (raw.size() != ElementBytes(type))
    return Bad(t.meta->name(), StrCat("has ", raw.size(), " raw bytes for one ", type, " value"));
  Scalar s;
  s.integral = type != "FP32" && type != "FP64";
  if (type == "BOOL") s.i = raw[0] != 0;
  if (type == "INT8") s.i = Load<int8_t>(raw);
  if (type == "INT16") s.i = Load<int16_t>(raw);
  if (type == "INT32") s.i = Load<int32_t>(raw);
  if (type == "INT64") s.i = Load<int64_t>(raw);
  if (type == "UINT8") s.i = Load<uint8_t>(raw);
  if (type == "UINT16") s.i = Load<uint16_t>(raw);
  if (type == "UINT32") s.i = Load<uint32_t>(raw);
  if (type == "UINT64") {
    s.is_unsigned = true;
    s.u = Load<uint64_t>(raw);
  }
  if (type == "FP32") s.d = Load<float>(raw);
  if (type == "FP64") s.d = Load<double>(raw);
  if (s.integral && !s.is_unsigned) s.d = static_cast<double>(s.i);
  if (s.is_unsigned) s.d = static_cast<double>(s.u);
  return s;
}

// The one numeric (or BOOL) element of a scalar input.
StatusOr<Scalar> OneScalar(const Tensor& t) {
  const std::string& type = t.meta->datatype();
  if (ElementBytes(type) == 0) return Bad(t.meta->name(), StrCat("must be a number or BOOL, got datatype ", type));
  if (t.elements != 1)
    return Bad(t.meta->name(), StrCat("must hold one value, got shape ", ShapeText(t), " (batches are not served)"));
  if (t.raw != nullptr) return RawScalar(t, type);
  const inference::InferTensorContents& c = t.meta->contents();
  Scalar s;
  s.integral = true;
  if (c.bool_contents_size() == 1)
    s.i = c.bool_contents(0);
  else if (c.int_contents_size() == 1)
    s.i = c.int_contents(0);
  else if (c.int64_contents_size() == 1)
    s.i = c.int64_contents(0);
  else if (c.uint_contents_size() == 1)
    s.i = c.uint_contents(0);
  else if (c.uint64_contents_size() == 1)
    s.is_unsigned = true, s.u = c.uint64_contents(0);
  else if (c.fp32_contents_size() == 1)
    s.integral = false, s.d = c.fp32_contents(0);
  else if (c.fp64_contents_size() == 1)
    s.integral = false, s.d = c.fp64_contents(0);
  else
    return Bad(t.meta->name(), "has no contents (give raw_input_contents or the datatype's contents field)");
  if (s.integral) s.d = s.is_unsigned ? static_cast<double>(s.u) : static_cast<double>(s.i);
  return s;
}

StatusOr<std::vector<std::string>> Strings(const Tensor& t) {
  if (t.meta->datatype() != "BYTES")
    return Bad(t.meta->name(), StrCat("must have datatype BYTES, got ", t.meta->datatype()));
  std::vector<std::string> out;
  if (t.raw == nullptr) {
    out.assign(t.meta->contents().bytes_contents().begin(), t.meta->contents().bytes_contents().end());
  } else {  // each element: a 4-byte little-endian length, then the bytes
    for (size_t at = 0; at < t.raw->size();) {
      if (t.raw->size() - at < 4) return Bad(t.meta->name(), "has raw contents that end inside a length prefix");
      const uint32_t n = Load<uint32_t>(t.raw->substr(at, 4));
      at += 4;
      if (t.raw->size() - at < n)
        return Bad(t.meta->name(), StrCat("has an element of ", n, " bytes but only ", t.raw->size() - at, " remain"));
      out.push_back(t.raw->substr(at, n));
      at += n;
    }
  }
  if (static_cast<int64_t>(out.size()) != t.elements)
    return Bad(t.meta->name(),
               StrCat("holds ", out.size(), " elements; its shape ", ShapeText(t), " says ", t.elements));
  return out;
}

// The request's inputs by name, each matched with its raw contents.
StatusOr<std::map<std::string, Tensor>> Tensors(const ModelInferRequest& req) {
  if (req.raw_input_contents_size() > 0 && req.raw_input_contents_size() != req.inputs_size())
    return InvalidArgument("the request has ", req.raw_input_contents_size(), " raw_input_contents for ",
                           req.inputs_size(), " inputs");
  std::vector<std::string> known;
  for (const auto& [name, type] : KserveInputs()) known.push_back(name);
  std::map<std::string, Tensor> out;
  for (int k = 0; k < req.inputs_size(); ++k) {
    const auto& in = req.inputs(k);
    if (std::find(known.begin(), known.end(), in.name()) == known.end())
      return Bad(in.name(), StrCat("is not an input of this model (did you mean '", Closest(in.name(), known), "'?)"));
    Tensor t{.meta = &in, .raw = req.raw_input_contents_size() > 0 ? &req.raw_input_contents(k) : nullptr};
    if (t.raw != nullptr && in.has_contents() && in.contents().ByteSizeLong() > 0)
      return Bad(in.name(), "has both raw_input_contents and typed contents; give one of them");
    t.elements = 1;
    for (int64_t d : in.shape()) {
      if (d < 0) return Bad(in.name(), StrCat("has a negative dimension in its shape ", ShapeText(t)));
      t.elements = d > 0 && t.elements > (int64_t{1} << 40) / d ? (int64_t{1} << 40) : t.elements * d;
    }
    if (!out.emplace(in.name(), t).second) return Bad(in.name(), "is given twice");
  }
  return out;
}

// A value of vLLM's sampling parameters: numbers and booleans may come as strings.
StatusOr<double> JsonNumber(const json& v, const std::string& key) {
  if (v.is_number()) return v.get<double>();
  if (v.is_string()) {
    const std::string s = v.get<std::string>();
    char* end = nullptr;
    const double d = std::strtod(s.c_str(), &end);
    if (!s.empty() && end == s.c_str() + s.size()) return d;
  }
  return InvalidArgument("field 'sampling_parameters.", key, "' must be a number, got ", PreviewJson(v, 40));
}

StatusOr<bool> JsonBool(const json& v, const std::string& key) {
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_string() && (v == "true" || v == "True" || v == "false" || v == "False")) return v == "true" || v == "True";
  return InvalidArgument("field 'sampling_parameters.", key, "' must be true or false, got ", PreviewJson(v, 40));
}

StatusOr<int64_t> JsonInteger(const json& v, const std::string& key) {
  KRAKEN_ASSIGN_OR_RETURN(double d, JsonNumber(v, key));
  if (d != std::floor(d) || std::fabs(d) > 9.2e18)
    return InvalidArgument("field 'sampling_parameters.", key, "' must be an integer, got ", PreviewJson(v, 40));
  return static_cast<int64_t>(d);
}

// sampling_parameters.stop: a string or a list of strings.
Status ReadStopParameter(const json& v, core::GenerationRequest* g) {
  if (v.is_string()) {
    g->stop.push_back(v.get<std::string>());
    return absl::OkStatus();
  }
  if (!v.is_array()) return InvalidArgument("field 'sampling_parameters.stop' must be a string or a list of strings");
  for (size_t i = 0; i < v.size(); ++i) {
    if (!v[i].is_string())
      return InvalidArgument("field 'sampling_parameters.stop[", i, "]' must be a string, got ", v[i].type_name(), " ",
                             PreviewJson(v[i], 40));
    g->stop.push_back(v[i].get<std::string>());
  }
  return absl::OkStatus();
}

// sampling_parameters.logit_bias as vLLM takes it: {"<token id>": bias}.
Status ReadLogitBiasParameter(const json& v, core::GenerationRequest* g) {
  if (!v.is_object())
    return InvalidArgument("field 'sampling_parameters.logit_bias' must be an object of token ids to biases");
  for (const auto& [id, bias] : v.items()) {
    KRAKEN_ASSIGN_OR_RETURN(int64_t token, JsonInteger(json(id), "logit_bias"));
    KRAKEN_ASSIGN_OR_RETURN(double b, JsonNumber(bias, "logit_bias"));
    g->logit_bias.emplace_back(token, b);
  }
  return absl::OkStatus();
}

Status ReadSamplingParameters(const std::string& text, KserveRequest* r) {
  static const std::vector<std::string> kKeys = {"max_tokens",
                                                 "temperature",
                                                 "top_p",
                                                 "top_k",
                                                 "min_p",
                                                 "typical_p",
                                                 "seed",
                                                 "stop",
                                                 "stop_token_ids",
                                                 "ignore_eos",
                                                 "min_tokens",
                                                 "presence_penalty",
                                                 "frequency_penalty",
                                                 "repetition_penalty",
                                                 "logprobs",
                                                 "skip_special_tokens",
                                                 "n",
                                                 "best_of",
                                                 "logit_bias"};
  KRAKEN_ASSIGN_OR_RETURN(const json j, ParseJsonStrict(text, "input 'sampling_parameters'", kMaxRequestJsonDepth));
  if (!j.is_object())
    return InvalidArgument("input 'sampling_parameters' must be a JSON object, got ", j.type_name(), " ",
                           PreviewJson(j, 40));
  core::GenerationRequest& g = r->generation;
  std::optional<int64_t> best_of;
  for (const auto& [key, v] : j.items()) {
    if (std::find(kKeys.begin(), kKeys.end(), key) == kKeys.end())
      return InvalidArgument("field 'sampling_parameters.", key, "' is not a sampling parameter (did you mean '",
                             Closest(key, kKeys), "'?)");
    if (v.is_null()) continue;
    if (key == "stop") {
      KRAKEN_RETURN_IF_ERROR(ReadStopParameter(v, &g));
    } else if (key == "logit_bias") {
      KRAKEN_RETURN_IF_ERROR(ReadLogitBiasParameter(v, &g));
    } else if (key == "stop_token_ids") {
      if (!v.is_array()) return InvalidArgument("field 'sampling_parameters.stop_token_ids' must be a list of ids");
      for (const json& id : v) {
        KRAKEN_ASSIGN_OR_RETURN(int64_t n, JsonInteger(id, key));
        g.stop_token_ids.push_back(n);
      }
    } else if (key == "ignore_eos" || key == "skip_special_tokens") {
      KRAKEN_ASSIGN_OR_RETURN(bool b, JsonBool(v, key));
      if (key == "ignore_eos")
        g.ignore_eos = b;
      else
        g.skip_special_tokens = b;
    } else if (key == "max_tokens" || key == "top_k" || key == "seed" || key == "min_tokens" || key == "logprobs" ||
               key == "n" || key == "best_of") {
      KRAKEN_ASSIGN_OR_RETURN(int64_t n, JsonInteger(v, key));
      if (key == "max_tokens") g.max_tokens = n;
      if (key == "top_k") g.top_k = n;
      if (key == "min_tokens") g.min_tokens = n;
      if (key == "logprobs") g.logprobs = true, g.top_logprobs = n;
      if (key == "seed") {
        if (n < 0) return InvalidArgument("field 'sampling_parameters.seed' must be >= 0, got ", n);
        g.seed = static_cast<uint64_t>(n);
      }
      if (key == "n") g.n = n;
      if (key == "best_of") best_of = n;
    } else {
      KRAKEN_ASSIGN_OR_RETURN(double d, JsonNumber(v, key));
      if (key == "temperature") g.temperature = d;
      if (key == "top_p") g.top_p = d;
      if (key == "min_p") g.min_p = d;
      if (key == "typical_p") g.typical_p = d;
      if (key == "presence_penalty") g.presence_penalty = d;
      if (key == "frequency_penalty") g.frequency_penalty = d;
      if (key == "repetition_penalty") g.repetition_penalty = d;
    }
  }
  if (best_of && *best_of != g.n.value_or(1))
    return InvalidArgument("field 'sampling_parameters.best_of' must equal n (", g.n.value_or(1),
                           "): this server returns every sample it draws, got ", *best_of);
  return absl::OkStatus();
}

// The datatype KserveInputs declares for `name` ("" for none).
const std::string& DeclaredType(const std::string& name) {
  static const std::string none;
  for (const auto& [n, type] : KserveInputs())
    if (n == name) return type;
  return none;
}

// TensorRT-LLM's scalar inputs and word lists.
Status ReadTrtllm(const std::map<std::string, Tensor>& in, KserveRequest* r) {
  core::GenerationRequest& g = r->generation;
  for (const auto& [name, t] : in) {
    if (name == "text_input" || name == "stream" || name == "exclude_input_in_output") continue;
    if (name == "stop_words" || name == "bad_words") {
      KRAKEN_ASSIGN_OR_RETURN(std::vector<std::string> words, Strings(t));
      std::erase(words, std::string());
      if (name == "bad_words" && !words.empty())
        return Bad(name, StrCat("is not supported (", words.size(), " words given); leave it empty"));
      for (std::string& w : words) g.stop.push_back(std::move(w));
      continue;
    }
    KRAKEN_ASSIGN_OR_RETURN(Scalar s, OneScalar(t));
    // An integer input (INT32, UINT64 in KserveInputs) takes any integer datatype, never a float:
    // 20.0 for max_tokens is refused rather than read as something else.
    const std::string& declared = DeclaredType(name);
    if (declared != "BOOL" && t.meta->datatype() == "BOOL")
      return Bad(name, StrCat("must have a numeric datatype (", declared, "), got BOOL"));
    if (declared != "FP32" && !s.integral)
      return Bad(name, StrCat("must have an integer datatype (", declared, "), got ", t.meta->datatype()));
    const int64_t i = s.is_unsigned ? (s.u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
                                           ? std::numeric_limits<int64_t>::max()
                                           : static_cast<int64_t>(s.u))
                                    : s.i;
    if (name == "max_tokens") g.max_tokens = i;
    if (name == "top_k") g.top_k = i;
    if (name == "min_length") g.min_tokens = i;
    if (name == "temperature") g.temperature = s.d;
    if (name == "top_p") g.top_p = s.d;
    if (name == "repetition_penalty") g.repetition_penalty = s.d;
    if (name == "presence_penalty") g.presence_penalty = s.d;
    if (name == "frequency_penalty") g.frequency_penalty = s.d;
    if (name == "return_log_probs") r->log_probs = r->generation.logprobs = s.i != 0;
    if (name == "random_seed") {
      if (!s.integral || (!s.is_unsigned && s.i < 0)) return Bad(name, StrCat("must be an integer >= 0, got ", s.d));
      g.seed = s.is_unsigned ? s.u : static_cast<uint64_t>(s.i);
    }
    if (name == "end_id") {  // the model's end token, replacing its EOS
      g.ignore_eos = true;
      g.stop_token_ids.push_back(i);
    }
    if ((name == "beam_width" || name == "num_return_sequences") && i != 1)
      return Bad(name, StrCat("must be 1 (one sample per request), got ", i));
  }
  return absl::OkStatus();
}

}  // namespace

const core::FieldNames kKserveFields{
    .text = "text_input", .token_ids = "text_input", .top_logprobs = "logprobs", .min_tokens = "min_tokens"};

const std::vector<std::pair<std::string, std::string>>& KserveInputs() {
  static const std::vector<std::pair<std::string, std::string>> inputs = {
      {"text_input", "BYTES"},
      {"stream", "BOOL"},
      {"exclude_input_in_output", "BOOL"},
      {"max_tokens", "INT32"},
      {"temperature", "FP32"},
      {"top_k", "INT32"},
      {"top_p", "FP32"},
      {"random_seed", "UINT64"},
      {"min_length", "INT32"},
      {"repetition_penalty", "FP32"},
      {"presence_penalty", "FP32"},
      {"frequency_penalty", "FP32"},
      {"end_id", "INT32"},
      {"pad_id", "INT32"},
      {"beam_width", "INT32"},
      {"length_penalty", "FP32"},
      {"num_return_sequences", "INT32"},
      {"return_log_probs", "BOOL"},
      {"stop_words", "BYTES"},
      {"bad_words", "BYTES"},
      {"sampling_parameters", "BYTES"},
      {"return_finish_reason", "BOOL"},
      {"return_num_input_tokens", "BOOL"},
      {"return_num_output_tokens", "BOOL"},
      {"return_cumulative_logprob", "BOOL"},
  };
  return inputs;
}

const std::vector<std::pair<std::string, std::string>>& KserveOutputs() {
  static const std::vector<std::pair<std::string, std::string>> outputs = {
      {"text_output", "BYTES"},       {"output_log_probs", "FP32"},   {"cum_log_probs", "FP32"},
      {"finish_reason", "BYTES"},     {"num_input_tokens", "UINT32"}, {"num_output_tokens", "UINT32"},
      {"cumulative_logprob", "FP32"},
  };
  return outputs;
}

bool KserveInputIsList(const std::string& name) {
  return name == "stop_words" || name == "bad_words";
}

namespace {

// The outputs asked for by name: each must exist; asking turns it on.
Status ReadRequestedOutputs(const ModelInferRequest& req, KserveRequest* r) {
  std::vector<std::string> known;
  for (const auto& [name, type] : KserveOutputs()) known.push_back(name);
  for (const auto& out : req.outputs()) {
    const std::string& name = out.name();
    if (std::find(known.begin(), known.end(), name) == known.end())
      return InvalidArgument("output '", name, "' is not an output of this model (did you mean '", Closest(name, known),
                             "'?)");
    r->outputs.push_back(name);
    if (name == "output_log_probs" || name == "cum_log_probs") r->log_probs = r->generation.logprobs = true;
    if (name == "cumulative_logprob") r->cumulative_logprob = r->generation.logprobs = true;
    if (name == "finish_reason") r->finish_reason = true;
    if (name == "num_input_tokens") r->num_input_tokens = true;
    if (name == "num_output_tokens") r->num_output_tokens = true;
  }
  return absl::OkStatus();
}

}  // namespace

StatusOr<KserveRequest> ParseKserveRequest(const ModelInferRequest& req) {
  KRAKEN_ASSIGN_OR_RETURN(auto in, Tensors(req));
  KserveRequest r;
  r.generation.request_id = req.id();
  auto text = in.find("text_input");
  if (text == in.end()) return Bad("text_input", "must be given (BYTES, the prompt)");
  KRAKEN_ASSIGN_OR_RETURN(std::vector<std::string> prompts, Strings(text->second));
  if (prompts.size() != 1)
    return Bad("text_input", StrCat("holds ", prompts.size(), " prompts; this server takes one prompt per request"));
  r.generation.text = std::move(prompts[0]);
  for (const std::string& name : kVllmOnly)
    if (in.count(name)) r.interface = KserveInterface::kVllm;
  for (const std::string& name : kTrtllmOnly) {
    if (r.interface == KserveInterface::kVllm && in.count(name))
      return Bad(name, "belongs to the TensorRT-LLM interface; with 'sampling_parameters' give it there");
  }
  auto flag = [&](const char* name, bool* out) -> Status {
    auto it = in.find(name);
    if (it == in.end()) return absl::OkStatus();
    KRAKEN_ASSIGN_OR_RETURN(Scalar s, OneScalar(it->second));
    *out = s.i != 0 || s.u != 0 || s.d != 0;
    return absl::OkStatus();
  };
  KRAKEN_RETURN_IF_ERROR(flag("stream", &r.stream));
  // text_output starts with the prompt only when asked: by default the TensorRT-LLM ensemble gives
  // the generated text alone, and so does the vLLM backend when streaming (it refuses to prepend
  // the prompt to a stream).
  r.exclude_input = r.interface == KserveInterface::kTensorRtLlm || r.stream;
  KRAKEN_RETURN_IF_ERROR(flag("exclude_input_in_output", &r.exclude_input));
  if (r.interface == KserveInterface::kVllm && r.stream && !r.exclude_input)
    return Bad("exclude_input_in_output", "must not be false when streaming (the prompt is not streamed back)");
  if (r.interface == KserveInterface::kTensorRtLlm) {
    KRAKEN_RETURN_IF_ERROR(ReadTrtllm(in, &r));
    KRAKEN_RETURN_IF_ERROR(ReadRequestedOutputs(req, &r));
    return r;
  }
  KRAKEN_RETURN_IF_ERROR(flag("return_finish_reason", &r.finish_reason));
  KRAKEN_RETURN_IF_ERROR(flag("return_num_input_tokens", &r.num_input_tokens));
  KRAKEN_RETURN_IF_ERROR(flag("return_num_output_tokens", &r.num_output_tokens));
  KRAKEN_RETURN_IF_ERROR(flag("return_cumulative_logprob", &r.cumulative_logprob));
  if (r.cumulative_logprob) r.generation.logprobs = true;
  if (auto it = in.find("sampling_parameters"); it != in.end()) {
    KRAKEN_ASSIGN_OR_RETURN(std::vector<std::string> json_text, Strings(it->second));
    if (json_text.size() != 1) return Bad("sampling_parameters", "must hold one JSON object");
    KRAKEN_RETURN_IF_ERROR(ReadSamplingParameters(json_text[0], &r));
  }
  KRAKEN_RETURN_IF_ERROR(ReadRequestedOutputs(req, &r));
  return r;
}

namespace {

// A BYTES output of shape [values.size()]: each element a 4-byte little-endian length, then its bytes.
void AddBytes(const std::string& name, const std::vector<std::string>& values, inference::ModelInferResponse* resp) {
  auto* out = resp->add_outputs();
  out->set_name(name);
  out->set_datatype("BYTES");
  out->add_shape(static_cast<int64_t>(values.size()));
  std::string raw;
  for (const std::string& value : values) {
    const uint32_t n = static_cast<uint32_t>(value.size());
    raw.append(reinterpret_cast<const char*>(&n), 4);
    raw += value;
  }
  resp->add_raw_output_contents(std::move(raw));
}

template <typename T>
void AddNumbers(const std::string& name, const char* type, const std::vector<T>& values,
                inference::ModelInferResponse* resp) {
  auto* out = resp->add_outputs();
  out->set_name(name);
  out->set_datatype(type);
  out->add_shape(static_cast<int64_t>(values.size()));
  std::string raw(values.size() * sizeof(T), '\0');
  if (!values.empty()) std::memcpy(raw.data(), values.data(), raw.size());
  resp->add_raw_output_contents(std::move(raw));
}

}  // namespace

void AppendKserveOutputs(const KserveRequest& req, const core::RequestParams& params,
                         std::span<const KserveSample> samples, bool last, inference::ModelInferResponse* resp) {
  auto wanted = [&](const char* name) {
    return req.outputs.empty() || std::find(req.outputs.begin(), req.outputs.end(), name) != req.outputs.end();
  };
  if (wanted("text_output")) {
    std::vector<std::string> texts;
    for (const KserveSample& s : samples)
      texts.push_back((s.first && !req.exclude_input ? params.prompt_text : std::string()) + std::string(s.text));
    AddBytes("text_output", texts, resp);
  }
  if (req.log_probs && wanted("output_log_probs")) {  // TensorRT-LLM: one sample
    std::vector<float> lps;
    if (samples[0].logprobs != nullptr)
      for (const core::TokenLogprobs& lp : *samples[0].logprobs) lps.push_back(lp.logprob);
    AddNumbers("output_log_probs", "FP32", lps, resp);
  }
  if (!last) return;
  std::vector<float> cumulative;
  std::vector<std::string> reasons;
  std::vector<uint32_t> tokens;
  for (const KserveSample& s : samples) {
    cumulative.push_back(static_cast<float>(s.cumulative_logprob));
    reasons.push_back(s.finish_reason == core::FinishReason::kStop ? "stop" : "length");
    tokens.push_back(s.completion_tokens);
  }
  if (req.log_probs && wanted("cum_log_probs")) AddNumbers("cum_log_probs", "FP32", cumulative, resp);
  if (req.cumulative_logprob && wanted("cumulative_logprob"))
    AddNumbers("cumulative_logprob", "FP32", cumulative, resp);
  if (req.finish_reason && wanted("finish_reason")) AddBytes("finish_reason", reasons, resp);
  if (req.num_input_tokens && wanted("num_input_tokens"))
    AddNumbers("num_input_tokens", "UINT32", std::vector<uint32_t>{static_cast<uint32_t>(params.prompt.size())}, resp);
  if (req.num_output_tokens && wanted("num_output_tokens")) AddNumbers("num_output_tokens", "UINT32", tokens, resp);
}

void AppendKserveOutputs(const KserveRequest& req, const core::RequestParams& params, const core::Output& out,
                         bool first, bool last, double cumulative_logprob, inference::ModelInferResponse* resp) {
  const KserveSample one{.text = out.text,
                         .first = first,
                         .logprobs = &out.logprobs,
                         .finish_reason = out.finish_reason,
                         .completion_tokens = out.completion_tokens,
                         .cumulative_logprob = cumulative_logprob};
  AppendKserveOutputs(req, params, std::span<const KserveSample>(&one, 1), last, resp);
}

}  // namespace kraken::server
