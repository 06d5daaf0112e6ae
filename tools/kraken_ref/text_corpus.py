"""Deterministic mixed-script text for tokenizer tests: English prose (the King James Bible from
Debian's bible-kjv, public domain), source code, and generated text in many scripts — CJK,
Cyrillic, Arabic and Hebrew with their combining marks, Latin with combining accents, emoji
with skin tones, ZWJ sequences, flags and keycaps, digits in several systems, contractions,
and runs of every kind of whitespace.

    docs = mixed_documents()         # list of str, >= 1 MB in total
    text = training_text()           # str, for training the test tokenizer
"""

from __future__ import annotations

import functools
import glob
import os
import random
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.lru_cache(maxsize=1)
def bible_verses() -> list[str]:
    """The King James Bible, one verse per entry, reference prefix stripped."""
    if shutil.which("bible") is None:
        raise RuntimeError("the 'bible' program is missing: run scripts/setup.sh (Debian package bible-kjv)")
    out = subprocess.run(["bible", "-l0", "Genesis1:1-Revelation22:21"], capture_output=True, text=True,
                         check=True).stdout
    verses = []
    for line in out.splitlines():
        parts = line.strip().split(" ", 1)
        if len(parts) == 2 and parts[0].isdigit():
            verses.append(parts[1])
    return verses


def _rand_word(rng, lo, hi, n_min=1, n_max=9):
    return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(n_min, n_max)))


def _cjk(rng):
    s = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(2, 30)))
    return s + rng.choice(["。", "，", "！", "？", "、", "：", ""])


def _cyrillic(rng):
    words = [_rand_word(rng, 0x0430, 0x044F) for _ in range(rng.randint(1, 8))]
    if rng.random() < 0.5:
        words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice([".", ",", "!", "?", " — ", ""])


def _arabic(rng):
    words = []
    for _ in range(rng.randint(1, 7)):
        w = ""
        for _ in range(rng.randint(1, 7)):
            w += chr(rng.randint(0x0621, 0x064A))
            if rng.random() < 0.3:
                w += chr(rng.randint(0x064B, 0x0652))  # harakat (combining)
        words.append(w)
    digits = "".join(chr(0x0660 + rng.randint(0, 9)) for _ in range(rng.randint(0, 4)))
    return " ".join(words) + ("، " + digits if digits else "")


def _hebrew(rng):
    words = []
    for _ in range(rng.randint(1, 7)):
        w = ""
        for _ in range(rng.randint(1, 6)):
            w += chr(rng.randint(0x05D0, 0x05EA))
            if rng.random() < 0.3:
                w += chr(rng.randint(0x05B0, 0x05BC))  # niqqud (combining)
        words.append(w)
    return " ".join(words) + rng.choice([".", ",", "", "׃"])


def _latin_combining(rng):
    base = "aeiouncAEIOUNC"
    out = []
    for _ in range(rng.randint(1, 8)):
        w = ""
        for _ in range(rng.randint(1, 8)):
            w += rng.choice(base)
            if rng.random() < 0.35:
                w += chr(rng.choice([0x0300, 0x0301, 0x0302, 0x0303, 0x0308, 0x030A, 0x0327]))
        out.append(w)
    return " ".join(out) + rng.choice(["", " café", " naïve", " Ångström", " façade"])


ZWJ_SEQUENCES = ["\U0001F468\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466", "\U0001F469\u200D\U0001F4BB",
                 "\U0001F3F3\uFE0F\u200D\U0001F308", "\U0001F9D1\U0001F3FD\u200D\U0001F680",
                 "\U0001F441\uFE0F\u200D\U0001F5E8\uFE0F"]


def _emoji(rng):
    parts = []
    for _ in range(rng.randint(1, 6)):
        r = rng.random()
        if r < 0.3:
            parts.append(chr(rng.randint(0x1F600, 0x1F64F)))
        elif r < 0.45:
            parts.append(chr(rng.randint(0x1F44A, 0x1F450)) + chr(rng.randint(0x1F3FB, 0x1F3FF)))  # skin tone
        elif r < 0.6:
            parts.append(rng.choice(ZWJ_SEQUENCES))
        elif r < 0.75:
            parts.append(chr(0x1F1E6 + rng.randint(0, 25)) + chr(0x1F1E6 + rng.randint(0, 25)))  # flag
        elif r < 0.85:
            parts.append(str(rng.randint(0, 9)) + "\uFE0F\u20E3")  # keycap
        else:
            parts.append(rng.choice(["\u2764\uFE0F", "\u2728", "\u2615", "\U0001F9EA"]))
    sep = rng.choice(["", " ", "  ", "!"])
    return sep.join(parts)


def _numbers(rng):
    forms = [str(rng.randint(0, 10 ** rng.randint(1, 15))), f"{rng.random() * 1000:.{rng.randint(1, 6)}f}",
             f"{rng.randint(1, 999)},{rng.randint(0, 999):03d},{rng.randint(0, 999):03d}",
             f"v{rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}", f"{rng.randint(1, 12)}/{rng.randint(1, 28)}",
             "".join(chr(0x0966 + rng.randint(0, 9)) for _ in range(3)),  # Devanagari digits
             "Ⅻ", "½", "²³", "①②"]
    return " ".join(rng.choice(forms) for _ in range(rng.randint(1, 6)))


def _whitespace(rng):
    ws = [" " * rng.randint(1, 40), "\t" * rng.randint(1, 5), "\n" * rng.randint(1, 4), "\r\n", " \t \n ", "\u00A0",
          "\u0085", "\u3000", "\u2028", "\u2003", "\u200B", "\uFEFF", "\u202F", "\x0b", "\x0c", "   \n\n   "]
    words = ["word", "Word", "it's", "we'll", "THEY'RE", "I'M", "'s", "don't", "o'clock", "x", "<|endoftext|>",
             "<|endof", "text|>", "#", "!!", "...", "--", "__init__", "'"]
    out = ""
    for _ in range(rng.randint(2, 12)):
        out += rng.choice(ws) + rng.choice(words)
    return out + rng.choice(ws + [""])


GENERATORS = [_cjk, _cyrillic, _arabic, _hebrew, _latin_combining, _emoji, _numbers, _whitespace]


def generated_documents(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        parts = [rng.choice(GENERATORS)(rng) for _ in range(rng.randint(1, 6))]
        docs.append(rng.choice(["", " ", "\n"]).join(parts))
    return docs


def source_documents(limit_bytes: int) -> list[str]:
    """This repository's C++/Python/CMake sources, whole files (content varies with the tree;
    tests only compare implementations on it)."""
    docs, total = [], 0
    for pattern in ("engine/**/*.cc", "engine/**/*.h", "tokenizer/**/*.cc", "tools/**/*.py", "**/CMakeLists.txt"):
        for path in sorted(glob.glob(os.path.join(ROOT, pattern), recursive=True)):
            if "/build" in path or "/.venv" in path:
                continue
            with open(path, encoding="utf-8") as f:
                text = f.read()
            docs.append(text)
            total += len(text.encode())
            if total >= limit_bytes:
                return docs
    return docs


def training_text() -> str:
    """What the committed test tokenizer was trained on (fixed: Bible verses and seed 1)."""
    verses = bible_verses()
    return "\n".join(verses[:6000] + generated_documents(seed=1, n=4000))


def mixed_documents() -> list[str]:
    """>= 1 MB of mixed text: verses not used in training, sources, generated documents."""
    verses = bible_verses()
    prose = [" ".join(verses[i:i + 5]) for i in range(10000, 24000, 5)]  # ~800 KB
    return prose + source_documents(200_000) + generated_documents(seed=2, n=3000)
