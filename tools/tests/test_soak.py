"""Soak: one real kraken-server (cpu:2, short supervision timers, a small waiting queue) under about
two minutes of mixed traffic: streaming Generate and unary Complete from a few client threads,
clients cancelling mid-stream, short deadlines, idle gaps longer than every timer, one worker
SIGKILLed and one SIGSTOPped at random points. Afterwards every request has a defined outcome, none
of them UNAVAILABLE (a request in flight at a worker failure pauses and resumes), the gauges are
back to zero, the front-end's memory did not grow, no child is left a zombie, the
restart counter equals the faults injected, and the server still serves.

Marked `soak` (tools/tests/conftest.py): it runs in the normal suite; `-m "not soak"` skips it.
SOAK_SEED=<n> repeats a run's random choices (the seed is printed); the timing stays the machine's.
Only 127.0.0.1 is contacted."""
import os
import random
import signal
import threading
import time
from collections import Counter

import grpc
import pytest

from kraken_client import pb
from serving import Server, request

pytestmark = pytest.mark.soak

SEED = int(os.environ.get("SOAK_SEED", random.SystemRandom().randrange(1 << 31)))
HEARTBEAT_S, STALL_S = 1.0, 2.0
SERVER_FLAGS = ["--heartbeat-timeout", str(HEARTBEAT_S), "--stall-timeout", str(STALL_S), "--restart-window", "600",
                "--max-restarts", "10", "--max-batch-seqs", "2", "--max-waiting", "2"]
CLIENTS = 6              # > max-batch-seqs + max-waiting: some calls are refused with RESOURCE_EXHAUSTED
MAX_PER_CLIENT = 1500    # requests per client thread, at most
CALL_TIMEOUT = 30        # every call's deadline unless a short one is drawn
WARMUP_S = 15
PHASES, PHASE_S = 5, 16  # traffic phases after the warm-up...
GAP_S = 3.0 + STALL_S    # ...separated by idle gaps longer than every timer
ALLOWED = {"CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
PROMPTS = ["And God said,", "In the beginning", "The LORD is my shepherd;", "Blessed are the",
           "And it came to pass", "Verily, verily, I say unto you,"]
FINISHED = (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


def metrics(server):
    """{sample name with labels: value} of /metrics."""
    out = {}
    for line in server.scrape().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def proc_stat(pid):
    """(state, ppid, start time) of a process, or None once it is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def zombie_children(ppid):
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None and st[0] == "Z" and st[1] == ppid:
                out.append(int(name))
    return out


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def healthy(server):
    """The API's health status is SERVING (it is NOT_SERVING while workers are recovered)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    if not hasattr(server, "health_channel"):
        server.health_channel = grpc.insecure_channel(server.target)
    try:
        r = health_pb2_grpc.HealthStub(server.health_channel).Check(
            health_pb2.HealthCheckRequest(service="kraken.v1.Kraken"), timeout=2)
        return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def poll(cond, timeout, step=0.1):
    """Polls cond() until it is truthy or timeout seconds pass; returns its last value."""
    t_end = time.time() + timeout
    while True:
        v = cond()
        if v or time.time() > t_end:
            return v
        time.sleep(step)


def finished_ok(msgs, max_tokens):
    """'OK' for a well-formed completion, else what is wrong with it."""
    if not msgs:
        return "OK without a message"
    last = msgs[-1]
    if any(m.finish_reason != pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1]):
        return "OK with a finish reason before the last message"
    if last.finish_reason not in FINISHED:
        return f"OK without a finish reason ({last.finish_reason})"
    n = sum(len(m.token_ids) for m in msgs)
    if n > max_tokens or last.usage.completion_tokens != n:
        return f"OK with {n} tokens, usage {last.usage.completion_tokens}, max_tokens {max_tokens}"
    return "OK"


class Traffic:
    """Client threads sending a random mix while `on`; every call is counted when sent and when it ends."""

    def __init__(self, server):
        self.server = server
        self.lock = threading.Lock()
        self.on = False
        self.stop = threading.Event()
        self.sent = 0
        self.inflight = 0
        self.outcomes = Counter()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def set(self, on):
        with self.lock:
            self.on = on

    def begin(self):
        """Counts one call as sent unless traffic is off (atomically, so none starts after `set(False)`)."""
        with self.lock:
            if not self.on:
                return False
            self.sent += 1
            self.inflight += 1
            return True

    def end(self, outcome):
        with self.lock:
            self.inflight -= 1
            self.outcomes[outcome] += 1

    def idle(self):
        with self.lock:
            return self.inflight == 0

    def client(self, i):
        rng = random.Random(f"{SEED}/{i}")
        t_end = time.time() + 600
        for _ in range(MAX_PER_CLIENT):
            while not self.begin():
                if self.stop.wait(0.05) or time.time() > t_end:
                    return
            outcome = "client error"
            try:
                outcome = self.one(rng)
            except Exception as e:  # recorded, and fails the test
                outcome = f"client error: {e!r}"
            finally:
                self.end(outcome)
            time.sleep(rng.uniform(0.2, 0.6) if outcome == "RESOURCE_EXHAUSTED" else rng.uniform(0, 0.05))

    def one(self, rng):
        mode = rng.choices(["plain", "cancel", "deadline"], [0.6, 0.2, 0.2])[0]
        timeout = rng.uniform(0.02, 0.5) if mode == "deadline" else CALL_TIMEOUT
        max_tokens = rng.choice([1, 4, 16, 48, 96, 160])
        kw = dict(max_tokens=max_tokens, seed=rng.randrange(1 << 31), temperature=rng.choice([0.0, 0.8]),
                  ignore_eos=rng.random() < 0.5)
        if rng.random() < 0.3:
            req = request(ids=[rng.randrange(1, 4096) for _ in range(rng.randint(1, 120))], **kw)
        else:
            req = request(text=rng.choice(PROMPTS), **kw)
        stub = self.server.stub
        try:
            if rng.random() < 0.6:
                call = stub.Generate(req, timeout=timeout)
                cancel_at = rng.randint(0, 6) if mode == "cancel" else -1
                msgs = []
                if cancel_at == 0:
                    call.cancel()
                for m in call:
                    msgs.append(m)
                    if len(msgs) == cancel_at:
                        call.cancel()
                return finished_ok(msgs, max_tokens)
            fut = stub.Complete.future(req, timeout=timeout)
            if mode == "cancel":
                time.sleep(rng.uniform(0, 0.3))
                if fut.cancel():
                    return "CANCELLED"
            return finished_ok([fut.result()], max_tokens)
        except grpc.RpcError as e:
            code = e.code().name
            return code if code in ALLOWED else f"{code}: {e.details()}"


def probe(server, traffic, seed):
    """A long stream, admitted and streaming (its first message received), counted like any call."""
    t_end = time.time() + 30
    while time.time() < t_end:
        with traffic.lock:
            traffic.sent += 1
            traffic.inflight += 1
        call = server.stub.Generate(request(ids=[1, 2, 3], max_tokens=240, ignore_eos=True, seed=seed),
                                    timeout=CALL_TIMEOUT)
        try:
            next(call)
            return call
        except grpc.RpcError as e:
            traffic.end(e.code().name if e.code().name in ALLOWED else f"{e.code().name}: {e.details()}")
            time.sleep(0.1)
    raise AssertionError("the probe stream was never admitted in 30 s")


STOPPED = []  # (pid, start time) of workers this test stopped: killed at the end if the server did not


def inject(server, traffic, sig, rng, during_traffic):
    """Stops or kills one worker; waits for the restart. Returns what happened."""
    pids = server.worker_pids()
    assert len(pids) == 2, pids
    restarts = metrics(server)["kraken_worker_restarts_total"]
    victim = rng.choice(pids)
    started = proc_stat(victim)[2]
    call = probe(server, traffic, rng.randrange(1 << 31)) if during_traffic else None
    t0 = time.time()
    if sig == signal.SIGSTOP:
        STOPPED.append((victim, started))
    os.kill(victim, sig)
    got = {"signal": signal.Signals(sig).name, "pid": victim, "during_traffic": during_traffic}
    if call is not None:
        try:
            for _ in call:
                pass
            outcome = "OK"
        except grpc.RpcError as e:
            outcome = e.code().name if e.code().name in ALLOWED else f"{e.code().name}: {e.details()}"
        traffic.end(outcome)
        got["probe"] = outcome
    # Noticed (dead, or no heartbeat), the group restarted, health SERVING again.
    assert poll(lambda: metrics(server)["kraken_worker_restarts_total"] == restarts + 1, 30), \
        (got, server.read_log()[-3000:])
    got["restart_s"] = round(time.time() - t0, 2)
    assert poll(lambda: healthy(server), 30), (got, server.read_log()[-3000:])
    # The old process is gone and reaped (a stopped one killed by the server, not left stopped or a zombie).
    gone = poll(lambda: (lambda st: st is None or st[2] != started)(proc_stat(victim)), 10)
    assert gone, (got, proc_stat(victim))
    new = server.worker_pids()
    assert len(new) == 2 and not set(new) & set(pids), (pids, new)
    return got


def test_soak(capsys):
    rng = random.Random(SEED)
    s = Server(*SERVER_FLAGS, devices="cpu:2")
    traffic = Traffic(s)
    report = {"seed": SEED}
    t_start = time.time()
    try:
        for t in traffic.threads:
            t.start()

        def quiesce():
            """Traffic off and every call ended; then the gauges settle (refreshed by the engine loop)."""
            traffic.set(False)
            assert poll(traffic.idle, CALL_TIMEOUT + 10), "calls still in flight long after their deadlines"

        # Warm-up: the same mix, no faults; the memory baseline is taken after it, idle.
        traffic.set(True)
        time.sleep(WARMUP_S)
        quiesce()
        assert poll(lambda: all(metrics(s)[g] == 0 for g in (
            "kraken_num_requests_running", "kraken_num_requests_waiting", "kraken_kv_cache_usage_ratio")), 10)
        rss_before = rss_kib(s.proc.pid)

        # The plan: the first fault in a traffic phase, the second in any other slot (phase or gap).
        slots = [("phase", i) for i in range(PHASES)] + [("gap", i) for i in range(PHASES - 1)]
        first = rng.choice(slots[:PHASES])
        second = rng.choice([x for x in slots if x != first])
        kinds = rng.sample([signal.SIGKILL, signal.SIGSTOP], 2)
        plan = {first: kinds[0], second: kinds[1]}
        report["plan"] = {f"{k[0]} {k[1] + 1}": signal.Signals(v).name for k, v in plan.items()}
        faults = []
        for i in range(PHASES):
            traffic.set(True)
            t_phase = time.time()
            if ("phase", i) in plan:
                time.sleep(rng.uniform(1, PHASE_S - 6))
                faults.append(inject(s, traffic, plan[("phase", i)], rng, during_traffic=True))
            time.sleep(max(0.0, PHASE_S - (time.time() - t_phase)))
            quiesce()
            if i == PHASES - 1:
                break
            # Idle gap, longer than every timer: no restart unless one is injected.
            restarts = metrics(s)["kraken_worker_restarts_total"]
            t_gap = time.time()
            if ("gap", i) in plan:
                time.sleep(rng.uniform(0.2, 1.5))
                faults.append(inject(s, traffic, plan[("gap", i)], rng, during_traffic=False))
            time.sleep(max(0.0, GAP_S - (time.time() - t_gap)))
            assert metrics(s)["kraken_worker_restarts_total"] == restarts + (("gap", i) in plan), \
                f"a restart while idle (gap {i + 1}): {s.read_log()[-3000:]}"
            assert healthy(s)

        traffic.stop.set()
        for t in traffic.threads:
            t.join(timeout=CALL_TIMEOUT + 10)
        assert not any(t.is_alive() for t in traffic.threads), "a client thread hung"
        m = poll(lambda: (lambda m: m if all(m[g] == 0 for g in (
            "kraken_num_requests_running", "kraken_num_requests_waiting", "kraken_kv_cache_usage_ratio")) else None)(
            metrics(s)), 10) or metrics(s)
        rss_after = rss_kib(s.proc.pid)
        zombies = zombie_children(s.proc.pid)
        final = s.stub.Complete(request(text="And God said,", max_tokens=8, ignore_eos=True, seed=1), timeout=30)

        outcomes = dict(sorted(traffic.outcomes.items()))
        report.update(outcomes=outcomes, sent=traffic.sent, faults=faults,
                      restarts=m["kraken_worker_restarts_total"],
                      rss_kib={"after_warmup": rss_before, "end": rss_after},
                      rss_growth=f"{(rss_after - rss_before) / rss_before:+.2%}", zombies=zombies,
                      seconds=round(time.time() - t_start, 1))
        with capsys.disabled():
            print(f"\nsoak: {report}", flush=True)

        # Every call ended in a defined outcome, and they add up to the calls sent.
        unexpected = {k: v for k, v in outcomes.items() if k != "OK" and k not in ALLOWED}
        assert not unexpected, (unexpected, s.read_log()[-3000:])
        assert sum(outcomes.values()) == traffic.sent
        # Each path was exercised: successes, client cancels, deadlines, a full queue, failed workers.
        for k in ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"):
            assert outcomes.get(k, 0) > 0, (k, outcomes)
        # The worker failures cost no request: the probe stream in flight at each completed.
        probes = [f["probe"] for f in faults if "probe" in f]
        assert probes and all(p == "OK" for p in probes), faults
        assert outcomes.get("UNAVAILABLE", 0) == 0, outcomes
        # Nothing held after the traffic; one restart per fault, none spurious; both workers up.
        assert (m["kraken_num_requests_running"], m["kraken_num_requests_waiting"],
                m["kraken_kv_cache_usage_ratio"]) == (0, 0, 0), m
        assert m["kraken_worker_restarts_total"] == len(faults) == 2, (faults, m)
        assert m['kraken_worker_up{rank="0"}'] == 1 and m['kraken_worker_up{rank="1"}'] == 1, m
        assert rss_after < rss_before * 1.05, report["rss_kib"]
        assert not zombies, zombies
        assert s.proc.poll() is None
        assert final.finish_reason == pb.FINISH_REASON_LENGTH and len(final.token_ids) == 8
        assert time.time() - t_start < 240, report
    finally:
        traffic.stop.set()
        s.close()
        # A stopped worker cannot notice its front-end is gone: if the test failed before the server
        # killed it, do it here (the same process only: pid and start time).
        for pid, started in STOPPED:
            st = proc_stat(pid)
            if st is not None and st[2] == started:
                os.kill(pid, signal.SIGKILL)
