"""tools/convert_kraken_checkpoint.py on checkpoints saved in the authors' exact layout."""

import os
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
                        "--dtype", "f32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
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
    conv.convert(str(ckpt), str(tmp_path / "m"), "bf16")
    out = run_generate(generate_bin, str(tmp_path / "m"), "--score", "--prompt-ids", "1,2,3,4,5,6")
    Wb = ref.round_to_dtype(W, torch.bfloat16)
    logp = torch.log_softmax(ref.forward(CFG, Wb, [1, 2, 3, 4, 5, 6]).double(), dim=-1)
    assert out["scores"][-1]["logprob"] == pytest.approx(logp[4, 6].item(), abs=1e-4)


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
