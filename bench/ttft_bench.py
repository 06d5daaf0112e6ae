#!/usr/bin/env python3
"""Makes the three random-weight models of the TTFT benchmark (equal parameter counts, shapes
scaled down from the paper's so a run fits this machine), then runs build/bench/ttft_bench.

    .venv/bin/python bench/ttft_bench.py                     # every preset, W = 2, 4, T = 128, 2048
    .venv/bin/python bench/ttft_bench.py --presets none,a100-nvswitch --repeats 2
    # On a DGX (CUDA build in build-gpu): paper-scale 1.3B models in BF16, one GPU per rank, NCCL
    .venv/bin/python bench/ttft_bench.py --build build-gpu --shapes gpu-1.3b-8way --device cuda \
        --presets none --worlds 4,8 --tokens 128,2048

Shapes (docs/kraken.md "Equal-parameter configurations"): standard GPT-2 and parallel-block with
L = 4, D = 512, 8 heads, FFN 4D; Kraken 4-way with L = 4 and d = 324 (4 heads of 81, FFN 2d),
chosen so the whole parameter count matches (d ~ 0.61 D plus the embedding and conjunction).
Vocabulary 4096, 2048 positions, F32 weights.
"""

import argparse
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from kraken_ref import reference as ref  # noqa: E402
from kraken_ref.checkpoint import kraken_config_json, save_model_dir  # noqa: E402

V, P = 4096, 2048
SHAPES = {
    "standard": ref.Config("gpt2", n_layer=4, n_embd=512, n_head=8, vocab_size=V, n_positions=P, ffn_hidden=2048,
                           bias=True),
    "parallel": ref.Config("parallel_block", n_layer=4, n_embd=512, n_head=8, vocab_size=V, n_positions=P,
                           ffn_hidden=2048, bias=True),
    "kraken": ref.Config("kraken", n_layer=4, n_embd=324, n_head=4, vocab_size=V, n_positions=P, kraken_degree=4,
                         ffn_hidden=648, bias=False),
}

# The paper's 1.3B scale (docs/kraken.md "Equal-parameter configurations"): GPT-2 1.3B (L = 24,
# D = 2048, 16 heads, FFN 4D) against a 4-way Kraken of d = 1248 (~0.61 D, 8 heads of 156, FFN 2d),
# BF16 weights, 50304-token vocabulary.
V_GPU = 50304
GPU_SHAPES = {
    "standard": ref.Config("gpt2", n_layer=24, n_embd=2048, n_head=16, vocab_size=V_GPU, n_positions=P,
                           ffn_hidden=8192, bias=True),
    "parallel": ref.Config("parallel_block", n_layer=24, n_embd=2048, n_head=16, vocab_size=V_GPU, n_positions=P,
                           ffn_hidden=8192, bias=True),
    "kraken": ref.Config("kraken", n_layer=24, n_embd=1248, n_head=8, vocab_size=V_GPU, n_positions=P,
                         kraken_degree=4, ffn_hidden=2496, bias=False),
}
# 8-way (W = 8 on a DGX): d = D sqrt(12 / (8 * 8)) ~ 0.43 D -> 880 (8 heads of 110, FFN 2d).
GPU_SHAPES_8WAY = dict(GPU_SHAPES, kraken=ref.Config("kraken", n_layer=24, n_embd=880, n_head=8, vocab_size=V_GPU,
                                                     n_positions=P, kraken_degree=8, ffn_hidden=1760, bias=False))


def config_json(cfg):
    if cfg.model_type == "kraken":
        return kraken_config_json(cfg)
    if cfg.model_type == "gpt2":
        return {"model_type": "gpt2", "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                "vocab_size": cfg.vocab_size, "n_positions": P}
    return {"model_type": "parallel_block", "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
            "ffn_expansion": cfg.ffn_hidden // cfg.n_embd, "vocab_size": cfg.vocab_size, "n_positions": P,
            "bias": True}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--shapes", choices=["cpu", "gpu-1.3b", "gpu-1.3b-8way"], default="cpu",
                    help="cpu: the small F32 models above; gpu-1.3b(-8way): the paper's 1.3B scale in BF16 with a "
                         "4-way (W = 2, 4) or 8-way (W = 2, 4, 8) Kraken")
    a, rest = ap.parse_known_args()
    shapes, dtype = {"cpu": (SHAPES, torch.float32), "gpu-1.3b": (GPU_SHAPES, torch.bfloat16),
                     "gpu-1.3b-8way": (GPU_SHAPES_8WAY, torch.bfloat16)}[a.shapes]
    models = os.path.join(a.build, "bench-models", "ttft" if a.shapes == "cpu" else "ttft-" + a.shapes)
    for name, cfg in shapes.items():
        d = os.path.join(models, name)
        if not os.path.exists(os.path.join(d, "model.safetensors")):
            save_model_dir(d, config_json(cfg), ref.random_weights(cfg, seed=7, std=0.02), dtype)
    return subprocess.call([os.path.join(a.build, "bench", "ttft_bench"), "--models", models, *rest])


if __name__ == "__main__":
    sys.exit(main())
