#!/usr/bin/env python3
"""Trains the byte-level BPE used by the tokenizer tests (tests/data/tokenizers/mixed-4k) with
Hugging Face tokenizers on kraken_ref.text_corpus.training_text(): 4096 tokens, the GPT-2
pre-tokenizer and decoder, one special token <|endoftext|>.

    .venv/bin/python tools/train_test_tokenizer.py            # rewrite the committed file
    .venv/bin/python tools/train_test_tokenizer.py --check    # fail if retraining changes it
"""

import argparse
import json
import os
import sys
import tempfile

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.trainers import BpeTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kraken_ref.text_corpus import ROOT, training_text  # noqa: E402

OUT = os.path.join(ROOT, "tests", "data", "tokenizers", "mixed-4k", "tokenizer.json")


def train() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"], show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text().split("\n"), trainer)
    return tok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = "1"
    tok = train()
    if a.check:
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "t.json")
            tok.save(p)
            same = json.load(open(p)) == json.load(open(OUT))
        print("train_test_tokenizer: " + ("identical" if same else "DIFFERS from the committed tokenizer.json"))
        return 0 if same else 1
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tok.save(OUT)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
