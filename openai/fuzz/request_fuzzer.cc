// libFuzzer target: any bytes as a /v1/completions body and as a /v1/chat/completions body. The
// parsers must answer every input with a request or an error, never crash or walk the input
// recursively: an error's OpenAI object is built and serialized, a parsed completion is validated
// against the test tokenizer as the server would (tokenizing its prompt, checking its stops), and a
// parsed chat's messages are rendered with a chat template that reads every message field. Run
// with the JSON dictionary, which builds deep nesting, huge numbers and bad UTF-8:
//   build-fuzz/openai/openai_request_fuzzer -dict=openai/fuzz/json.dict openai/fuzz/corpus/completions
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "openai/protocol.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/fuzz/fuzz_tokenizer.h"
#include "tokenizer/tokenizer.h"

namespace {

const kraken::tokenizer::Tokenizer& Tok() {
  return kraken::tokenizer::FuzzTokenizer();
}

const kraken::tokenizer::ChatTemplate& Template() {
  static const kraken::tokenizer::ChatTemplate t = *kraken::tokenizer::ChatTemplate::Parse(
      "{%- for m in messages %}{{ m.role | upper }}: {% if m.content is string %}{{ m.content | trim }}"
      "{% else %}{{ m.content | tojson }}{% endif %}{{ m | tojson }}\n{%- endfor %}"
      "{% if add_generation_prompt %}ASSISTANT:{% endif %}");
  return t;
}

void Chat(std::string_view body) {
  auto chat = kraken::openai::ParseChatRequest(body, /*context_length=*/1024);
  if (!chat.ok()) {
    if (chat.status().code() != absl::StatusCode::kInvalidArgument) std::abort();
    (void)kraken::openai::Dump(kraken::openai::ErrorObject(chat.status(), 400));
    return;
  }
  nlohmann::ordered_json context{{"messages", chat->messages}, {"add_generation_prompt", chat->add_generation_prompt}};
  auto text = Template().Render(context);
  if (!text.ok() && text.status().code() != absl::StatusCode::kInvalidArgument) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  Chat(body);
  auto parsed = kraken::openai::ParseCompletionRequest(body, /*context_length=*/1024);
  if (!parsed.ok()) {
    if (parsed.status().code() != absl::StatusCode::kInvalidArgument) std::abort();  // a bad body is a 400
    const int status = kraken::openai::HttpStatus(parsed.status());
    (void)kraken::openai::Dump(kraken::openai::ErrorObject(parsed.status(), status));
    return 0;
  }
  kraken::core::RequestLimits limits{.context_length = 1024, .vocab_size = Tok().vocab_size(), .eos_token_id = 0};
  auto params = kraken::core::ValidateGeneration(parsed->generation, limits, Tok(), kraken::openai::kCompletionFields);
  if (!params.ok()) (void)kraken::openai::Dump(kraken::openai::ErrorObject(params.status(), 400));
  return 0;
}
