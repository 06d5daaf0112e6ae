#!/usr/bin/env python3
"""Engine benchmark: the C++ CPU engine against PyTorch eager on the same random weights, in the
same run, for a Kraken "125M 4-way" shape and a GPT-2 124M shape.

The weights are drawn once and rounded to BF16, then saved twice: as an F32 checkpoint and as a
BF16 checkpoint holding the very same values. PyTorch eager computes in F32 (as the reference
does); the engine also computes in F32, reading the weights either as F32 or, from the BF16
checkpoint, as BF16 widened in registers (half the bytes per decode step, identical results).

    .venv/bin/python bench/engine_bench.py                 # full table (several minutes)
    .venv/bin/python bench/engine_bench.py --quick         # small prompt lengths, fewer steps
    .venv/bin/python bench/engine_bench.py --kv-dtypes f32,bf16,f16   # decode by KV-cache dtype only

Prints prefill latency (T = 128, 512, 2048) and decode tokens/s (batch 1, 8, 32 after a
128-token context, greedy), the ratio PyTorch time / engine time, the machine's GEMM rate
(oneDNN sgemm 2048x1024x1024 and our packed GEMM) and the prefill's achieved GFLOP/s as a share
of the oneDNN rate. Targets (issue): decode at batch 1 >= 2x PyTorch eager; prefill >= 60% of the
measured GEMM rate.

With --kv-dtypes, only decode runs (GPT-2 124M shape, F32 and BF16 weights, a --context-token
history per sequence), once per KV-cache dtype, and each step's share of the memory-bandwidth
bound: the bytes it must read (every weight once, plus each sequence's cached K and V) over the
step time, against the read bandwidth measured in the same run.
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
    # docs/kraken.md "Released configurations", 125M 4-way, with 2048 positions so T = 2048 fits.
    "kraken-125m-4way": ref.Config("kraken", n_layer=12, n_embd=504, n_head=3, vocab_size=50304, n_positions=2048,
                                   kraken_degree=4, ffn_hidden=1008, bias=False),
    # GPT-2 124M (Hugging Face layout), 2048 positions.
    "gpt2-124m": ref.Config("gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=2048,
                            ffn_hidden=3072, bias=True),
}


def ensure_models(name: str, cfg: ref.Config, root: str) -> dict:
    """{'f32': dir, 'bf16': dir} holding the same BF16-representable weights."""
    paths = {"f32": os.path.join(root, name + "-f32"), "bf16": os.path.join(root, name + "-bf16")}
    if all(os.path.exists(os.path.join(p, "model.safetensors")) for p in paths.values()):
        return paths
    W = ref.round_to_dtype(ref.random_weights(cfg, seed=1234, std=0.02), torch.bfloat16)
    if cfg.model_type == "kraken":
        config = kraken_config_json(cfg)
    else:
        config = {"model_type": "gpt2", "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                  "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions}
    save_model_dir(paths["f32"], config, W, torch.float32)
    save_model_dir(paths["bf16"], config, W, torch.bfloat16)
    return paths


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


def kv_dtype_table(a) -> int:
    binary = os.path.join(a.build, "bench", "engine_bench")
    batches = [1, 8] if a.quick else [1, 8, 32]
    steps = 8 if a.quick else 16
    paths = ensure_models("gpt2-124m", SHAPES["gpt2-124m"], a.models or os.path.join(a.build, "bench-models"))
    runs = {}
    for wdt, path in paths.items():
        runs[wdt] = json.loads(subprocess.run(
            [binary, "--model", path, "--prefill", "16", "--decode-batch", ",".join(map(str, batches)), "--context",
             str(a.context), "--decode-steps", str(steps), "--repeats", "1", "--threads", str(a.threads),
             "--kv-dtypes", a.kv_dtypes], check=True, capture_output=True, text=True).stdout)
    bw = runs["f32"]["memory_read_gbps"]
    print(f"GPT-2 124M shape, {a.threads} threads, {a.context}-token history per sequence, greedy decode; "
          f"memory read bandwidth {bw:.1f} GB/s (same run)")
    print("bound = bytes a step must read (weights + every sequence's K and V) / bandwidth; share = bound time / "
          "step time")
    print(f"{'weights':8} {'KV':5} {'batch':>5} {'tok/s':>8} {'step ms':>8} {'MB/step':>8} {'GB/s':>6} "
          f"{'% of bound':>10}")
    for wdt, r in runs.items():
        base = {}
        for d in r["decode"]:
            base.setdefault(d["batch"], d["tokens_per_second"])
            print(f"{wdt.upper():8} {d['kv_dtype']:5} {d['batch']:5d} {d['tokens_per_second']:8.1f} "
                  f"{d['step_seconds'] * 1e3:8.1f} {d['step_bytes'] / 1e6:8.0f} {d['read_gbps']:6.1f} "
                  f"{100 * d['bandwidth_share']:9.0f}%   x{d['tokens_per_second'] / base[d['batch']]:.2f} vs first KV")
    if a.json:
        print(json.dumps(runs, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--models", default=None, help="where the random-weight models are written (default BUILD/bench-models)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="T = 128, 512; batches 1, 8; 8 decode steps")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    ap.add_argument("--kv-dtypes", default=None, help="decode only, once per KV-cache dtype (e.g. f32,bf16,f16)")
    ap.add_argument("--context", type=int, default=256, help="history tokens per sequence with --kv-dtypes")
    a = ap.parse_args()
    if a.kv_dtypes:
        return kv_dtype_table(a)
    prefill = [128, 512] if a.quick else [128, 512, 2048]
    batches = [1, 8] if a.quick else [1, 8, 32]
    steps, repeats, context = (8, 2, 128) if a.quick else (16, 3, 128)
    models_root = a.models or os.path.join(a.build, "bench-models")
    torch.set_num_threads(a.threads)
    binary = os.path.join(a.build, "bench", "engine_bench")
    results = {}
    def engine(path):
        return json.loads(subprocess.run(
            [binary, "--model", path, "--prefill", ",".join(map(str, prefill)), "--decode-batch",
             ",".join(map(str, batches)), "--context", str(context), "--decode-steps", str(steps), "--repeats",
             str(repeats), "--threads", str(a.threads)], check=True, capture_output=True, text=True).stdout)

    for name, cfg in SHAPES.items():
        paths = ensure_models(name, cfg, models_root)
        eng = {dt: engine(p) for dt, p in paths.items()}
        W = load_model_dir(paths["f32"])
        pt_prefill = {T: torch_prefill(cfg, W, T, repeats) for T in prefill}
        pt_decode = {B: torch_decode(cfg, W, B, context, steps) for B in batches}
        del W
        results[name] = {"engine": eng, "torch_prefill_s": pt_prefill, "torch_decode_step_s": pt_decode}

    first = next(iter(results.values()))["engine"]["f32"]
    gemm = first["gemm_2048x1024x1024"]
    rate = gemm["onednn_sgemm_gflops"]
    print(f"machine: {a.threads} threads; torch {torch.__version__}; memory read {first['memory_read_gbps']:.1f} GB/s")
    print(f"GEMM 2048x1024x1024 F32: oneDNN sgemm {rate:.1f} GFLOP/s (the yardstick), Kraken packed GEMM "
          f"{gemm['kraken_packed_gflops']:.1f} GFLOP/s")
    print("speed-up = PyTorch eager time / engine time; % GEMM = prefill GFLOP/s / oneDNN sgemm GFLOP/s")
    print()
    hdr = (f"{'model':17} {'measure':22} {'engine F32':>11} {'engine BF16':>12} {'PyTorch F32':>12} "
           f"{'speed-up F32':>13} {'BF16':>6} {'GFLOP/s':>8} {'% GEMM':>7}")
    print(hdr)
    for name, r in results.items():
        e32, e16 = r["engine"]["f32"], r["engine"]["bf16"]
        for p32, p16 in zip(e32["prefill"], e16["prefill"]):
            T = p32["tokens"]
            a_ms, b_ms, t_ms = p32["seconds"] * 1e3, p16["seconds"] * 1e3, r["torch_prefill_s"][T] * 1e3
            print(f"{name:17} {'prefill T=' + str(T) + ' (ms)':22} {a_ms:11.1f} {b_ms:12.1f} {t_ms:12.1f} "
                  f"{t_ms / a_ms:12.2f}x {t_ms / b_ms:5.2f}x {p32['gflops_total']:8.1f} "
                  f"{100 * p32['gflops_total'] / rate:6.0f}%")
        for d32, d16 in zip(e32["decode"], e16["decode"]):
            B = d32["batch"]
            t_tps = B / r["torch_decode_step_s"][B]
            print(f"{name:17} {'decode B=' + str(B) + ' (tok/s)':22} {d32['tokens_per_second']:11.1f} "
                  f"{d16['tokens_per_second']:12.1f} {t_tps:12.1f} {d32['tokens_per_second'] / t_tps:12.2f}x "
                  f"{d16['tokens_per_second'] / t_tps:5.2f}x")
    if a.json:
        print(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
