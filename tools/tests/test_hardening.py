"""What a stranger can send and what a busy host can do, against the real kraken-server: JSON nested
far past any stack (every path that quotes a value in its error) is refused by the depth limit and
the server serves the next request; repeated keys are refused by name; HTTP framing that would let
a body be read as a second request (request smuggling) is refused and the connection closed;
KServe leniencies are refused; a port in use refuses the start, naming it; SIGTERM ends a server
within its grace period in every state; recovery gives up after --max-restarts failed starts
whatever the timers' ratio; and a server whose CPU quota leaves it throttled most of each second
serves with no restart while a stopped worker is still caught within its bound."""
import http.client
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc
import pytest

from serving import DEFAULT_MODEL, ROOT, SERVER_BIN, Server, free_port, request, steady_traffic, stream
from test_reliability import metric

DEPTH = 100_000  # about 200 KB of brackets: far under the 4 MiB body limit, far past any stack
LIMIT = "nests deeper than 32 levels"


def nested(depth=DEPTH):
    return "[" * depth + "]" * depth


def post(server, path, body, headers=None):
    """(status, parsed JSON body) of one POST to the server's HTTP port."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data else None


def completes(server):
    status, body = post(server, "/v1/completions", json.dumps({"prompt": "And God said", "max_tokens": 3}))
    return status == 200 and body["usage"]["completion_tokens"] == 3


@pytest.fixture(scope="module")
def server():
    s = Server("--max-waiting", "1", "--max-batch-seqs", "1", devices="cpu:1")
    yield s
    s.close()


# Every path whose error message quotes the offending value.
DEEP_BODIES = {
    "body": lambda d: d,
    "prompt": lambda d: '{"prompt": ' + d + "}",
    "prompt[i]": lambda d: '{"prompt": [1, ' + d + "]}",
    "model": lambda d: '{"model": ' + d + ', "prompt": "a"}',
    "logit_bias": lambda d: '{"prompt": "a", "logit_bias": {"1": ' + d + "}}",
    "stop": lambda d: '{"prompt": "a", "stop": [' + d + "]}",
    "stream_options": lambda d: '{"prompt": "a", "stream": true, "stream_options": {"include_usage": ' + d + "}}",
}


@pytest.mark.parametrize("path", sorted(DEEP_BODIES))
def test_deep_json_in_a_completion_is_refused_by_the_depth_limit(server, path):
    status, body = post(server, "/v1/completions", DEEP_BODIES[path](nested()))
    assert status == 400, body
    assert body["error"]["message"] == f"the request body: JSON {LIMIT}"
    assert server.proc.poll() is None
    assert completes(server)


@pytest.mark.parametrize("route,body", [("/detokenize", '{"tokens": [' + nested() + "]}"),
                                        ("/tokenize", '{"prompt": ' + nested() + "}")])
def test_deep_json_on_the_tokenizer_routes_is_refused(server, route, body):
    status, got = post(server, route, body)
    assert status == 400 and got["error"]["message"] == f"the request body: JSON {LIMIT}", got
    assert completes(server)


def test_a_body_within_the_limit_is_still_read_and_quoted_briefly(server):
    # 31 levels inside the body's own object: parsed, then refused for its type with a short preview.
    status, body = post(server, "/v1/completions", '{"prompt": ' + nested(31) + "}")
    assert status == 400
    message = body["error"]["message"]
    assert message.startswith("field 'prompt[0]' must be an integer token id, got array [[[["), message
    assert len(message) < 120, message


def test_a_repeated_key_is_refused_by_name(server):
    status, body = post(server, "/v1/completions", '{"prompt": "a", "max_tokens": 1, "max_tokens": 500}')
    assert status == 400 and body["error"]["message"] == "the request body: duplicate key 'max_tokens'", body
    status, body = post(server, "/tokenize", '{"prompt": "a", "prompt": "b"}')
    assert status == 400 and body["error"]["message"] == "the request body: duplicate key 'prompt'", body


def test_messages_name_the_field_once_and_the_value_as_sent(server):
    status, body = post(server, "/v1/completions", '{"max_tokens": 3}')
    assert status == 400 and body["error"]["message"] == "field 'prompt' must be set", body
    status, body = post(server, "/v1/completions", '{"prompt": "a", "max_tokens": 18446744073709551616}')
    assert status == 400 and body["error"]["param"] == "max_tokens"
    assert body["error"]["message"] == ("field 'max_tokens' must be an integer in [-2^63, 2^63), got "
                                        "1.8446744073709552e+19 (too large)"), body
    status, body = post(server, "/tokenize", '{"prompt": "a", "return_token_strs": "yes"}')
    assert status == 400 and body["error"]["message"] == "field 'return_token_strs' must be true or false, got \"yes\""


def test_a_full_queue_is_429_with_no_field_named(server):
    # One running (--max-batch-seqs 1) and one waiting (--max-waiting 1): the third is refused.
    running = server.stub.Generate(request(ids=[1, 2, 3], max_tokens=240, ignore_eos=True), timeout=60)
    next(running)
    waiting = server.stub.Generate(request(ids=[1, 2, 3], max_tokens=240, ignore_eos=True), timeout=60)
    t_end = time.time() + 10
    while "kraken_num_requests_waiting 1\n" not in server.scrape() and time.time() < t_end:
        time.sleep(0.02)
    status, body = post(server, "/v1/completions", json.dumps({"prompt": [1, 2], "max_tokens": 1}))
    running.cancel()
    waiting.cancel()
    assert status == 429, body
    assert body["error"]["param"] is None and body["error"]["type"] == "rate_limit_error", body
    assert body["error"]["message"].startswith("the waiting queue is full"), body


# ---- HTTP framing (RFC 9112 section 6) ----------------------------------------------------------

SMUGGLED = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def raw_exchange(port, data, half_close=True, timeout=10):
    """Sends `data` on one connection and reads until the server closes it; the bytes read."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(data)
    if half_close:
        s.shutdown(socket.SHUT_WR)
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    finally:
        s.close()
    return out


def responses(data):
    """The status lines in `data` (a response's body may run straight into the next status line)."""
    return [m.rstrip(b"\r\n") for m in re.findall(rb"HTTP/1\.1 \d\d\d [^\r]*\r\n", data)]


HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize("coding", [b"identity", b"gzip", b"xchunked", b"chunked, identity"])
def test_a_transfer_coding_that_does_not_end_in_chunked_is_400_and_close(server, coding):
    got = raw_exchange(server.http_port, HEAD + b"Transfer-Encoding: " + coding + b"\r\n\r\n" + SMUGGLED)
    assert responses(got) == [b"HTTP/1.1 400 Bad Request"], got  # the GET behind it is never answered
    assert b"Connection: close" in got and b"does not end in chunked" in got


def test_chunked_after_a_coding_the_server_does_not_decode_is_501_and_close(server):
    got = raw_exchange(server.http_port, HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" + SMUGGLED)
    assert responses(got) == [b"HTTP/1.1 501 Not Implemented"], got


@pytest.mark.parametrize("coding", [b"chunked", b"foo"])
def test_transfer_encoding_beside_content_length_is_400_and_close(server, coding):
    body = b'{"prompt": "a", "max_tokens": 1}'
    got = raw_exchange(server.http_port, HEAD + b"Transfer-Encoding: " + coding +
                       b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body + SMUGGLED)
    assert responses(got) == [b"HTTP/1.1 400 Bad Request"], got
    assert b"Content-Length together" in got or b"bad Content-Length" in got  # Beast refuses chunked + length itself


@pytest.mark.parametrize("chunks", [b"zz\r\nabc\r\n0\r\n\r\n", b"-5\r\nabcde\r\n0\r\n\r\n",
                                    b"10\r\nab\r\n0\r\n\r\n"], ids=["not-hex", "negative", "short"])
def test_a_malformed_chunk_is_400_and_close(server, chunks):
    got = raw_exchange(server.http_port, HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + SMUGGLED)
    assert responses(got) == [b"HTTP/1.1 400 Bad Request"], got
    assert b"malformed HTTP request body: bad chunk" in got


def test_a_well_framed_chunked_body_and_the_request_after_it_are_both_served(server):
    body = json.dumps({"prompt": "And God said", "max_tokens": 2}).encode()
    data = HEAD + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    data += b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    got = raw_exchange(server.http_port, data, half_close=False)
    assert responses(got) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"], got


# ---- KServe ----------------------------------------------------------------------------------------

def kserve_stubs():
    """inference.GRPCInferenceService's Python stubs, generated once from proto/ (grpc_tools)."""
    out = os.path.join(tempfile.gettempdir(), "kraken-kserve-stubs")
    if not os.path.exists(os.path.join(out, "inference", "grpc_service_pb2_grpc.py")):
        from grpc_tools import protoc
        os.makedirs(out, exist_ok=True)
        proto_dir = os.path.join(ROOT, "proto")
        assert protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}",
                            os.path.join(proto_dir, "inference", "grpc_service.proto")]) == 0
    if out not in sys.path:
        sys.path.insert(0, out)
    return (importlib.import_module("inference.grpc_service_pb2"),
            importlib.import_module("inference.grpc_service_pb2_grpc"))


def kserve_infer(server, inputs, raw=None, version="", expect=grpc.StatusCode.INVALID_ARGUMENT):
    """ModelInfer with `inputs` {name: (datatype, contents field, values)}; the error's details."""
    pb2, pb2_grpc = kserve_stubs()
    req = pb2.ModelInferRequest(model_name="kraken-kjv-4way", model_version=version)
    for name, (datatype, field, values) in inputs.items():
        t = req.inputs.add(name=name, datatype=datatype, shape=[len(values)])
        if field:
            getattr(t.contents, field).extend(values)
    if raw is not None:
        req.raw_input_contents.extend(raw)
    stub = pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req, timeout=30)
    assert e.value.code() == expect, e.value.details()
    return e.value.details()


def prompt(text="And God said"):
    return ("BYTES", "bytes_contents", [text.encode()])


def sampling(text):
    return ("BYTES", "bytes_contents", [text.encode()])


@pytest.mark.parametrize("key", ["stop", "max_tokens"])
def test_kserve_deep_sampling_parameters_are_refused_by_the_depth_limit(server, key):
    details = kserve_infer(server, {"text_input": prompt(),
                                    "sampling_parameters": sampling('{"' + key + '": ' + nested() + "}")})
    assert details == f"input 'sampling_parameters': JSON {LIMIT}"
    assert completes(server)


def test_kserve_refuses_each_leniency_by_name(server):
    assert kserve_infer(server, {"text_input": prompt(), "sampling_parameters": sampling('{"stop": ["a", 1]}')}) == \
        "field 'sampling_parameters.stop[1]' must be a string, got number 1"
    assert kserve_infer(server, {"text_input": prompt(),
                                 "sampling_parameters": sampling('{"max_tokens": 2, "max_tokens": 3}')}) == \
        "input 'sampling_parameters': duplicate key 'max_tokens'"
    assert kserve_infer(server, {"text_input": prompt(), "max_tokens": ("BOOL", "bool_contents", [True])}) == \
        "input 'max_tokens' must have a numeric datatype (INT32), got BOOL"
    details = kserve_infer(server, {"text_input": prompt(), "max_tokens": ("INT32", "int_contents", [4])},
                           raw=[b"\x0c\x00\x00\x00And God said", b"\x04\x00\x00\x00"])
    assert details == "input 'text_input' has both raw_input_contents and typed contents; give one of them"
    assert kserve_infer(server, {"text_input": prompt(), "max_tokens": ("INT32", "int_contents", [4])}, version="2",
                        expect=grpc.StatusCode.NOT_FOUND) == \
        "model 'kraken-kjv-4way' has no version '2' (this server serves version 1)"


def test_kserve_statistics_count_refused_requests(server):
    pb2, pb2_grpc = kserve_stubs()
    stub = pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))

    def failures():
        stats = stub.ModelStatistics(pb2.ModelStatisticsRequest(name="kraken-kjv-4way"), timeout=10)
        return stats.model_stats[0].inference_stats.fail.count
    before = failures()
    kserve_infer(server, {"text_input": prompt(), "sampling_parameters": sampling('{"temperature": "hot"}')})
    kserve_infer(server, {"text_input": prompt()}, version="7", expect=grpc.StatusCode.NOT_FOUND)
    assert failures() - before == 2


# ---- ports -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--port", "--http-port", "--metrics-port"])
def test_a_second_server_on_a_port_in_use_exits_non_zero_naming_it(server, flag):
    taken = {"--port": server.port, "--http-port": server.http_port, "--metrics-port": server.metrics_port}[flag]
    ports = {f: str(free_port()) for f in ("--port", "--http-port", "--metrics-port")}
    ports[flag] = str(taken)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_")}
    out = subprocess.run([SERVER_BIN, "--model", DEFAULT_MODEL, "--devices", "cpu:1", "--host", "127.0.0.1",
                          *[x for kv in ports.items() for x in kv]], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{taken}" in out.stderr and flag in out.stderr, out.stderr[-2000:]
    assert completes(server)  # the first server keeps every connection


# ---- SIGTERM in every state, and recovery that gives up ------------------------------------------

def wait_for_line(log_path, text, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(log_path) as f:
            if text in f.read():
                return True
        time.sleep(0.05)
    return False


def test_sigterm_while_waiting_for_nodes_ends_the_leader_at_once(tmp_path):
    log = tmp_path / "leader.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KRAKEN_", "LWS_"))}
    with open(log, "w") as out:
        proc = subprocess.Popen([SERVER_BIN, "--model", DEFAULT_MODEL, "--devices", "cpu:1", "--host", "127.0.0.1",
                                 "--port", str(free_port()), "--http-port", "-1", "--metrics-port", "-1", "--nodes", "2",
                                 "--cluster-port", str(port), "--start-timeout", "300", "--cluster-insecure"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        assert wait_for_line(log, "waiting for 1 follower(s)", 30), log.read_text()
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.time() - t0 < 2, "the leader outlived SIGTERM by 2 s while waiting for nodes"
        assert "before the server began serving: exiting" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def group(cluster_port, *args):
    """A leader (one CPU worker) and its follower (one CPU worker), serving."""
    from cluster_certs import tls_args
    from test_multinode import Follower
    follower = Follower(cluster_port, devices="cpu:1")
    leader = Server("--nodes", "2", "--cluster-port", str(cluster_port), "--node-address", "127.0.0.1", *tls_args(),
                    *args, devices="cpu:1")
    return leader, follower


def test_sigterm_while_the_workers_restart_ends_within_the_grace_period():
    from grpc_health.v1 import health_pb2
    from test_multinode import health_status, wait_for
    port = free_port()
    leader, follower = group(port, "--grace-period", "1", "--start-timeout", "300")
    try:
        follower.signal_tree(signal.SIGKILL)  # the restart now waits up to 300 s for the node
        assert wait_for(lambda: health_status(leader.target) == health_pb2.HealthCheckResponse.NOT_SERVING, 10)
        time.sleep(0.5)
        t0 = time.time()
        leader.proc.send_signal(signal.SIGTERM)
        assert leader.proc.wait(timeout=30) == 0
        # The grace period, then the restart is abandoned at once; servers flush (2 s), workers exit.
        assert time.time() - t0 < 1 + 7, time.time() - t0
    finally:
        leader.close()
        follower.close()


def test_recovery_gives_up_after_max_restarts_failed_starts_whatever_the_window():
    # Each restart waits --start-timeout (1 s) for a node that never returns; --restart-window (2 s)
    # never holds more than two of them, so only the count of failed starts in a row can end it.
    port = free_port()
    leader, follower = group(port, "--start-timeout", "1", "--restart-window", "2", "--max-restarts", "2")
    try:
        t0 = time.time()
        follower.signal_tree(signal.SIGKILL)
        assert leader.proc.wait(timeout=30) == 1
        assert time.time() - t0 < 10, time.time() - t0
        assert "giving up: 3 restarts in a row failed to start (more than 2)" in leader.read_log(), leader.read_log()
    finally:
        leader.close()
        follower.close()


# ---- the cluster port ---------------------------------------------------------------------------------

def start_leader(tmp_path, *args):
    """A leader (--nodes 2, one CPU worker) waiting for its follower; (process, cluster port, log path)."""
    port = free_port()
    log = tmp_path / f"leader-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KRAKEN_", "LWS_"))}
    with open(log, "w") as out:
        proc = subprocess.Popen([SERVER_BIN, "--model", DEFAULT_MODEL, "--devices", "cpu:1", "--host", "127.0.0.1",
                                 "--port", str(free_port()), "--http-port", "-1", "--metrics-port", "-1", "--nodes", "2",
                                 "--cluster-port", str(port), "--node-address", "127.0.0.1", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    assert wait_for_line(log, "waiting for 1 follower(s)", 30), log.read_text()
    return proc, port, log


def threads_of(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Threads:")))


def test_a_second_leader_on_a_cluster_port_in_use_exits_non_zero_naming_it(tmp_path):
    from cluster_certs import tls_args
    leader, port, log = start_leader(tmp_path, *tls_args())
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KRAKEN_", "LWS_"))}
        r = subprocess.run([SERVER_BIN, "--model", DEFAULT_MODEL, "--devices", "cpu:1", "--host", "127.0.0.1",
                            "--port", str(free_port()), "--http-port", "-1", "--metrics-port", "-1", "--nodes", "2",
                            "--cluster-port", str(port), *tls_args()], capture_output=True, text=True, timeout=60,
                           env=env)
        assert r.returncode == 1, r.stderr[-2000:]
        assert f"cannot listen on 127.0.0.1:{port} for the cluster (--cluster-port)" in r.stderr, r.stderr[-2000:]
        assert leader.poll() is None  # the first leader keeps waiting for its follower
    finally:
        leader.kill()
        leader.wait()


def test_a_group_without_cluster_tls_is_refused_unless_told_insecure(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KRAKEN_", "LWS_"))}
    base = [SERVER_BIN, "--model", DEFAULT_MODEL, "--devices", "cpu:1", "--port", str(free_port()), "--http-port", "-1",
            "--metrics-port", "-1", "--cluster-port", str(free_port())]
    for role in (["--nodes", "2"], ["--join", "127.0.0.1"]):
        r = subprocess.run(base + role, capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "needs mutual TLS on its cluster port: give --cluster-cert, --cluster-key and --cluster-ca" in r.stderr
    r = subprocess.run(base + ["--nodes", "2", "--cluster-cert", "x.pem"], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 2 and "needs all of --cluster-cert, --cluster-key and --cluster-ca" in r.stderr


def test_a_node_without_the_groups_certificate_learns_nothing_and_cannot_take_a_place(tmp_path):
    from cluster_certs import certs_dir, tls_args
    from grpc_health.v1 import health_pb2
    from test_multinode import Follower, health_status, wait_for
    leader, port, log = start_leader(tmp_path, *tls_args())
    try:
        # A plaintext client: the TLS handshake fails before any byte of the service is spoken.
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        join = ch.stream_stream("/kraken.cluster.v1.Cluster/Join", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            list(join(iter([b"\x0a\x00"]), timeout=5))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # A TLS client that trusts the group's CA but has no certificate of its own: refused in the handshake.
        d = certs_dir()
        with open(f"{d}/ca.pem", "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        join = grpc.secure_channel(f"127.0.0.1:{port}", creds).stream_stream(
            "/kraken.cluster.v1.Cluster/Join", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            list(join(iter([b"\x0a\x00"]), timeout=5))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # A node with a certificate from another CA, and a valid Hello: never joins, learns nothing.
        stranger = Follower(port, "--start-timeout", "3", devices="cpu:1", tls="stranger")
        try:
            assert stranger.wait(20) == 1
            said = stranger.read_log()
            assert "could not join the leader" in said
            for secret in ("protocol", "config.json#", DEFAULT_MODEL, "Limits=", "node 1 at"):
                assert secret not in said.split("could not join")[1], said
        finally:
            stranger.close()
        assert "joined" not in log.read_text()
        # The group's own node joins, and the group serves.
        member = Follower(port, devices="cpu:1")
        try:
            assert wait_for_line(log, "serving kraken-kjv-4way", 60), log.read_text()
            target = next(line for line in log.read_text().splitlines() if "serving kraken-kjv-4way" in line)
            target = target.rsplit(" on ", 1)[1].strip()
            # Its place, once it is killed, cannot be taken by the stranger either.
            member.signal_tree(signal.SIGKILL)
            assert wait_for(lambda: health_status(target) == health_pb2.HealthCheckResponse.NOT_SERVING, 10)
            stranger = Follower(port, "--start-timeout", "3", devices="cpu:1", tls="stranger")
            try:
                assert stranger.wait(20) == 1
            finally:
                stranger.close()
            assert health_status(target) == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            member.close()
    finally:
        leader.kill()
        leader.wait()


def test_a_thousand_join_streams_without_hello_hold_a_bounded_number_of_threads(tmp_path):
    import asyncio
    leader, port, log = start_leader(tmp_path, "--cluster-insecure")
    try:
        before = threads_of(leader.pid)
        peak = [before]

        async def storm():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                join = ch.stream_stream("/kraken.cluster.v1.Cluster/Join", request_serializer=None,
                                        response_deserializer=None)
                calls = [join(timeout=30) for _ in range(1000)]  # each opens a stream and sends nothing
                codes = {}
                t0 = time.time()
                while time.time() - t0 < 8:
                    peak[0] = max(peak[0], threads_of(leader.pid))
                    await asyncio.sleep(0.1)
                for c in calls:
                    try:
                        await c.read()
                        code = "message"
                    except grpc.aio.AioRpcError as e:
                        code = e.code().name
                    codes[code] = codes.get(code, 0) + 1
                    c.cancel()
                return codes
        codes = asyncio.run(storm())
        # 16 may wait for their Hello (then are cancelled after 5 s); gRPC refuses the rest at once.
        assert peak[0] - before < 40, (before, peak[0])
        assert codes.get("RESOURCE_EXHAUSTED", 0) >= 900, codes
        assert set(codes) <= {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "CANCELLED"}, codes
        print(f"1000 Hello-less Join streams: leader threads {before} -> peak {peak[0]}; outcomes {codes}")
        assert leader.poll() is None
    finally:
        leader.kill()
        leader.wait()


# ---- a starved host -----------------------------------------------------------------------------------

class CpuQuota:
    """A cgroup that lets its processes run `quota_ms` of each `period_ms` (cgroup v1 cpu or v2 cpu.max), as
    a container's CPU limit throttles it; `add(pid)` moves a process (and the threads and children it
    starts later) into it."""

    def __init__(self, quota_ms, period_ms):
        name = f"kraken-test-{os.getpid()}-{time.monotonic_ns()}"
        self.path = None
        if os.path.isdir("/sys/fs/cgroup/cpu") and os.access("/sys/fs/cgroup/cpu", os.W_OK):
            path = f"/sys/fs/cgroup/cpu/{name}"
            os.mkdir(path)
            self._write(path, "cpu.cfs_period_us", period_ms * 1000)
            self._write(path, "cpu.cfs_quota_us", quota_ms * 1000)
            self.path = path
        elif os.path.exists("/sys/fs/cgroup/cgroup.controllers") and os.access("/sys/fs/cgroup", os.W_OK):
            path = f"/sys/fs/cgroup/{name}"
            os.mkdir(path)
            self._write(path, "cpu.max", f"{quota_ms * 1000} {period_ms * 1000}")
            self.path = path

    @staticmethod
    def _write(path, name, value):
        with open(os.path.join(path, name), "w") as f:
            f.write(str(value))

    def add(self, pid):
        self._write(self.path, "cgroup.procs", pid)

    def close(self):
        """Moves what is left to the parent group and removes this one (processes that are exiting may
        hold it for a moment)."""
        if self.path is None:
            return
        parent = os.path.dirname(self.path)
        deadline = time.time() + 10
        while True:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                for pid in f.read().split():
                    try:
                        self._write(parent, "cgroup.procs", pid)
                    except OSError:
                        pass
            try:
                os.rmdir(self.path)
                return
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)


def test_a_server_throttled_to_a_sliver_of_a_core_serves_without_restarts_and_still_catches_a_stopped_worker():
    """The container case: a CPU quota of 100 ms per 1 s period leaves the whole server (front-end and
    workers) frozen 0.9 s of every second once its quota is spent, longer than the heartbeat timeout
    (0.5 s here). Its heartbeat threads are runnable all that time, or asleep after a stamp taken just
    before a freeze the supervisor sat through too, so none is hung: steady traffic for a minute must see
    no restart and no failed request. A SIGSTOPped worker is still caught within the
    timeout plus one period."""
    from grpc_health.v1 import health_pb2
    from test_multinode import health_status, wait_for
    try:
        quota = CpuQuota(quota_ms=100, period_ms=1000)
    except OSError as e:
        pytest.skip(f"no writable cgroup CPU controller here: {e}")
    if quota.path is None:
        pytest.skip("no writable cgroup CPU controller here")
    s = Server("--heartbeat-timeout", "0.5", devices="cpu:2")
    try:
        workers = s.worker_pids()
        for pid in [s.proc.pid, *workers]:
            quota.add(pid)
        outcomes = steady_traffic(s.stub, float(os.environ.get("KRAKEN_STARVATION_SECONDS", "60")))
        log = s.read_log()
        failed = {k: v for k, v in outcomes.items() if k != "ok"}
        assert not failed and outcomes["ok"] > 0, (outcomes, log[-3000:])
        assert "stopped responding" not in log and "restarting the workers" not in log, log[-3000:]
        assert s.worker_pids() == workers
        print(f"throttled to 100 ms per 1 s: {outcomes['ok']} requests, none failed, no restart")
        # A real hang in the same setup.
        t0 = time.time()
        os.kill(workers[1], signal.SIGSTOP)
        assert wait_for(lambda: health_status(s.target) == health_pb2.HealthCheckResponse.NOT_SERVING, 10)
        caught = time.time() - t0
        assert caught < 0.5 + 1.0 + 1.0, caught  # timeout + one period + the checks' own throttling
        assert f"worker rank 1 (pid {workers[1]}) stopped responding" in s.read_log()
        assert "now stopped" in s.read_log()
        print(f"a stopped worker was caught in {caught:.2f} s")
    finally:
        s.close()
        quota.close()
