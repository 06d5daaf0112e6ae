#!/usr/bin/env python3
"""Converts the Kraken authors' nanoGPT-style checkpoint (ckpt.pt from github.com/rohan-bp/kraken
training/train.py) into a Kraken Serve model directory: config.json + model.safetensors.

    .venv/bin/python tools/convert_kraken_checkpoint.py out-4-1234/ckpt.pt models/kraken-4way --dtype bf16

What it does (docs/kraken.md "The authors' checkpoint"):
  * strips the '_orig_mod.' prefix a torch.compile'd module leaves on every key;
  * checks that lm_head.weight is the same as transformer.wte.weight (tied) and drops it;
  * drops the causal-mask buffers (attn.bias) the non-flash attention path registers;
  * checks every remaining tensor against the shapes model_args implies, and refuses anything
    unexpected or missing, naming it;
  * derives N = n_head / n_heads_in_split and writes our config.json;
  * names the end-of-text token (--eos-token-id; for GPT-2's vocabulary, 50257 or 50304 tokens, by
    default GPT-2's <|endoftext|>, 50256, which the released recipe's data preparation appends
    after every document) in config.json and in a generation_config.json, so generation stops
    where the model learned to end a text.
Weights keep the authors' PyTorch [out, in] layout and names, so nothing is transposed.

Refused, with one line on stderr naming the file and the problem and exit status 1 (never a
traceback): a missing, empty, truncated or non-PyTorch file; a pickle that is not the nanoGPT
dict; model_args the authors' own code would refuse (n_head not a multiple of n_heads_in_split,
n_embd not divisible by n_heads_in_split: both asserted in their CausalSelfAttention) or that
give N = 1 (their KrakenBlock sums the other N - 1 sub-layers' outputs, and there are none);
values outside what the engine loads (engine/model_config.h); missing, unexpected or misshapen
tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kraken_ref.checkpoint import DTYPES, save_model_dir  # noqa: E402

PREFIX = "_orig_mod."


# Largest value of each integer model_args field the engine loads (engine/model_config.h: kMaxLayers,
# kMaxWidth, ...); n_head is bounded through N and n_heads_in_split.
MAX_KRAKEN_DEGREE = 64
LIMITS = {"n_layer": 1024, "n_embd": 1 << 16, "n_head": MAX_KRAKEN_DEGREE << 16, "n_heads_in_split": 1 << 16,
          "vocab_size": 1 << 22, "block_size": 1 << 20, "ffn_expansion": 64}
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
# GPT-2's <|endoftext|> (tiktoken "gpt2" eot_token): the released recipe tokenizes with tiktoken's
# gpt2 encoding and appends it after each document (nanoGPT data/openwebtext/prepare.py).
GPT2_EOT = 50256
GPT2_VOCAB_SIZES = (50257, 50304)  # GPT-2's, and nanoGPT's padding of it to a multiple of 64
GPT2_DEFAULT = object()  # --eos-token-id not given: GPT-2's <|endoftext|>, for GPT-2's vocabulary only


class ConversionError(Exception):
    """Bad or unsupported input; the message is one line naming the field, the limit and the value."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message cut to one line of at most `limit` characters."""
    text = str(e).strip().splitlines()
    line = text[0].strip() if text else type(e).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def torch_load_reason(e: BaseException) -> str:
    """The informative part of a torch.load failure, on one line: the unpickler's own complaint
    (not the paragraph about weights_only around it), or the first sentence of the message."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
    else:
        text = text.split(". ", 1)[0]
    return f"{type(e).__name__}: {first_line(' '.join(text.split()) or type(e).__name__)}"


def load_checkpoint(path: str):
    """torch.load of `path` (tensors and plain containers only, no code), or ConversionError
    saying why it cannot be read."""
    if not os.path.exists(path):
        raise ConversionError("no such file")
    if not os.path.isfile(path):
        raise ConversionError("not a regular file")
    size = os.path.getsize(path)
    if size == 0:
        raise ConversionError("empty file (0 bytes); expected a ckpt.pt written by torch.save")
    with open(path, "rb") as f:
        is_zip = f.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing on them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # RuntimeError, UnpicklingError, EOFError, ...: it depends on the bytes
        if is_zip:
            raise ConversionError(f"truncated or corrupt zip archive ({size} bytes; torch.load: "
                                  f"{torch_load_reason(e)})") from None
        raise ConversionError(f"not a PyTorch checkpoint ({size} bytes, not a zip archive; torch.load: "
                              f"{torch_load_reason(e)})") from None


def check_model_args(args: dict) -> None:
    """model_args the authors' training code would build a Kraken model from, within the engine's limits."""
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "n_heads_in_split"):
        if key not in args:
            raise ConversionError(f"model_args lacks '{key}'")
    for key, hi in LIMITS.items():
        v = args.get(key, 2 if key == "ffn_expansion" else None)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConversionError(f"model_args field '{key}' must be an integer, got {v!r}")
        if not 1 <= v <= hi:
            raise ConversionError(f"model_args field '{key}' ({v}) must be in [1, {hi}]")
    if not args.get("is_split", True):
        raise ConversionError("model_args has is_split=False: a standard GPT, not a Kraken model")
    n_head, h, d = args["n_head"], args["n_heads_in_split"], args["n_embd"]
    if n_head % h:
        raise ConversionError(f"model_args field 'n_head' ({n_head}) must be a multiple of 'n_heads_in_split' ({h})")
    if d % h:
        raise ConversionError(f"model_args field 'n_embd' ({d}) must be divisible by 'n_heads_in_split' ({h})")
    N = n_head // h
    if not 2 <= N <= MAX_KRAKEN_DEGREE:
        raise ConversionError(f"Kraken degree N = n_head / n_heads_in_split = {n_head} / {h} = {N} must be in "
                              f"[2, {MAX_KRAKEN_DEGREE}] (each Kraken layer sums the other N - 1 sub-layers)")


def expected_shapes(args: dict) -> dict:
    n_layer, d, V, P = args["n_layer"], args["n_embd"], args["vocab_size"], args["block_size"]
    h = args["n_heads_in_split"]
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


def convert(ckpt_path: str, out_dir: str, dtype: str = "bf16", eos_token_id=GPT2_DEFAULT) -> dict:
    """Converts; returns the config.json dict written. `eos_token_id` (None: none; by default
    GPT-2's <|endoftext|> for GPT-2's vocabulary sizes, refused for others) goes into config.json
    (eos_token_id, bos_token_id) and generation_config.json. Raises ConversionError on bad input,
    its message starting with `ckpt_path`."""
    try:
        return _convert(ckpt_path, out_dir, dtype, eos_token_id)
    except ConversionError as e:
        raise ConversionError(f"{ckpt_path}: {e}") from None


def _convert(ckpt_path: str, out_dir: str, dtype: str, eos_token_id) -> dict:
    ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt, dict):
        raise ConversionError(f"holds a {type(ckpt).__name__}, not the dict with 'model' and 'model_args' of a "
                              "nanoGPT ckpt.pt")
    for key in ("model", "model_args"):
        if key not in ckpt:
            raise ConversionError(f"lacks key '{key}' (a nanoGPT ckpt.pt holds 'model' and 'model_args'); "
                                  f"keys: {sorted(map(str, ckpt))[:8]}")
        if not isinstance(ckpt[key], dict):
            raise ConversionError(f"'{key}' is a {type(ckpt[key]).__name__}, expected a dict")
    args = dict(ckpt["model_args"])
    check_model_args(args)
    sd = {}
    for k, v in ckpt["model"].items():
        if not isinstance(k, str):
            raise ConversionError(f"'model' has a key of type {type(k).__name__} ({k!r}); tensor names are strings")
        if not isinstance(v, torch.Tensor):
            raise ConversionError(f"'model' entry '{k}' is a {type(v).__name__}, expected a tensor")
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
    if eos_token_id is GPT2_DEFAULT:
        if args["vocab_size"] not in GPT2_VOCAB_SIZES:
            raise ConversionError(f"vocab_size {args['vocab_size']} is not GPT-2's (50257, or 50304 padded), so its "
                                  "end-of-text token is unknown: pass --eos-token-id ID (or -1 for none)")
        eos_token_id = GPT2_EOT
    if eos_token_id is not None:
        if not 0 <= eos_token_id < args["vocab_size"]:
            raise ConversionError(f"--eos-token-id {eos_token_id} is outside the vocabulary [0, {args['vocab_size']}); "
                                  "pass the id of the model's end-of-text token, or -1 for none")
        config["eos_token_id"] = config["bos_token_id"] = eos_token_id
    try:
        save_model_dir(out_dir, config, {k: v.float() for k, v in sd.items()}, DTYPES[dtype],
                       metadata={"converted_from": os.path.basename(ckpt_path)})
        if eos_token_id is not None:  # kept: what an existing generation_config.json already says
            path = os.path.join(out_dir, "generation_config.json")
            generation = {}
            if os.path.exists(path):
                with open(path) as f:
                    generation = json.load(f)
            generation.update({"bos_token_id": eos_token_id, "eos_token_id": eos_token_id})
            with open(path, "w") as f:
                json.dump(generation, f, indent=2, sort_keys=True)
                f.write("\n")
    except OSError as e:
        raise ConversionError(f"cannot write the model directory '{out_dir}': {e.strerror or first_line(e)}") from None
    return config


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="the authors' ckpt.pt")
    ap.add_argument("out_dir", help="model directory to write")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stored weight type (default bf16)")
    ap.add_argument("--eos-token-id", type=int, default=None,
                    help=f"the end-of-text token id, written to config.json and generation_config.json "
                         f"(default {GPT2_EOT}, GPT-2's <|endoftext|>, for a vocabulary of 50257 or 50304 "
                         f"tokens; required for another; -1: none)")
    a = ap.parse_args()
    try:
        eos = GPT2_DEFAULT if a.eos_token_id is None else None if a.eos_token_id < 0 else a.eos_token_id
        cfg = convert(a.ckpt, a.out_dir, a.dtype, eos)
    except ConversionError as e:
        print(f"convert_kraken_checkpoint: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a case the checks above missed: still one line, but say it is ours
        print(f"convert_kraken_checkpoint: {a.ckpt}: internal error, please report: {type(e).__name__}: "
              f"{first_line(e)}", file=sys.stderr)
        return 1
    print(f"wrote {a.out_dir}: Kraken {cfg['kraken_degree']}-way, {cfg['n_layer']} layers, d={cfg['n_embd']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
