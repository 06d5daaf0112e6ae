"""kraken-generate (the C++ engine) against the PyTorch reference: scoring, greedy generation,
chunked prefill, seeded sampling."""

import math
import os

import pytest
import torch

from conftest import run_generate, model_dir_of
from kraken_ref import reference as ref
from kraken_ref.checkpoint import load_model_dir

MODELS = ["kraken-n2-h113-f32", "kraken-n4-bias-f32", "kraken-n4-bf16", "gpt2-f32", "parallel-block-f16-sharded"]


def reference_greedy(cfg, W, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        logits = ref.forward(cfg, W, tokens)[-1]
        tokens.append(int(torch.argmax(logits)))
    return tokens[len(prompt):]


@pytest.mark.parametrize("name", MODELS)
def test_score_matches_reference_logprobs(generate_bin, name):
    model_dir = model_dir_of(name)
    cfg, W = ref.read_config(model_dir), load_model_dir(model_dir)
    prompt = [(7 * i + 3) % cfg.vocab_size for i in range(40)]
    # The reference caches K and V in F32: so does the engine here (the default, auto, would round them to
    # a 16-bit checkpoint's dtype; tests/engine/model_golden_test.cc bounds that difference).
    out = run_generate(generate_bin, model_dir, "--score", "--kv-cache-dtype", "f32", "--prompt-ids",
                       ",".join(map(str, prompt)))
    logp = torch.log_softmax(ref.forward(cfg, W, prompt).double(), dim=-1)
    want = [logp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    got = [s["logprob"] for s in out["scores"]]
    assert [s["token"] for s in out["scores"]] == prompt[1:]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-3
    assert out["perplexity"] == pytest.approx(math.exp(-sum(want) / len(want)), rel=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_matches_reference_token_for_token(generate_bin, name):
    model_dir = model_dir_of(name)
    cfg, W = ref.read_config(model_dir), load_model_dir(model_dir)
    prompt = [5, 77, 140, 9, 31]
    want = reference_greedy(cfg, W, prompt, 24)
    out = run_generate(generate_bin, model_dir, "--prompt-ids", ",".join(map(str, prompt)), "--max-tokens", "24",
                       "--ignore-eos")
    assert out["generated_ids"] == want
    chunked = run_generate(generate_bin, model_dir, "--prompt-ids", ",".join(map(str, prompt)), "--max-tokens",
                           "24", "--ignore-eos", "--prefill-chunk", "2", "--block-size", "4")
    assert chunked["generated_ids"] == want


def test_seeded_sampling_is_reproducible_and_seed_dependent(generate_bin):
    model_dir = model_dir_of("kraken-n4-bf16")
    args = ["--prompt-ids", "1,2,3", "--max-tokens", "20", "--temperature", "1.0", "--top-p", "0.9", "--ignore-eos",
            "--top-logprobs", "3"]
    a = run_generate(generate_bin, model_dir, *args, "--seed", "123")
    b = run_generate(generate_bin, model_dir, *args, "--seed", "123", "--threads", "1")
    c = run_generate(generate_bin, model_dir, *args, "--seed", "124")
    assert a["generated_ids"] == b["generated_ids"]
    assert a["generated_ids"] != c["generated_ids"]
    for step in a["steps"]:
        # The three most likely, then the drawn token when it is not among them (as OpenAI reports them).
        top = step["top_logprobs"]
        ids = [t[0] for t in top]
        assert len(top) == (3 if step["token"] in ids[:3] else 4)
        assert [step["token"], step["logprob"]] in top
        assert step["logprob"] <= 0.0


def test_bad_arguments_fail_with_a_message(generate_bin):
    import subprocess
    model_dir = model_dir_of("gpt2-f32")
    r = subprocess.run([generate_bin, model_dir, "--prompt-ids", "1,999"], capture_output=True, text=True)
    assert r.returncode == 1
    assert "prompt token 1 = 999 is outside the vocabulary [0, 256)" in r.stderr
    # Scoring in chunks reads the next chunk's first token: it must be checked before any step.
    r = subprocess.run([generate_bin, model_dir, "--prompt-ids", "1,2,999999999", "--prefill-chunk", "2", "--score"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "prompt token 2 = 999999999 is outside the vocabulary [0, 256)" in r.stderr
    r = subprocess.run([generate_bin, model_dir, "--prompt-ids", "1", "--top-p", "0"], capture_output=True, text=True)
    assert r.returncode == 1
    assert "'top_p' must be in (0, 1], got 0" in r.stderr


def test_gpt2_in_openais_original_layout_loads_as_is(tmp_path, generate_bin):
    """OpenAI's GPT-2 upload has no 'transformer.' prefix and carries attn.bias / attn.masked_bias
    buffers; the engine must read it exactly like the save_pretrained layout."""
    import json as _json
    import shutil

    from safetensors.torch import load_file, save_file

    src = model_dir_of("gpt2-f32")
    W = load_file(os.path.join(src, "model.safetensors"))
    cfg = _json.load(open(os.path.join(src, "config.json")))
    P = cfg["n_positions"]
    original = {k[len("transformer."):]: v for k, v in W.items()}
    for l in range(cfg["n_layer"]):
        original[f"h.{l}.attn.bias"] = torch.tril(torch.ones(P, P)).view(1, 1, P, P)
        original[f"h.{l}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(original, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
    args = ["--score", "--prompt-ids", "3,1,4,1,5,9,2,6,5,3,5"]
    assert run_generate(generate_bin, str(tmp_path), *args)["scores"] == run_generate(generate_bin, src, *args)["scores"]
