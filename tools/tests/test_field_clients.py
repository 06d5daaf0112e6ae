"""The field's load generators against a real kraken-server, on short loads: aiperf (OpenAI
/v1/completions, SSE streaming) and perf_analyzer (KServe v2 ModelStreamInfer in the TensorRT-LLM
backend's tensor names) complete without errors with the request count they were given, and the
TTFT and ITL they measure agree with the server's own histograms (/metrics) over the same run.
genai-perf (--endpoint-type kserve) runs too, or fails in the one known way (see its test).
guidellm's default sweep completes without an error on the server's defaults.

aiperf, perf_analyzer and genai-perf live in .venv-clients (their pins clash with ours; scripts/setup.sh
makes it), guidellm in .venv; all run by subprocess, the first three through
bench/field_clients_bench.py's helpers. Figures: docs/benchmarks.md, "The
field's clients"."""
import json
import os
import re
import subprocess
import sys

import pytest

from serving import ROOT, Server

sys.path.insert(0, os.path.join(ROOT, "bench"))
import field_clients_bench as fcb  # noqa: E402

REQUESTS, CONCURRENCY, ISL, OSL = 32, 4, 32, 32

# How far a client's mean may stand from the server's histogram mean over the same run (ms), from
# repeated runs on a noisy 2-core machine where the clients share the cores with the server
# (docs/benchmarks.md). TTFT: the client starts its clock before the server's arrival and stops it
# after the first token is handed to the stream, so it sees more, never less (a little slack for
# the two clocks' reading points); what it adds is request encoding, loopback, HTTP/SSE or gRPC
# parsing and its own scheduling: +0.8 to +8.4 ms here, aiperf (many processes) the most. ITL: a
# constant overhead cancels between the first and the last token, so the means agree closely.
TTFT_BELOW_MS = 2.0
TTFT_ABOVE_MS, TTFT_ABOVE_REL = 15.0, 0.25  # + 25% of the server's mean: a loaded machine delays clients more
ITL_REL, ITL_ABS_MS = 0.15, 2.0


@pytest.fixture(scope="module")
def server():
    if not os.path.exists(fcb.AIPERF):
        pytest.fail(f"{fcb.AIPERF} is missing: run scripts/setup.sh (it creates .venv-clients)")
    s = Server("--max-batch-seqs", "32")
    # One-time costs (first prefill, thread start-up) are not the clients' to measure.
    fcb.run_kraken_v1(s, requests=CONCURRENCY, concurrency=CONCURRENCY, isl=ISL, osl=4)
    yield s
    s.close()


def check_agreement(row):
    """The client's TTFT and ITL means against the server's over the same run."""
    srv = row["server"]
    assert srv["requests"] == REQUESTS, f"the server saw {srv['requests']} requests, the client was given {REQUESTS}"
    d = row["ttft_mean"] - srv["ttft_ms"]
    assert -TTFT_BELOW_MS <= d <= TTFT_ABOVE_MS + TTFT_ABOVE_REL * srv["ttft_ms"], (
        f"{row['client']}: TTFT mean {row['ttft_mean']:.1f} ms vs the server's {srv['ttft_ms']:.1f} ms ({d:+.1f} ms)")
    assert abs(row["itl_mean"] - srv["itl_ms"]) <= ITL_REL * srv["itl_ms"] + ITL_ABS_MS, (
        f"{row['client']}: ITL mean {row['itl_mean']:.1f} ms vs the server's {srv['itl_ms']:.1f} ms")


def test_aiperf_completions_streaming(server, tmp_path):
    row = fcb.measured(server, lambda: fcb.run_aiperf(server, str(tmp_path), REQUESTS, CONCURRENCY, ISL, OSL),
                       "aiperf", catch=False)
    assert row["errors"] == 0, row
    assert row["requests"] == REQUESTS
    check_agreement(row)


def test_perf_analyzer_model_stream_infer(server, tmp_path):
    if not os.path.exists(fcb.PERF_ANALYZER):
        pytest.fail(f"{fcb.PERF_ANALYZER} is missing: run scripts/setup.sh (requirements-clients.txt pins "
                    "tritonclient 2.51.0, whose wheel ships it)")
    problem = fcb.perf_analyzer_problem()
    if problem:  # the binary is there but this machine cannot load it (libraries, glibc)
        pytest.skip(problem)
    row = fcb.measured(server, lambda: fcb.run_perf_analyzer(server, str(tmp_path), REQUESTS, CONCURRENCY, ISL, OSL),
                       "perf_analyzer", catch=False)
    assert row["errors"] == 0, row
    assert row["requests"] == REQUESTS
    check_agreement(row)


@pytest.mark.parametrize("backend", ["tensorrtllm", "vllm"])
def test_genai_perf_kserve(server, tmp_path, backend):
    if not os.path.exists(fcb.GENAI_PERF):
        pytest.fail(f"{fcb.GENAI_PERF} is missing: run scripts/setup.sh")
    problem = fcb.perf_analyzer_problem()
    if problem:
        pytest.skip(problem)
    # genai-perf sends its tensors without shapes: it relies on the model declaring each scalar input
    # [1], as Triton's LLM backends do.
    row = fcb.measured(server, lambda: fcb.run_genai_perf(server, str(tmp_path), backend, REQUESTS, CONCURRENCY,
                                                          ISL, OSL), f"genai-perf {backend}", catch=False)
    assert row["errors"] == 0, row
    assert row["requests"] == REQUESTS
    check_agreement(row)


GUIDELLM = os.path.join(os.path.dirname(sys.executable), "guidellm")
GUIDELLM_PHASE_S = 4  # each phase of the sweep runs this long


def test_guidellm_default_sweep_completes_on_the_default_queue_bound(tmp_path):
    """guidellm's sweep as its users run it: its default profile (a synchronous phase, then a
    throughput phase that opens 512 concurrent streams, then constant rates between the two) against
    a server on its own defaults, over guidellm's default route (/v1/chat/completions, streamed, with
    ignore_eos and content parts). Only the sweep's length is shortened (3 phases of a few seconds).
    No request may fail: a queue bound below the throughput phase's concurrency answers 429s there."""
    if not os.path.exists(GUIDELLM):
        pytest.fail(f"{GUIDELLM} is missing: run scripts/setup.sh (requirements.txt pins guidellm)")
    server = Server()
    try:
        out = tmp_path / "sweep.json"
        model = os.path.join(ROOT, "models", "kraken-kjv-4way")
        cmd = [GUIDELLM, "run",
               "--backend", f"kind=openai_http,target={server.http_url},model=kraken-kjv-4way",
               "--profile", "kind=sweep,sweep_size=3",
               "--constraint", f"kind=max_duration,seconds={GUIDELLM_PHASE_S}",
               "--data", f"kind=synthetic_text,prompt_tokens=32,output_tokens={OSL // 2}",
               "--tokenizer", f"kind=hf_auto,model={model}",
               "--output", f"kind=json,path={out}", "--disable-console-interactive"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        with open(out) as f:
            phases = json.load(f)["benchmarks"]
        kinds = [p["config"]["strategy"]["type_"] for p in phases]
        for kind, phase in zip(kinds, phases):
            totals = phase["metrics"]["request_totals"]
            assert totals["errored"] == 0 and totals["successful"] > 0, (kind, totals, server.read_log()[-2000:])
            tokens = phase["metrics"]["output_token_count"]["successful"]
            assert tokens["min"] == tokens["max"] == OSL // 2, (kind, tokens)
        assert kinds == ["synchronous", "throughput", "constant"], kinds
        assert phases[1]["config"]["strategy"]["max_concurrency"] == 512  # guidellm's default, not lowered
    finally:
        server.close()
