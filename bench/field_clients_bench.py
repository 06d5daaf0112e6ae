#!/usr/bin/env python3
"""The field's load generators against kraken-server, beside our own, on the same closed-loop load:
TTFT and ITL as each client measures them, and the server's own means (/metrics) over each run.

    .venv/bin/python bench/field_clients_bench.py                          # 64 requests, concurrency 4
    .venv/bin/python bench/field_clients_bench.py --requests 128 --concurrency 8 --no-genai-perf

Clients (the field's live in .venv-clients, made by scripts/setup.sh from requirements-clients.txt):
  aiperf          OpenAI /v1/completions, SSE streaming (`aiperf profile --streaming`), synthetic
                  prompts of --isl tokens (our tokenizer), --osl tokens forced with ignore_eos and
                  min_tokens, token counts from the server's usage.
  perf_analyzer   KServe v2 ModelStreamInfer in the TensorRT-LLM backend's tensor names (text_input,
                  max_tokens, min_length, stream); timings from its --profile-export-file.
  genai-perf      `--endpoint-type kserve --backend tensorrtllm|vllm` (it drives perf_analyzer); it
                  fails here until the server declares its scalar inputs dims [1] (the row says why).
  kraken.v1       our own client: bench/serve_bench.py's timed_stream over kraken.v1 Generate.
A perf_analyzer run whose export comes out truncated (a perf_analyzer 2.51 flake) is run again.
Every client runs the same load: --requests requests, --concurrency in flight, prompts of about --isl
tokens, exactly --osl tokens out. The runs are one after another, each against the same warm server.

Definitions, the same for every row (aiperf's): TTFT = first token's arrival - request sent; ITL of a
request = (last token - first token) / (tokens - 1); p50/p99 over requests. "server" = the server's
histograms over that run: mean = delta _sum / delta _count of kraken_time_to_first_token_seconds
(arrival to the first token handed to the stream) and kraken_inter_token_latency_seconds.
The clients run on the same cores as the server (a 2-core machine takes CPU from the workers).
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tools", "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from serve_bench import pct, timed_stream  # noqa: E402
from serving import DEFAULT_MODEL, Server, request  # noqa: E402

MODEL_NAME = "kraken-kjv-4way"  # the bundled model's served name
CLIENTS = os.path.join(ROOT, ".venv-clients")
CLIENTS_BIN = os.path.join(CLIENTS, "bin")
PERF_ANALYZER = os.path.join(CLIENTS_BIN, "perf_analyzer")  # from the tritonclient 2.51.0 wheel
AIPERF = os.path.join(CLIENTS_BIN, "aiperf")
GENAI_PERF = os.path.join(CLIENTS_BIN, "genai-perf")

# Public-domain text (Genesis 1) cut into prompts of a given token count for perf_analyzer and kraken.v1.
GENESIS = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God "
    "said, Let there be light: and there was light. And God saw the light, that it was good: and God divided "
    "the light from the darkness. And God called the light Day, and the darkness he called Night. And the "
    "evening and the morning were the first day. And God said, Let there be a firmament in the midst of the "
    "waters, and let it divide the waters from the waters. And God made the firmament, and divided the waters "
    "which were under the firmament from the waters which were above the firmament: and it was so. And God "
    "called the firmament Heaven. And the evening and the morning were the second day.")


def clients_env():
    """The environment the field's clients run in: .venv-clients first on PATH (genai-perf calls
    `perf_analyzer` from PATH), and libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel on the
    loader's path (perf_analyzer is linked against it; libb64.so.0d comes from Debian's libb64-0d).
    The tokenizer is a local directory, which neither aiperf nor genai-perf looks up online (do not
    set HF_HUB_OFFLINE: aiperf 0.13 then takes the directory for a hub name and fails)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_")}
    env["PATH"] = CLIENTS_BIN + os.pathsep + env.get("PATH", "")
    libs = glob.glob(os.path.join(CLIENTS, "lib", "python3*", "site-packages", "nvidia", "cuda_runtime", "lib"))
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([libs[0]] + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(k, None)
    env.update(NO_COLOR="1", COLUMNS="160", PYTHONUNBUFFERED="1")
    return env


def perf_analyzer_problem():
    """None when perf_analyzer runs here, else why not (missing binary or libraries)."""
    if not os.path.exists(PERF_ANALYZER):
        return (f"{PERF_ANALYZER} is missing: run scripts/setup.sh (requirements-clients.txt pins tritonclient "
                "2.51.0, whose wheel ships it)")
    out = subprocess.run([PERF_ANALYZER, "--version"], capture_output=True, text=True, env=clients_env(), timeout=60)
    if out.returncode != 0 or "Perf Analyzer Version" not in out.stdout + out.stderr:
        return f"{PERF_ANALYZER} does not start: {(out.stderr + out.stdout).strip()[-500:]}"
    return None


# ---------------------------------------------------------------------------------------------------
# The server's side: its histograms' sums and counts before and after a run.

_HIST = {"ttft": "kraken_time_to_first_token_seconds", "itl": "kraken_inter_token_latency_seconds"}


def server_totals(server):
    """{ttft_sum, ttft_count, itl_sum, itl_count} from /metrics (every series of each, summed)."""
    text = server.scrape()
    got = {}
    for key, name in _HIST.items():
        for part in ("sum", "count"):
            vals = re.findall(rf"^{name}_{part}(?:{{[^}}]*}})? (\S+)$", text, re.M)
            got[f"{key}_{part}"] = sum(float(v) for v in vals)
    return got


def server_means(before, after):
    """The server's view of one run: requests with a first token, mean TTFT and ITL in ms."""
    d = {k: after[k] - before[k] for k in after}
    return {"requests": int(round(d["ttft_count"])),
            "ttft_ms": 1e3 * d["ttft_sum"] / d["ttft_count"] if d["ttft_count"] else float("nan"),
            "itl_ms": 1e3 * d["itl_sum"] / d["itl_count"] if d["itl_count"] else float("nan")}


# ---------------------------------------------------------------------------------------------------
# One client's result.

def summarize(client, ttft_ms, itl_ms, requests, errors, note=""):
    """A row: per-request TTFT and ITL lists (ms) -> mean, p50, p99."""
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"client": client, "requests": requests, "errors": errors, "note": note,
            "ttft_mean": mean(ttft_ms), "ttft_p50": pct(ttft_ms, .5), "ttft_p99": pct(ttft_ms, .99),
            "itl_mean": mean(itl_ms), "itl_p50": pct(itl_ms, .5), "itl_p99": pct(itl_ms, .99)}


def prompts(model_dir, n, tokens):
    """n distinct prompts of `tokens` tokens each (windows of GENESIS, by the model's tokenizer)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    ids = tok.encode(GENESIS, add_special_tokens=False).ids
    step = max(1, (len(ids) - tokens) // max(1, n))
    return [tok.decode(ids[i * step:i * step + tokens]).strip() for i in range(n)]


def run_aiperf(server, workdir, requests, concurrency, isl, osl, model_dir=DEFAULT_MODEL, timeout=600):
    """aiperf profile on /v1/completions, SSE streaming. Its figures from profile_export_aiperf.json."""
    art = os.path.join(workdir, "aiperf")
    shutil.rmtree(art, ignore_errors=True)
    cmd = [AIPERF, "profile", "-m", MODEL_NAME, "--url", server.http_url, "--endpoint-type", "completions",
           "--streaming", "--tokenizer", model_dir, "--isl", str(isl), "--isl-stddev", "0", "--osl", str(osl),
           "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{osl}", "--use-server-token-count",
           "--concurrency", str(concurrency), "--request-count", str(requests), "--random-seed", "0",
           "--ui", "none", "--no-gpu-telemetry", "--no-server-metrics", "--artifact-dir", art]
    out = subprocess.run(cmd, capture_output=True, text=True, env=clients_env(), timeout=timeout, cwd=workdir)
    path = os.path.join(art, "profile_export_aiperf.json")
    if out.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"aiperf failed ({out.returncode}): {' '.join(cmd)}\n{(out.stdout + out.stderr)[-4000:]}")
    d = json.load(open(path))
    errors = sum(int(e.get("count", 1)) for e in d.get("error_summary") or [])
    errors = max(errors, int((d.get("error_request_count") or {}).get("avg", 0)))
    # Per-request records give the same lists as the other clients; the summary's own p50/p99 agree.
    ttft, itl = [], []
    with open(os.path.join(art, "profile_export.jsonl")) as f:
        for line in f:
            m = json.loads(line).get("metrics", {})
            if "time_to_first_token" in m:
                ttft.append(float(m["time_to_first_token"]["value"]))
            if "inter_token_latency" in m:
                itl.append(float(m["inter_token_latency"]["value"]))
    completed = d.get("completed_request_count") or d["request_count"]  # successes + errors
    row = summarize("aiperf (OpenAI /v1/completions SSE)", ttft, itl, int(completed["avg"]), errors)
    row["summary"] = {k: d[k] for k in ("time_to_first_token", "inter_token_latency") if k in d}
    return row


def perf_analyzer_input(path, texts, osl):
    """perf_analyzer's --input-data JSON in the TensorRT-LLM backend's tensor names, one entry per
    prompt; every input's shape given, as the server's metadata declares each dims [-1]."""
    data = [{"text_input": {"content": [t], "shape": [1]}, "max_tokens": {"content": [osl], "shape": [1]},
             "min_length": {"content": [osl], "shape": [1]}, "stream": {"content": [True], "shape": [1]}}
            for t in texts]
    with open(path, "w") as f:
        json.dump({"data": data}, f)


class TruncatedExport(RuntimeError):
    """perf_analyzer 2.51 now and then (about 1 run in 12 here) exits 0 leaving its profile export
    cut short at a multiple of 64 KiB: not JSON. The run is repeated (see measured())."""


def export_rows(path, osl):
    """Per-request TTFT and ITL (ms) from a perf_analyzer profile export; ITL over `osl` tokens (the
    server may coalesce tokens into one response when the reader lags, so responses <= tokens)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise TruncatedExport(f"perf_analyzer's export {path} ({len(raw)} bytes) is not JSON: {e}") from e
    ttft, itl = [], []
    for r in d["experiments"][0]["requests"]:
        ts = r.get("response_timestamps") or []
        if not ts:
            continue
        ttft.append((ts[0] - r["timestamp"]) / 1e6)
        if osl > 1:
            itl.append((ts[-1] - ts[0]) / 1e6 / (osl - 1))
    return ttft, itl, len(d["experiments"][0]["requests"])


def run_perf_analyzer(server, workdir, requests, concurrency, isl, osl, model_dir=DEFAULT_MODEL, timeout=600):
    """perf_analyzer on ModelStreamInfer, exactly `requests` requests (--request-count)."""
    inp, exp = os.path.join(workdir, "pa_input.json"), os.path.join(workdir, "pa_export.json")
    perf_analyzer_input(inp, prompts(model_dir, 8, isl), osl)
    if os.path.exists(exp):
        os.remove(exp)  # an earlier attempt's
    cmd = [PERF_ANALYZER, "-m", MODEL_NAME, "-i", "grpc", "-u", server.target, "--streaming", "--async",
           "--input-data", inp, "--concurrency-range", f"{concurrency}:{concurrency}", "--request-count",
           str(requests), "--stability-percentage", "999", "--profile-export-file", exp]
    out = subprocess.run(cmd, capture_output=True, text=True, env=clients_env(), timeout=timeout, cwd=workdir)
    if out.returncode != 0 or not os.path.exists(exp):
        raise RuntimeError(f"perf_analyzer failed ({out.returncode}): {' '.join(cmd)}\n{(out.stdout + out.stderr)[-4000:]}")
    ttft, itl, n = export_rows(exp, osl)
    # perf_analyzer counts no errors in the export; a request without responses is one.
    return summarize("perf_analyzer (KServe ModelStreamInfer)", ttft, itl, n, n - len(ttft))


def run_genai_perf(server, workdir, backend, requests, concurrency, isl, osl, model_dir=DEFAULT_MODEL, timeout=600):
    """genai-perf --endpoint-type kserve --backend tensorrtllm|vllm. Its figures from the
    perf_analyzer export it leaves, by the same definitions as the other rows."""
    art = os.path.join(workdir, f"genai-perf-{backend}")
    shutil.rmtree(art, ignore_errors=True)
    cmd = [GENAI_PERF, "profile", "-m", MODEL_NAME, "--endpoint-type", "kserve", "--backend", backend,
           "-u", server.target, "--streaming", "--tokenizer", model_dir, "--synthetic-input-tokens-mean", str(isl),
           "--synthetic-input-tokens-stddev", "0", "--output-tokens-mean", str(osl),
           "--output-tokens-mean-deterministic", "--concurrency", str(concurrency), "--request-count", str(requests),
           "--random-seed", "0", "--artifact-dir", art]
    out = subprocess.run(cmd, capture_output=True, text=True, env=clients_env(), timeout=timeout, cwd=workdir)
    exports = glob.glob(os.path.join(art, "*", "profile_export.json"))
    if out.returncode != 0 or not exports:
        text = out.stdout + out.stderr
        if "JSONDecodeError" in text:
            raise TruncatedExport(f"genai-perf --backend {backend}: perf_analyzer's export is not JSON")
        why = re.findall(r"^error: .*$", text, re.M) or [text.strip().splitlines()[-1] if text.strip() else "?"]
        raise RuntimeError(f"genai-perf --backend {backend} failed: {why[0]}")
    ttft, itl, n = export_rows(exports[0], osl)
    return summarize(f"genai-perf kserve --backend {backend}", ttft, itl, n, n - len(ttft))


def run_kraken_v1(server, requests, concurrency, isl, osl, model_dir=DEFAULT_MODEL):
    """Our own client (bench/serve_bench.py's timed_stream) on kraken.v1 Generate, closed loop."""
    texts = prompts(model_dir, 8, isl)
    results, errors, lock = [], [], threading.Lock()
    it = iter(range(requests))

    def worker():
        while True:
            with lock:
                i = next(it, None)
            if i is None:
                return
            try:
                r = timed_stream(server.stub, request(text=texts[i % len(texts)], max_tokens=osl, ignore_eos=True, seed=i))
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - counted, shown in the note
                with lock:
                    errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ttft = [r[0] * 1e3 for r in results if r[0] is not None]
    itl = [sum(r[1]) / len(r[1]) * 1e3 for r in results if r[1]]
    return summarize("kraken.v1 (bench/serve_bench.py client)", ttft, itl, len(results) + len(errors), len(errors),
                     errors[0] if errors else "")


def measured(server, fn, label="?", attempts=2, catch=True):
    """Runs fn() -> row, adding the server's means over that run (a run whose perf_analyzer export came
    out truncated is run again, up to `attempts` in all, each measured on its own). With `catch`, a
    failure becomes a row with its reason; else it is raised."""
    for attempt in range(1, attempts + 1):
        before = server_totals(server)
        t0 = time.perf_counter()
        try:
            row = fn()
        except TruncatedExport as e:
            if attempt < attempts:
                print(f"  {label}: {e}; running it again", flush=True)
                continue
            if not catch:
                raise
            row = {"client": label, "failed": f"{type(e).__name__}: {e}"}
        except Exception as e:  # noqa: BLE001 - a client that cannot run is a finding, not a crash
            if not catch:
                raise
            row = {"client": label, "failed": f"{type(e).__name__}: {e}"}
        row["attempts"] = attempt
        row["wall_s"] = time.perf_counter() - t0
        row["server"] = server_means(before, server_totals(server))
        return row


def table(rows):
    head = (f"{'client':42} {'req':>4} {'err':>3}  {'TTFT p50/p99 ms':>15}  {'ITL p50/p99 ms':>14}  "
            f"{'client TTFT/ITL mean':>20}  {'server TTFT/ITL mean':>20} {'srv req':>7}  {'TTFT +ms':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        s = r["server"]
        if "failed" in r:
            why = r["failed"].splitlines()[0].replace("RuntimeError: ", "").replace("Failed to init manager inputs: ", "")
            lines.append(f"{r['client']:42} FAILED: {why[:220]}")
            continue
        lines.append(f"{r['client']:42} {r['requests']:>4} {r['errors']:>3}  "
                     f"{r['ttft_p50']:>7.1f}/{r['ttft_p99']:<7.1f}  {r['itl_p50']:>6.1f}/{r['itl_p99']:<7.1f}  "
                     f"{r['ttft_mean']:>9.1f}/{r['itl_mean']:<10.1f}  {s['ttft_ms']:>9.1f}/{s['itl_ms']:<10.1f} "
                     f"{s['requests']:>7}  {r['ttft_mean'] - s['ttft_ms']:>+8.1f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--devices", default="cpu:2")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--isl", type=int, default=32, help="prompt tokens")
    ap.add_argument("--osl", type=int, default=32, help="output tokens (forced)")
    ap.add_argument("--no-genai-perf", action="store_true", help="skip the two genai-perf rows")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--keep", metavar="DIR", help="leave the clients' artifacts (inputs, exports, logs) in DIR")
    args = ap.parse_args()
    if not os.path.exists(AIPERF):
        sys.exit(f"{AIPERF} is missing: run scripts/setup.sh (it creates .venv-clients)")
    pa_problem = perf_analyzer_problem()
    server = Server("--max-batch-seqs", str(max(32, args.concurrency)), model=args.model, devices=args.devices)
    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="field-clients-")
    os.makedirs(work, exist_ok=True)
    load = dict(requests=args.requests, concurrency=args.concurrency, isl=args.isl, osl=args.osl)
    try:
        print(f"kraken-server {args.model} on {args.devices}; {args.requests} requests, concurrency {args.concurrency}, "
              f"prompts ~{args.isl} tokens, {args.osl} tokens out (forced)", flush=True)
        # Warm-up (first requests pay one-time costs): a few kraken.v1 requests, not measured.
        run_kraken_v1(server, requests=args.concurrency, concurrency=args.concurrency, isl=args.isl, osl=4, model_dir=args.model)
        jobs = [("kraken.v1 (bench/serve_bench.py client)", lambda: run_kraken_v1(server, model_dir=args.model, **load)),
                ("aiperf (OpenAI /v1/completions SSE)", lambda: run_aiperf(server, work, model_dir=args.model, **load))]
        if pa_problem:
            print(f"perf_analyzer skipped: {pa_problem}")
        else:
            jobs.append(("perf_analyzer (KServe ModelStreamInfer)",
                         lambda: run_perf_analyzer(server, work, model_dir=args.model, **load)))
            if not args.no_genai_perf and os.path.exists(GENAI_PERF):
                for backend in ("tensorrtllm", "vllm"):
                    jobs.append((f"genai-perf kserve --backend {backend}",
                                 lambda b=backend: run_genai_perf(server, work, b, model_dir=args.model, **load)))
        rows = []
        for label, fn in jobs:
            print(f"running {label} ...", flush=True)
            rows.append(measured(server, fn, label))
        print()
        print(table(rows))
        print("\nsrv req: requests the server's TTFT histogram counted over the run. TTFT +ms: client mean - "
              "server mean (what the client and the transport add to the server's arrival-to-first-token).")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    finally:
        server.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
