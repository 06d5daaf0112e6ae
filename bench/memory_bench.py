#!/usr/bin/env python3
"""Memory benchmark: what a kraken-server worker holds at default settings, and the KV cache it buys.

Starts kraken-server with nothing but --model and --devices (the defaults a new user gets) for the
bundled models and a GPT-2-124M-shaped model (12 layers, 768 wide, context 1024, F32 random
weights, written once under BUILD/bench-models), waits until it serves, and prints per worker:
resident memory (VmRSS), the weights, KV cache, activations and scratch it reports
(kraken_worker_memory_bytes), and the KV tokens the cache holds (GetModelInfo).

    .venv/bin/python bench/memory_bench.py                       # this build
    .venv/bin/python bench/memory_bench.py --before OLD/kraken-server   # and another build, same run

With --before, each model is also served by that binary (an earlier build, say) in the same run,
and a before/after table is printed. Figures, not a timed test.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tools", "tests"))
import serving  # noqa: E402
from kraken_client import pb  # noqa: E402

MIB = 1024 * 1024


def ensure_gpt2_124m(root: str) -> str:
    """A GPT-2-124M-shaped model with context 1024 and F32 random weights (Hugging Face layout)."""
    path = os.path.join(root, "gpt2-124m-ctx1024-f32")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    import shutil

    import torch
    from kraken_ref import reference as ref
    from kraken_ref.checkpoint import save_model_dir
    cfg = ref.Config("gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, ffn_hidden=3072,
                     bias=True)
    W = ref.random_weights(cfg, seed=1234, std=0.02)
    save_model_dir(path, {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257,
                          "n_positions": 1024}, W, torch.float32)
    # Any tokenizer serves: the server needs one to start; the bench sends no text.
    shutil.copy(os.path.join(ROOT, "models", "gpt2-kjv", "tokenizer.json"), path)
    return path


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_metrics(text: str) -> dict:
    out = {}
    for m in re.finditer(r'kraken_worker_memory_bytes\{rank="(\d+)",kind="(\w+)"\} (\S+)', text):
        out.setdefault(int(m.group(1)), {})[m.group(2)] = float(m.group(3))
    return out


def measure(binary: str, model: str, devices: str, extra: tuple = ()) -> dict:
    s = serving.Server(*extra, model=model, devices=devices, binary=binary)
    try:
        time.sleep(1.0)  # let the metrics collector run once
        info = s.stub.GetModelInfo(pb.GetModelInfoRequest())
        pids = sorted(s.worker_pids())
        mem = memory_metrics(s.scrape())
        # Older builds report no KV size in GetModelInfo: their log gives the blocks and block size.
        tokens = info.kv_cache_tokens
        if not tokens:
            m = re.search(r"(\d+) KV blocks of (\d+) tokens", s.read_log())
            tokens = int(m.group(1)) * int(m.group(2)) if m else 0
        return {"rss": [rss_bytes(p) for p in pids], "mem": mem, "kv_tokens": tokens}
    finally:
        s.close()


def fmt(b: float) -> str:
    return f"{b / MIB:,.0f} MiB" if b >= 10 * MIB else f"{b / MIB:.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--before", default=None, help="another kraken-server binary to measure in the same run")
    ap.add_argument("--skip-124m", action="store_true", help="only the bundled models")
    a = ap.parse_args()
    after = os.path.join(a.build, "server", "kraken-server")
    # (name, model, devices, extra flags): the extra flags only for this build (older ones may lack them).
    cases = [("kraken-kjv-4way (bundled)", os.path.join(ROOT, "models", "kraken-kjv-4way"), "cpu:2", ()),
             ("gpt2-kjv (bundled)", os.path.join(ROOT, "models", "gpt2-kjv"), "cpu:1", ())]
    if not a.skip_124m:
        gpt2 = ensure_gpt2_124m(os.path.join(a.build, "bench-models"))
        cases.append(("GPT-2-124M shape, F32, ctx 1024", gpt2, "cpu:1", ()))
        cases.append(("GPT-2-124M shape, F32, ctx 1024, --kv-cache-dtype bf16", gpt2, "cpu:1",
                      ("--kv-cache-dtype", "bf16")))
    builds = [("before", a.before), ("after", after)] if a.before else [("this build", after)]
    print("| model | devices | build | worker RSS | weights | KV cache | activations | scratch | KV tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model, devices, extra in cases:
        for label, binary in builds:
            if extra and binary != after:
                continue
            r = measure(binary, model, devices, extra)
            m0 = r["mem"].get(0, {})
            known = lambda k: fmt(m0[k]) if k in m0 else "not reported"  # noqa: E731
            rss = " / ".join(fmt(x) for x in r["rss"])
            print(f"| {name} | {devices} | {label} | {rss} | {known('weights')} | {known('kv_cache')} | "
                  f"{known('activations')} | {known('scratch')} | {r['kv_tokens']:,} |", flush=True)
    print("\nWorker RSS per rank (rank 0 first); the other columns are rank 0's own report. "
          "Defaults: no memory flag given.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
