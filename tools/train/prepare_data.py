#!/usr/bin/env python3
"""Prepares the training data of the bundled models: the King James Bible (Debian's bible-kjv,
public domain), cleaned, split by chapter into train (95%) and validation (5%), a byte-level BPE
of 4096 tokens trained with Hugging Face tokenizers on the train split, and both splits as token
ids.

    .venv/bin/python tools/train/prepare_data.py --out build/train-data

Writes OUT/train.txt, OUT/val.txt, OUT/tokenizer.json, OUT/train.bin, OUT/val.bin (uint16 ids,
chapters separated by <|endoftext|>) and OUT/data.json (sizes, provenance). Deterministic: the
same Debian package gives the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.trainers import BpeTrainer

EOT = "<|endoftext|>"
VOCAB = 4096
VAL_EVERY = 20  # chapter index % 20 == 0 -> validation (about 5%)


def chapters() -> list[str]:
    """Every chapter as one text: verses joined by single spaces, 'Book N' headings dropped."""
    out = subprocess.run(["bible", "-l0", "Genesis1:1-Revelation22:21"], capture_output=True, text=True,
                         check=True).stdout
    result, current = [], []
    for line in out.splitlines():
        m = re.match(r"^ +(\d+) (.*)$", line)
        if m:
            if m.group(1) == "1" and current:  # verse 1 starts a new chapter
                result.append(" ".join(current))
                current = []
            current.append(m.group(2).strip())
    if current:
        result.append(" ".join(current))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = "1"  # deterministic training of the tokenizer
    os.makedirs(a.out, exist_ok=True)
    chs = chapters()
    train = [c for i, c in enumerate(chs) if i % VAL_EVERY != 0]
    val = [c for i, c in enumerate(chs) if i % VAL_EVERY == 0]
    for name, docs in (("train", train), ("val", val)):
        with open(os.path.join(a.out, f"{name}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(docs) + "\n")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=VOCAB, special_tokens=[EOT], show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train, trainer)
    tok.save(os.path.join(a.out, "tokenizer.json"))
    eot = tok.token_to_id(EOT)

    sizes = {}
    for name, docs in (("train", train), ("val", val)):
        ids = []
        for enc in tok.encode_batch(docs):
            ids.extend(enc.ids)
            ids.append(eot)
        arr = np.asarray(ids, dtype=np.uint16)
        arr.tofile(os.path.join(a.out, f"{name}.bin"))
        sizes[name] = {"chapters": len(docs), "bytes": sum(len(d.encode()) for d in docs), "tokens": int(arr.size)}
    info = {
        "source": "King James Bible (Authorized Version, 1769 text), Debian package bible-kjv-text, "
                  "extracted with `bible -l0 Genesis1:1-Revelation22:21`",
        "licence": "public domain (in the United Kingdom the Authorized Version is under Crown letters patent)",
        "split": f"chapter index % {VAL_EVERY} == 0 is validation",
        "tokenizer": f"byte-level BPE, {VOCAB} tokens, trained on the train split with Hugging Face tokenizers",
        "eot_token_id": eot,
        "sizes": sizes,
        "train_sha256": hashlib.sha256(open(os.path.join(a.out, "train.bin"), "rb").read()).hexdigest(),
    }
    with open(os.path.join(a.out, "data.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info["sizes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
