"""Prefix caching end to end: a request's tokens and logprobs are the same bits with a full cache
hit, a partial hit and no hit, at any batch composition; what the cache saved is reported in the
usage and the metrics; a worker restart empties it."""
import os
import re
import signal
import threading
import time

import pytest

from kraken_client import pb
from serving import ROOT, Server, request

MODELS = {"kraken-4way": os.path.join(ROOT, "models", "kraken-kjv-4way"),
          "gpt2": os.path.join(ROOT, "models", "gpt2-kjv")}
BLOCK = 16
TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
        "And God said, Let there be light: and there was light. And God saw the light, that it was good: "
        "and God divided the light from the darkness. And God called the light Day, and the darkness he "
        "called Night. And the evening and the morning were the first day.")


def metric(text, name):
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in the exposition"
    return float(m.group(1))


def run(stub, ids, seed=None, max_tokens=12):
    """(token ids, [(logprob, [(top id, top logprob)...])...], cached prompt tokens) of one request."""
    kw = dict(ids=ids, max_tokens=max_tokens, logprobs=True, top_logprobs=3, ignore_eos=True)
    kw.update(temperature=0.9, seed=seed) if seed is not None else kw.update(temperature=0)
    r = stub.Complete(request(**kw), timeout=120)
    lps = [(lp.logprob, [(t.token_id, t.logprob) for t in lp.top]) for lp in r.logprobs]
    return list(r.token_ids), lps, r.usage.cached_prompt_tokens


def prompts(stub):
    """Prompts built to hit the cache fully, partly and not at all, by token ids."""
    base = list(stub.Tokenize(pb.TokenizeRequest(text=TEXT)).token_ids)
    assert len(base) > 5 * BLOCK
    other = list(stub.Tokenize(pb.TokenizeRequest(text="Blessed are the meek: for they shall inherit the earth."))
                 .token_ids)
    return {
        "base": base,
        "base_again": base,                              # every full block but the last token's
        "prefix_50": base[:50] + other,                  # 3 blocks shared, then different
        "prefix_one_block": base[:BLOCK] + other + base,  # 1 block shared
        "extended": base + other,                        # all of base's full blocks shared
        "fresh": other + base,                           # nothing shared
    }


@pytest.fixture(scope="module", params=sorted(MODELS))
def servers(request):
    """(caching server with small chunks, server without the cache): two batch compositions."""
    model = MODELS[request.param]
    cached = Server("--max-batch-tokens", "40", "--block-size", str(BLOCK), model=model)
    plain = Server("--no-prefix-caching", "--block-size", str(BLOCK), model=model)
    cached.model_name = plain.model_name = os.path.basename(model)
    yield cached, plain
    cached.close()
    plain.close()


def test_hits_partial_hits_and_misses_are_bit_identical(servers):
    cached, plain = servers
    ps = prompts(cached.stub)
    want_cached = {"base": 0, "base_again": (len(ps["base"]) - 1) // BLOCK * BLOCK, "prefix_50": 48,
                   "prefix_one_block": BLOCK, "extended": len(ps["base"]) // BLOCK * BLOCK, "fresh": 0}
    hits = 0
    for name, ids in ps.items():
        for seed in (None, 7):
            got = run(cached.stub, ids, seed)
            want = run(plain.stub, ids, seed)
            assert want[2] == 0, "no cache, nothing cached"
            assert got[0] == want[0], f"{name} seed={seed}: tokens"
            assert got[1] == want[1], f"{name} seed={seed}: logprobs, exactly"
            expect = want_cached[name] if seed is None else (len(ids) - 1) // BLOCK * BLOCK
            assert got[2] == expect, f"{name} seed={seed}: cached prompt tokens"
            hits += got[2]
    text = cached.scrape()
    assert metric(text, "kraken_prefix_cache_hits_total") == hits
    assert metric(text, "kraken_prefix_cache_queries_total") == 2 * sum(len(ids) for ids in ps.values())
    assert 'enable_prefix_caching="True"' in text
    assert 'enable_prefix_caching="False"' in plain.scrape()
    assert metric(plain.scrape(), "kraken_prefix_cache_queries_total") == 0


def test_concurrent_requests_sharing_a_prefix_equal_their_uncached_results(servers):
    cached, plain = servers
    base = prompts(cached.stub)["base"]
    # A system prompt of 3 blocks and 16 different questions, all at once with sampling: they share
    # blocks while some are still prefilling, in whatever batches the scheduler makes.
    reqs = [(base[:48] + base[60 + i:64 + i], 100 + i) for i in range(16)]
    results = [None] * len(reqs)

    def go(i):
        results[i] = run(cached.stub, reqs[i][0], reqs[i][1], max_tokens=8)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (ids, seed) in enumerate(reqs):
        want = run(plain.stub, ids, seed, max_tokens=8)
        assert results[i][:2] == want[:2], f"request {i}"
    assert sum(r[2] for r in results) >= 48 * 8, "most of them found the system prompt cached"


def test_openai_usage_reports_cached_tokens(servers):
    cached, plain = servers
    client = cached.openai()
    prompt = TEXT + " And God said, Let there be a firmament"
    first = client.completions.create(model=cached.model_name, prompt=prompt, max_tokens=6, temperature=0)
    second = client.completions.create(model=cached.model_name, prompt=prompt, max_tokens=6, temperature=0)
    assert second.choices[0].text == first.choices[0].text
    n = first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // BLOCK * BLOCK
    off = plain.openai().completions.create(model=cached.model_name, prompt=prompt, max_tokens=6, temperature=0)
    assert off.usage.prompt_tokens_details.cached_tokens == 0
    assert off.choices[0].text == first.choices[0].text


def test_a_worker_restart_empties_the_cache():
    s = Server("--block-size", str(BLOCK))
    try:
        ids = prompts(s.stub)["base"]
        before = run(s.stub, ids)
        assert run(s.stub, ids)[2] > 0, "cached while the workers live"
        os.kill(s.worker_pids()[0], signal.SIGKILL)
        t_end = time.time() + 30
        while metric(s.scrape(), "kraken_worker_restarts_total") < 1:
            assert time.time() < t_end, "the workers were not restarted"
            time.sleep(0.1)
        after = None
        while after is None:
            try:
                after = run(s.stub, ids)
            except Exception:  # noqa: BLE001 -- still recovering: NOT_SERVING / UNAVAILABLE
                assert time.time() < t_end, "no request succeeded after the restart"
                time.sleep(0.2)
        assert after[2] == 0, "the new workers' pools hold nothing: no hit"
        assert after[:2] == before[:2]
        assert run(s.stub, ids)[2] > 0, "and the cache fills again"
    finally:
        s.close()


def test_prefix_bench_runs_at_a_small_size():
    """bench/prefix_bench.py --small: every scenario runs; the cache hits where prompts share a
    prefix, never where they do not, and changes no answer (the bench asserts both)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "prefix_bench.py"), "--small"],
                         capture_output=True, text=True, timeout=600, env={**os.environ})
    assert out.returncode == 0, out.stdout + out.stderr
    shared = re.search(r"^cache +\S+ +\S+ +\S+ +\S+ +(\d+)$", out.stdout, re.M)
    assert shared and int(shared.group(1)) >= 8 * 160, "at least half of the 16 requests hit the system prompt"
    assert re.search(r"^ *\d+ +\d+ +\S+ +\S+ +0$", out.stdout, re.M), "the first turn finds nothing cached"
    assert "the cache costs" in out.stdout and "TTFT p50" in out.stdout, out.stdout
