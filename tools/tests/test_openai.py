"""The OpenAI-compatible HTTP API, judged by the official `openai` client (and raw HTTP where the
client would hide what is sent): the same answers as kraken.v1 for the same seed, OpenAI error
objects with the right status for every refusal, SSE framing, disconnects, and 1,000 concurrent
streams on a handful of threads."""
import asyncio
import json
import os
import re
import socket
import time
import urllib.request

import openai
import pytest

from kraken_client import pb
from serving import Server, request
from test_reliability import metric

MODEL = "kraken-kjv-4way"


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch-seqs", "64", "--max-batch-tokens", "512")
    yield s
    s.close()


def http(server, method, path, body=None, headers=None, raw=None):
    """(status, headers, body bytes) of one request; `raw` sends those bytes as the body."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.http_url + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_completion_equals_kraken_v1_for_the_same_seed(server):
    client = server.openai()
    for temperature in (0.0, 0.9):
        r = client.completions.create(model=MODEL, prompt="And God said,", max_tokens=24, temperature=temperature,
                                      top_p=0.95, seed=11, logprobs=2)
        g = server.stub.Complete(request(text="And God said,", max_tokens=24, temperature=temperature, top_p=0.95,
                                         seed=11, logprobs=True, top_logprobs=2))
        choice = r.choices[0]
        assert choice.text == g.text
        assert choice.finish_reason == "length"
        assert r.usage.completion_tokens == 24 == len(g.token_ids)
        assert r.usage.prompt_tokens == len(server.stub.Tokenize(pb.TokenizeRequest(text="And God said,")).token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + 24
        assert choice.logprobs.token_logprobs == pytest.approx([lp.logprob for lp in g.logprobs], abs=0)
        assert "".join(choice.logprobs.tokens) == choice.text
        # The two most likely, then the sampled token when it is not among them (OpenAI: up to logprobs + 1).
        assert [len(t) for t in choice.logprobs.top_logprobs] == [len(lp.top) for lp in g.logprobs]
        assert all(len(lp.top) == 2 + (lp.token_id not in [a.token_id for a in lp.top[:2]]) for lp in g.logprobs)
        for t, tok, v in zip(choice.logprobs.top_logprobs, choice.logprobs.tokens, choice.logprobs.token_logprobs):
            assert t[tok] == v
        assert r.model == MODEL and r.object == "text_completion" and r.id.startswith("cmpl-")
    # "logprobs": true, as pydantic-based servers read it: one alternative per token.
    r = client.completions.create(model=MODEL, prompt="And God said,", max_tokens=4, temperature=0, logprobs=True)
    tops = r.choices[0].logprobs.top_logprobs
    assert [len(t) for t in tops] == [1] * 4 and [next(iter(t)) for t in tops] == r.choices[0].logprobs.tokens
    # A hot sample: every token is in its own top_logprobs with its own logprob, most of them after
    # the most likely one.
    r = client.completions.create(model=MODEL, prompt="And the LORD spake unto Moses, saying,", max_tokens=6,
                                  temperature=1.5, top_p=1, logprobs=1, seed=3)
    lp = r.choices[0].logprobs
    assert all(t[tok] == v for t, tok, v in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))
    assert sum(len(t) == 2 for t in lp.top_logprobs) >= 3, lp.top_logprobs


def test_stream_equals_non_stream_and_is_framed_as_openai_does(server):
    client = server.openai()
    args = dict(model=MODEL, prompt="In the beginning", max_tokens=30, temperature=0.7, seed=3)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    # Exactly one chunk carries the finish reason, and it is the last text chunk; the usage comes after it.
    reasons = [c.choices[0].finish_reason for c in text_chunks]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_sse_bytes_end_with_done(server):
    status, headers, body = http(server, "POST", "/v1/completions",
                                 {"prompt": "Blessed are the", "max_tokens": 4, "temperature": 0, "stream": True})
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream"
    events = body.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert "".join(p["choices"][0]["text"] for p in payloads) != ""
    assert all("usage" not in p for p in payloads)  # only with stream_options.include_usage


def test_token_id_prompt_equals_text_prompt(server):
    client = server.openai()
    ids = list(server.stub.Tokenize(pb.TokenizeRequest(text="The LORD is my shepherd;")).token_ids)
    a = client.completions.create(model=MODEL, prompt="The LORD is my shepherd;", max_tokens=10, temperature=0)
    b = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    assert a.usage.prompt_tokens == b.usage.prompt_tokens == len(ids)


def test_a_prompt_array_answers_each_prompt_as_its_own_request_would(server):
    # OpenAI and vLLM: choices prompt by prompt, then by sample; each exactly the single-prompt answer.
    client = server.openai()
    ids = list(server.stub.Tokenize(pb.TokenizeRequest(text="In the beginning")).token_ids)
    prompts = ["And God said,", ids, "The LORD is my shepherd;"]
    kw = dict(model=MODEL, max_tokens=8, temperature=0.9, seed=5, n=2, logprobs=2, echo=True,
              extra_body={"ignore_eos": True})
    alone = [client.completions.create(prompt=p, **kw) for p in prompts]
    batch = client.completions.create(prompt=prompts, **kw)
    assert [c.index for c in batch.choices] == list(range(6))
    for i, c in enumerate(batch.choices):
        want = alone[i // 2].choices[i % 2]
        assert (c.text, c.finish_reason) == (want.text, want.finish_reason)
        assert c.logprobs.tokens == want.logprobs.tokens
        assert c.logprobs.token_logprobs == want.logprobs.token_logprobs
        assert c.logprobs.top_logprobs == want.logprobs.top_logprobs
        assert c.logprobs.text_offset == want.logprobs.text_offset
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone) == 6 * 8
    assert batch.usage.total_tokens == batch.usage.prompt_tokens + batch.usage.completion_tokens
    # Streamed: each chunk names its choice; joined per index they are the unary texts.
    kw.pop("logprobs")
    texts, finishes, usage = {}, {}, None
    for chunk in client.completions.create(prompt=prompts, stream=True, stream_options={"include_usage": True}, **kw):
        if not chunk.choices:
            usage = chunk.usage
            continue
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {i: c.text for i, c in enumerate(batch.choices)}
    assert finishes == {i: "length" for i in range(6)}
    assert usage.prompt_tokens == batch.usage.prompt_tokens and usage.completion_tokens == 48


def test_langchain_openai_llm_invoke_stream_and_batch(server):
    # LangChain's completions LLM: batch() sends its prompts in one request (up to 20 each).
    from langchain_openai import OpenAI

    llm = OpenAI(model=MODEL, base_url=server.http_url + "/v1", api_key="none", max_tokens=6, temperature=0,
                 max_retries=0, extra_body={"ignore_eos": True})
    client = server.openai()
    prompts = ["And God said,", "In the beginning", "The LORD is my shepherd;"]
    want = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    assert llm.invoke(prompts[0]) == want[0]
    assert "".join(llm.stream(prompts[1])) == want[1]
    assert llm.batch(prompts) == want
    assert [g[0].text for g in llm.generate(prompts * 9).generations] == want * 9  # two requests of 20 and 7


def test_a_burst_of_600_requests_queues_at_the_default_capacity(server):
    # guidellm's sweep opens 512 requests at once: at the default --max-waiting (0: from memory,
    # at least 1024) none is refused with 429.
    async def burst():
        client = openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="none", max_retries=0, timeout=300)
        try:
            rs = await asyncio.gather(*[client.completions.create(model=MODEL, prompt=f"And God said, {i}",
                                                                  max_tokens=2, extra_body={"ignore_eos": True})
                                        for i in range(600)], return_exceptions=True)
        finally:
            await client.close()
        return rs
    results = asyncio.run(burst())
    failures = [r for r in results if isinstance(r, Exception)]
    assert not failures, f"{len(failures)} failed, first: {failures[0]!r}"
    assert all(r.usage.completion_tokens == 2 for r in results)


def test_a_prompt_array_past_its_limits_is_refused_by_name(server):
    limit = server.stub.GetModelInfo(pb.GetModelInfoRequest()).max_waiting_requests
    assert 1024 <= limit <= 16384, "--max-waiting 0: from the host's memory, within its bounds"
    status, _, raw = http(server, "POST", "/v1/completions", {"prompt": ["a"] * 1025, "max_tokens": 1})
    assert status == 400
    err = json.loads(raw)["error"]
    assert err["message"] == "field 'prompt' holds 1025 prompts; at most 1024 per request" and err["param"] == "prompt"
    # Past the waiting queue's capacity (prompts x n), before any prompt is tokenized.
    prompts = limit // 16 + 1
    if prompts <= 1024:
        status, _, raw = http(server, "POST", "/v1/completions", {"prompt": ["a"] * prompts, "n": 16, "max_tokens": 1})
        assert status == 400
        assert json.loads(raw)["error"]["message"] == (
            f"field 'prompt' holds {prompts} prompts of n = 16 samples each, {prompts * 16} samples in all; the limit "
            f"per request is {limit} (the waiting queue's capacity, --max-waiting)")


def test_logit_bias_forces_and_bans_tokens_as_kraken_v1_does(server):
    client = server.openai()
    lord = list(server.stub.Tokenize(pb.TokenizeRequest(text=" LORD")).token_ids)
    assert len(lord) == 1
    forced = client.completions.create(model=MODEL, prompt="And God said,", max_tokens=5, temperature=1.0, seed=2,
                                       logit_bias={str(lord[0]): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == " LORD" * 5
    # -100 on each greedy choice in turn: the greedy text changes at the banned token and never holds it.
    greedy = client.completions.create(model=MODEL, prompt="And God said,", max_tokens=8, temperature=0,
                                       logprobs=0, extra_body={"ignore_eos": True})
    first = list(server.stub.Tokenize(pb.TokenizeRequest(text=greedy.choices[0].logprobs.tokens[0])).token_ids)
    banned = client.completions.create(model=MODEL, prompt="And God said,", max_tokens=8, temperature=0,
                                       logit_bias={str(first[0]): -100}, extra_body={"ignore_eos": True})
    g = server.stub.Complete(request(text="And God said,", max_tokens=8, temperature=0, ignore_eos=True,
                                     logit_bias={first[0]: -100}))
    assert first[0] not in g.token_ids and banned.choices[0].text == g.text != greedy.choices[0].text


def test_a_batch_full_of_logit_biases_fits_the_step_plan(server):
    # 48 prompts of 300 biases each in one request: 28,800 bias slots in a step, more than the
    # contexts alone reserve (64 x 256); every prompt is answered and nobody's step fails.
    bias = {str(i): -1.0 for i in range(1, 301)}
    r = server.openai().completions.create(model=MODEL, prompt=["And God said,"] * 48, max_tokens=2, temperature=0,
                                           logit_bias=bias, extra_body={"ignore_eos": True})
    assert len(r.choices) == 48 and all(c.finish_reason == "length" for c in r.choices)
    assert len({c.text for c in r.choices}) == 1
    assert r.usage.completion_tokens == 96


def test_stop_string_and_echo(server):
    client = server.openai()
    free = client.completions.create(model=MODEL, prompt="And God said,", max_tokens=20, temperature=0)
    word = free.choices[0].text.split()[2]
    r = client.completions.create(model=MODEL, prompt="And God said,", max_tokens=20, temperature=0, stop=[word])
    assert r.choices[0].finish_reason == "stop"
    assert word not in r.choices[0].text
    assert free.choices[0].text.startswith(r.choices[0].text)
    e = client.completions.create(model=MODEL, prompt="And God said,", max_tokens=5, temperature=0, echo=True)
    assert e.choices[0].text == "And God said," + free.choices[0].text[:len(e.choices[0].text) - 13]


def test_max_tokens_null_fills_the_context(server):
    # Failure case B18: null is allowed by the OpenAI spec and must not be a 500.
    ids = [5] * 250
    status, _, body = http(server, "POST", "/v1/completions",
                           {"prompt": ids, "max_tokens": None, "temperature": 0, "ignore_eos": True})
    assert status == 200, body
    out = json.loads(body)
    assert out["usage"]["completion_tokens"] == 6
    assert out["choices"][0]["finish_reason"] == "length"


# (body, HTTP status, message, param): every refusal names the field, the limit and the value.
INVALID = [
    ({"prompt": "a", "top_p": 0}, 400, "field 'top_p' must be in (0, 1], got 0", "top_p"),
    ({"prompt": "a", "temperature": -1}, 400, "field 'temperature' must be >= 0, got -1", "temperature"),
    ({"prompt": "a", "temperature": "hot"}, 400, "field 'temperature' must be a number, got string \"hot\"",
     "temperature"),
    ({"prompt": "a", "max_tokens": -1}, 400, "field 'max_tokens' must be >= 0, got -1", "max_tokens"),
    ({"prompt": "a", "max_token": 5}, 400,
     "field 'max_token' is not a field of the completions API (did you mean 'max_tokens'?)", "max_token"),
    ({"prompt": ""}, 400, "field 'prompt' must not be empty", "prompt"),
    ({"prompt": [""]}, 400, "field 'prompt' must not be empty", "prompt"),  # failure case B21
    ({"prompt": []}, 400, "field 'prompt' must not be empty", "prompt"),
    ({"prompt": [1, 4096]}, 400, "field 'prompt[1]' must be in [0, 4096), got 4096", "prompt[1]"),
    ({"prompt": [5] * 256}, 400, "field 'prompt' has 256 tokens; the context length is 256", "prompt"),
    ({"prompt": ["a", ""]}, 400, "field 'prompt[1]' must not be empty", "prompt[1]"),
    ({"prompt": [[1], [1, 4096]]}, 400, "field 'prompt[1][1]' must be in [0, 4096), got 4096", "prompt[1][1]"),
    ({"prompt": ["a", 5]}, 400, "field 'prompt[1]' must be a string or an array of token ids, got number 5",
     "prompt[1]"),
    ({"prompt": "a", "n": 0}, 400, "field 'n' must be in [1, 16], got 0", "n"),
    ({"prompt": "a", "n": 17}, 400, "field 'n' must be in [1, 16], got 17", "n"),
    ({"prompt": "a", "n": 2, "best_of": 3}, 400,
     "field 'best_of' must equal n (2): this server returns every sample it generates, got 3", "best_of"),
    ({"prompt": "a", "logprobs": 21}, 400, "field 'logprobs' must be in [0, 20], got 21", "logprobs"),
    ({"prompt": "a", "stop": ["x"] * 17}, 400, "field 'stop' may hold at most 16 strings, got 17", "stop"),
    ({"prompt": "a", "seed": -4}, 400, "field 'seed' must be >= 0, got -4", "seed"),
    ({"prompt": "a", "logit_bias": {"abc": 1}}, 400,
     "field 'logit_bias' has the key \"abc\", which is not a token id", "logit_bias"),
    ({"prompt": "a", "logit_bias": {"5": 101}}, 400,
     "field 'logit_bias' gives token 5 the bias 101; biases must be in [-100, 100]", "logit_bias"),
    ({"prompt": "a", "logit_bias": {"4096": 1}}, 400,
     "field 'logit_bias' holds token 4096, outside the vocabulary [0, 4096)", "logit_bias"),
    ({"prompt": "a", "logit_bias": {"5": "x"}}, 400, "field 'logit_bias[\"5\"]' must be a number, got string",
     "logit_bias[\"5\"]"),
    ({"prompt": "a", "max_tokens": 3, "min_tokens": 4}, 400, "field 'min_tokens' must be <= max_tokens (3",
     "min_tokens"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, 400,
     "field 'stream_options' is allowed only with 'stream': true", "stream_options"),
    ({"prompt": "a", "model": "gpt-4"}, 404,
     "field 'model' names 'gpt-4', which this server does not serve (it serves 'kraken-kjv-4way')", "model"),
]


@pytest.mark.parametrize("body,status,message,param", INVALID, ids=[m for _, _, m, _ in INVALID])
def test_refusals_are_openai_error_objects(server, body, status, message, param):
    before = server.scrape()
    got, headers, raw = http(server, "POST", "/v1/completions", body)
    assert got == status, raw
    assert headers["Content-Type"] == "application/json"
    err = json.loads(raw)["error"]
    assert message in err["message"]
    assert err["param"] == param and err["code"] == status
    reason = "not_found" if status == 404 else "invalid_argument"
    assert metric(server.scrape(), "kraken_request_failure_total", f'reason="{reason}"') == \
        metric(before, "kraken_request_failure_total", f'reason="{reason}"') + 1
    # The official client raises the matching exception with the same message, and the server is unharmed.
    client = server.openai()
    expected = openai.NotFoundError if status == 404 else openai.BadRequestError
    rest = {k: v for k, v in body.items() if k not in ("model", "prompt")}
    with pytest.raises(expected) as e:
        client.completions.create(model=body.get("model", MODEL), prompt=body["prompt"], extra_body=rest)
    assert message in str(e.value)
    assert client.completions.create(model=MODEL, prompt="a", max_tokens=2,
                                     extra_body={"ignore_eos": True}).usage.completion_tokens == 2


@pytest.mark.parametrize("raw,message", [
    (b"{not json", "the request body: not valid JSON (at byte 3)"),
    (b"[1, 2]", "the request body must be a JSON object, got array [1,2]"),
    (b'{"prompt": "a\xff"}', "the request body: not valid JSON (at byte 14)"),  # failure case B25: invalid UTF-8
])
def test_bodies_that_are_not_requests(server, raw, message):
    status, _, body = http(server, "POST", "/v1/completions", raw=raw, headers={"Content-Type": "application/json"})
    assert status == 400
    assert json.loads(body)["error"]["message"] == message


def test_oversized_body_is_413_and_counted(server):
    before = metric(server.scrape(), "kraken_request_failure_total", 'reason="resource_exhausted"')
    big = json.dumps({"prompt": "a" * (5 << 20)}).encode()
    try:
        status, _, body = http(server, "POST", "/v1/completions", raw=big)
    except (ConnectionResetError, BrokenPipeError, urllib.error.URLError):
        pytest.fail("the server closed the connection without answering 413")
    assert status == 413
    assert f"the request body is {len(big)} bytes; the limit (--max-message-bytes) is 4194304" in \
        json.loads(body)["error"]["message"]
    assert metric(server.scrape(), "kraken_request_failure_total", 'reason="resource_exhausted"') == before + 1


def test_models_tokenize_detokenize_health_version(server):
    models = server.openai().models.list()
    assert [m.id for m in models.data] == [MODEL]
    one = server.openai().models.retrieve(MODEL)  # GET /v1/models/{id}
    assert one.id == MODEL and one.model_dump() == models.data[0].model_dump()
    with pytest.raises(openai.NotFoundError):
        server.openai().models.retrieve("gpt-4")
    text = "And God said, Let there be light: and there was light."
    status, _, body = http(server, "POST", "/tokenize", {"prompt": text})
    ids = list(server.stub.Tokenize(pb.TokenizeRequest(text=text)).token_ids)
    assert status == 200 and json.loads(body) == {"count": len(ids), "max_model_len": 256, "tokens": ids,
                                                   "token_strs": None}
    status, _, body = http(server, "POST", "/detokenize", {"tokens": ids})
    assert status == 200 and json.loads(body) == {"prompt": text}
    status, _, body = http(server, "POST", "/detokenize", {"tokens": [1, 99999]})
    assert status == 400 and "field 'tokens[1]' must be in [0, 4096), got 99999" in json.loads(body)["error"]["message"]
    assert http(server, "GET", "/health")[0] == 200
    assert json.loads(http(server, "GET", "/version")[2])["version"]
    # /metrics answers on the API port too, and equals the metrics port's families.
    status, headers, body = http(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert re.findall(r"^# TYPE (\S+)", body.decode(), re.M) == re.findall(r"^# TYPE (\S+)", server.scrape(), re.M)


def wait_for(cond, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return time.time() - t0
        time.sleep(0.02)
    pytest.fail(f"{what} not within {timeout} s")


def test_a_disconnected_stream_frees_its_kv_cache(server):
    # Failure case B33: the request ends at the next step after the client goes, not at max_tokens.
    before = metric(server.scrape(), "kraken_request_failure_total", 'reason="cancelled"')
    body = json.dumps({"prompt": "And", "max_tokens": 250, "temperature": 1.0, "ignore_eos": True, "stream": True,
                       "seed": 1}).encode()
    s = socket.create_connection(("127.0.0.1", server.http_port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")
    wait_for(lambda: metric(server.scrape(), "kraken_num_requests_running") == 1, 10, "the request running")
    s.close()
    wait_for(lambda: metric(server.scrape(), "kraken_num_requests_running") == 0, 5, "the request ending")
    scrape = server.scrape()
    assert metric(scrape, "kraken_kv_cache_usage_ratio") == 0
    assert metric(scrape, "kraken_request_failure_total", 'reason="cancelled"') == before + 1
    # A non-streamed request whose client leaves is cancelled too (the connection watches its socket).
    body = json.dumps({"prompt": "And", "max_tokens": 250, "ignore_eos": True, "seed": 1}).encode()
    s = socket.create_connection(("127.0.0.1", server.http_port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode() +
              b"\r\n\r\n" + body)
    s.close()
    wait_for(lambda: metric(server.scrape(), "kraken_request_failure_total", 'reason="cancelled"') == before + 2, 5,
             "the unary request cancelled")


def threads_and_rss(pid):
    status = open(f"/proc/{pid}/status").read()
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))
    rss_kib = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))
    return threads, rss_kib / 1024


def test_a_thousand_concurrent_streams():
    import httpx2  # the openai client's HTTP library
    s = Server("--max-waiting", "2000", "--max-batch-seqs", "128", "--max-batch-tokens", "1024")
    try:
        threads_idle, rss_idle = threads_and_rss(s.proc.pid)
        n, peak = 1000, {"threads": 0, "rss": 0.0, "sockets": 0}
        stop = False

        def link(fd):  # "" for a descriptor closed since the listing (the server opens and closes files)
            try:
                return os.readlink(f"/proc/{s.proc.pid}/fd/{fd}")
            except FileNotFoundError:
                return ""

        def sample():
            fds = os.listdir(f"/proc/{s.proc.pid}/fd")
            sockets = sum(1 for f in fds if link(f).startswith("socket:"))
            t, r = threads_and_rss(s.proc.pid)
            peak.update(threads=max(peak["threads"], t), rss=max(peak["rss"], r),
                        sockets=max(peak["sockets"], sockets))

        async def sampler():
            while not stop:
                sample()
                await asyncio.sleep(0.05)

        async def one(client):
            stream = await client.completions.create(model=MODEL, prompt="And God said,", max_tokens=8,
                                                     temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream if c.choices])

        async def main():
            nonlocal stop
            limits = httpx2.Limits(max_connections=n + 100, max_keepalive_connections=n + 100)
            async with openai.DefaultAsyncHttpxClient(limits=limits, timeout=300) as h:
                client = openai.AsyncOpenAI(base_url=s.http_url + "/v1", api_key="none", max_retries=0, http_client=h)
                watcher = asyncio.create_task(sampler())
                outs = await asyncio.gather(*(one(client) for _ in range(n)))
                stop = True
                await watcher
                return outs

        t0 = time.time()
        outs = asyncio.run(main())
        elapsed = time.time() - t0
        reference = s.openai().completions.create(model=MODEL, prompt="And God said,", max_tokens=8,
                                                  temperature=0).choices[0].text
        assert outs == [reference] * n  # greedy and batch-invariant: every stream the same text
        print(f"\n1000 concurrent SSE streams: {elapsed:.1f} s; server threads {threads_idle} idle, "
              f"{peak['threads']} at peak; RSS {rss_idle:.0f} MiB idle, {peak['rss']:.0f} MiB at peak; "
              f"{peak['sockets']} sockets open at peak")
        assert peak["sockets"] >= n  # they really were open at once
        assert peak["threads"] <= threads_idle + 4  # no thread per connection
    finally:
        s.close()


def test_api_key_applies_to_http_and_health_stays_open():
    s = Server("--api-key", "sesame", api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            s.openai(api_key="wrong").completions.create(model=MODEL, prompt="a", max_tokens=1)
        assert "invalid API key" in str(e.value)
        status, _, body = http(s, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 1})
        assert status == 401 and "missing 'Authorization: Bearer <key>' header" in json.loads(body)["error"]["message"]
        assert s.openai(api_key="sesame").completions.create(model=MODEL, prompt="a", max_tokens=1,
                                                             extra_body={"ignore_eos": True}).usage.completion_tokens == 1
        assert http(s, "GET", "/health")[0] == 200
        assert http(s, "GET", "/v1/models")[0] == 401
    finally:
        s.close()


def test_queue_full_is_429():
    s = Server("--max-waiting", "1", "--max-batch-seqs", "1")
    try:
        client = s.openai()

        async def main():
            c = openai.AsyncOpenAI(base_url=s.http_url + "/v1", api_key="none", max_retries=0)
            return await asyncio.gather(*(c.completions.create(model=MODEL, prompt="And", max_tokens=200,
                                                               extra_body={"ignore_eos": True}) for _ in range(6)),
                                        return_exceptions=True)

        results = asyncio.run(main())
        limited = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert limited, results
        assert all("queue" in str(r) for r in limited)
        assert client.completions.create(model=MODEL, prompt="a", max_tokens=1,
                                         extra_body={"ignore_eos": True}).usage.completion_tokens == 1
    finally:
        s.close()


def test_request_id_header_and_continuous_usage(server):
    status, headers, body = http(server, "POST", "/v1/completions",
                                 {"prompt": "And God said,", "max_tokens": 6, "temperature": 0, "stream": True,
                                  "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
                                 headers={"X-Request-Id": "abc-123"})
    assert status == 200 and headers["X-Request-Id"] == "abc-123"
    chunks = [json.loads(e[6:]) for e in body.decode().split("\n\n") if e.startswith("data: {")]
    assert all(c["id"] == "cmpl-abc-123" for c in chunks)
    # Every chunk carries the tokens sent so far, this one's included; they only grow, to the total.
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] >= 1
    assert all(c["usage"]["prompt_tokens"] == chunks[0]["usage"]["prompt_tokens"] for c in chunks)


def test_a_slow_reader_slows_nobody_and_loses_nothing(server):
    # A stream whose client reads nothing (a tiny receive buffer): another request meanwhile
    # finishes, and the slow stream's own generation ends in the engine before the client has read
    # a byte (the engine never waits for a connection); then the client receives the whole
    # completion, whatever was still pending joined into fewer events.
    body = json.dumps({"prompt": "And", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True,
                       "logprobs": 20}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    s.connect(("127.0.0.1", server.http_port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode() +
              b"\r\n\r\n" + body)
    client = server.openai()
    t0 = time.time()
    other = client.completions.create(model=MODEL, prompt="In the beginning", max_tokens=40, temperature=0)
    other_s = time.time() - t0
    assert other.usage.completion_tokens == 40
    wait_for(lambda: metric(server.scrape(), "kraken_num_requests_running") == 0, 30, "the slow stream's request end")
    raw = b""
    s.settimeout(30)
    while not raw.endswith(b"0\r\n\r\n"):
        part = s.recv(1 << 16)
        assert part, "the connection closed before the end"
        raw += part
    s.close()
    head, _, chunked = raw.partition(b"\r\n\r\n")
    payload, rest = b"", chunked
    while True:  # de-chunk
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        payload, rest = payload + rest[:size], rest[size + 2:]
    events = [json.loads(e[6:]) for e in payload.decode().split("\n\n") if e.startswith("data: {")]
    text = "".join(e["choices"][0]["text"] for e in events)
    whole = client.completions.create(model=MODEL, prompt="And", max_tokens=200, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert text == whole.choices[0].text
    assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events) == 200
    print(f"\nslow reader: 200 tokens in {len(events)} events; the other request took {other_s:.2f} s")


@pytest.mark.parametrize("seed", [1, 2])  # seeds whose draws include characters split across tokens
def test_streamed_text_is_whole_utf8_and_equals_the_unary_text(server, seed):
    # Failure cases B01/B02/B25: at a very high temperature the model emits byte tokens that split
    # characters (and sequences that are no UTF-8 at all). Every event is valid UTF-8 JSON, the
    # events join to the unary text, and that is the tokenizer's decoding of the tokens drawn.
    args = {"prompt": [95, 160, 120], "max_tokens": 200, "temperature": 100.0, "seed": seed, "ignore_eos": True}
    status, _, body = http(server, "POST", "/v1/completions", {**args, "stream": True})
    assert status == 200
    events = [json.loads(e[6:]) for e in body.decode("utf-8", errors="strict").split("\n\n") if e.startswith("data: {")]
    streamed = "".join(e["choices"][0]["text"] for e in events)
    unary = json.loads(http(server, "POST", "/v1/completions", args)[2])["choices"][0]["text"]
    assert streamed == unary
    g = server.stub.Complete(request(ids=[95, 160, 120], max_tokens=200, temperature=100.0, seed=seed, ignore_eos=True))
    assert streamed == server.stub.Detokenize(pb.DetokenizeRequest(token_ids=g.token_ids, skip_special_tokens=True)).text
    assert any(ord(c) > 127 for c in streamed)
