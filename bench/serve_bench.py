#!/usr/bin/env python3
"""Load generator for kraken-server: TTFT, ITL, end-to-end latency, throughput and goodput, each
against a baseline measured in the same run with the engine alone (kraken-generate on the same
workers, no server).

    .venv/bin/python bench/serve_bench.py                        # the three scenarios below
    .venv/bin/python bench/serve_bench.py --rate 4 --requests 64 # Poisson arrivals only

Scenarios:
  1. concurrency 1: requests one after another with max_tokens = 1; server TTFT (arrival to first
     token handed to the stream, reported by the server) and client TTFT against the engine's own
     prefill time for the same prompt (median of kraken-generate runs). Target: server adds < 1 ms.
  2. N concurrent streams (default 32), each max_tokens tokens with ignore_eos: output tokens/s
     against kraken-generate --batch N (the engine's offline batched decode). Target: >= 80%.
  3. Poisson arrivals at --rate requests/s: TTFT and ITL percentiles, and goodput (requests/s that
     meet both --ttft-slo and --itl-slo).
The load generator runs on the same cores as the server, so on a small machine it takes CPU from
the workers; the figures include that.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tools", "tests"))
from kraken_client import pb  # noqa: E402
from serving import BUILD, DEFAULT_MODEL, Server, request  # noqa: E402

# The same sampling for the server and the engine baseline (the bundled model's defaults).
TEMPERATURE, TOP_P = 0.8, 0.95
PROMPT = "And God said, Let there be light: and there was light. And God saw the light, that it was good"


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def engine_run(model, devices, *args):
    out = subprocess.run([os.path.join(BUILD, "core", "kraken-generate"), model, "--devices", devices,
                          "--prompt", PROMPT, "--json", "--ignore-eos", "--seed", "1", "--temperature", str(TEMPERATURE),
                          "--threads", "1",  # as the server's workers (tools/tests/serving.py)
                          "--top-p", str(TOP_P), *args],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout)


def timed_stream(stub, req):
    """Returns (client TTFT s, list of inter-token gaps s, e2e s, tokens, last message)."""
    t0 = time.perf_counter()
    first = None
    gaps = []
    prev = None
    n = 0
    last = None
    for m in stub.Generate(req, timeout=600):
        now = time.perf_counter()
        k = len(m.token_ids)
        if k:
            if first is None:
                first = now - t0
            elif prev is not None:
                gaps.extend([(now - prev) / k] * k)  # coalesced tokens share the gap
            prev = now
            n += k
        last = m
    return first, gaps, time.perf_counter() - t0, n, last


def scenario_ttft(stub, args):
    prefill = [engine_run(args.model, args.devices, "--max-tokens", "1")["prefill_ms"] for _ in range(args.engine_runs)]
    server_ttft, client_ttft = [], []
    for i in range(args.ttft_requests):
        c, _, _, _, last = timed_stream(stub, request(text=PROMPT, max_tokens=1, seed=i, temperature=TEMPERATURE, top_p=TOP_P))
        client_ttft.append(c * 1e3)
        server_ttft.append(last.timings.ttft_seconds * 1e3)
    p = statistics.median(prefill)
    s50, c50 = statistics.median(server_ttft), statistics.median(client_ttft)
    print(f"\n== 1. concurrency 1, prompt of {len(stub.Tokenize(pb.TokenizeRequest(text=PROMPT)).token_ids)} tokens, "
          f"max_tokens 1, {args.ttft_requests} requests ==")
    print(f"engine prefill (kraken-generate, median of {args.engine_runs}): {p:.2f} ms")
    print(f"server TTFT p50 {s50:.2f} ms (p90 {pct(server_ttft, 0.9):.2f}) -> server adds {s50 - p:+.2f} ms "
          f"(target < 1 ms: {'met' if s50 - p < 1 else 'NOT met'})")
    print(f"client TTFT p50 {c50:.2f} ms (p90 {pct(client_ttft, 0.9):.2f}) -> incl. gRPC and the Python client: "
          f"{c50 - p:+.2f} ms")


def scenario_throughput(stub, args):
    n, T = args.concurrency, args.max_tokens
    base = engine_run(args.model, args.devices, "--max-tokens", str(T), "--batch", str(n))
    results = [None] * n

    def run(i):
        results[i] = timed_stream(stub, request(text=PROMPT, max_tokens=T, seed=i, ignore_eos=True, temperature=TEMPERATURE, top_p=TOP_P))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r[3] for r in results)
    tps = tokens / wall
    ratio = tps / base["decode_tokens_per_second"]
    ttft = [r[0] * 1e3 for r in results]
    itl = [g * 1e3 for r in results for g in r[1]]
    print(f"\n== 2. {n} concurrent streams x {T} tokens ==")
    print(f"engine offline batched decode (kraken-generate --batch {n}): {base['decode_tokens_per_second']:.1f} tokens/s")
    print(f"server output: {tokens} tokens in {wall:.2f} s = {tps:.1f} tokens/s = {ratio:.1%} of the engine "
          f"(target >= 80%: {'met' if ratio >= 0.8 else 'NOT met'})")
    print(f"TTFT p50/p90/p99 {pct(ttft, .5):.1f}/{pct(ttft, .9):.1f}/{pct(ttft, .99):.1f} ms; "
          f"ITL p50/p90/p99 {pct(itl, .5):.1f}/{pct(itl, .9):.1f}/{pct(itl, .99):.1f} ms")


def scenario_poisson(stub, args):
    rng = random.Random(0)
    results = []
    lock = threading.Lock()

    def run(i):
        r = timed_stream(stub, request(text=PROMPT, max_tokens=args.max_tokens, seed=i, ignore_eos=True, temperature=TEMPERATURE,
                                               top_p=TOP_P))
        with lock:
            results.append(r)

    threads = []
    t0 = time.perf_counter()
    for i in range(args.requests):
        th = threading.Thread(target=run, args=(i,))
        th.start()
        threads.append(th)
        time.sleep(rng.expovariate(args.rate))
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    ttft = [r[0] * 1e3 for r in results]
    itl = [g * 1e3 for r in results for g in r[1]]
    e2e = [r[2] * 1e3 for r in results]
    good = sum(1 for r in results if r[0] * 1e3 <= args.ttft_slo and
               (not r[1] or statistics.mean(r[1]) * 1e3 <= args.itl_slo))
    print(f"\n== 3. Poisson arrivals, {args.rate} requests/s, {args.requests} requests x {args.max_tokens} tokens ==")
    print(f"TTFT p50/p90/p99 {pct(ttft, .5):.1f}/{pct(ttft, .9):.1f}/{pct(ttft, .99):.1f} ms; "
          f"ITL p50/p90/p99 {pct(itl, .5):.1f}/{pct(itl, .9):.1f}/{pct(itl, .99):.1f} ms; "
          f"e2e p50/p90 {pct(e2e, .5):.0f}/{pct(e2e, .9):.0f} ms")
    print(f"output {sum(r[3] for r in results) / wall:.1f} tokens/s; goodput (TTFT <= {args.ttft_slo} ms and mean "
          f"ITL <= {args.itl_slo} ms): {good / wall:.2f} requests/s ({good}/{len(results)} requests)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--devices", default="cpu:2")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ttft-requests", type=int, default=50)
    ap.add_argument("--engine-runs", type=int, default=9)
    ap.add_argument("--rate", type=float, default=0, help="Poisson arrivals per second (0: skip scenario 3 "
                    "unless it is the only one asked for)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--ttft-slo", type=float, default=200.0, help="ms")
    ap.add_argument("--itl-slo", type=float, default=100.0, help="ms")
    ap.add_argument("--only", choices=["ttft", "throughput", "poisson"])
    args = ap.parse_args()
    server = Server("--max-batch-seqs", str(max(64, args.concurrency)), model=args.model, devices=args.devices)
    try:
        print(f"kraken-server {args.model} on {args.devices}")
        if args.only in (None, "ttft"):
            scenario_ttft(server.stub, args)
        if args.only in (None, "throughput"):
            scenario_throughput(server.stub, args)
        if args.only == "poisson" or args.rate > 0:
            if args.rate <= 0:
                args.rate = 4.0
            scenario_poisson(server.stub, args)
    finally:
        server.close()


if __name__ == "__main__":
    main()
