"""lm-evaluation-harness as the judge of prompt arrays and prompt logprobs: its `local-completions`
backend scores a small local multiple-choice task against the server at batch sizes 1 and 8 (8
sends each request with eight token-id prompts), and its `hf` backend scores the same task with
transformers on the same weights. Its `local-chat-completions` backend runs a generate_until task
through the model's chat template, and its `hf` backend with `--apply_chat_template` generates the
same greedy answers. Served with an F32 KV cache, as an F32 reference needs (docs/openai.md
"Responses")."""
import glob
import json
import os
import subprocess
import sys

import pytest

from serving import ROOT, Server

MODEL_DIR = os.path.join(ROOT, "models", "gpt2-kjv")
CONTEXTS = [
    ("In the beginning God created", [" the heaven and the earth.", " a city of gold.", " nothing at all."]),
    ("And God said, Let there be", [" light: and there was light.", " darkness upon the sea.", " a king."]),
    ("The LORD is my shepherd;", [" I shall not want.", " he maketh bread.", " the sea is wide."]),
    ("Blessed are the meek:", [" for they shall inherit the earth.", " for the night is long.", " and the fish."]),
    ("And the LORD spake unto Moses,", [" saying,", " and the river", " behold the tree"]),
    ("Thou shalt love thy neighbour", [" as thyself.", " on the mountain.", " in the valley of iron."]),
    ("For God so loved the world,", [" that he gave his only begotten Son,", " and the stars fell,", " by water."]),
    ("Ask, and it shall be given you;", [" seek, and ye shall find;", " sell, and be gone;", " nay."]),
    ("Honour thy father and thy mother:", [" that thy days may be long", " and the sheep", " of the north"]),
    ("Let not your heart be troubled:", [" ye believe in God,", " the ox is fed,", " three and four"]),
]


def write_task(tmp_path):
    data = tmp_path / "kjv_choice.jsonl"
    with open(data, "w") as f:
        for i, (ctx, choices) in enumerate(CONTEXTS):
            f.write(json.dumps({"context": ctx, "choices": choices, "label": 0, "id": i}) + "\n")
    (tmp_path / "kjv_choice.yaml").write_text(f"""task: kjv_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""")
    return str(tmp_path)


def write_chat_task(tmp_path):
    """A generate_until task: each context answered greedily, at most 12 tokens, up to a newline."""
    data = tmp_path / "kjv_chat.jsonl"
    with open(data, "w") as f:
        for i, (ctx, choices) in enumerate(CONTEXTS):
            f.write(json.dumps({"context": ctx, "answer": choices[0], "id": i}) + "\n")
    (tmp_path / "kjv_chat.yaml").write_text(f"""task: kjv_chat
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""")


def run_lm_eval(tmp_path, name, model, model_args, batch_size, *extra, task="kjv_choice"):
    out = tmp_path / name
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
                        "--tasks", task, "--include_path", str(tmp_path), "--batch_size", str(batch_size),
                        "--log_samples", "--output_path", str(out), *extra], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    samples = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
    assert len(samples) == 1, samples
    rows = sorted((json.loads(line) for line in open(samples[0])), key=lambda d: d["doc_id"])
    if task != "kjv_choice":
        return [(d["arguments"], d["resps"]) for d in rows]  # the request lm-eval made and what it got
    # Per document: each choice's (loglikelihood, is_greedy), which the log writes as strings.
    return [[(float(r[0][0]), r[0][1] == "True") for r in d["resps"]] for d in rows]


@pytest.fixture(scope="module")
def server():
    s = Server("--kv-cache-dtype", "f32", "--max-batch-tokens", "512", model=MODEL_DIR, devices="cpu:1")
    yield s
    s.close()


def test_lm_eval_local_completions_at_batch_1_and_8_agree_with_its_hf_backend(server, tmp_path):
    write_task(tmp_path)
    api = (f"model=gpt2-kjv,base_url={server.http_url}/v1/completions,tokenizer_backend=huggingface,"
           f"tokenizer={MODEL_DIR},num_concurrent=1,max_retries=1")
    one = run_lm_eval(tmp_path, "bs1", "local-completions", api, 1)
    eight = run_lm_eval(tmp_path, "bs8", "local-completions", api, 8)
    hf = run_lm_eval(tmp_path, "hf", "hf", f"pretrained={MODEL_DIR},dtype=float32", 1, "--device", "cpu")
    assert len(one) == len(CONTEXTS) and all(len(d) == 3 for d in one)
    assert eight == one, "eight prompts per request score exactly as one"
    worst = max(abs(a[0] - b[0]) for d1, d2 in zip(one, hf) for a, b in zip(d1, d2))
    assert worst < 2e-3, f"largest loglikelihood difference from transformers: {worst}"
    assert [[g for _, g in d] for d in one] == [[g for _, g in d] for d in hf], "is_greedy agrees"
    assert any(g for d in one for _, g in d) and not all(g for d in one for _, g in d)


def test_lm_eval_local_chat_completions_generates_what_its_hf_backend_generates(server, tmp_path):
    """lm-eval 0.4.13's chat backend takes one conversation per request ("Chat completions does not
    support batching": it sets batch size 1), so batch size 8 becomes eight concurrent requests; the
    answers must not change with that, and must equal transformers' greedy generation from the
    prompt the model's chat template renders."""
    write_chat_task(tmp_path)
    api = f"model=gpt2-kjv,base_url={server.http_url}/v1/chat/completions,max_retries=1"
    one = run_lm_eval(tmp_path, "chat1", "local-chat-completions", api + ",num_concurrent=1", 1,
                      "--apply_chat_template", task="kjv_chat")
    eight = run_lm_eval(tmp_path, "chat8", "local-chat-completions", api + ",num_concurrent=8", 8,
                        "--apply_chat_template", task="kjv_chat")
    # The model's generation_config.json asks for max_new_tokens 128, which transformers lets win over
    # the max_length lm-eval's hf backend passes; the reference reads the same files without it.
    ref = tmp_path / "gpt2-kjv"
    ref.mkdir()
    for name in os.listdir(MODEL_DIR):
        if name != "generation_config.json":
            os.symlink(os.path.join(MODEL_DIR, name), ref / name)
    hf = run_lm_eval(tmp_path, "chathf", "hf", f"pretrained={ref},dtype=float32", 1, "--device", "cpu",
                     "--apply_chat_template", task="kjv_chat")
    answers = [r for _, r in one]
    assert len(answers) == len(CONTEXTS) and all(a[0] for a in answers), answers
    assert [r for _, r in eight] == answers, "eight concurrent conversations answer exactly as one at a time"
    assert [r for _, r in hf] == answers, list(zip(answers, [r for _, r in hf]))
    # The conversation the server got is the one transformers rendered: a single user turn.
    for (args, _), (ctx, _) in zip(one, CONTEXTS):
        assert json.loads(args["gen_args_0"]["arg_0"][0]) == [{"role": "user", "content": ctx}], args
