#!/usr/bin/env python3
"""Writes the tiny random-weight test models under tests/data/models/ and, for each, a golden
file computed by the PyTorch reference (tools/kraken_ref/reference.py).

    .venv/bin/python tools/make_test_models.py              # regenerate everything
    .venv/bin/python tools/make_test_models.py --check      # regenerate to a temp dir and compare

Golden file (golden.safetensors in each model directory): safetensors whose __metadata__ holds
magic "KRAKEN-GOLDEN" and version "1"; tensors:
  tokens                int32 [T]     the input sequence (positions 0..T-1)
  logits                f32   [T, V]  reference logits at every position
  trace.<name>[.l<L>][.s<S>]  f32     named intermediates (see reference.py)
  hf_logits             f32   [T, V]  (GPT-2 only) Hugging Face GPT2LMHeadModel's logits
The reference computes in float32 with the weights exactly as stored (BF16/F16 widened).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kraken_ref import reference as ref  # noqa: E402
from kraken_ref.checkpoint import DTYPES, kraken_config_json, save_model_dir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_MAGIC = "KRAKEN-GOLDEN"
GOLDEN_VERSION = "1"
SEQ_LEN = 37
VOCAB = 256
POSITIONS = 64

# name -> (config, stored dtype, seed, shards)
MODELS = {
    "kraken-n2-h113-f32": (ref.Config("kraken", n_layer=3, n_embd=113, n_head=1, vocab_size=VOCAB,
                                      n_positions=POSITIONS, kraken_degree=2, ffn_hidden=226), "f32", 11, 1),
    "kraken-n4-bias-f32": (ref.Config("kraken", n_layer=2, n_embd=63, n_head=3, vocab_size=VOCAB,
                                      n_positions=POSITIONS, kraken_degree=4, ffn_hidden=126, bias=True),
                           "f32", 12, 1),
    "kraken-n4-bf16": (ref.Config("kraken", n_layer=3, n_embd=90, n_head=2, vocab_size=VOCAB,
                                  n_positions=POSITIONS, kraken_degree=4, ffn_hidden=180), "bf16", 13, 1),
    "gpt2-f32": (ref.Config("gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=POSITIONS,
                            ffn_hidden=256, bias=True), "f32", 14, 1),
    "gpt2-bf16": (ref.Config("gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=POSITIONS,
                             ffn_hidden=256, bias=True), "bf16", 15, 1),
    "parallel-block-f16-sharded": (ref.Config("parallel_block", n_layer=2, n_embd=75, n_head=3, vocab_size=VOCAB,
                                              n_positions=POSITIONS, ffn_hidden=300, bias=True), "f16", 16, 2),
}


def write_gpt2_hf(model_dir: str, cfg: ref.Config, W: dict, dtype: torch.dtype) -> torch.nn.Module:
    """Saves through Hugging Face transformers, so the directory is exactly what
    GPT2LMHeadModel.save_pretrained produces (HF key names, Conv1D [in, out] weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=None, activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.layer_norm_epsilon,
                        bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1)
    model = GPT2LMHeadModel(hf_cfg).eval()
    missing, unexpected = model.load_state_dict(W, strict=False)
    assert not unexpected, unexpected
    assert all(k == "lm_head.weight" for k in missing), missing
    model = model.to(dtype)
    model.save_pretrained(model_dir, safe_serialization=True)
    return model.to(torch.float32)


def make(name: str, out_root: str) -> None:
    cfg, dtype_name, seed, shards = MODELS[name]
    dtype = DTYPES[dtype_name]
    model_dir = os.path.join(out_root, name)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.makedirs(model_dir)
    W = ref.round_to_dtype(ref.random_weights(cfg, seed), dtype)
    hf_logits = None
    tokens = torch.randint(0, cfg.vocab_size, (SEQ_LEN,), generator=torch.Generator().manual_seed(seed + 1000))
    if cfg.model_type == "gpt2":
        hf = write_gpt2_hf(model_dir, cfg, W, dtype)
        with torch.no_grad():
            hf_logits = hf(tokens.unsqueeze(0)).logits[0].float()
    else:
        config = kraken_config_json(cfg) if cfg.model_type == "kraken" else {
            "model_type": "parallel_block", "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
            "ffn_expansion": cfg.ffn_hidden // cfg.n_embd, "vocab_size": cfg.vocab_size,
            "n_positions": cfg.n_positions, "bias": cfg.bias, "layer_norm_epsilon": cfg.layer_norm_epsilon}
        config["eos_token_id"] = cfg.vocab_size - 1
        save_model_dir(model_dir, config, W, dtype, shards=shards)
    trace = {}
    logits = ref.forward(cfg, W, tokens, trace=trace)
    golden = {"tokens": tokens.to(torch.int32), "logits": logits.float()}
    for k, v in trace.items():
        golden["trace." + k] = v.float().contiguous()
    if hf_logits is not None:
        golden["hf_logits"] = hf_logits.contiguous()
    save_file(golden, os.path.join(model_dir, "golden.safetensors"),
              metadata={"magic": GOLDEN_MAGIC, "version": GOLDEN_VERSION, "model": name,
                        "regenerate": ".venv/bin/python tools/make_test_models.py"})


# How far a regenerated golden float may sit from the committed one, relative to the largest
# magnitude in its tensor. The reference runs in float32 through PyTorch's CPU kernels, whose
# summation order follows the CPU's vector width (AVX2 and AVX-512 machines differ by ~1e-6 of
# the scale), so golden logits and traces agree to rounding, not to the bit. Weights, token ids
# and every non-golden file must still be identical.
GOLDEN_REL_TOL = 1e-5


def same_tensor(x: torch.Tensor, y: torch.Tensor, golden: bool) -> bool:
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if not golden or not x.is_floating_point():
        return torch.equal(x, y)
    scale = max(y.float().abs().max().item(), 1e-30) if y.numel() else 1.0
    return bool(((x.float() - y.float()).abs() <= GOLDEN_REL_TOL * scale).all())


def same_file(a: str, b: str) -> bool:
    """Byte equality, except safetensors files compare by tensors (their metadata order varies),
    and golden outputs to GOLDEN_REL_TOL of their scale."""
    if not a.endswith(".safetensors"):
        return filecmp.cmp(a, b, shallow=False)
    ta, tb = load_file(a), load_file(b)
    golden = os.path.basename(a) == "golden.safetensors"
    return ta.keys() == tb.keys() and all(same_tensor(ta[k], tb[k], golden) for k in ta)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "data", "models"))
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary directory and fail if anything differs from --out")
    a = ap.parse_args()
    torch.set_num_threads(1)  # reproducible reductions
    if a.check:
        with tempfile.TemporaryDirectory() as tmp:
            for name in MODELS:
                make(name, tmp)
            bad = []
            for name in MODELS:
                cmp = filecmp.dircmp(os.path.join(tmp, name), os.path.join(a.out, name))
                bad += [f"{name}/{f}" for f in cmp.left_only + cmp.right_only]
                for f in cmp.common_files:
                    if not same_file(os.path.join(tmp, name, f), os.path.join(a.out, name, f)):
                        bad.append(f"{name}/{f}")
            if bad:
                print("make_test_models: regenerated files differ: " + ", ".join(sorted(set(bad))), file=sys.stderr)
                return 1
            print(f"make_test_models: {len(MODELS)} models regenerate identically (golden outputs to "
                  f"{GOLDEN_REL_TOL:g} of their scale)")
            return 0
    for name in MODELS:
        make(name, a.out)
        print(f"wrote {os.path.join(a.out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
