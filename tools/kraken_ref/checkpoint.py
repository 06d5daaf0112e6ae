"""Reading and writing model directories (config.json + safetensors) and the authors' nanoGPT
checkpoint layout (docs/kraken.md "The authors' checkpoint")."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def load_model_dir(model_dir: str) -> dict:
    """All tensors of model.safetensors or of the shards in model.safetensors.index.json, as
    float32."""
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        W = load_file(single)
    else:
        with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
            index = json.load(f)
        W = {}
        for shard in sorted(set(index["weight_map"].values())):
            W.update(load_file(os.path.join(model_dir, shard)))
    return {k: v.to(torch.float32) for k, v in W.items()}


def save_model_dir(model_dir: str, config: dict, W: dict, dtype: torch.dtype, shards: int = 1,
                   metadata: dict | None = None) -> None:
    """Writes config.json and the weights in `dtype`, in one file or `shards` files with an index."""
    os.makedirs(model_dir, exist_ok=True)
    config = dict(config, torch_dtype=TORCH_DTYPE_NAMES[dtype])
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    tensors = {k: v.to(dtype).contiguous() for k, v in W.items()}
    meta = {"format": "pt", **(metadata or {})}
    if shards == 1:
        save_file(tensors, os.path.join(model_dir, "model.safetensors"), metadata=meta)
        return
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, os.path.join(model_dir, fname), metadata=meta)
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")


def kraken_config_json(cfg) -> dict:
    """Our config.json for a Kraken reference Config."""
    return {
        "model_type": "kraken",
        "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "kraken_degree": cfg.kraken_degree,
        "n_head_per_sublayer": cfg.n_head,
        "ffn_expansion": cfg.ffn_hidden // cfg.n_embd,
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "bias": cfg.bias,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
    }


def to_authors_checkpoint(cfg, W: dict, compiled_prefix: bool = True) -> dict:
    """The dict the authors' train.py saves with torch.save: 'model' (state_dict, optionally with
    the '_orig_mod.' prefix of a compiled module, lm_head.weight tied to wte), 'model_args' and
    'config'."""
    pre = "_orig_mod." if compiled_prefix else ""
    sd = {pre + k: v.clone() for k, v in W.items()}
    sd[pre + "lm_head.weight"] = sd[pre + "transformer.wte.weight"]  # tied: the same tensor
    n_head_total = cfg.n_head * cfg.kraken_degree
    model_args = dict(n_layer=cfg.n_layer, n_head=n_head_total, n_embd=cfg.n_embd, block_size=cfg.n_positions,
                      bias=cfg.bias, vocab_size=cfg.vocab_size, dropout=0.0, n_heads_in_split=cfg.n_head,
                      is_split=True, ffn_expansion=cfg.ffn_hidden // cfg.n_embd)
    return {"model": sd, "model_args": model_args, "iter_num": 0, "best_val_loss": 0.0,
            "config": dict(model_args)}
