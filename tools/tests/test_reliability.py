"""kraken-server over time and against bad configuration and bad bytes: every timer in both
directions (a gap of inactivity longer than the timer never fires it; a real death or hang does,
within its bound), a server left idle that notices a worker dying and replaces it before the next
request, configuration precedence (command line > KRAKEN_* > --config file > defaults) with
unknown names refused, and request bodies that are not valid messages or are too large refused
precisely and counted. Short timer values come through the server's flags."""
import os
import re
import signal
import subprocess
import threading
import time

import grpc
import pytest

from kraken_client import pb
from serving import DEFAULT_MODEL, SERVER_BIN, Server, request

# Heartbeat, stall and collective timers well below the idle gaps the tests leave.
SHORT_TIMERS = ("--heartbeat-timeout", "0.5", "--stall-timeout", "0.5", "--collective-timeout", "0.5")


def metric(text, name, labels=""):
    """The value of one sample of the scrape `text`, e.g. metric(t, "kraken_worker_up", 'rank="0"')."""
    pattern = r"^" + re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)$"
    m = re.search(pattern, text, re.MULTILINE)
    assert m, f"{name}{{{labels}}} is not in the scrape"
    return float(m.group(1))


def gone(pid):
    """True once `pid` has exited and been reaped (no /proc entry, not even a zombie)."""
    return not os.path.exists(f"/proc/{pid}")


def health_watch(target):
    """Streams the overall health status (grpc.health.v1 Watch); returns (list of (t, status), call)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    seen = []

    def run():
        try:
            for r in call:
                seen.append((time.time(), r.status))
        except grpc.RpcError:
            pass
    threading.Thread(target=run, daemon=True).start()
    return seen, call


def test_idle_server_survives_every_timer_and_replaces_a_worker_that_dies_while_idle():
    from grpc_health.v1 import health_pb2
    s = Server(*SHORT_TIMERS, devices="cpu:2")
    try:
        assert len(s.stub.Complete(request(text="And God said,", max_tokens=8)).token_ids) == 8
        # Idle for four times every timer: nothing may fire, and the next request succeeds (the
        # stall timer once measured this gap and failed it as a hung step).
        time.sleep(2.0)
        r = s.stub.Complete(request(text="And God said,", max_tokens=8), timeout=30)
        assert len(r.token_ids) == 8
        assert metric(s.scrape(), "kraken_worker_restarts_total") == 0
        # A worker killed while idle: noticed within 2 s, reaped, restarted; health goes
        # NOT_SERVING and back, worker_up drops to 0 and returns to 1; the next request succeeds.
        seen, watch = health_watch(s.target)
        time.sleep(0.3)
        pids = s.worker_pids()
        ups = []
        stop = threading.Event()

        def scrape_ups():
            while not stop.is_set():
                t = s.scrape()
                ups.append(min(metric(t, "kraken_worker_up", f'rank="{r}"') for r in range(2)))
                time.sleep(0.01)
        scraper = threading.Thread(target=scrape_ups)
        scraper.start()
        time.sleep(0.1)
        t_kill = time.time()
        os.kill(pids[1], signal.SIGKILL)
        while metric(s.scrape(), "kraken_worker_restarts_total") < 1 and time.time() - t_kill < 10:
            time.sleep(0.02)
        restarted_after = time.time() - t_kill
        time.sleep(0.2)
        stop.set()
        scraper.join()
        watch.cancel()
        assert restarted_after < 2.0, f"restart seen {restarted_after:.2f} s after the kill"
        assert gone(pids[1]), "the killed worker was not reaped"
        new = s.worker_pids()
        assert len(new) == 2 and not set(new) & set(pids)
        statuses = [st for _, st in seen]
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert statuses[0] == serving and not_serving in statuses and statuses[-1] == serving, statuses
        t_down = next(t for t, st in seen if st == not_serving)
        assert t_down - t_kill < 2.0, f"NOT_SERVING {t_down - t_kill:.2f} s after the kill"
        assert 0 in ups and ups[-1] == 1, ups
        assert len(s.stub.Complete(request(text="And God said,", max_tokens=8), timeout=30).token_ids) == 8
        # A worker stopped (alive but silent) while idle: caught by the heartbeat the same way.
        pids = s.worker_pids()
        t_stop = time.time()
        os.kill(pids[0], signal.SIGSTOP)
        while metric(s.scrape(), "kraken_worker_restarts_total") < 2 and time.time() - t_stop < 10:
            time.sleep(0.02)
        assert time.time() - t_stop < 2.0 + 0.5
        deadline = time.time() + 5
        while not gone(pids[0]) and time.time() < deadline:
            time.sleep(0.02)
        assert gone(pids[0]), "the stopped worker was not killed and reaped"
        assert len(s.stub.Complete(request(text="And God said,", max_tokens=8), timeout=30).token_ids) == 8
        assert "stopped responding: no heartbeat" in s.read_log()
    finally:
        s.close()


def test_a_server_whose_workers_keep_dying_while_idle_exits_non_zero():
    s = Server(*SHORT_TIMERS, "--max-restarts", "0", devices="cpu:1")
    try:
        t0 = time.time()
        os.kill(s.worker_pids()[0], signal.SIGKILL)
        assert s.proc.wait(timeout=10) == 1
        assert time.time() - t0 < 3
        assert "could not be restarted" in s.read_log()
    finally:
        s.close()


def test_drain_grace_period_in_both_directions():
    # A grace period longer than the work: every stream completes and the server exits 0 (also
    # test_server.py); shorter than the work: the rest end UNAVAILABLE at its end, exit 0 in time.
    s = Server("--grace-period", "0.2", "--max-batch-seqs", "1", devices="cpu:1")
    try:
        # The first is short and running when the signal comes; 15 long ones wait behind it: 3600
        # tokens one sequence at a time take over 0.7 s even at 5000 tokens/s.
        # The short one is running before the others are sent (calls started together may reach the
        # server in any order).
        calls = [s.stub.Generate(request(ids=[1, 2, 3], max_tokens=20, ignore_eos=True, seed=0), timeout=60)]
        next(calls[0])
        calls += [s.stub.Generate(request(ids=[1, 2, 3], max_tokens=240, ignore_eos=True, seed=i), timeout=60)
                  for i in range(1, 16)]
        t0 = time.time()
        s.proc.send_signal(signal.SIGTERM)
        outcomes = []
        for c in calls:
            try:
                msgs = list(c)
                outcomes.append("ok" if msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH else "?")
            except grpc.RpcError as e:
                outcomes.append(e.code())
                assert e.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.details(), e.details()
        assert s.proc.wait(timeout=30) == 0
        elapsed = time.time() - t0
        assert outcomes[0] == "ok", outcomes  # it was running: 20 tokens take well under 0.2 s
        assert grpc.StatusCode.UNAVAILABLE in outcomes, outcomes
        assert 0.2 <= elapsed < 0.2 + 5, elapsed
    finally:
        s.close()


def test_a_deadline_is_counted_from_arrival_and_idle_time_does_not_consume_it():
    s = Server(devices="cpu:1")
    try:
        time.sleep(1.5)  # idle longer than the deadline below
        r = s.stub.Complete(request(text="And God said,", max_tokens=4), timeout=1.0)
        assert len(r.token_ids) == 4
        with pytest.raises(grpc.RpcError) as e:
            list(s.stub.Generate(request(ids=[1, 2, 3], max_tokens=240, ignore_eos=True), timeout=0.05))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        s.close()


def print_resources(*args, env=None):
    """Runs kraken-server --print-resources; (exit code, JSON or None, stderr)."""
    import json
    base = {k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_")}
    r = subprocess.run([SERVER_BIN, "--model", DEFAULT_MODEL, "--print-resources", *args], capture_output=True,
                       text=True, env={**base, **(env or {})}, timeout=60)
    return r.returncode, json.loads(r.stdout) if r.returncode == 0 else None, r.stderr


def test_precedence_is_command_line_then_environment_then_file_then_default(tmp_path):
    cfg = tmp_path / "server.toml"
    cfg.write_text("port = 1111\nmetrics-port = 1112\ngrace-period = 7.0\n")
    conf = ("--config", str(cfg))
    # The same key in all three: the command line wins.
    code, out, err = print_resources(*conf, "--port", "3333", env={"KRAKEN_PORT": "2222"})
    assert code == 0, err
    assert out["grpc_port"] == 3333
    # Environment over file.
    code, out, err = print_resources(*conf, env={"KRAKEN_PORT": "2222", "KRAKEN_METRICS_PORT": "2223"})
    assert (out["grpc_port"], out["metrics_port"], out["grace_period_seconds"]) == (2222, 2223, 7.0), err
    # File over default; default where nobody says.
    code, out, err = print_resources(*conf)
    assert (out["grpc_port"], out["metrics_port"], out["grace_period_seconds"]) == (1111, 1112, 7.0), err
    code, out, err = print_resources()
    assert (out["grpc_port"], out["metrics_port"], out["grace_period_seconds"]) == (8001, 8002, 30.0), err
    # kraken-cli's own variable is left alone (a shell may set it for both programs).
    code, out, err = print_resources(env={"KRAKEN_TARGET": "localhost:9"})
    assert code == 0 and out["grpc_port"] == 8001, err
    # The config file itself may come from the environment, and --config wins over it.
    code, out, err = print_resources(env={"KRAKEN_CONFIG": str(cfg)})
    assert out["grpc_port"] == 1111, err
    other = tmp_path / "other.toml"
    other.write_text("port = 4444\n")
    code, out, err = print_resources("--config", str(other), env={"KRAKEN_CONFIG": str(cfg)})
    assert code == 0, err
    assert (out["grpc_port"], out["grace_period_seconds"]) == (4444, 30.0), err


def test_a_running_server_takes_the_environment_over_its_config_file(tmp_path):
    cfg = tmp_path / "server.toml"
    cfg.write_text("max-waiting = 7\nmax-batch-seqs = 3\n")
    s = Server("--config", str(cfg), devices="cpu:1", env={"KRAKEN_MAX_WAITING": "11"})
    try:
        info = s.stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (info.max_waiting_requests, info.max_batch_sequences) == (11, 3)
    finally:
        s.close()


@pytest.mark.parametrize("setting,message", [
    ({"file": "max-wating = 5\n"},
     "key 'max-wating' is not a kraken-server setting (did you mean 'max-waiting'?)"),
    ({"env": {"KRAKEN_MAX_WATING": "5"}},
     "environment variable KRAKEN_MAX_WATING is not a kraken-server setting (did you mean KRAKEN_MAX_WAITING?)"),
    ({"env": {"KRAKEN_PORT": "tcp://10.0.0.1:8001"}},
     "--port: Value tcp://10.0.0.1:8001 not in range 0 to 65535 (the value came from the environment variable "
     "KRAKEN_PORT)"),
    ({"args": ("--heartbeat-timeout", "0")}, "--heartbeat-timeout: Value 0 not in range"),
    ({"file": "[server]\nport = 1\n"}, "key 'server.port' is not a kraken-server setting"),
], ids=["misspelt-key", "misspelt-variable", "service-link-variable", "timer-out-of-range", "section"])
def test_unknown_or_bad_settings_are_refused_by_name(tmp_path, setting, message):
    args = list(setting.get("args", ()))
    if "file" in setting:
        cfg = tmp_path / "server.toml"
        cfg.write_text(setting["file"])
        args += ["--config", str(cfg)]
    code, out, err = print_resources(*args, env=setting.get("env"))
    assert code == 2, (out, err)
    assert message in err, err
    assert "Traceback" not in err and "terminate called" not in err


def test_every_timer_flag_is_documented():
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_")}
    out = subprocess.run([SERVER_BIN, "--help"], capture_output=True, text=True, env=env).stdout
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "docs", "api.md")) as f:
        api = f.read()
    for flag in ("--heartbeat-timeout", "--stall-timeout", "--start-timeout", "--collective-timeout",
                 "--restart-window", "--max-restarts", "--grace-period", "--request-timeout", "--http-idle-timeout",
                 "--resume-timeout"):
        assert flag in out, flag
        assert f"`{flag}" in api, f"{flag} is not in docs/api.md"


@pytest.fixture(scope="module")
def server():
    s = Server("--max-message-bytes", "65536", devices="cpu:1")
    yield s
    s.close()


METHODS = ["Generate", "Complete", "Tokenize", "Detokenize", "GetModelInfo"]
MESSAGES = {"Generate": "GenerateRequest", "Complete": "GenerateRequest", "Tokenize": "TokenizeRequest",
            "Detokenize": "DetokenizeRequest", "GetModelInfo": "GetModelInfoRequest"}


def raw_call(target, method, body, timeout=10):
    ch = grpc.insecure_channel(target)
    path = f"/kraken.v1.Kraken/{method}"
    if method == "Generate":
        return list(ch.unary_stream(path)(body, timeout=timeout))
    return ch.unary_unary(path)(body, timeout=timeout)


@pytest.mark.parametrize("method", METHODS)
def test_a_body_that_is_not_a_message_is_invalid_argument_and_counted(server, method):
    before = metric(server.scrape(), "kraken_request_failure_total", 'reason="invalid_argument"')
    for body in (b"\xff\xff\xff\xff", b"\x0a\x05ab"):  # a bad tag; a string field cut short
        with pytest.raises(grpc.RpcError) as e:
            raw_call(server.target, method, body)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == (f"the request body ({len(body)} bytes) is not a valid "
                                     f"kraken.v1.{MESSAGES[method]} protobuf message")
    generation = method in ("Generate", "Complete")
    time.sleep(0.1)
    after = metric(server.scrape(), "kraken_request_failure_total", 'reason="invalid_argument"')
    assert after - before == (2 if generation else 0)  # generation requests are what the metric counts
    assert len(server.stub.Complete(request(text="a", max_tokens=2, ignore_eos=True)).token_ids) == 2


@pytest.mark.parametrize("size", [65537, 4 * 65536 - 64])
def test_an_oversized_generation_request_is_refused_by_size_and_counted(server, size):
    before = metric(server.scrape(), "kraken_request_failure_total", 'reason="resource_exhausted"')
    req = request(text="a" * size)
    n = req.ByteSize()
    with pytest.raises(grpc.RpcError) as e:
        server.stub.Complete(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.value.details() == f"the request message is {n} bytes; the limit (--max-message-bytes) is 65536"
    time.sleep(0.1)
    assert metric(server.scrape(), "kraken_request_failure_total", 'reason="resource_exhausted"') == before + 1
    assert len(server.stub.Complete(request(text="a", max_tokens=2, ignore_eos=True)).token_ids) == 2


def test_a_cpu_without_the_builds_instruction_set_gets_one_line_not_sigill():
    """qemu-user runs the real binaries as a baseline x86-64 CPU (qemu64: no SSE4.1, AVX, AVX2 or
    AVX-512), below what any build of this project is compiled for."""
    import shutil
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.fail("qemu-x86_64 is not installed: run scripts/setup.sh")
    env = {"PATH": os.environ["PATH"]}
    generate = os.path.join(os.path.dirname(os.path.dirname(SERVER_BIN)), "core", "kraken-generate")
    for binary in (SERVER_BIN, generate):
        r = subprocess.run([qemu, "-cpu", "qemu64", binary, "--help"], capture_output=True, text=True, env=env,
                           timeout=120)
        lines = [line for line in r.stderr.splitlines() if not line.startswith("qemu-x86_64: warning")]
        assert r.returncode == 1, (binary, r.returncode, r.stderr[-2000:])
        assert len(lines) == 1, lines
        name = os.path.basename(binary)
        assert lines[0].startswith(f"{name}: this binary was built for "), lines[0]
        assert "but this CPU lacks: " in lines[0] and " avx2" in lines[0], lines[0]
        assert r.stdout == "", "the program ran past the check"
