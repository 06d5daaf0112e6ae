"""The OpenAI-compatible HTTP API as a served process: its timers in both directions through the
server's flags (--request-timeout on both APIs, --http-idle-timeout), draining on SIGTERM over
HTTP, TLS and mutual TLS on the HTTP port, and --http-port -1. Short timer values come through
the flags; a request is made slow not by a slow model but by queueing it behind others
(--max-batch-seqs 1, and the request's priority under the default priority policy)."""
import json
import os
import re
import signal
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from serving import Server, request
from test_reliability import metric
from test_server import _make_certs

MODEL = "kraken-kjv-4way"
LONG = dict(model=MODEL, prompt=[1, 2, 3], max_tokens=250, extra_body={"ignore_eos": True})
# A short completion whose length is known (sampled text may end at EOS earlier otherwise).
SHORT = dict(model=MODEL, prompt="And God said,", extra_body={"ignore_eos": True})


def http(url, method, path, body=None, timeout=30):
    """(status, headers, body bytes) of one request on a fresh connection."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_for(cond, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return time.time() - t0
        time.sleep(0.01)
    pytest.fail(f"{what} not within {timeout} s")


def failures(server, reason):
    return metric(server.scrape(), "kraken_request_failure_total", f'reason="{reason}"')


# --request-timeout ------------------------------------------------------------------------------

class Feeder:
    """Keeps the one batch slot busy with short priority-0 requests over gRPC, from `n` threads,
    until stopped or `limit` seconds have passed: with --max-batch-seqs 1 there is always one of
    them waiting, so a request of a lower priority (a higher value) is never scheduled while it
    runs. Each feeder request (24 tokens, a few ms of work, at most n-1 ahead of it) is far inside
    the request timeout."""

    def __init__(self, stub, n=4, limit=10.0):
        self.stub, self.limit = stub, limit
        self.stop = threading.Event()
        self.outcomes = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()
        wait_for(lambda: len(self.outcomes) >= 3 * n, 10, "the feeders cycling")

    def _run(self):
        t_end = time.time() + self.limit
        while not self.stop.is_set() and time.time() < t_end:
            try:
                r = self.stub.Complete(request(ids=[4, 5, 6], max_tokens=24, ignore_eos=True), timeout=30)
                self.outcomes.append("ok" if len(r.token_ids) == 24 else "short")
            except grpc.RpcError as e:
                self.outcomes.append(e.code())

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        return self.outcomes


REQUEST_TIMEOUT = 0.5


def deadline_seconds(message):
    """The seconds in "deadline exceeded after 0.5012 s (while queued)", the engine's message for a
    request ended at its deadline before it was scheduled."""
    m = re.fullmatch(r"deadline exceeded after (\d+(?:\.\d+)?(?:e-?\d+)?) s \(while queued\)", message)
    assert m, message
    return float(m.group(1))


def test_request_timeout_in_both_directions_on_http_and_grpc():
    s = Server("--request-timeout", str(REQUEST_TIMEOUT), "--max-batch-seqs", "1", devices="cpu:1")
    try:
        client = s.openai()
        # Inside the timeout: a short completion on each API, also after the server sat idle for
        # longer than the timeout (it counts from the request's arrival, not from anything earlier).
        r = client.completions.create(max_tokens=2, **SHORT)
        assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"
        time.sleep(REQUEST_TIMEOUT + 0.3)
        r = client.completions.create(max_tokens=2, **SHORT)
        assert r.usage.completion_tokens == 2
        g = s.stub.Complete(request(text="And God said,", max_tokens=2, ignore_eos=True), timeout=30)
        assert len(g.token_ids) == 2
        assert failures(s, "deadline_exceeded") == 0

        # Past it: the same short request at priority 10 waits behind a never-ending supply of
        # priority-0 requests, and is ended at its deadline: 408 with an OpenAI error object.
        before = failures(s, "deadline_exceeded")
        feeder = Feeder(s.stub)
        try:
            t0 = time.time()
            status, headers, body = http(s.http_url, "POST", "/v1/completions",
                                         {"model": MODEL, "prompt": "And God said,", "max_tokens": 2,
                                          "ignore_eos": True, "priority": 10})
            http_elapsed = time.time() - t0
            assert status == 408, (status, body, http_elapsed)
            t0 = time.time()
            with pytest.raises(grpc.RpcError) as e:
                s.stub.Complete(request(text="And God said,", max_tokens=2, ignore_eos=True, priority=10), timeout=30)
            grpc_elapsed = time.time() - t0
        finally:
            outcomes = feeder.close()
        assert headers["Content-Type"] == "application/json"
        err = json.loads(body)["error"]
        assert REQUEST_TIMEOUT <= deadline_seconds(err["message"]) < 3, err
        assert err["code"] == 408 and err["type"] == "invalid_request_error" and err["param"] is None
        assert REQUEST_TIMEOUT <= http_elapsed < 3, http_elapsed
        # The same flag on kraken.v1: the server's DEADLINE_EXCEEDED (the client's own deadline is 30 s).
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert REQUEST_TIMEOUT <= deadline_seconds(e.value.details()) < 3, e.value.details()
        assert REQUEST_TIMEOUT <= grpc_elapsed < 3, grpc_elapsed
        # Both counted as deadline_exceeded (plus any feeder request a stalled machine let expire).
        feeder_expired = outcomes.count(grpc.StatusCode.DEADLINE_EXCEEDED)
        assert set(outcomes) <= {"ok", grpc.StatusCode.DEADLINE_EXCEEDED}, outcomes
        assert failures(s, "deadline_exceeded") == before + 2 + feeder_expired
        # And the server is unharmed: the same request, now alone, succeeds.
        r = client.completions.create(model=MODEL, prompt="And God said,", max_tokens=2,
                                      extra_body={"ignore_eos": True, "priority": 10})
        assert r.usage.completion_tokens == 2
    finally:
        s.close()


# --http-idle-timeout ----------------------------------------------------------------------------

IDLE_TIMEOUT = 0.5


def read_response(sock):
    """(status, headers, body) of one Content-Length response from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed mid-response: {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed mid-body"
        rest += chunk
    assert len(rest) == length, "bytes beyond the response"
    return int(lines[0].split()[1]), headers, rest


def seconds_until_closed(sock, limit=10):
    """Seconds until the server closes `sock` (recv returns b""); fails if bytes come instead."""
    sock.settimeout(limit)
    t0 = time.time()
    try:
        got = sock.recv(4096)
    except socket.timeout:
        pytest.fail(f"the server kept the connection open for {limit} s")
    except ConnectionResetError:
        got = b""
    assert got == b"", got
    return time.time() - t0


HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def idle_server():
    s = Server("--http-idle-timeout", str(IDLE_TIMEOUT), "--max-batch-seqs", "1", devices="cpu:1")
    yield s
    s.close()


def test_idle_keep_alive_connection_is_kept_inside_the_timeout_and_closed_past_it(idle_server):
    s = idle_server
    with socket.create_connection(("127.0.0.1", s.http_port)) as sock:
        sock.sendall(HEALTH)
        assert read_response(sock)[0] == 200
        # Five gaps of 0.15 s: each inside the timeout, together past it. Every request is served
        # on the same socket (the timer restarts with each request).
        for _ in range(5):
            time.sleep(0.15)
            sock.sendall(HEALTH)
            status, headers, _ = read_response(sock)
            assert status == 200 and headers.get("connection", "keep-alive").lower() != "close", headers
        # Then idle: the server closes it after the timeout, not before, and not much after.
        closed_after = seconds_until_closed(sock)
    assert IDLE_TIMEOUT - 0.1 <= closed_after < IDLE_TIMEOUT + 1.5, closed_after
    # A client that starts a request and does not finish sending it is closed the same way.
    with socket.create_connection(("127.0.0.1", s.http_port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
        closed_after = seconds_until_closed(sock)
    assert IDLE_TIMEOUT - 0.1 <= closed_after < IDLE_TIMEOUT + 1.5, closed_after
    with socket.create_connection(("127.0.0.1", s.http_port)) as sock:
        sock.sendall(HEALTH[:20])
        closed_after = seconds_until_closed(sock)
    assert IDLE_TIMEOUT - 0.1 <= closed_after < IDLE_TIMEOUT + 1.5, closed_after
    # The server goes on serving new connections.
    assert http(s.http_url, "GET", "/health")[0] == 200


def test_a_slow_generation_is_not_cut_by_the_idle_timeout(idle_server):
    """Eight streams of 250 tokens, one sequence at a time: the later ones wait, their response
    head sent and nothing else, for far longer than the idle timeout, then stream; a non-streamed
    request queued behind them all waits longer still. Every one completes in full."""
    s = idle_server
    n = 8
    results = [None] * n

    def one(i):
        client = s.openai()
        t0 = time.time()
        stream = client.completions.create(stream=True, stream_options={"include_usage": True}, seed=i, **LONG)
        times, text, finish, usage = [time.time()], "", None, None
        for c in stream:
            times.append(time.time())
            if c.choices:
                text += c.choices[0].text
                finish = c.choices[0].finish_reason or finish
            if c.usage is not None:
                usage = c.usage.completion_tokens
        results[i] = dict(total=time.time() - t0, silence=max(b - a for a, b in zip(times, times[1:])),
                          finish=finish, tokens=usage, text=text)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    wait_for(lambda: metric(s.scrape(), "kraken_num_requests_waiting") >= n - 2, 10, "the streams queued")
    t0 = time.time()
    unary = s.openai().completions.create(seed=99, **LONG)
    unary_elapsed = time.time() - t0
    for t in threads:
        t.join(timeout=60)
    assert all(r is not None for r in results), results
    for r in results:
        assert r["finish"] == "length" and r["tokens"] == 250, r
    assert unary.usage.completion_tokens == 250 and unary.choices[0].finish_reason == "length"
    # The test proves something only if connections really sat silent past the timer: the
    # longest silence of a stream (head to first token, or between events) and the wait of the
    # non-streamed request, with a 1.5x margin.
    longest = max(r["silence"] for r in results)
    totals = ", ".join(f"{r['total']:.2f}" for r in results)
    print(f"\n8 x 250-token streams, one at a time: longest silence {longest:.2f} s, totals {totals} s; "
          f"the non-streamed request {unary_elapsed:.2f} s")
    assert longest > 1.5 * IDLE_TIMEOUT, results
    assert max(r["total"] for r in results) > 1.5 * IDLE_TIMEOUT
    assert unary_elapsed > 1.5 * IDLE_TIMEOUT
    assert failures(s, "cancelled") == 0


# Drain ------------------------------------------------------------------------------------------

def test_sigterm_drains_http_the_stream_in_flight_completes_and_new_requests_get_503():
    s = Server("--grace-period", "10", "--max-batch-seqs", "1", devices="cpu:1")
    try:
        client = s.openai()
        # Three gRPC requests of 250 tokens (one runs, the others wait), then the HTTP stream at a
        # higher priority: it runs next, and what waits behind it keeps the server busy after it.
        blockers = [s.stub.Generate(request(ids=[1, 2, 3], max_tokens=250, ignore_eos=True, seed=i), timeout=60)
                    for i in range(3)]
        wait_for(lambda: metric(s.scrape(), "kraken_num_requests_waiting") >= 1, 10, "requests waiting")
        unavailable = failures(s, "unavailable")
        stream = client.completions.create(stream=True, stream_options={"include_usage": True}, seed=7,
                                           extra_headers={"X-Request-Id": "drained-stream"},
                                           **{**LONG, "extra_body": {"ignore_eos": True, "priority": -1}})
        chunks = iter(stream)
        first = next(chunks)
        before_signal = [first]
        while not before_signal[-1].choices or not before_signal[-1].choices[0].text:
            before_signal.append(next(chunks))
        t_signal = time.time()
        s.proc.send_signal(signal.SIGTERM)
        # /health turns 503 at once (the drain loop looks every 50 ms).
        turned = wait_for(lambda: http(s.http_url, "GET", "/health")[0] == 503, 2, "/health 503")
        assert turned < 1.0, turned
        # A new completion: 503 and an OpenAI error object, counted as unavailable.
        status, headers, body = http(s.http_url, "POST", "/v1/completions",
                                     {"model": MODEL, "prompt": "a", "max_tokens": 2})
        assert status == 503 and headers["Content-Type"] == "application/json", body
        assert json.loads(body) == {"error": {"message": "the server is shutting down", "type": "server_error",
                                              "param": None, "code": 503}}
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt="a", max_tokens=2)
        assert e.value.status_code == 503 and "the server is shutting down" in str(e.value)
        assert failures(s, "unavailable") == unavailable + 2
        # The stream in flight when the signal came completes normally, in full.
        rest = list(chunks)
        chunks_all = before_signal + rest
        text_chunks = [c for c in chunks_all if c.choices]
        assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
        assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
        assert chunks_all[-1].choices == [] and chunks_all[-1].usage.completion_tokens == 250
        assert chunks_all[0].id == "cmpl-drained-stream"
        # So does the work behind it, and the server exits 0 once it is done, well inside the grace period.
        for b in blockers:
            msgs = list(b)
            assert sum(len(m.token_ids) for m in msgs) == 250
        assert s.proc.wait(timeout=30) == 0
        assert time.time() - t_signal < 8
        # It was generating when the drain began: it finished after the log says so.
        log = s.read_log()
        draining = log.index("draining (grace period 10 s)")
        finished = log.index("request drained-stream (")
        assert draining < finished, log
        assert "generated 250" in log[finished:].splitlines()[0]
    finally:
        s.close()


# TLS --------------------------------------------------------------------------------------------

def test_https_with_the_servers_certificate(tmp_path):
    c = _make_certs(str(tmp_path))
    d = str(tmp_path)
    s = Server("--tls-cert", f"{d}/server.pem", "--tls-key", f"{d}/server.key", devices="cpu:1",
               health_creds=(c["ca.pem"], None, None))
    try:
        https_url = f"https://127.0.0.1:{s.http_port}"
        trusting = ssl.create_default_context(cafile=f"{d}/ca.pem")
        with openai.DefaultHttpxClient(verify=trusting) as h:
            client = openai.OpenAI(base_url=https_url + "/v1", api_key="none", max_retries=0, http_client=h)
            r = client.completions.create(max_tokens=3, **SHORT)
            assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
            chunks = list(client.completions.create(max_tokens=5, stream=True, **SHORT,
                                                    stream_options={"include_usage": True}))
            assert chunks[-1].usage.completion_tokens == 5
            assert [m.id for m in client.models.list().data] == [MODEL]
        # The certificate is checked: a client that does not trust the CA is refused.
        with openai.DefaultHttpxClient(verify=ssl.create_default_context()) as h:
            client = openai.OpenAI(base_url=https_url + "/v1", api_key="none", max_retries=0, http_client=h)
            with pytest.raises(openai.APIConnectionError) as e:
                client.completions.create(model=MODEL, prompt="a", max_tokens=1)
            assert "CERTIFICATE_VERIFY_FAILED" in repr(e.value.__cause__) + repr(e.value.__context__)
        # Plain HTTP to the TLS port gets no answer (the handshake fails, the connection closes at once).
        t0 = time.time()
        with pytest.raises(openai.APIConnectionError):
            s.openai(timeout=10).completions.create(model=MODEL, prompt="a", max_tokens=1)
        assert time.time() - t0 < 3
        # The metrics port stays plain HTTP, as documented.
        assert "kraken_request_success_total" in s.scrape()
    finally:
        s.close()


def test_https_with_client_certificates(tmp_path):
    c = _make_certs(str(tmp_path))
    d = str(tmp_path)
    s = Server("--tls-cert", f"{d}/server.pem", "--tls-key", f"{d}/server.key", "--tls-client-ca", f"{d}/ca.pem",
               devices="cpu:1", health_creds=(c["ca.pem"], c["client.key"], c["client.pem"]))
    try:
        https_url = f"https://127.0.0.1:{s.http_port}"
        with_cert = ssl.create_default_context(cafile=f"{d}/ca.pem")
        with_cert.load_cert_chain(f"{d}/client.pem", f"{d}/client.key")
        with openai.DefaultHttpxClient(verify=with_cert) as h:
            client = openai.OpenAI(base_url=https_url + "/v1", api_key="none", max_retries=0, http_client=h)
            r = client.completions.create(max_tokens=3, **SHORT)
            assert r.usage.completion_tokens == 3
        # Without a client certificate the server refuses the connection.
        without = ssl.create_default_context(cafile=f"{d}/ca.pem")
        with openai.DefaultHttpxClient(verify=without) as h:
            client = openai.OpenAI(base_url=https_url + "/v1", api_key="none", max_retries=0, http_client=h,
                                   timeout=10)
            t0 = time.time()
            with pytest.raises(openai.APIConnectionError):
                client.completions.create(model=MODEL, prompt="a", max_tokens=1)
            assert time.time() - t0 < 3
        # Even /health: the client certificate is asked for before any request is read.
        without_ctx = ssl.create_default_context(cafile=f"{d}/ca.pem")
        with socket.create_connection(("127.0.0.1", s.http_port), timeout=10) as raw:
            with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
                with without_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(HEALTH)
                    got = tls.recv(4096)  # TLS 1.3: the refusal arrives as an alert on the first read
                    assert got == b"", got
                    raise ConnectionResetError("closed without an answer")
        # The one with the certificate still works afterwards.
        with openai.DefaultHttpxClient(verify=with_cert) as h:
            client = openai.OpenAI(base_url=https_url + "/v1", api_key="none", max_retries=0, http_client=h)
            assert client.completions.create(max_tokens=1, **SHORT).usage.completion_tokens == 1
    finally:
        s.close()


# --http-port -1 ---------------------------------------------------------------------------------

def test_http_port_minus_one_turns_the_http_api_off():
    s = Server("--http-port", "-1", devices="cpu:1")  # the last --http-port wins over the harness's
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", s.http_port), timeout=5).close()
        with pytest.raises(openai.APIConnectionError):
            s.openai(timeout=5).completions.create(model=MODEL, prompt="a", max_tokens=1)
        assert "OpenAI-compatible API on" not in s.read_log()
        # gRPC and the metrics port go on.
        g = s.stub.Complete(request(text="And God said,", max_tokens=3, ignore_eos=True), timeout=30)
        assert len(g.token_ids) == 3
        assert metric(s.scrape(), "kraken_request_success_total", 'finish_reason="length"') == 1
    finally:
        s.close()


def test_health_is_503_while_the_workers_recover_and_200_after():
    # A worker killed while the server is idle: /health on the HTTP port turns 503 while the
    # workers restart (as the gRPC health status turns NOT_SERVING) and 200 once they are back;
    # the next completion succeeds.
    import signal
    import threading
    s = Server("--heartbeat-timeout", "0.5", "--stall-timeout", "0.5", devices="cpu:2")
    try:
        statuses = []
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                try:
                    statuses.append(urllib.request.urlopen(s.http_url + "/health", timeout=5).status)
                except urllib.error.HTTPError as e:
                    statuses.append(e.code)
                except OSError as e:  # any failure to answer at all is a finding
                    statuses.append(repr(e))
                time.sleep(0.005)
        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(0.2)
        os.kill(s.worker_pids()[1], signal.SIGKILL)
        t0 = time.time()
        while time.time() - t0 < 10 and not (503 in statuses and statuses[-1] == 200):
            time.sleep(0.05)
        stop.set()
        poller.join()
        assert statuses[0] == 200 and 503 in statuses and statuses[-1] == 200, statuses[::10]
        first_503 = statuses.index(503)
        assert all(st == 200 for st in statuses[:first_503])
        r = s.openai().completions.create(model=MODEL, prompt="And God said,", max_tokens=4,
                                          extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 4
    finally:
        s.close()
