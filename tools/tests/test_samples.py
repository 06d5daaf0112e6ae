"""n > 1 samples per request on kraken.v1 and OpenAI: sample i is, token for token and logprob for
logprob, the n = 1 request with seed + i; the samples share the prompt's full KV blocks (the
prompt is computed once, each sample computes only its partial last block), with or without the
prefix cache; cancelling the call ends every sample."""
import os
import re
import time

import grpc
import pytest

from kraken_client import pb
from serving import ROOT, Server, request

MODELS = {"kraken-4way": os.path.join(ROOT, "models", "kraken-kjv-4way"),
          "gpt2": os.path.join(ROOT, "models", "gpt2-kjv")}
BLOCK = 16
TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.")


def metric(text, name):
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in the exposition"
    return float(m.group(1))


def sample(r):
    """(token ids, [(logprob, [(top id, top logprob)...])...]) of one response or sample."""
    return list(r.token_ids), [(lp.logprob, [(t.token_id, t.logprob) for t in lp.top]) for lp in r.logprobs]


def params(**kw):
    base = dict(text=TEXT, max_tokens=10, temperature=0.9, logprobs=True, top_logprobs=3, ignore_eos=True)
    base.update(kw)
    return base


@pytest.fixture(scope="module", params=[(m, c) for m in sorted(MODELS) for c in ("cache", "no-cache")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def server(request):
    name, cache = request.param
    model = MODELS[name]
    s = Server("--block-size", str(BLOCK), *(["--no-prefix-caching"] if cache == "no-cache" else []), model=model)
    s.model_name = os.path.basename(model)
    yield s
    s.close()


def test_each_sample_is_the_single_request_with_its_derived_seed(server):
    stub = server.stub
    singles = [sample(stub.Complete(request(**params(seed=41 + i)), timeout=120)) for i in range(4)]
    assert len({tuple(t) for t, _ in singles}) > 1, "different seeds draw different samples"
    whole = stub.Complete(request(**params(seed=41, n=4)), timeout=120)
    assert [s.index for s in whole.samples] == [0, 1, 2, 3]
    for i, s in enumerate(whole.samples):
        assert sample(s) == singles[i], f"sample {i}: tokens and logprobs, exactly"
        assert s.seed == 41 + i
        assert s.usage.completion_tokens == 10 and s.finish_reason == pb.FINISH_REASON_LENGTH
    assert sample(whole) == singles[0], "the message's own fields are sample 0"

    # Streamed: each sample's messages in order, its first and last carrying its seed, its last
    # alone the finish reason and usage.
    msgs = list(stub.Generate(request(**params(seed=41, n=4)), timeout=120))
    for i in range(4):
        mine = [m for m in msgs if m.index == i]
        assert [t for m in mine for t in m.token_ids] == singles[i][0], f"sample {i} streamed"
        assert [lp.logprob for m in mine for lp in m.logprobs] == [lp for lp, _ in singles[i][1]]
        assert mine[0].seed == 41 + i and mine[-1].seed == 41 + i
        assert [m.HasField("usage") for m in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert all(m.HasField("index") for m in msgs)
    # n = 1 messages carry no index.
    assert not any(m.HasField("index") for m in stub.Generate(request(**params(seed=41)), timeout=120))


def test_the_prompt_is_computed_once(server):
    """The samples share the prompt's full blocks: the tokens the engine computes are the prompt
    once, each other sample's partial last block, and each sample's decodes."""
    prompt = list(server.stub.Tokenize(pb.TokenizeRequest(text=TEXT)).token_ids)
    # A prompt the prefix cache has never seen, so the cache cannot be what saves the work.
    prompt = [7] + prompt
    n, max_tokens, length = 4, 6, len(prompt)
    before = metric(server.scrape(), "kraken_iteration_tokens_sum")
    r = server.stub.Complete(request(**params(n=n, seed=3, max_tokens=max_tokens, text=None, ids=prompt)), timeout=120)
    assert len(r.samples) == n
    computed = metric(server.scrape(), "kraken_iteration_tokens_sum") - before
    shared = (length - 1) // BLOCK * BLOCK
    assert shared >= 2 * BLOCK
    assert computed == length + (n - 1) * (length - shared) + n * (max_tokens - 1)
    assert r.usage.cached_prompt_tokens == 0 and all(s.usage.cached_prompt_tokens == 0 for s in r.samples)


def test_greedy_samples_are_identical_and_n_one_is_unchanged(server):
    r = server.stub.Complete(request(**params(temperature=0, n=3)), timeout=120)
    one = server.stub.Complete(request(**params(temperature=0)), timeout=120)
    assert [sample(s) for s in r.samples] == [sample(one)] * 3
    assert len(one.samples) == 0 and not one.HasField("index")


def test_openai_n_choices(server):
    client = server.openai()
    kw = dict(model=server.model_name, prompt=TEXT, max_tokens=8, temperature=0.9, logprobs=2,
              extra_body={"ignore_eos": True})
    singles = [client.completions.create(seed=5 + i, **kw).choices[0] for i in range(3)]
    out = client.completions.create(seed=5, n=3, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for i, c in enumerate(out.choices):
        assert c.text == singles[i].text, f"choice {i}"
        assert c.logprobs.token_logprobs == singles[i].logprobs.token_logprobs
        assert c.logprobs.text_offset == singles[i].logprobs.text_offset, "offsets count within each choice"
        assert c.finish_reason == "length"
    assert out.usage.completion_tokens == 3 * 8
    assert out.usage.prompt_tokens == client.completions.create(**kw).usage.prompt_tokens
    assert out.usage.total_tokens == out.usage.prompt_tokens + 24

    # Streamed: chunks name their choice; each choice ends once; the usage chunk counts them all.
    texts, ends = {}, {}
    usage = None
    for chunk in client.completions.create(seed=5, n=3, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                ends[c.index] = ends.get(c.index, 0) + 1
    assert texts == {i: singles[i].text for i in range(3)}
    assert ends == {0: 1, 1: 1, 2: 1}
    assert usage.completion_tokens == 24


def test_cancelling_ends_every_sample(server):
    call = server.stub.Generate(request(**params(n=4, max_tokens=200, seed=1)), timeout=120)
    first = next(call)
    assert first.index in range(4)
    call.cancel()
    t_end = time.time() + 10
    while True:
        text = server.scrape()
        if metric(text, "kraken_num_requests_running") == 0 and metric(text, "kraken_kv_cache_usage_ratio") == 0:
            break
        assert time.time() < t_end, "the samples did not all end"
        time.sleep(0.05)
    # And the server goes on.
    assert len(server.stub.Complete(request(**params(n=2, max_tokens=3)), timeout=60).samples) == 2


def test_n_is_capped_by_the_waiting_queue():
    s = Server("--max-waiting", "3", devices="cpu:1")
    try:
        assert s.stub.GetModelInfo(pb.GetModelInfoRequest()).max_n == 3
        with pytest.raises(grpc.RpcError) as e:
            s.stub.Complete(request(**params(n=4)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "field 'n' must be in [1, 3], got 4" in e.value.details()
        assert len(s.stub.Complete(request(**params(n=3, max_tokens=2)), timeout=60).samples) == 3
    finally:
        s.close()
