"""Chat templates (tokenizer/chat_template.h) rendered as transformers' apply_chat_template renders
them: a corpus of templates in the styles the field uses (ChatML, Llama 2 and 3, Mistral, Gemma,
Phi, DeepSeek, Zephyr, Vicuna, Alpaca, Command-R, Granite, OpenAI content parts, tools as JSON),
each rendered over several conversations with and without the generation prompt by kraken-tokenize
--jsonl-chat and by transformers' renderer; the texts, and the errors a template raises, must be
equal."""
import json
import os
import subprocess

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from conftest import ROOT

BUILD = os.environ.get("KRAKEN_BUILD_DIR", os.path.join(ROOT, "build"))
TOKENIZE = os.path.join(BUILD, "tokenizer", "kraken-tokenize")

TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "chatml-multiline": """{%- for message in messages %}
    {%- if message.role == "system" %}
        {{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
""",
    "llama3": (
        "{% set loop_messages = messages %}"
        "{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "llama3-system-default": """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "Cutting Knowledge Date: December 2023" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
""",
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
        "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
        "{%- set ns = namespace(last_user=-1) %}"
        "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
        "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
        "{{- bos_token }}"
        "{%- for message in loop_messages %}"
        "{%- if message['role'] == 'user' %}"
        "{%- if loop.index0 == ns.last_user and system_message is defined %}"
        "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
        "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
        "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
        "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
        "initial optional system message!') }}{%- endif %}{%- endfor %}"),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"),
    "phi3": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"),
    "deepseek": (
        "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
        "{% set ns = namespace(is_first=false, system_prompt='') %}"
        "{%- for message in messages %}{%- if message['role'] == 'system' %}"
        "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
        "{{ bos_token }}{{ ns.system_prompt }}"
        "{%- for message in messages %}"
        "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
        "{%- elif message['role'] == 'assistant' %}"
        "{% set content = message['content'] %}"
        "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
        "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}{%- endfor %}"
        "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"),
    "zephyr": (
        "{% for message in messages %}\n"
        "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
        "{% endfor %}"),
    "vicuna": (
        "{% if messages[0]['role'] == 'system' %}{% set offset = 1 %}{{ messages[0]['content'] + ' ' }}"
        "{% else %}{% set offset = 0 %}{{ 'A chat between a curious user and an artificial intelligence "
        "assistant. ' }}{% endif %}"
        "{% for message in messages[offset:] %}"
        "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] ~ ' ' }}"
        "{% else %}{{ 'ASSISTANT: ' ~ message['content'] ~ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' ~ message['content'] ~ '\n\n' }}"
        "{% else %}{{ '### Response:\n' ~ message['content'] ~ eos_token ~ '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"),
    "command-r": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% elif false == true %}{% set loop_messages = messages %}"
        "{% set system_message = 'You are a large language model.' %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% if system_message != false %}"
        "{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + system_message + '<|END_OF_TURN_TOKEN|>' }}{% endif %}"
        "{% for message in loop_messages %}{% set content = message['content'] %}"
        "{% if message['role'] == 'user' %}"
        "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + content.strip() + '<|END_OF_TURN_TOKEN|>' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'  + content.strip() + '<|END_OF_TURN_TOKEN|>' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"),
    "granite": (
        "{%- for message in messages if message['role'] != 'system' %}"
        "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>' }}"
        "{%- if loop.last %}{{- ' (' ~ loop.length ~ ' turns, ' ~ loop.revindex0 ~ ' left)' }}{%- endif %}"
        "{%- if not loop.last %}{{- '\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '\\n<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"),
    "content-parts": (
        "{%- for message in messages %}{{- message.role | upper ~ ': ' }}"
        "{%- if message.content is string %}{{- message.content }}"
        "{%- else %}{%- for part in message.content %}{%- if part.type == 'text' %}{{- part.text }}"
        "{%- elif part.type == 'image_url' %}{{- '<image>' }}{%- endif %}{%- endfor %}{%- endif %}"
        "{{- '\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- 'ASSISTANT: ' }}{%- endif %}"),
    "tools-json": (
        "{%- if tools is defined and tools is not none %}{{- 'TOOLS ' + tools | tojson }}{%- endif %}"
        "{%- for message in messages %}"
        "{{- '<' ~ message['role'] ~ '>' ~ (message | tojson) ~ ' ' ~ (message.meta | default({}) | tojson(indent=2)) }}"
        "{%- endfor %}"
        "{{- ' users=' ~ (messages | selectattr('role', 'equalto', 'user') | list | length) }}"
        "{{- ' roles=' ~ (messages | map(attribute='role') | join(',')) }}"
        "{%- if add_generation_prompt %}{{- '<assistant>' }}{%- endif %}"),
    "arithmetic": (
        "{%- set ns = namespace(total=0, words=[]) %}"
        "{%- for m in messages %}{%- set ns.total = ns.total + m.content | length %}"
        "{%- set ns.words = ns.words + m.content.split() %}{%- endfor %}"
        "{{- ns.total }} {{ ns.total // 3 }} {{ ns.total % 7 }} {{ ns.total / 4 }} {{ -ns.total % 5 }} {{ 2 ** 10 }}"
        "|{{ ns.words | length }}|{{ ns.words[-1] if ns.words else 'none' }}|{{ ns.words[::2] | join(' ') }}"
        "|{{ messages[-1].content[:4] }}|{{ none }}|{{ true }}|{{ 1.5 }}|{{ missing }}|{{ 'x' if missing is undefined }}"
        "|{% for k, v in {'a': 1, 'b': [1, 2]}.items() %}{{ k }}={{ v }};{% endfor %}"
        "|{% for i in range(3) %}{% if i == 1 %}{% continue %}{% endif %}{{ i }}{% endfor %}"
        "|{% for i in range(10) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% else %}never{% endfor %}"
        "|{% for x in [] %}x{% else %}empty{% endfor %}"
        "|{{ 'Hello World'.lower().replace('world', 'there').title() }}|{{ '  pad  ' | trim }}|"
        "{{ messages[0].get('name', 'anonymous') }}|{{ 'a,b,,c'.split(',') }}|{{ [1, 'two', none, true] }}"),
    # What jinja2 does at the edges: spaces before a tag after an expression on its line stay;
    # CRLF reads as LF and one trailing newline goes; what a loop body sets is gone next time round;
    # floats print as Python's repr; nothing is in an undefined value; map() of a missing key is "".
    "edges": ("{{ messages | length }}  {% if true %}x{% endif %}\r\n"
              "{%- for m in messages %}{% if loop.first %}{% set seen = 'first' %}{% endif %}"
              "[{{ seen | default('unset') }}]{% endfor %}\r\n"
              "{{ 100000.0 }} {{ 0.0001 }} {{ 0.00001 }} {{ 1e16 }} {{ 2.5e-7 }} {{ 1.0 / 3 }} {{ -0.5 }} {{ 1e300 * 10 }}\n"
              "{{ 'x' in nothing }} {{ messages | map(attribute='nope') | join('|') }} {{ 7 // -2 }} {{ -7 % 3 }}"
              " {{ 2 ** 62 }} {{ messages | map(attribute='role') | list | tojson }}\n"),
}

CONVERSATIONS = {
    "one-user": [{"role": "user", "content": "Hello there"}],
    "system-user": [{"role": "system", "content": "You answer in verse."},
                    {"role": "user", "content": "What is light?"}],
    "multi-turn": [{"role": "user", "content": "  Who made the heaven?  "},
                   {"role": "assistant", "content": "In the beginning God created the heaven and the earth."},
                   {"role": "user", "content": "And then?\nTell me more: \"quotes\", 'apostrophes', unicode é ü 😀"}],
    "system-multi": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "<think>greet</think>Hello!"},
                     {"role": "user", "content": "Bye", "meta": {"lang": "en", "nested": {"k": [1, 2.5, None]}}}],
    "assistant-first": [{"role": "assistant", "content": "I speak first."},
                        {"role": "user", "content": "That breaks alternation."}],
    "parts": [{"role": "user", "content": [{"type": "text", "text": "Look: "},
                                           {"type": "image_url", "image_url": {"url": "x"}},
                                           {"type": "text", "text": " what is it?"}]}],
}

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}


def hf_render(template, messages, add_generation_prompt):
    try:
        rendered, _ = render_jinja_template([messages], chat_template=template,
                                            add_generation_prompt=add_generation_prompt, **SPECIAL)
        return {"text": rendered[0]}
    except Exception as e:  # noqa: BLE001 - the template's own error is what is compared
        return {"error": str(e)}


def cases():
    for name, template in TEMPLATES.items():
        for conv, messages in CONVERSATIONS.items():
            if name not in ("content-parts", "edges") and conv == "parts":
                continue
            for gen in (True, False):
                yield name, conv, gen, template, messages


def test_the_corpus_renders_as_transformers_renders_it(tmp_path):
    rows = list(cases())
    assert len(TEMPLATES) >= 15
    path = tmp_path / "chat.jsonl"
    with open(path, "w") as f:
        for _, _, gen, template, messages in rows:
            context = {"messages": messages, "add_generation_prompt": gen, "tools": None, "documents": None,
                       **SPECIAL}
            f.write(json.dumps({"template": template, "context": context}) + "\n")
    out = subprocess.run([TOKENIZE, "--jsonl-chat", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ours = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(ours) == len(rows)
    errors = 0
    for (name, conv, gen, template, messages), got in zip(rows, ours):
        want = hf_render(template, messages, gen)
        if "error" in want:
            errors += 1
            assert "error" in got, (name, conv, gen, want, got)
            assert got["error"] == want["error"], (name, conv, gen, want, got)  # raise_exception's own message
        else:
            assert got == want, (name, conv, gen)
    assert errors >= 4, "the alternation checks raise where transformers raises"


@pytest.mark.parametrize("template,message", [
    ("{% for m in messages %}", "chat template line 1: the source ends inside a block: expected {% endfor %}"),
    ("{% macro f() %}x{% endmacro %}", "chat template line 1: {% macro %} is not supported in chat templates here"),
    ("{{ messages | frobnicate }}", "chat template line 1: the filter 'frobnicate' is not supported here"),
    ("line\n{{ undefined_thing.attr }}", "chat template line 2: 'undefined_thing' is undefined"),
    ("{{ 'a' + 1 }}", "chat template line 1: '+' between a string and a number is not defined"),
    ("{% for i in range(100000000) %}{% endfor %}", "steps"),
    ("{{ 'x' * 100000000 }}{{ 'y' }}", "bytes"),
    ("{{ 9223372036854775807 + 1 }}", "integer overflow in 9223372036854775807 + 1"),
    ("{{ (-9223372036854775807 - 1) // -1 }}", "integer overflow"),
    ("{% if true false %}x{% endif %}", "chat template line 1: unexpected 'false' in {% if %}"),
    ("{% break %}", "chat template line 1: {% break %} outside a loop"),
    ("{{ " + " ~ ".join(["'a'"] * 2000) + " }}", "an expression of more than 1000 parts"),
    ("{{ (((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((1" + ")" * 70 + " }}",
     "nest too deeply"),
])
def test_templates_outside_the_subset_or_past_the_limits_fail_by_name(tmp_path, template, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"template": template, "context": {"messages": []}}) + "\n")
    out = subprocess.run([TOKENIZE, "--jsonl-chat", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert "error" in got and message in got["error"], got
