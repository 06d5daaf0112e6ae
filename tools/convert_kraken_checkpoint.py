#!/usr/bin/env python3
"""Converts the Kraken authors' nanoGPT-style checkpoint (ckpt.pt from github.com/rohan-bp/kraken
training/train.py) into a Kraken Serve model directory: config.json + model.safetensors.

    .venv/bin/python tools/convert_kraken_checkpoint.py out-4-1234/ckpt.pt models/kraken-4way --dtype bf16

What it does (KRAKEN.md "The authors' checkpoint"):
  * strips the '_orig_mod.' prefix a torch.compile'd module leaves on every key;
  * checks that lm_head.weight is the same as transformer.wte.weight (tied) and drops it;
  * drops the causal-mask buffers (attn.bias) the non-flash attention path registers;
  * checks every remaining tensor against the shapes model_args implies, and refuses anything
    unexpected or missing, naming it;
  * derives N = n_head / n_heads_in_split and writes our config.json.
Weights keep the authors' PyTorch [out, in] layout and names, so nothing is transposed.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kraken_ref.checkpoint import DTYPES, save_model_dir  # noqa: E402

PREFIX = "_orig_mod."


class ConversionError(Exception):
    pass


def expected_shapes(args: dict) -> dict:
    n_layer, d, V, P = args["n_layer"], args["n_embd"], args["vocab_size"], args["block_size"]
    h = args["n_heads_in_split"]
    if args["n_head"] % h:
        raise ConversionError(f"model_args n_head ({args['n_head']}) is not a multiple of n_heads_in_split ({h})")
    N = args["n_head"] // h
    e = args.get("ffn_expansion", 2)
    bias = bool(args.get("bias", False))
    shapes = {"transformer.wte.weight": (V, d), "transformer.wpe.weight": (P, d),
              "transformer.ln_f.weight": (d,), "transformer.conjunction.weight": (d, N * d)}
    if bias:
        shapes["transformer.ln_f.bias"] = (d,)
        shapes["transformer.conjunction.bias"] = (d,)
    for i in range(N):
        for l in range(n_layer):
            p = f"transformer.h.{i}.{l}."
            for ln in ("ln_1", "ln_2"):
                shapes[p + ln + ".weight"] = (d,)
                if bias:
                    shapes[p + ln + ".bias"] = (d,)
            for name, out, inp in (("attn.c_attn", 3 * d, d), ("attn.c_proj", d, d), ("mlp.c_fc", e * d, d),
                                   ("mlp.c_proj", d, e * d)):
                shapes[p + name + ".weight"] = (out, inp)
                if bias:
                    shapes[p + name + ".bias"] = (out,)
    return shapes


def convert(ckpt_path: str, out_dir: str, dtype: str = "bf16") -> dict:
    """Converts; returns the config.json dict written. Raises ConversionError on bad input."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ConversionError(f"{ckpt_path}: expected a dict with 'model' and 'model_args' (nanoGPT ckpt.pt)")
    args = dict(ckpt["model_args"])
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "n_heads_in_split"):
        if key not in args:
            raise ConversionError(f"{ckpt_path}: model_args lacks '{key}'")
    if not args.get("is_split", True):
        raise ConversionError(f"{ckpt_path}: model_args has is_split=False: a standard GPT, not a Kraken model")
    sd = {}
    for k, v in ckpt["model"].items():
        sd[k[len(PREFIX):] if k.startswith(PREFIX) else k] = v
    wte = sd.get("transformer.wte.weight")
    head = sd.pop("lm_head.weight", None)
    if head is not None and (wte is None or not torch.equal(head, wte)):
        raise ConversionError("lm_head.weight differs from transformer.wte.weight; only tied heads are supported")
    for k in [k for k in sd if k.endswith(".attn.bias") and not k.endswith("c_attn.bias")]:
        del sd[k]  # causal-mask buffer
    shapes = expected_shapes(args)
    missing = sorted(set(shapes) - set(sd))
    if missing:
        raise ConversionError(f"missing tensor '{missing[0]}' (and {len(missing) - 1} more)")
    unexpected = sorted(set(sd) - set(shapes))
    if unexpected:
        raise ConversionError(f"unexpected tensor '{unexpected[0]}' (and {len(unexpected) - 1} more)")
    for k, shape in shapes.items():
        if tuple(sd[k].shape) != shape:
            raise ConversionError(f"tensor '{k}' has shape {list(sd[k].shape)}; model_args imply {list(shape)}")
    h = args["n_heads_in_split"]
    config = {
        "model_type": "kraken",
        "n_layer": args["n_layer"],
        "n_embd": args["n_embd"],
        "kraken_degree": args["n_head"] // h,
        "n_head_per_sublayer": h,
        "ffn_expansion": args.get("ffn_expansion", 2),
        "vocab_size": args["vocab_size"],
        "n_positions": args["block_size"],
        "bias": bool(args.get("bias", False)),
        "layer_norm_epsilon": 1e-5,
    }
    save_model_dir(out_dir, config, {k: v.float() for k, v in sd.items()}, DTYPES[dtype],
                   metadata={"converted_from": os.path.basename(ckpt_path)})
    return config


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="the authors' ckpt.pt")
    ap.add_argument("out_dir", help="model directory to write")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stored weight type (default bf16)")
    a = ap.parse_args()
    try:
        cfg = convert(a.ckpt, a.out_dir, a.dtype)
    except ConversionError as e:
        print(f"convert_kraken_checkpoint: {e}", file=sys.stderr)
        return 1
    print(f"wrote {a.out_dir}: Kraken {cfg['kraken_degree']}-way, {cfg['n_layer']} layers, d={cfg['n_embd']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
