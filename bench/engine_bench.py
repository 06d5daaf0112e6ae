#!/usr/bin/env python3
"""Engine benchmark: the C++ CPU engine against PyTorch eager on the same random weights, in the
same run, for a Kraken "125M 4-way" shape and a GPT-2 124M shape (F32 weights for both).

    .venv/bin/python bench/engine_bench.py                 # full table (several minutes)
    .venv/bin/python bench/engine_bench.py --quick         # small prompt lengths, fewer steps

Prints prefill latency (T = 128, 512, 2048) and decode tokens/s (batch 1, 8, 32 after a
128-token context, greedy), the ratio PyTorch time / engine time, the machine's GEMM rate
(oneDNN sgemm 2048x1024x1024 and our packed GEMM) and the prefill's achieved GFLOP/s as a share
of the oneDNN rate. Targets (issue): decode at batch 1 >= 2x PyTorch eager; prefill >= 60% of the
measured GEMM rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from kraken_ref import reference as ref  # noqa: E402
from kraken_ref.checkpoint import kraken_config_json, load_model_dir, save_model_dir  # noqa: E402

SHAPES = {
    # KRAKEN.md "Released configurations", 125M 4-way, with 2048 positions so T = 2048 fits.
    "kraken-125m-4way": ref.Config("kraken", n_layer=12, n_embd=504, n_head=3, vocab_size=50304, n_positions=2048,
                                   kraken_degree=4, ffn_hidden=1008, bias=False),
    # GPT-2 124M (Hugging Face layout), 2048 positions.
    "gpt2-124m": ref.Config("gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=2048,
                            ffn_hidden=3072, bias=True),
}


def ensure_model(name: str, cfg: ref.Config, root: str) -> str:
    path = os.path.join(root, name)
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    W = ref.random_weights(cfg, seed=1234, std=0.02)
    if cfg.model_type == "kraken":
        config = kraken_config_json(cfg)
    else:
        config = {"model_type": "gpt2", "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                  "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions}
    save_model_dir(path, config, W, torch.float32)
    return path


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def torch_prefill(cfg, W, T: int, repeats: int) -> float:
    tokens = torch.randint(0, cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(T))

    def run():
        ref.forward(cfg, W, tokens, cache=ref.KVCache(), logit_rows=[T - 1])

    return median_time(run, repeats)


@torch.inference_mode()
def torch_decode(cfg, W, B: int, context: int, steps: int) -> float:
    tokens = torch.randint(0, cfg.vocab_size, (B, context), generator=torch.Generator().manual_seed(B))
    cache = ref.KVCache()
    logits = ref.forward(cfg, W, tokens, cache=cache, logit_rows=[context - 1])
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        logits = ref.forward(cfg, W, nxt, positions=[context + s], cache=cache)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--models", default=None, help="where the random-weight models are written (default BUILD/bench-models)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="T = 128, 512; batches 1, 8; 8 decode steps")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    a = ap.parse_args()
    prefill = [128, 512] if a.quick else [128, 512, 2048]
    batches = [1, 8] if a.quick else [1, 8, 32]
    steps, repeats, context = (8, 2, 128) if a.quick else (16, 3, 128)
    models_root = a.models or os.path.join(a.build, "bench-models")
    torch.set_num_threads(a.threads)
    binary = os.path.join(a.build, "bench", "engine_bench")
    results = {}
    for name, cfg in SHAPES.items():
        path = ensure_model(name, cfg, models_root)
        eng = json.loads(subprocess.run(
            [binary, "--model", path, "--prefill", ",".join(map(str, prefill)), "--decode-batch",
             ",".join(map(str, batches)), "--context", str(context), "--decode-steps", str(steps), "--repeats",
             str(repeats), "--threads", str(a.threads)], check=True, capture_output=True, text=True).stdout)
        W = load_model_dir(path)
        pt_prefill = {T: torch_prefill(cfg, W, T, repeats) for T in prefill}
        pt_decode = {B: torch_decode(cfg, W, B, context, steps) for B in batches}
        del W
        results[name] = {"engine": eng, "torch_prefill_s": pt_prefill, "torch_decode_step_s": pt_decode}

    gemm = next(iter(results.values()))["engine"]["gemm_2048x1024x1024"]
    rate = gemm["onednn_sgemm_gflops"]
    print(f"machine: {a.threads} threads; torch {torch.__version__}")
    print(f"GEMM 2048x1024x1024 F32: oneDNN sgemm {rate:.1f} GFLOP/s, Kraken packed GEMM "
          f"{gemm['kraken_packed_gflops']:.1f} GFLOP/s")
    print()
    print(f"{'model':18} {'measure':24} {'engine':>12} {'pytorch':>12} {'speed-up':>9} {'GFLOP/s':>8} {'% GEMM':>7}")
    for name, r in results.items():
        eng = r["engine"]
        for p in eng["prefill"]:
            T = p["tokens"]
            e_ms, t_ms = p["seconds"] * 1e3, r["torch_prefill_s"][T] * 1e3
            print(f"{name:18} {'prefill T=' + str(T) + ' (ms)':24} {e_ms:12.1f} {t_ms:12.1f} {t_ms / e_ms:8.2f}x "
                  f"{p['gflops_total']:8.1f} {100 * p['gflops_total'] / rate:6.0f}%")
        for d in eng["decode"]:
            B = d["batch"]
            e_tps = d["tokens_per_second"]
            t_tps = B / r["torch_decode_step_s"][B]
            print(f"{name:18} {'decode B=' + str(B) + ' (tokens/s)':24} {e_tps:12.1f} {t_tps:12.1f} "
                  f"{e_tps / t_tps:8.2f}x")
    if a.json:
        print(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
