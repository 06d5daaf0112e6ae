"""tools/convert_kraken_checkpoint.py on checkpoints saved in the authors' exact layout."""

import io
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import TOOLS, run_generate
from kraken_ref import reference as ref
from kraken_ref.checkpoint import to_authors_checkpoint

sys.path.insert(0, TOOLS)
import convert_kraken_checkpoint as conv  # noqa: E402

CFG = ref.Config("kraken", n_layer=3, n_embd=51, n_head=3, vocab_size=120, n_positions=48, kraken_degree=3,
                 ffn_hidden=102, bias=True)


def save_authors_ckpt(path, cfg, W, **kw):
    torch.save(to_authors_checkpoint(cfg, W, **kw), path)


@pytest.mark.parametrize("bias", [True, False])
def test_converted_model_scores_like_the_original(tmp_path, generate_bin, bias):
    cfg = ref.Config(**{**CFG.__dict__, "bias": bias})
    W = ref.random_weights(cfg, seed=21)
    ckpt = tmp_path / "ckpt.pt"
    save_authors_ckpt(ckpt, cfg, W)
    saved = torch.load(ckpt, weights_only=True)
    assert all(k.startswith("_orig_mod.") for k in saved["model"])
    assert "_orig_mod.transformer.h.2.1.mlp.c_proj.weight" in saved["model"]  # h.{i}.{l}: sub-layer first

    out_dir = tmp_path / "model"
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "convert_kraken_checkpoint.py"), str(ckpt), str(out_dir),
                        "--dtype", "f32", "--eos-token-id", "7"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # The end-of-text token where the server and transformers read it.
    assert json.load(open(out_dir / "config.json"))["eos_token_id"] == 7
    assert json.load(open(out_dir / "generation_config.json")) == {"bos_token_id": 7, "eos_token_id": 7}
    prompt = [(11 * i + 4) % cfg.vocab_size for i in range(30)]
    out = run_generate(generate_bin, str(out_dir), "--score", "--prompt-ids", ",".join(map(str, prompt)))
    logp = torch.log_softmax(ref.forward(cfg, W, prompt).double(), dim=-1)
    want = [logp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    got = [s["logprob"] for s in out["scores"]]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4


def test_uncompiled_checkpoint_and_bf16_output(tmp_path, generate_bin):
    W = ref.random_weights(CFG, seed=22)
    ckpt = tmp_path / "ckpt.pt"
    save_authors_ckpt(ckpt, CFG, W, compiled_prefix=False)
    conv.convert(str(ckpt), str(tmp_path / "m"), "bf16", eos_token_id=None)
    # An F32 KV cache, as the reference keeps: the weights' rounding alone is what is checked here.
    out = run_generate(generate_bin, str(tmp_path / "m"), "--score", "--kv-cache-dtype", "f32", "--prompt-ids",
                       "1,2,3,4,5,6")
    Wb = ref.round_to_dtype(W, torch.bfloat16)
    logp = torch.log_softmax(ref.forward(CFG, Wb, [1, 2, 3, 4, 5, 6]).double(), dim=-1)
    assert out["scores"][-1]["logprob"] == pytest.approx(logp[4, 6].item(), abs=1e-4)


def test_the_default_end_of_text_is_gpt2s_where_the_server_and_transformers_read_it(tmp_path):
    # The released recipe's vocabulary (50304, GPT-2's padded) with its <|endoftext|>: 50256.
    cfg = ref.Config(**{**CFG.__dict__, "vocab_size": 50304, "n_embd": 24, "n_head": 3, "ffn_hidden": 48})
    save_authors_ckpt(tmp_path / "ckpt.pt", cfg, ref.random_weights(cfg, seed=23))
    conv.convert(str(tmp_path / "ckpt.pt"), str(tmp_path / "m"), "f32")
    assert json.load(open(tmp_path / "m" / "config.json"))["eos_token_id"] == conv.GPT2_EOT == 50256
    assert json.load(open(tmp_path / "m" / "generation_config.json")) == {"bos_token_id": 50256, "eos_token_id": 50256}

    # A vocabulary without that id: the default is refused by name; None writes no end-of-text.
    save_authors_ckpt(tmp_path / "small.pt", CFG, ref.random_weights(CFG, seed=24))
    with pytest.raises(conv.ConversionError, match=r"vocab_size 120 is not GPT-2's .* pass --eos-token-id ID"):
        conv.convert(str(tmp_path / "small.pt"), str(tmp_path / "n"), "f32")
    with pytest.raises(conv.ConversionError, match=r"--eos-token-id 120 is outside the vocabulary \[0, 120\)"):
        conv.convert(str(tmp_path / "small.pt"), str(tmp_path / "n"), "f32", 120)
    conv.convert(str(tmp_path / "small.pt"), str(tmp_path / "none"), "f32", None)
    assert "eos_token_id" not in json.load(open(tmp_path / "none" / "config.json"))
    assert not (tmp_path / "none" / "generation_config.json").exists()


def test_bad_checkpoints_are_refused_by_name(tmp_path):
    W = ref.random_weights(CFG, seed=23)

    def attempt(mutate):
        ck = to_authors_checkpoint(CFG, W)
        mutate(ck)
        p = tmp_path / "bad.pt"
        torch.save(ck, p)
        with pytest.raises(conv.ConversionError) as e:
            conv.convert(str(p), str(tmp_path / "out"), "f32")
        return str(e.value)

    assert "missing tensor 'transformer.conjunction.weight'" in attempt(
        lambda c: c["model"].pop("_orig_mod.transformer.conjunction.weight"))
    assert "unexpected tensor 'transformer.extra'" in attempt(
        lambda c: c["model"].__setitem__("_orig_mod.transformer.extra", torch.zeros(2)))
    assert "lm_head.weight differs" in attempt(
        lambda c: c["model"].__setitem__("_orig_mod.lm_head.weight", torch.zeros(CFG.vocab_size, CFG.n_embd)))
    assert "tensor 'transformer.wte.weight' has shape [120, 51]; model_args imply [120, 54]" in attempt(
        lambda c: c["model_args"].__setitem__("n_embd", 54))
    assert "is_split=False" in attempt(lambda c: c["model_args"].__setitem__("is_split", False))


# ---- Unreadable and unsupported checkpoints: one line on stderr, exit status 1, no traceback ------

def authors_ckpt_bytes(cfg=CFG, seed=24, mutate=None):
    """A checkpoint in the authors' layout (after `mutate` of its dict), as the bytes torch.save writes."""
    ck = to_authors_checkpoint(cfg, ref.random_weights(cfg, seed=seed))
    if mutate is not None:
        mutate(ck)
    buf = io.BytesIO()
    torch.save(ck, buf)
    return buf.getvalue()


def saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# Consistent weights for shapes the authors' code refuses, so that only the model_args check can
# stop them: d = 50 with 3 heads per sub-layer (their CausalSelfAttention asserts
# n_embd % n_heads_in_split == 0), and N = 1 (their KrakenBlock stacks the other N - 1 sub-layers'
# outputs; with none, torch.stack fails from layer 1 on).
CFG_D50 = ref.Config(**{**CFG.__dict__, "n_embd": 50, "ffn_hidden": 100})
CFG_N1 = ref.Config(**{**CFG.__dict__, "kraken_degree": 1})

# (case, the checkpoint's bytes or None for no file, the message after "convert_kraken_checkpoint: PATH: ").
# A message ending in "..." goes on with torch.load's own words, and is checked up to there.
BAD_CHECKPOINTS = [
    ("missing_file", lambda: None, "no such file"),
    ("empty", lambda: b"", "empty file (0 bytes); expected a ckpt.pt written by torch.save"),
    ("truncated", lambda: (lambda b: b[:len(b) // 2])(authors_ckpt_bytes()),
     "truncated or corrupt zip archive (..."),
    ("random_bytes", lambda: random.Random(5).randbytes(4096),
     "not a PyTorch checkpoint (4096 bytes, not a zip archive; torch.load: UnpicklingError: ..."),
    ("not_a_dict", lambda: saved([torch.zeros(2)]),
     "holds a list, not the dict with 'model' and 'model_args' of a nanoGPT ckpt.pt"),
    ("no_model_key", lambda: saved({"model_args": {}, "iter_num": 0}),
     "lacks key 'model' (a nanoGPT ckpt.pt holds 'model' and 'model_args'); keys: ['iter_num', 'model_args']"),
    ("model_not_a_dict", lambda: saved({"model": [torch.zeros(2)], "model_args": {}}),
     "'model' is a list, expected a dict"),
    ("model_entry_not_a_tensor", lambda: authors_ckpt_bytes(
        mutate=lambda c: c["model"].__setitem__("_orig_mod.transformer.ln_f.weight", [1.0])),
     "'model' entry '_orig_mod.transformer.ln_f.weight' is a list, expected a tensor"),
    ("missing_tensors", lambda: authors_ckpt_bytes(mutate=lambda c: [
        c["model"].pop(f"_orig_mod.transformer.h.{i}.1.attn.c_proj.weight") for i in range(3)]),
     "missing tensor 'transformer.h.0.1.attn.c_proj.weight' (and 2 more)"),
    ("shape_mismatch", lambda: authors_ckpt_bytes(
        mutate=lambda c: c["model"].__setitem__("_orig_mod.transformer.h.2.1.mlp.c_fc.weight", torch.zeros(51, 102))),
     "tensor 'transformer.h.2.1.mlp.c_fc.weight' has shape [51, 102]; model_args imply [102, 51]"),
    ("n_embd_not_divisible", lambda: authors_ckpt_bytes(CFG_D50),
     "model_args field 'n_embd' (50) must be divisible by 'n_heads_in_split' (3)"),
    ("degree_one", lambda: authors_ckpt_bytes(CFG_N1),
     "Kraken degree N = n_head / n_heads_in_split = 3 / 3 = 1 must be in [2, 64] "
     "(each Kraken layer sums the other N - 1 sub-layers)"),
    ("n_head_not_a_multiple", lambda: authors_ckpt_bytes(mutate=lambda c: c["model_args"].__setitem__("n_head", 10)),
     "model_args field 'n_head' (10) must be a multiple of 'n_heads_in_split' (3)"),
    ("zero_heads_in_split", lambda: authors_ckpt_bytes(
        mutate=lambda c: c["model_args"].__setitem__("n_heads_in_split", 0)),
     "model_args field 'n_heads_in_split' (0) must be in [1, 65536]"),
    ("n_layer_not_an_integer", lambda: authors_ckpt_bytes(mutate=lambda c: c["model_args"].__setitem__("n_layer", 3.0)),
     "model_args field 'n_layer' must be an integer, got 3.0"),
]


@pytest.mark.parametrize("make,want", [c[1:] for c in BAD_CHECKPOINTS], ids=[c[0] for c in BAD_CHECKPOINTS])
def test_unusable_checkpoint_ends_with_one_line_naming_file_and_problem(tmp_path, make, want):
    """The command line on a checkpoint it cannot convert: exit status 1, stdout empty, stderr exactly
    one line "convert_kraken_checkpoint: <path>: <problem>" with the field, limit and value the
    problem is about (`want`: the whole problem, or its start up to "..."), no traceback, and no
    model directory left behind."""
    ckpt = tmp_path / "ckpt.pt"
    data = make()
    if data is not None:
        ckpt.write_bytes(data)
    out_dir = tmp_path / "model"
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "convert_kraken_checkpoint.py"), str(ckpt), str(out_dir),
                        "--dtype", "f32"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    prefix = f"convert_kraken_checkpoint: {ckpt}: "
    if want.endswith("..."):
        assert lines[0].startswith(prefix + want[:-3]), lines[0]
    else:
        assert lines[0] == prefix + want
    assert not out_dir.exists()
