"""/v1/chat/completions, judged by the official openai client and LangChain's ChatOpenAI: the
messages rendered with the model's chat template exactly as transformers renders and tokenizes
them, the answer equal to the same prompt's completion, OpenAI's chat objects (messages, deltas,
logprobs with top_logprobs, usage), n samples, and precise refusals."""
import json
import os
import shutil

import openai
import pytest
from transformers import AutoTokenizer

from kraken_client import pb
from serving import ROOT, Server, request

MODEL_DIR = os.path.join(ROOT, "models", "kraken-kjv-4way")
MODEL = "kraken-kjv-4way"
MESSAGES = [{"role": "system", "content": "Thou art a scribe."},
            {"role": "user", "content": "Who made the light?"},
            {"role": "assistant", "content": "God said, Let there be light."},
            {"role": "user", "content": "And what was the light?"}]


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch-seqs", "32")
    yield s
    s.close()


def hf_ids(messages, add_generation_prompt=True):
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    return list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=True)["input_ids"])


def test_a_chat_answers_as_the_prompt_transformers_renders_would(server):
    client = server.openai()
    ids = hf_ids(MESSAGES)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0.8, seed=4,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    want = server.stub.Complete(request(ids=ids, max_tokens=12, temperature=0.8, seed=4, ignore_eos=True,
                                        logprobs=True, top_logprobs=2))
    choice = chat.choices[0]
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == "length"
    assert chat.usage.prompt_tokens == len(ids) and chat.usage.completion_tokens == 12
    # Logprobs as the chat API gives them: each token with its bytes and its top_logprobs most likely.
    content = choice.logprobs.content
    assert [c.logprob for c in content] == [lp.logprob for lp in want.logprobs]
    for c, lp in zip(content, want.logprobs):
        assert bytes(c.bytes).decode("utf-8", "replace") == c.token
        assert [t.logprob for t in c.top_logprobs] == [t.logprob for t in lp.top[:2]]
    # Without the generation prompt the template leaves the turn open, as transformers does.
    bare = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0,
                                          extra_body={"add_generation_prompt": False})
    assert bare.usage.prompt_tokens == len(hf_ids(MESSAGES, add_generation_prompt=False))
    # OpenAI's newer max_completion_tokens wins over max_tokens.
    short = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=9, max_completion_tokens=3,
                                           extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3


def test_a_streamed_chat_is_the_whole_chat_in_deltas_and_n_samples_each_have_theirs(server):
    client = server.openai()
    args = dict(model=MODEL, messages=MESSAGES[1:2], max_tokens=10, temperature=0.9, seed=8, n=2,
                extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args)
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.choices[0].message.content != whole.choices[1].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    firsts = [c for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(c.choices[0].index for c in firsts) == [0, 1], "each choice opens with the role"
    text = {0: "", 1: ""}
    finish = {}
    for c in chunks:
        for ch in c.choices:
            text[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert text == {i: c.message.content for i, c in enumerate(whole.choices)}
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices


@pytest.mark.parametrize("body,message,param", [
    ({}, "field 'messages' must be set", "messages"),
    ({"messages": []}, "field 'messages' must be a non-empty array of messages, got an empty array", "messages"),
    ({"messages": [{"content": "hi"}]}, "field 'messages[0].role' must be a string", "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]},
     "field 'messages[0].content' must be a string, an array of content parts or null, got number",
     "messages[0].content"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "field 'top_logprobs' needs 'logprobs': true, got 2", "top_logprobs"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "field 'tools' is not supported", "tools"),
    ({"messages": MESSAGES, "prompt": "x"},
     "field 'prompt' is not a field of the chat completions API", "prompt"),
])
def test_chat_refusals_name_the_field(server, body, message, param):
    import urllib.request
    req = urllib.request.Request(server.http_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400
    err = json.loads(e.value.read())["error"]
    assert message in err["message"], err
    if param:
        assert err["param"] == param


def test_a_model_without_a_template_refuses_and_a_template_file_gives_one(tmp_path):
    bare = tmp_path / "model"
    shutil.copytree(MODEL_DIR, bare)
    (bare / "chat_template.jinja").unlink()
    raising = tmp_path / "strict.jinja"
    raising.write_text("{% if messages[0].role != 'user' %}{{ raise_exception('The first message must be the "
                       "user\\'s') }}{% endif %}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    s = Server(model=str(bare), devices="cpu:1")
    try:
        with pytest.raises(openai.BadRequestError) as e:
            s.openai().chat.completions.create(model="model", messages=MESSAGES)
        assert "has no chat template" in str(e.value) and "--chat-template FILE" in str(e.value)
    finally:
        s.close()
    s = Server("--chat-template", str(raising), model=str(bare), devices="cpu:1")
    try:
        with pytest.raises(openai.BadRequestError) as e:
            s.openai().chat.completions.create(model="model", messages=MESSAGES)
        assert "The first message must be the user's" in str(e.value)
        r = s.openai().chat.completions.create(model="model", messages=MESSAGES[1:2], max_tokens=2)
        ids = list(s.stub.Tokenize(pb.TokenizeRequest(text="[user] Who made the light?\n")).token_ids)
        assert r.usage.prompt_tokens == len(ids)
    finally:
        s.close()


def test_langchain_chat_openai_invoke_stream_and_batch(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.http_url + "/v1", api_key="none", max_tokens=6, temperature=0,
                     max_retries=0, extra_body={"ignore_eos": True})
    client = server.openai()
    questions = ["Who made the light?", "What is in the beginning?"]
    want = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=6,
                                           temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
            for q in questions]
    assert llm.invoke(questions[0]).content == want[0]
    assert "".join(c.content for c in llm.stream(questions[1])) == want[1]
    assert [m.content for m in llm.batch(questions)] == want
