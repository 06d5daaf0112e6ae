#!/usr/bin/env python3
"""Prefix-caching benchmark: TTFT and throughput with and without the cache, same run.

Two kraken-server processes serve the same model, one with prefix caching (the default) and one
with --no-prefix-caching; every scenario runs on both, one after the other, and the ratios are
printed beside the figures:

  shared   a shared system prompt + distinct questions, N requests at concurrency C:
           TTFT p50/p99 and throughput (target: TTFT p50 >= 5x lower with the cache)
  turns    a conversation: each turn's prompt is the previous prompt + its answer + a new
           question; TTFT per turn (flat with the cache, growing with the history without)
  unique   prompts that share nothing, rounds interleaved: the cache's cost when nothing hits
           (target: < 2%)

    .venv/bin/python bench/prefix_bench.py            # GPT-2-124M-shaped, context 1024 (minutes)
    .venv/bin/python bench/prefix_bench.py --small    # the bundled GPT-2 twin, context 256 (CI)

The 124M model has random F32 weights (bench/memory_bench.py writes it once under
BUILD/bench-models); the prompts are token ids below 4096, the size of the bundled tokenizer it is
served with (the server checks ids against it). Figures, not a timed test: on a shared machine
compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tools", "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import serving  # noqa: E402
from memory_bench import ensure_gpt2_124m  # noqa: E402


def timed(stub, ids, max_tokens):
    """(client TTFT s, generated ids, cached prompt tokens) of one greedy streamed request."""
    req = serving.request(ids=ids, max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    ttft, out, cached = None, [], 0
    for m in stub.Generate(req, timeout=600):
        if m.token_ids and ttft is None:
            ttft = time.perf_counter() - t0
        out.extend(m.token_ids)
        if m.HasField("usage"):
            cached = m.usage.cached_prompt_tokens
    return ttft, out, cached


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_all(stub, prompts, concurrency, max_tokens):
    """Runs `prompts` (token-id lists) `concurrency` at a time; (TTFTs s, wall s, output tokens, cached tokens)."""
    ttfts, cached, tokens = [None] * len(prompts), [0] * len(prompts), [0] * len(prompts)
    nxt = iter(range(len(prompts)))
    lock = threading.Lock()
    errors = []

    def worker():
        while not errors:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            try:
                ttft, out, c = timed(stub, prompts[i], max_tokens)
            except Exception as e:  # noqa: BLE001 -- re-raised below, on the main thread
                errors.append(e)
                return
            ttfts[i], tokens[i], cached[i] = ttft, len(out), c

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return ttfts, time.perf_counter() - t0, sum(tokens), sum(cached)


def scenario_shared(servers, rng, a):
    system = [rng.randrange(100, a.vocab) for _ in range(a.system)]
    prompts = [system + [rng.randrange(100, a.vocab) for _ in range(a.question)] for _ in range(a.requests)]
    print(f"\n## shared: {a.system}-token system prompt + {a.question}-token questions, "
          f"{a.requests} requests at concurrency {a.concurrency}, {a.max_tokens} tokens each")
    print(f"{'':14} {'TTFT p50 s':>11} {'TTFT p99 s':>11} {'req/s':>7} {'tok/s':>7} {'cached tokens':>14}")
    res = {}
    for name, s in servers.items():
        ttfts, wall, toks, cached = run_all(s.stub, prompts, a.concurrency, a.max_tokens)
        res[name] = (pct(ttfts, 0.5), pct(ttfts, 0.99), len(prompts) / wall, toks / wall)
        print(f"{name:14} {res[name][0]:11.3f} {res[name][1]:11.3f} {res[name][2]:7.2f} {res[name][3]:7.1f} "
              f"{cached:14d}")
    on, off = res["cache"], res["no cache"]
    print(f"TTFT p50 {off[0] / on[0]:.1f}x lower with the cache (target >= 5x); "
          f"throughput {on[3] / off[3]:.2f}x (target >= 1)")


def scenario_turns(servers, rng, a):
    print(f"\n## turns: each turn = previous prompt + its {a.answer}-token answer + a {a.question}-token question")
    print(f"{'turn':>4} {'prompt':>7} {'TTFT cache s':>13} {'TTFT no cache s':>16} {'cached':>7}")
    history = [rng.randrange(100, a.vocab) for _ in range(a.question)]
    per_turn = {name: [] for name in servers}
    turn = 0
    while len(history) + a.answer + a.question + a.answer <= a.context:
        turn += 1
        row, answers = {}, {}
        for name, s in servers.items():
            ttft, answers[name], cached = timed(s.stub, history, a.answer)
            row[name] = (ttft, cached)
            per_turn[name].append(ttft)
        assert answers["cache"] == answers["no cache"], "the cache changed an answer"
        answer = answers["cache"]
        print(f"{turn:4d} {len(history):7d} {row['cache'][0]:13.3f} {row['no cache'][0]:16.3f} "
              f"{row['cache'][1]:7d}")
        history = history + answer + [rng.randrange(100, a.vocab) for _ in range(a.question)]
    for name, xs in per_turn.items():
        print(f"{name}: first turn {xs[0]:.3f} s, last turn {xs[-1]:.3f} s ({xs[-1] / xs[0]:.1f}x)")


def scenario_unique(servers, rng, a):
    prompts = [[rng.randrange(100, a.vocab) for _ in range(a.system + a.question)] for _ in range(a.unique)]
    print(f"\n## unique: {a.unique} prompts of {a.system + a.question} tokens sharing nothing, "
          f"concurrency {a.concurrency}")
    tput = {name: [] for name in servers}
    for _ in range(a.rounds):  # interleaved rounds: drift on a shared machine hits both alike
        for name, s in servers.items():
            _, wall, toks, cached = run_all(s.stub, prompts, a.concurrency, a.max_tokens)
            assert cached == 0, "prompts that share nothing hit nothing"
            tput[name].append(len(prompts) / wall)
        prompts = [[rng.randrange(100, a.vocab) for _ in p] for p in prompts]  # fresh tokens every round
    on, off = statistics.median(tput["cache"]), statistics.median(tput["no cache"])
    print(f"req/s median of {a.rounds}: cache {on:.3f}, no cache {off:.3f}: the cache costs "
          f"{(1 - on / off) * 100:+.1f}% (target < 2%)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=serving.BUILD)
    ap.add_argument("--small", action="store_true", help="the bundled GPT-2 twin at a CI size")
    ap.add_argument("--devices", default="cpu:1")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.small:
        model = os.path.join(ROOT, "models", "gpt2-kjv")
        a.context, a.system, a.question, a.answer, a.vocab = 256, 160, 16, 16, 4096
        a.requests, a.concurrency, a.max_tokens, a.unique, a.rounds = 16, 4, 4, 8, 1
    else:
        model = ensure_gpt2_124m(os.path.join(a.build, "bench-models"))
        a.context, a.system, a.question, a.answer, a.vocab = 1024, 768, 32, 32, 4096
        a.requests, a.concurrency, a.max_tokens, a.unique, a.rounds = 64, 8, 8, 16, 3
    binary = os.path.join(a.build, "server", "kraken-server")
    common = ["--max-batch-tokens", "512", "--max-batch-seqs", str(a.concurrency)]
    servers = {}
    try:
        servers["cache"] = serving.Server(*common, model=model, devices=a.devices, binary=binary)
        servers["no cache"] = serving.Server(*common, "--no-prefix-caching", model=model, devices=a.devices,
                                             binary=binary)
        print(f"# prefix_bench: {os.path.basename(model)} on {a.devices}")
        rng = random.Random(a.seed)
        scenario_shared(servers, rng, a)
        scenario_turns(servers, rng, a)
        scenario_unique(servers, rng, a)
    finally:
        for s in servers.values():
            s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
