"""Prompt logprobs: each prompt token after the first scored under the positions before it, on
kraken.v1 (`prompt_logprobs`) and OpenAI (`echo` with `logprobs`). A prompt made of a prompt and
its greedy continuation scores the continuation with exactly the logprobs and alternatives its
generation reported (the sampler scores a given token as it scores a drawn one), whatever the
chunking; a request for prompt logprobs computes its whole prompt even when it is cached."""
import os

import pytest

from kraken_client import pb
from serving import ROOT, Server, request

MODELS = {"kraken-4way": os.path.join(ROOT, "models", "kraken-kjv-4way"),
          "gpt2": os.path.join(ROOT, "models", "gpt2-kjv")}
TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void"


def scored(lps):
    return [(x.token_id, x.logprob, [(t.token_id, t.logprob) for t in x.top]) for x in lps]


@pytest.fixture(scope="module", params=sorted(MODELS))
def servers(request):
    """(a server whose 24-token chunks split the prompts, a server with one chunk per prompt)."""
    model = MODELS[request.param]
    small = Server("--block-size", "16", "--max-batch-tokens", "24", model=model)
    big = Server("--block-size", "16", "--no-prefix-caching", model=model)
    small.model_name = big.model_name = os.path.basename(model)
    yield small, big
    small.close()
    big.close()


def test_a_continuation_scores_as_it_was_generated(servers):
    for s in servers:
        ids = list(s.stub.Tokenize(pb.TokenizeRequest(text=TEXT)).token_ids)
        gen = s.stub.Complete(request(ids=ids, max_tokens=12, temperature=0, top_logprobs=3, ignore_eos=True))
        full = ids + list(gen.token_ids)
        r = s.stub.Complete(request(ids=full, max_tokens=0, prompt_logprobs=True, top_logprobs=3))
        assert len(r.token_ids) == 0 and r.finish_reason == pb.FINISH_REASON_LENGTH
        got = scored(r.prompt_logprobs)
        assert [t for t, _, _ in got] == full[1:], "one entry per prompt token after the first"
        assert got[len(ids) - 1:] == scored(gen.logprobs), "bit for bit, alternatives included"
        # The three most likely, then the scored token itself when it is not among them.
        assert all(len(top) == 3 + (t not in [a for a, _ in top[:3]]) and (t, lp) in top for t, lp, top in got)
        assert any(len(top) == 4 for _, _, top in got), "some prompt token is not among the model's first three"


def test_prompt_logprobs_do_not_depend_on_chunking_or_the_cache(servers):
    small, big = servers
    ids = list(small.stub.Tokenize(pb.TokenizeRequest(text=TEXT + " " + TEXT + " " + TEXT)).token_ids)
    assert len(ids) > 2 * 24
    want = big.stub.Complete(request(ids=ids, max_tokens=2, temperature=0, prompt_logprobs=True, top_logprobs=2))
    small.stub.Complete(request(ids=ids, max_tokens=2, temperature=0))  # the prompt is now cached
    got = small.stub.Complete(request(ids=ids, max_tokens=2, temperature=0, prompt_logprobs=True, top_logprobs=2))
    assert got.usage.cached_prompt_tokens == 0, "prompt logprobs need every position: computed, not cached"
    assert scored(got.prompt_logprobs) == scored(want.prompt_logprobs)
    assert list(got.token_ids) == list(want.token_ids)
    # Streamed: all of them on the first message, none after.
    msgs = list(small.stub.Generate(request(ids=ids, max_tokens=3, temperature=0, prompt_logprobs=True)))
    assert scored(msgs[0].prompt_logprobs) == [(t, lp, []) for t, lp, _ in scored(want.prompt_logprobs)]
    assert all(len(m.prompt_logprobs) == 0 for m in msgs[1:])
    # With n > 1, sample 0 carries them.
    r = small.stub.Complete(request(ids=ids, max_tokens=2, temperature=0, prompt_logprobs=True, top_logprobs=2, n=2))
    assert scored(r.samples[0].prompt_logprobs) == scored(want.prompt_logprobs)
    assert len(r.samples[1].prompt_logprobs) == 0


def test_openai_echo_with_logprobs(servers):
    small, _ = servers
    client = small.openai()
    ids = list(small.stub.Tokenize(pb.TokenizeRequest(text=TEXT)).token_ids)
    want = small.stub.Complete(request(ids=ids, max_tokens=4, temperature=0, prompt_logprobs=True, top_logprobs=1,
                                       ignore_eos=True))
    kw = dict(model=small.model_name, prompt=TEXT, max_tokens=4, temperature=0, echo=True, logprobs=1,
              extra_body={"ignore_eos": True})
    out = client.completions.create(n=2, **kw)
    for c in out.choices:
        lp = c.logprobs
        assert c.text.startswith(TEXT)
        assert "".join(lp.tokens) == c.text
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:len(ids)] == [x.logprob for x in want.prompt_logprobs]
        assert lp.token_logprobs[len(ids):] == [x.logprob for x in want.logprobs]
        assert lp.text_offset[len(ids)] == len(TEXT.encode()), "the completion's offsets follow the prompt"
        # The most likely token, then the token itself when it is another (OpenAI: up to logprobs + 1).
        assert all(len(t) in (1, 2) and t[tok] == v
                   for t, tok, v in zip(lp.top_logprobs[1:], lp.tokens[1:], lp.token_logprobs[1:]))
        assert any(len(t) == 2 for t in lp.top_logprobs[1:len(ids)]), "some prompt token is not the model's first choice"
    # Scoring only, as evaluation harnesses do it: max_tokens 0.
    score = client.completions.create(**{**kw, "max_tokens": 0})
    assert score.choices[0].text == TEXT
    assert score.choices[0].logprobs.token_logprobs[1:] == [x.logprob for x in want.prompt_logprobs]
    # Streamed: the echo chunk carries the prompt's logprobs; the text chunks follow.
    chunks = list(client.completions.create(stream=True, **kw))
    first = chunks[0].choices[0]
    assert first.text == TEXT and first.logprobs.token_logprobs[1:] == [x.logprob for x in want.prompt_logprobs]
    assert [x for ch in chunks[1:] for x in ch.choices[0].logprobs.token_logprobs] == [x.logprob for x in
                                                                                      want.logprobs]
    # vLLM's continuous usage: the echo chunk holds no generated token, each later chunk its own.
    usage = [ch.usage.completion_tokens for ch in client.completions.create(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, **kw) if ch.choices]
    assert usage[0] == 0 and usage[-1] == 4 and usage == sorted(usage)
