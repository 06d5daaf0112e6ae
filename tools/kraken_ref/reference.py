"""Independent PyTorch reference of the three architectures the engine runs.

Written from docs/kraken.md, not from the C++ engine, so the two can check each
other. Functional style over a dict of weights named as in our checkpoints; everything computes
in float32 (BF16/F16 weights are widened exactly first), which is also the engine's arithmetic.

    weights = load_safetensors_dir("tests/data/models/kraken-n2-h113-f32")
    cfg = read_config(...)
    trace = {}
    logits = forward(cfg, weights, torch.tensor([1, 2, 3]), trace=trace)   # [T, V]
    trace["attn_out.l1.s0"]                                                  # [T, d]

Trace names match the engine's Dump() calls: x0, attn_norm, attn_out, ffn_norm, ffn_out, y, sum,
conjunction, final_norm, logits, with ".l<layer>" and ".s<sub-layer>" suffixes where they apply.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Config:
    """Hyper-parameters (the same fields as the engine's ModelConfig)."""

    model_type: str
    n_layer: int
    n_embd: int
    n_head: int  # heads per sub-layer (kraken) or per layer
    vocab_size: int
    n_positions: int
    kraken_degree: int = 1
    ffn_hidden: int = 0
    bias: bool = False
    layer_norm_epsilon: float = 1e-5
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def config_from_json(d: dict) -> Config:
    """Reads our config.json (model_type kraken / gpt2 / parallel_block)."""
    t = d["model_type"]
    eps = d.get("layer_norm_epsilon", 1e-5)
    if t == "kraken":
        return Config(t, d["n_layer"], d["n_embd"], d["n_head_per_sublayer"], d["vocab_size"], d["n_positions"],
                      kraken_degree=d["kraken_degree"], ffn_hidden=d.get("ffn_expansion", 2) * d["n_embd"],
                      bias=d.get("bias", False), layer_norm_epsilon=eps)
    if t == "gpt2":
        inner = d.get("n_inner") or 4 * d["n_embd"]
        return Config(t, d["n_layer"], d["n_embd"], d["n_head"], d["vocab_size"], d["n_positions"],
                      ffn_hidden=inner, bias=True, layer_norm_epsilon=eps)
    if t == "parallel_block":
        return Config(t, d["n_layer"], d["n_embd"], d["n_head"], d["vocab_size"], d["n_positions"],
                      ffn_hidden=d.get("ffn_expansion", 4) * d["n_embd"], bias=d.get("bias", True),
                      layer_norm_epsilon=eps)
    raise ValueError(f"unknown model_type {t!r}")


def read_config(model_dir: str) -> Config:
    with open(os.path.join(model_dir, "config.json")) as f:
        return config_from_json(json.load(f))


# ---- Building blocks (docs/kraken.md "Building blocks") --------------------------------------

def layer_norm(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def linear(x, w, b=None, in_major=False):
    """y = x W^T + b for W [out, in]; HF Conv1D weights are [in, out] (in_major)."""
    y = x @ (w if in_major else w.t())
    return y + b if b is not None else y


class KVCache:
    """Contiguous per-block cache for decode benchmarks: key and value [heads, T, head_dim]."""

    def __init__(self):
        self.k = {}
        self.v = {}


# Training sets this: without a KV cache, attention then goes through PyTorch's fused
# scaled_dot_product_attention (same math, different rounding). Golden files keep the explicit
# formula below.
USE_SDPA = False


def attention(x, qkv_w, qkv_b, proj_w, proj_b, n_head, in_major=False, cache=None, key=None):
    """Causal multi-head self-attention on x [..., T, d] (optional leading batch dimensions).
    With `cache`, x holds only the new tokens and attends to the cached ones first."""
    *lead, T, d = x.shape
    hd = d // n_head
    qkv = linear(x, qkv_w, qkv_b, in_major)
    q, k, v = qkv.split(d, dim=-1)
    q = q.reshape(*lead, T, n_head, hd).transpose(-2, -3)  # [..., h, T, hd]
    k = k.reshape(*lead, T, n_head, hd).transpose(-2, -3)
    v = v.reshape(*lead, T, n_head, hd).transpose(-2, -3)
    if USE_SDPA and cache is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return linear(out.transpose(-2, -3).reshape(*lead, T, d), proj_w, proj_b, in_major)
    past = 0
    if cache is not None:
        if key in cache.k:
            past = cache.k[key].shape[-2]
            k = torch.cat([cache.k[key], k], dim=-2)
            v = torch.cat([cache.v[key], v], dim=-2)
        cache.k[key], cache.v[key] = k, v
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
    S = k.shape[-2]
    mask = torch.arange(S).unsqueeze(0) <= (torch.arange(T).unsqueeze(1) + past)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    out = out.transpose(-2, -3).reshape(*lead, T, d)
    return linear(out, proj_w, proj_b, in_major)


# ---- Forward passes ------------------------------------------------------------------------

def _get(W, name):
    return W.get(name)


def _record(trace, name, t):
    if trace is not None:
        trace[name] = t.detach().clone()


def forward_kraken(cfg: Config, W: dict, tokens, positions, trace=None, cache=None, logit_rows=None):
    """docs/kraken.md "The layer" for one sequence."""
    N, L, eps = cfg.kraken_degree, cfg.n_layer, cfg.layer_norm_epsilon
    P = "transformer."
    x0 = W[P + "wte.weight"][tokens] + W[P + "wpe.weight"][positions]
    _record(trace, "x0", x0)

    def blk(i, l, name):
        return W.get(f"{P}h.{i}.{l}.{name}")

    def attn(i, l, inp):
        return attention(inp, blk(i, l, "attn.c_attn.weight"), blk(i, l, "attn.c_attn.bias"),
                         blk(i, l, "attn.c_proj.weight"), blk(i, l, "attn.c_proj.bias"), cfg.n_head,
                         cache=cache, key=(l, i))

    def ffn(i, l, inp):
        h = gelu_tanh(linear(inp, blk(i, l, "mlp.c_fc.weight"), blk(i, l, "mlp.c_fc.bias")))
        return linear(h, blk(i, l, "mlp.c_proj.weight"), blk(i, l, "mlp.c_proj.bias"))

    ys = []
    for i in range(N):  # layer 0: a plain GPT block per sub-layer on the shared input
        n1 = layer_norm(x0, blk(i, 0, "ln_1.weight"), blk(i, 0, "ln_1.bias"), eps)
        _record(trace, f"attn_norm.l0.s{i}", n1)
        a = attn(i, 0, n1)
        _record(trace, f"attn_out.l0.s{i}", a)
        h = x0 + a
        n2 = layer_norm(h, blk(i, 0, "ln_2.weight"), blk(i, 0, "ln_2.bias"), eps)
        _record(trace, f"ffn_norm.l0.s{i}", n2)
        y = h + ffn(i, 0, n2)
        _record(trace, f"y.l0.s{i}", y)
        ys.append(y)
    for l in range(1, L):
        S = ys[0]
        for j in range(1, N):
            S = S + ys[j]
        _record(trace, f"sum.l{l}", S)
        new = []
        for i in range(N):
            n1 = layer_norm(ys[i], blk(i, l, "ln_1.weight"), blk(i, l, "ln_1.bias"), eps)
            _record(trace, f"attn_norm.l{l}.s{i}", n1)
            a = attn(i, l, n1)
            _record(trace, f"attn_out.l{l}.s{i}", a)
            n2 = layer_norm(S + a, blk(i, l, "ln_2.weight"), blk(i, l, "ln_2.bias"), eps)
            _record(trace, f"ffn_norm.l{l}.s{i}", n2)
            y = ys[i] + a + ffn(i, l, n2)
            _record(trace, f"y.l{l}.s{i}", y)
            new.append(y)
        ys = new
    rows = slice(None) if logit_rows is None else logit_rows
    z = linear(torch.cat(ys, dim=-1)[..., rows, :], W[P + "conjunction.weight"], W.get(P + "conjunction.bias"))
    _record(trace, "conjunction", z)
    return _head(cfg, W, P, z, trace)


def _head(cfg, W, P, z, trace):
    n = layer_norm(z, W[P + "ln_f.weight"], W.get(P + "ln_f.bias"), cfg.layer_norm_epsilon)
    _record(trace, "final_norm", n)
    logits = n @ W[P + "wte.weight"].t()
    _record(trace, "logits", logits)
    return logits


def forward_gpt2(cfg: Config, W: dict, tokens, positions, trace=None, cache=None, logit_rows=None):
    """GPT-2 as Hugging Face GPT2LMHeadModel computes it (Conv1D [in, out] weights)."""
    P = "transformer." if "transformer.wte.weight" in W else ""
    eps = cfg.layer_norm_epsilon
    x = W[P + "wte.weight"][tokens] + W[P + "wpe.weight"][positions]
    _record(trace, "x0", x)
    for l in range(cfg.n_layer):
        p = f"{P}h.{l}."
        n1 = layer_norm(x, W[p + "ln_1.weight"], W[p + "ln_1.bias"], eps)
        _record(trace, f"attn_norm.l{l}", n1)
        a = attention(n1, W[p + "attn.c_attn.weight"], W[p + "attn.c_attn.bias"], W[p + "attn.c_proj.weight"],
                      W[p + "attn.c_proj.bias"], cfg.n_head, in_major=True, cache=cache, key=l)
        _record(trace, f"attn_out.l{l}", a)
        x = x + a
        n2 = layer_norm(x, W[p + "ln_2.weight"], W[p + "ln_2.bias"], eps)
        _record(trace, f"ffn_norm.l{l}", n2)
        h = gelu_tanh(linear(n2, W[p + "mlp.c_fc.weight"], W[p + "mlp.c_fc.bias"], in_major=True))
        f = linear(h, W[p + "mlp.c_proj.weight"], W[p + "mlp.c_proj.bias"], in_major=True)
        _record(trace, f"ffn_out.l{l}", f)
        x = x + f
        _record(trace, f"y.l{l}", x)
    rows = slice(None) if logit_rows is None else logit_rows
    return _head(cfg, W, P, x[..., rows, :], trace)


def forward_parallel_block(cfg: Config, W: dict, tokens, positions, trace=None, cache=None, logit_rows=None):
    """GPT-J style parallel block: x = x + Attn(LN(x)) + FFN(LN(x)); PyTorch Linear layout."""
    P = "transformer."
    eps = cfg.layer_norm_epsilon
    x = W[P + "wte.weight"][tokens] + W[P + "wpe.weight"][positions]
    _record(trace, "x0", x)
    for l in range(cfg.n_layer):
        p = f"{P}h.{l}."
        n = layer_norm(x, W[p + "ln.weight"], W.get(p + "ln.bias"), eps)
        _record(trace, f"attn_norm.l{l}", n)
        a = attention(n, W[p + "attn.c_attn.weight"], W.get(p + "attn.c_attn.bias"), W[p + "attn.c_proj.weight"],
                      W.get(p + "attn.c_proj.bias"), cfg.n_head, cache=cache, key=l)
        _record(trace, f"attn_out.l{l}", a)
        h = gelu_tanh(linear(n, W[p + "mlp.c_fc.weight"], W.get(p + "mlp.c_fc.bias")))
        f = linear(h, W[p + "mlp.c_proj.weight"], W.get(p + "mlp.c_proj.bias"))
        _record(trace, f"ffn_out.l{l}", f)
        x = x + a + f
        _record(trace, f"y.l{l}", x)
    rows = slice(None) if logit_rows is None else logit_rows
    return _head(cfg, W, P, x[..., rows, :], trace)


FORWARD = {"kraken": forward_kraken, "gpt2": forward_gpt2, "parallel_block": forward_parallel_block}


@torch.no_grad()
def forward(cfg: Config, W: dict, tokens, positions=None, trace=None, cache=None, logit_rows=None):
    """Logits [..., T, V] (or [..., len(logit_rows), V]) for tokens [..., T] (leading batch
    dimensions allowed; all rows share `positions`, default 0..T-1)."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if positions is None:
        positions = torch.arange(tokens.shape[-1])
    return FORWARD[cfg.model_type](cfg, W, tokens, torch.as_tensor(positions, dtype=torch.long), trace, cache,
                                   logit_rows)


# ---- Random weights ---------------------------------------------------------------------------

def random_weights(cfg: Config, seed: int, std: float = 0.08) -> dict:
    """Random weights for tests, named as in our checkpoints (float32). LayerNorm scales near 1
    and biases non-zero so that mistakes in either show up."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=std):
        return torch.randn(*shape, generator=g) * scale

    d, f, V, Pn, b = cfg.n_embd, cfg.ffn_hidden, cfg.vocab_size, cfg.n_positions, cfg.bias
    W = {}

    def norm(name):
        W[name + ".weight"] = 1.0 + rnd(d, scale=0.1)
        if b:
            W[name + ".bias"] = rnd(d, scale=0.05)

    def lin(name, out, inp, in_major=False):
        W[name + ".weight"] = rnd(inp, out) if in_major else rnd(out, inp)
        if b:
            W[name + ".bias"] = rnd(out, scale=0.05)

    if cfg.model_type == "gpt2":
        P = "transformer."
        W[P + "wte.weight"] = rnd(V, d, scale=0.5)
        W[P + "wpe.weight"] = rnd(Pn, d, scale=0.1)
        for l in range(cfg.n_layer):
            p = f"{P}h.{l}."
            norm(p + "ln_1")
            norm(p + "ln_2")
            lin(p + "attn.c_attn", 3 * d, d, in_major=True)
            lin(p + "attn.c_proj", d, d, in_major=True)
            lin(p + "mlp.c_fc", f, d, in_major=True)
            lin(p + "mlp.c_proj", d, f, in_major=True)
        norm(P + "ln_f")
        return W
    P = "transformer."
    W[P + "wte.weight"] = rnd(V, d, scale=0.5)
    W[P + "wpe.weight"] = rnd(Pn, d, scale=0.1)
    if cfg.model_type == "kraken":
        for i in range(cfg.kraken_degree):
            for l in range(cfg.n_layer):
                p = f"{P}h.{i}.{l}."
                norm(p + "ln_1")
                norm(p + "ln_2")
                lin(p + "attn.c_attn", 3 * d, d)
                lin(p + "attn.c_proj", d, d)
                lin(p + "mlp.c_fc", f, d)
                lin(p + "mlp.c_proj", d, f)
        lin(P + "conjunction", d, cfg.kraken_degree * d)
    else:
        for l in range(cfg.n_layer):
            p = f"{P}h.{l}."
            norm(p + "ln")
            lin(p + "attn.c_attn", 3 * d, d)
            lin(p + "attn.c_proj", d, d)
            lin(p + "mlp.c_fc", f, d)
            lin(p + "mlp.c_proj", d, f)
    norm(P + "ln_f")
    return W


def round_to_dtype(W: dict, dtype: torch.dtype) -> dict:
    """Weights as they will be stored (`dtype`), widened back to float32 for computing."""
    return {k: v.to(dtype).to(torch.float32) for k, v in W.items()}
