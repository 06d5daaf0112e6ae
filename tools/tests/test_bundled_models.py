"""The bundled models (models/kraken-kjv-4way, models/gpt2-kjv) in the engine against the
PyTorch reference: 64 greedy tokens on 10 prompts, seeded sampling reproducible, validation
perplexity as reported, and the Kraken model's round trip through the authors' checkpoint
layout and the converter."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer

from conftest import ROOT, TOOLS, run_generate
from kraken_ref import reference as ref
from kraken_ref.checkpoint import load_model_dir, to_authors_checkpoint

MODELS = ["kraken-kjv-4way", "gpt2-kjv"]
PROMPTS = [
    "In the beginning",
    "And the LORD said unto Moses,",
    "Blessed are the",
    "The LORD is my shepherd;",
    "And it came to pass, when",
    "For God so loved the world,",
    "Then Jesus answered and said,",
    "Thus saith the LORD of hosts;",
    "And he opened his mouth, and taught them, saying,",
    "Now the serpent was more subtil than any beast of the field",
]
GREEDY_TOKENS = 64


def model_dir(name):
    return os.path.join(ROOT, "models", name)


@pytest.fixture(scope="module", params=MODELS)
def bundled(request):
    d = model_dir(request.param)
    return request.param, d, ref.read_config(d), load_model_dir(d), Tokenizer.from_file(os.path.join(d, "tokenizer.json"))


@torch.inference_mode()
def reference_greedy(cfg, W, prompt, n):
    """Greedy continuation with the reference and a KV cache; also each step's top-2 margin."""
    cache = ref.KVCache()
    logits = ref.forward(cfg, W, prompt, cache=cache)[-1]
    out, margins = [], []
    for i in range(n):
        top = torch.topk(logits, 2)
        margins.append((top.values[0] - top.values[1]).item())
        out.append(int(top.indices[0]))
        logits = ref.forward(cfg, W, [out[-1]], positions=[len(prompt) + i], cache=cache)[-1]
    return out, margins


def test_greedy_generation_matches_the_reference_token_for_token(generate_bin, bundled):
    name, d, cfg, W, tok = bundled
    for prompt_text in PROMPTS:
        prompt = tok.encode(prompt_text).ids
        want, margins = reference_greedy(cfg, W, prompt, GREEDY_TOKENS)
        got = run_generate(generate_bin, d, "--prompt-ids", ",".join(map(str, prompt)), "--max-tokens",
                           str(GREEDY_TOKENS), "--ignore-eos")["generated_ids"]
        for i, (a, b) in enumerate(zip(got, want)):
            if a != b:
                # Only a genuine near-tie may flip the argmax: the engine and the reference
                # agree to ~1e-5 in logits.
                assert margins[i] < 1e-4, (f"{name}, prompt {prompt_text!r}: token {i} is {a}, reference {b} "
                                           f"(top-2 margin {margins[i]:.3g})")
                break
        else:
            assert len(got) == GREEDY_TOKENS


def test_text_prompt_and_seeded_sampling_are_reproducible(generate_bin, bundled):
    name, d, *_ = bundled
    args = ["--prompt", "And God said,", "--max-tokens", "40", "--temperature", "0.8", "--top-p", "0.95", "--seed", "42",
            "--ignore-eos"]
    a = run_generate(generate_bin, d, *args)
    b = run_generate(generate_bin, d, *args, "--threads", "1")
    c = run_generate(generate_bin, d, *args[:-2], "43", "--ignore-eos")
    assert a["generated_ids"] == b["generated_ids"] and a["text"] == b["text"]
    assert a["generated_ids"] != c["generated_ids"]
    assert len(a["text"]) > 40


@pytest.fixture(scope="module")
def validation_ids(tmp_path_factory):
    """The validation split, re-made from the Debian package exactly as for training."""
    out = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, os.path.join(TOOLS, "train", "prepare_data.py"), "--out", str(out)], check=True,
                   capture_output=True)
    import numpy as np

    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    path = out / "val.ids"
    path.write_text(",".join(map(str, val.tolist())))
    return str(path), len(val)


def test_engine_validation_perplexity_matches_the_training_report(generate_bin, bundled, validation_ids):
    name, d, cfg, W, tok = bundled
    path, n = validation_ids
    log = json.load(open(os.path.join(d, "training_log.json")))
    assert log["parameters"] == sum(v.numel() for v in W.values())
    assert log["data"]["sizes"]["val"]["tokens"] == n
    out = run_generate(generate_bin, d, "--score", "--score-window", "256", "--prompt-ids-file", path)
    # Training evaluated 51,200 of the 51,431 predictions the engine scores: allow 0.5%.
    assert out["perplexity"] == pytest.approx(log["val_ppl_bf16"], rel=5e-3)
    # And one sentence against the reference, prediction by prediction: exact to F32 rounding with an F32
    # KV cache; the default (auto: the weights' BF16) rounds K and V, which moves the mean NLL by < 2e-3.
    ids = tok.encode("And the word of the LORD came unto me, saying, Son of man, set thy face toward Jerusalem.").ids
    logp = torch.log_softmax(ref.forward(cfg, W, ids).double(), dim=-1)
    want = -sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)) / (len(ids) - 1)
    prompt = ",".join(map(str, ids))
    scored = run_generate(generate_bin, d, "--score", "--kv-cache-dtype", "f32", "--prompt-ids", prompt)
    assert scored["mean_nll"] == pytest.approx(want, abs=1e-4)
    scored_bf16 = run_generate(generate_bin, d, "--score", "--prompt-ids", prompt)
    assert scored_bf16["mean_nll"] != scored["mean_nll"]
    assert scored_bf16["mean_nll"] == pytest.approx(want, abs=2e-3)


def test_kraken_round_trip_through_the_authors_layout(tmp_path, generate_bin):
    d = model_dir("kraken-kjv-4way")
    cfg, W = ref.read_config(d), load_model_dir(d)
    torch.save(to_authors_checkpoint(cfg, W), tmp_path / "ckpt.pt")
    out = tmp_path / "converted"
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "convert_kraken_checkpoint.py"), str(tmp_path / "ckpt.pt"),
                        str(out), "--dtype", "bf16", "--eos-token-id", "0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    back = load_model_dir(str(out))
    assert back.keys() == W.keys()
    assert all(torch.equal(back[k], W[k]) for k in W)
    for k in ("model_type", "n_layer", "n_embd", "kraken_degree", "n_head_per_sublayer", "ffn_expansion", "vocab_size",
              "n_positions", "bias", "eos_token_id", "bos_token_id"):
        assert json.load(open(os.path.join(out, "config.json")))[k] == json.load(open(os.path.join(d, "config.json")))[k]
    ids = "1,50,300,7,999,42,3000,11"
    a = run_generate(generate_bin, d, "--score", "--prompt-ids", ids)["scores"]
    b = run_generate(generate_bin, str(out), "--score", "--prompt-ids", ids)["scores"]
    assert a == b  # identical logits give identical logprobs, bit for bit
