"""Metrics end to end: the server's /metrics parses (promtool, the official Python parser), a real
Prometheus scrapes it under load, and its answers agree with what the clients measured and with
the server's own counters; the recording rules, alerts and every dashboard expression work."""
import json
import math
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kraken_client import pb
from serving import ROOT, Server, free_port, request, stream

DEPLOY = os.path.join(ROOT, "deploy")
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]


def pct(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def bucket_index(v):
    return next((i for i, b in enumerate(TTFT_BUCKETS) if v <= b), len(TTFT_BUCKETS))


def samples(text):
    """{(name, frozenset(labels)): value} of a scrape, parsed by the official client."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


class Prometheus:
    def __init__(self, tmp, metrics_port):
        self.port = free_port()
        cfg = os.path.join(tmp, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {os.path.join(DEPLOY, "prometheus", "kraken-rules.yml")}
scrape_configs:
  - job_name: kraken
    static_configs:
      - targets: ['127.0.0.1:{metrics_port}']
""")
        self.log = open(os.path.join(tmp, "prometheus.log"), "w")
        self.proc = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp}/tsdb",
                                      f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self._wait_target_up()

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr, **params):
        """An instant query; `time=` (Unix seconds) evaluates it then instead of now."""
        return self.api("query", query=expr, **params)["result"]

    def _wait_target_up(self, timeout=90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, "prometheus exited; see its log"
            try:
                targets = self.api("targets")["activeTargets"]
                if targets and all(t["health"] == "up" for t in targets):
                    return
            except (OSError, AssertionError):
                pass
            time.sleep(0.5)
        raise RuntimeError("prometheus never scraped the server")

    def wait_for(self, expr, want, timeout=60):
        """Polls until `expr` gives one sample equal to `want`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = self.query(expr)
            if r and float(r[0]["value"][1]) == want:
                return
            time.sleep(0.5)
        raise AssertionError(f"{expr} never reached {want}: {self.query(expr)}")

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A server under load, a Prometheus scraping it, and what the clients measured."""
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run scripts/setup.sh")
    tmp = str(tmp_path_factory.mktemp("prom"))
    server = Server(devices="cpu:2")
    prom = Prometheus(tmp, server.metrics_port)
    client_ttft, server_ttft = [], []
    lock = threading.Lock()
    n_requests = 40

    def run(i):
        t0 = time.perf_counter()
        first = None
        last = None
        for m in server.stub.Generate(request(text="And God said,", max_tokens=16, seed=i, ignore_eos=True)):
            if first is None and m.token_ids:
                first = time.perf_counter() - t0
            last = m
        with lock:
            client_ttft.append(first)
            server_ttft.append(last.timings.ttft_seconds)

    for wave in range(n_requests // 4):
        threads = [threading.Thread(target=run, args=(wave * 4 + k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # One of each kind of refusal, so failure counters move too.
    with pytest.raises(grpc.RpcError):
        server.stub.Complete(request(text=""))
    prom.wait_for("sum(kraken_request_success_total)", n_requests)
    prom.wait_for('kraken_request_failure_total{reason="invalid_argument"}', 1)
    prom.load_end = time.time()  # Prometheus holds the load's last counters from here on
    yield server, prom, client_ttft, server_ttft
    prom.close()
    server.close()


def test_ttft_histogram_measures_from_arrival_including_queueing():
    """kraken_time_to_first_token_seconds observes first token − arrival, queueing included: with
    one sequence at a time, 4 concurrent requests wait for each other, and the histogram's _sum
    grows by the sum of the ttft_seconds the responses report (1 ms per request of tolerance for
    rounding), its _count by 4. The queued time they report (over 10 times that tolerance) is what
    a histogram timed from scheduling would leave out."""
    n = 4
    server = Server("--max-batch-seqs", "1", devices="cpu:1")
    try:
        before = samples(server.scrape())
        timings = [None] * n

        def run(i):
            timings[i] = server.stub.Complete(request(text="And God said,", max_tokens=32, seed=i, ignore_eos=True),
                                              timeout=120).timings

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = samples(server.scrape())
    finally:
        server.close()
    assert all(t is not None for t in timings)
    queued = [t.queue_seconds for t in timings]
    assert sum(q > 0.005 for q in queued) >= 2, queued  # they really waited for one another
    assert sum(queued) > 10 * n * 1e-3, queued

    def delta(name):
        return after[(name, frozenset())] - before.get((name, frozenset()), 0)
    assert delta("kraken_time_to_first_token_seconds_count") == n
    reported = sum(t.ttft_seconds for t in timings)
    assert delta("kraken_time_to_first_token_seconds_sum") == pytest.approx(reported, abs=n * 1e-3), (
        f"histogram sum grew by {delta('kraken_time_to_first_token_seconds_sum')} s, responses report TTFTs "
        f"summing to {reported} s with {sum(queued)} s of it queued")


def test_scrape_passes_promtool_and_the_official_parser(loaded):
    server = loaded[0]
    text = server.scrape()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    s = samples(text)
    assert s[("kraken_request_success_total", frozenset({("finish_reason", "length")}))] == 40
    assert s[("kraken_generation_tokens_total", frozenset())] == 40 * 16
    assert s[("kraken_time_to_first_token_seconds_count", frozenset())] == 40
    assert s[("kraken_inter_token_latency_seconds_count", frozenset())] == 40 * 15
    assert s[("kraken_request_failure_total", frozenset({("reason", "invalid_argument")}))] == 1
    for rank in ("0", "1"):
        assert s[("kraken_worker_up", frozenset({("rank", rank)}))] == 1
        assert s[("kraken_device_busy_seconds_total", frozenset({("rank", rank)}))] > 0
    names = {fam.name for fam in text_string_to_metric_families(text)}
    want = {"kraken_time_to_first_token_seconds", "kraken_inter_token_latency_seconds", "kraken_e2e_request_latency_seconds",
            "kraken_request_queue_time_seconds", "kraken_request_prefill_time_seconds", "kraken_prompt_tokens",
            "kraken_generation_tokens", "kraken_request_success", "kraken_request_failure", "kraken_num_requests_running",
            "kraken_num_requests_waiting", "kraken_kv_cache_usage_ratio", "kraken_iteration_tokens",
            "kraken_device_busy_seconds", "kraken_device_idle_seconds", "kraken_collective_seconds",
            "kraken_collective_exposed_seconds", "kraken_worker_up", "kraken_worker_restarts", "kraken_build_info"}
    assert want <= names, want - names
    # The build's labels name the CPU kernel level chosen at start: AVX-512 where the CPU has
    # F/BW/DQ/VL/CD, else AVX2 (engine/cpu/kernels.h).
    flags = set(open("/proc/cpuinfo").read().split())
    level = "avx512" if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags else "avx2"
    info = [labels for (name, labels), v in s.items() if name == "kraken_build_info" and v == 1]
    assert len(info) == 1 and ("cpu_kernels", level) in info[0], info


def test_prometheus_ttft_quantile_matches_the_clients(loaded):
    server, prom, client_ttft, server_ttft = loaded
    r = prom.query("histogram_quantile(0.9, rate(kraken_time_to_first_token_seconds_bucket[1m]))")
    assert len(r) == 1
    p90 = float(r[0]["value"][1])
    # Prometheus interpolates inside the bucket that holds the 90th percentile: the exact p90 of
    # the server-reported TTFTs is in that bucket (or next to it, for rank rounding), and so is
    # what the clients measured, which adds only the gRPC hop.
    assert abs(bucket_index(p90) - bucket_index(pct(server_ttft, 0.9))) <= 1, (p90, pct(server_ttft, 0.9))
    assert abs(bucket_index(p90) - bucket_index(pct(client_ttft, 0.9))) <= 1, (p90, pct(client_ttft, 0.9))
    assert all(c >= s for c, s in zip(sorted(client_ttft), sorted(server_ttft)))


def test_idle_and_exposed_ratios_agree_with_the_step_statistics(loaded):
    server, prom, _, _ = loaded
    s = samples(server.scrape())
    # The counters Prometheus holds are the server's (the load is over, they no longer move) ...
    for rank in ("0", "1"):
        busy = s[("kraken_device_busy_seconds_total", frozenset({("rank", rank)}))]
        exposed = s[("kraken_collective_exposed_seconds_total", frozenset({("rank", rank)}))]
        got = prom.query(f'kraken_collective_exposed_seconds_total{{rank="{rank}"}} / '
                         f'(kraken_collective_exposed_seconds_total{{rank="{rank}"}} + '
                         f'kraken_device_busy_seconds_total{{rank="{rank}"}})')
        assert float(got[0]["value"][1]) == pytest.approx(exposed / (exposed + busy), rel=1e-6)
        # ... the exposed wait is part of the collective time in flight, and is counted as idle.
        assert exposed <= s[("kraken_collective_seconds_total", frozenset({("rank", rank), ("op", "all_reduce")}))] + 1e-9
        assert exposed == s[("kraken_device_idle_seconds_total", frozenset({("rank", rank), ("reason", "collective_wait")}))]
    # The recording rules produce a ratio in [0, 1] for every rank.
    for rule in ("kraken:device_idle:ratio_rate5m", "kraken:collective_exposed:ratio_rate5m"):
        deadline = time.time() + 30
        r = []
        while time.time() < deadline and len(r) < 2:
            r = prom.query(rule)
            time.sleep(0.5)
        assert len(r) == 2, rule
        assert all(0 <= float(x["value"][1]) <= 1 for x in r), r


def dashboard_queries(rate_interval):
    """Every expression of every panel of the dashboard as Grafana sends it: all instances, and
    `rate_interval` (a PromQL duration) for $__rate_interval."""
    with open(os.path.join(DEPLOY, "grafana", "kraken-dashboard.json")) as f:
        dash = json.load(f)
    return [t["expr"].replace("$__rate_interval", rate_interval).replace("$instance", ".*")
            for p in dash["panels"] for t in p["targets"]]


def non_finite(result):
    """(labels, value) of each sample of a query result that is NaN or ±Inf."""
    return [(x["metric"], x["value"][1]) for x in result if not math.isfinite(float(x["value"][1]))]


def test_every_dashboard_expression_returns_data(loaded):
    """Evaluated when the load has just ended (1 min windows that hold it, however long the other
    tests took), every panel expression returns at least one sample and every sample is a finite
    number: each quantile's histogram had observations in the window and each ratio a non-zero
    denominator. NaN or ±Inf is not data."""
    _, prom, _, _ = loaded
    queries = dashboard_queries("1m")
    assert len(queries) >= 20
    bad = []
    for q in queries:
        r = prom.query(q, time=prom.load_end)
        if not r:
            bad.append(f"no data: {q}")
        elif non_finite(r):
            bad.append(f"non-finite samples {non_finite(r)} from: {q}")
    assert not bad, "\n".join(bad)


def test_dashboard_expressions_are_never_nan_when_idle(loaded):
    """5 s windows that start 3 s after the load ended hold no observation and no collective: a
    quantile of an empty histogram and a ratio over a zero rate must then give no sample (a gap in
    Grafana), never NaN or ±Inf, which legends and stat reductions would carry."""
    _, prom, _, _ = loaded
    at = prom.load_end + 8
    time.sleep(max(0.0, at - time.time() + 1))  # and one more scrape interval, so the window is complete
    bad = [f"non-finite samples {non_finite(r)} from: {q}"
           for q in dashboard_queries("5s") if non_finite(r := prom.query(q, time=at))]
    assert not bad, "\n".join(bad)


def test_rules_check_and_unit_tests():
    rules = os.path.join(DEPLOY, "prometheus", "kraken-rules.yml")
    r = subprocess.run(["promtool", "check", "rules", rules], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["promtool", "test", "rules", os.path.join(DEPLOY, "prometheus", "tests", "kraken-rules.test.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
