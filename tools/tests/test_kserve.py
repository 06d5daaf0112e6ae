"""KServe v2 gRPC (inference.GRPCInferenceService), judged by the official tritonclient: metadata and
readiness, ModelInfer and ModelStreamInfer in the tensor names of Triton's TensorRT-LLM and vLLM
backends, equal to kraken.v1 for the same seed, and precise errors that leave the stream going.

tritonclient lives in .venv-clients (its protobuf pin clashes with ours): each scenario runs
tools/tests/clients/triton_checks.py there and the assertions are made here."""
import json
import math
import os
import subprocess

import pytest

from kraken_client import pb
from serving import ROOT, Server, request
from test_reliability import metric

MODEL = "kraken-kjv-4way"
CLIENT_PY = os.path.join(ROOT, ".venv-clients", "bin", "python")
CHECKS = os.path.join(ROOT, "tools", "tests", "clients", "triton_checks.py")


@pytest.fixture(scope="module")
def server():
    if not os.path.exists(CLIENT_PY):
        pytest.fail(f"{CLIENT_PY} is missing: run scripts/setup.sh (it creates .venv-clients)")
    s = Server("--max-batch-seqs", "32")
    yield s
    s.close()


def triton(server, scenario):
    out = subprocess.run([CLIENT_PY, CHECKS, server.target, MODEL, json.dumps(scenario)], capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def trtllm(prompt, max_tokens, **extra):
    inputs = {"text_input": ["BYTES", prompt], "max_tokens": ["INT32", max_tokens]}
    inputs.update(extra)
    return inputs


def test_metadata_and_readiness(server):
    got = triton(server, {"kind": "metadata"})
    assert got["live"] and got["ready"] and got["model_ready"]
    assert got["other_model_ready"] is False
    assert got["inputs"]["text_input"] == "BYTES" and got["inputs"]["sampling_parameters"] == "BYTES"
    assert got["inputs"]["random_seed"] == "UINT64" and got["outputs"]["text_output"] == "BYTES"
    assert got["decoupled"] is True and got["max_batch_size"] == 0
    # One value per scalar input, as Triton's LLM backends declare them (genai-perf sends no shapes).
    assert got["input_shapes"]["max_tokens"] == [1] and got["config_dims"]["temperature"] == [1]
    assert got["input_shapes"]["stop_words"] == [-1]
    assert got["server"] == "kraken-serve"


def test_infer_equals_kraken_v1_for_the_same_seed(server):
    req = trtllm("And God said,", 20, temperature=["FP32", 0.8], top_p=["FP32", 0.95], random_seed=["UINT64", 7],
                 return_log_probs=["BOOL", True])
    got = triton(server, {"kind": "infer", "requests": [{"id": "r1", "inputs": req}]})[0]
    g = server.stub.Complete(request(text="And God said,", max_tokens=20, temperature=0.8, top_p=0.95, seed=7,
                                     logprobs=True))
    assert got["id"] == "r1"
    assert got["outputs"]["text_output"] == [g.text]
    assert got["outputs"]["output_log_probs"] == pytest.approx([lp.logprob for lp in g.logprobs], rel=1e-6)
    assert got["outputs"]["cum_log_probs"] == pytest.approx([sum(lp.logprob for lp in g.logprobs)], rel=1e-5)


def test_stream_deltas_join_to_the_whole_answer_with_one_final_flag(server):
    reqs = [{"id": f"s{i}", "inputs": trtllm(p, 24, stream=["BOOL", True], temperature=["FP32", 0.0])}
            for i, p in enumerate(["And God said,", "In the beginning", "Blessed are the", "And it came to pass"])]
    reqs += [{"id": f"w{i}", "inputs": trtllm("The LORD is my shepherd;", 12, stream=["BOOL", False],
                                               temperature=["FP32", 0.0])}
             for i in range(12)]  # sixteen requests on one stream
    got = triton(server, {"kind": "stream", "requests": reqs})
    for r in reqs[:4]:
        prompt = r["inputs"]["text_input"][1]
        whole = server.stub.Complete(request(text=prompt, max_tokens=24, temperature=0.0))
        out = got[r["id"]]
        assert out["finals"] == 1 and not out["errors"]
        assert len(out["responses"]) >= 2  # streamed, not one block
        assert "".join(x["text_output"][0] for x in out["responses"]) == whole.text
    whole = server.stub.Complete(request(text="The LORD is my shepherd;", max_tokens=12, temperature=0.0))
    for i in range(12):  # without "stream": one response with everything
        assert len(got[f"w{i}"]["responses"]) == 1 and got[f"w{i}"]["finals"] == 1
        assert got[f"w{i}"]["responses"][0]["text_output"] == [whole.text]


def test_vllm_interface(server):
    params = json.dumps({"max_tokens": "10", "temperature": "0", "ignore_eos": "true"})
    base = {"text_input": ["BYTES", "In the beginning"], "sampling_parameters": ["BYTES", params],
            "return_num_output_tokens": ["BOOL", True], "return_finish_reason": ["BOOL", True]}
    whole = server.stub.Complete(request(text="In the beginning", max_tokens=10, temperature=0, ignore_eos=True))
    got = triton(server, {"kind": "infer", "requests": [
        {"id": "full", "inputs": base},
        {"id": "excl", "inputs": {**base, "exclude_input_in_output": ["BOOL", True]}}]})
    assert got[0]["outputs"]["text_output"] == ["In the beginning" + whole.text]  # vLLM's default keeps the prompt
    assert got[1]["outputs"]["text_output"] == [whole.text]
    assert got[1]["outputs"]["num_output_tokens"] == [10.0]
    assert got[1]["outputs"]["finish_reason"] == ["length"]
    # Streaming leaves the prompt out without being asked, as vLLM's backend does.
    streamed = triton(server, {"kind": "stream", "requests": [
        {"id": "v", "inputs": {**base, "stream": ["BOOL", True]}}]})["v"]
    assert "".join(x["text_output"][0] for x in streamed["responses"]) == whole.text


def test_vllm_n_samples_are_outputs_of_shape_n_as_kraken_v1_samples_them(server):
    # Triton's vLLM backend answers n samples as text_output (and finish_reason, num_output_tokens,
    # cumulative_logprob) of shape [n]; a stream's responses carry every sample's delta, "" for none.
    prompt = "And God said,"
    params = json.dumps({"n": 3, "max_tokens": 8, "temperature": 0.9, "seed": 11, "ignore_eos": True})
    base = {"text_input": ["BYTES", prompt], "sampling_parameters": ["BYTES", params],
            "exclude_input_in_output": ["BOOL", True], "return_finish_reason": ["BOOL", True],
            "return_num_output_tokens": ["BOOL", True], "return_cumulative_logprob": ["BOOL", True]}
    want = server.stub.Complete(request(text=prompt, n=3, max_tokens=8, temperature=0.9, seed=11, ignore_eos=True,
                                        logprobs=True))
    texts = [x.text for x in want.samples]
    assert len(set(texts)) > 1, "three seeds, three samples"
    unary = triton(server, {"kind": "infer", "requests": [{"id": "u", "inputs": base}]})[0]
    assert unary["outputs"]["text_output"] == texts
    assert unary["outputs"]["finish_reason"] == ["length"] * 3
    assert unary["outputs"]["num_output_tokens"] == [8.0] * 3
    assert unary["outputs"]["cumulative_logprob"] == pytest.approx(
        [sum(lp.logprob for lp in x.logprobs) for x in want.samples], rel=1e-5)
    got = triton(server, {"kind": "stream", "requests": [
        {"id": "s", "inputs": {**base, "stream": ["BOOL", True]}},
        {"id": "w", "inputs": base},
        {"id": "p", "inputs": {**base, "exclude_input_in_output": ["BOOL", False]}}]})
    streamed = got["s"]["responses"]
    assert all(len(r["text_output"]) == 3 for r in streamed)
    assert ["".join(r["text_output"][i] for r in streamed) for i in range(3)] == texts
    assert got["s"]["finals"] == 1 and streamed[-1]["finish_reason"] == ["length"] * 3
    assert len(got["w"]["responses"]) == 1 and got["w"]["responses"][0]["text_output"] == texts
    assert got["p"]["responses"][0]["text_output"] == [prompt + t for t in texts]


# (inputs, message): refusals name the input or field, the limit and the value.
INVALID = [
    (trtllm("a", 4, top_p=["FP32", 0.0]), "field 'top_p' must be in (0, 1], got 0"),
    (trtllm("a", 4, temprature=["FP32", 0.5]), "input 'temprature' is not an input of this model (did you mean "
                                                "'temperature'?)"),
    (trtllm("a", 4, beam_width=["INT32", 2]), "input 'beam_width' must be 1 (one sample per request), got 2"),
    (trtllm("a", 4, bad_words=["BYTES", ["x"]]), "input 'bad_words' is not supported (1 words given)"),
    (trtllm("", 4), "field 'text_input' must not be empty"),
    ({"text_input": ["BYTES", ["a", "b"]]}, "input 'text_input' holds 2 prompts; this server takes one prompt"),
    ({"text_input": ["BYTES", "a"], "sampling_parameters": ["BYTES", '{"max_tokenz": 3}']},
     "field 'sampling_parameters.max_tokenz' is not a sampling parameter (did you mean 'max_tokens'?)"),
    ({"text_input": ["BYTES", "a"], "sampling_parameters": ["BYTES", '{"n": 2, "best_of": 3}']},
     "field 'sampling_parameters.best_of' must equal n (2): this server returns every sample it draws, got 3"),
    ({"text_input": ["BYTES", "a"], "sampling_parameters": ["BYTES", '{"n": 17}']},
     "field 'n' must be in [1, 16], got 17"),
    ({"text_input": ["BYTES", "a"], "max_tokens": ["INT32", 3], "sampling_parameters": ["BYTES", "{}"]},
     "input 'max_tokens' belongs to the TensorRT-LLM interface"),
    ({"text_input": ["BYTES", "a"], "max_tokens": ["FP32", 20.0]},
     "input 'max_tokens' must have an integer datatype (INT32), got FP32"),
    ({"text_input": ["BYTES", "a"], "stream": ["BOOL", True], "exclude_input_in_output": ["BOOL", False],
      "sampling_parameters": ["BYTES", "{}"]}, "input 'exclude_input_in_output' must not be false when streaming"),
]


@pytest.mark.parametrize("inputs,message", INVALID, ids=[m for _, m in INVALID])
def test_refusals_are_precise_and_the_stream_goes_on(server, inputs, message):
    before = metric(server.scrape(), "kraken_request_failure_total", 'reason="invalid_argument"')
    got = triton(server, {"kind": "infer", "requests": [{"id": "bad", "inputs": inputs}]})[0]
    assert got["status"] == "StatusCode.INVALID_ARGUMENT" and message in got["error"]
    got = triton(server, {"kind": "stream", "requests": [
        {"id": "bad", "inputs": inputs, "expect_error": True},
        {"id": "good", "inputs": trtllm("And God said,", 5, stream=["BOOL", True])}]})
    assert len(got["bad"]["errors"]) == 1 and message in got["bad"]["errors"][0]
    assert got["good"]["finals"] == 1 and not got["good"]["errors"]
    assert metric(server.scrape(), "kraken_request_failure_total", 'reason="invalid_argument"') == before + 2


def test_unknown_model_is_not_found(server):
    got = triton(server, {"kind": "infer", "requests": [{"id": "x", "model": "ensemble", "inputs": trtllm("a", 2)}]})
    assert got[0]["status"] == "StatusCode.NOT_FOUND"
    assert "model 'ensemble' is not served here (this server serves 'kraken-kjv-4way')" in got[0]["error"]


def test_api_key_applies_to_inference():
    s = Server("--api-key", "sesame", api_key="sesame", devices="cpu:1")
    try:
        req = [{"id": "k", "inputs": trtllm("And God said,", 3, temperature=["FP32", 0.0])}]
        got = triton(s, {"kind": "infer", "requests": req})[0]
        assert got["status"] == "StatusCode.UNAUTHENTICATED"
        assert "missing 'authorization: Bearer <key>' metadata" in got["error"]
        got = triton(s, {"kind": "infer", "headers": {"authorization": "Bearer wrong"}, "requests": req})[0]
        assert got["status"] == "StatusCode.UNAUTHENTICATED" and "invalid API key" in got["error"]
        got = triton(s, {"kind": "infer", "headers": {"authorization": "Bearer sesame"}, "requests": req})[0]
        assert got["outputs"]["text_output"] == [s.stub.Complete(request(text="And God said,", max_tokens=3,
                                                                         temperature=0.0)).text]
    finally:
        s.close()


def test_requested_outputs_are_checked_and_only_they_are_sent(server):
    req = trtllm("And God said,", 6, temperature=["FP32", 0.0])
    got = triton(server, {"kind": "infer", "requests": [
        {"id": "a", "inputs": req, "outputs": ["text_output", "cum_log_probs"]},
        {"id": "b", "inputs": req, "outputs": ["nope"]}]})
    g = server.stub.Complete(request(text="And God said,", max_tokens=6, temperature=0.0, logprobs=True))
    assert set(got[0]["outputs"]) == {"text_output", "cum_log_probs"}  # asking for it turns the logprobs on
    assert got[0]["outputs"]["text_output"] == [g.text]
    assert got[0]["outputs"]["cum_log_probs"] == pytest.approx([sum(lp.logprob for lp in g.logprobs)], rel=1e-5)
    assert got[1]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "output 'nope' is not an output of this model" in got[1]["error"]
