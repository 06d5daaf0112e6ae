"""A worker group over two "nodes" on one machine: the leader (kraken-server --nodes 2) and a follower
(kraken-server --join), two process trees that share nothing but TCP, two CPU workers each (world
size 4). The group computes exactly what one node with four workers computes; 16 concurrent
streams through the leader equal their serial results; and each failure of a node is handled
within its bound: a follower killed is noticed within 2 s and a stopped one within its node timeout
(2 x --heartbeat-timeout, plus the freezes it reported lately) (health NOT_SERVING; the requests in
flight pause, and resume token for token when a node joins again, or fail at --resume-timeout) and the group re-forms when a follower joins again; a leader that
dies takes its follower down at once (non-zero exit); a follower started before its leader retries
with back-off and says why; a node the leader cannot use is refused by name."""
import concurrent.futures
import json
import os
import signal
import subprocess
import threading
import time

import grpc
import pytest

from kraken_client import pb
from cluster_certs import tls_args
from serving import DEFAULT_MODEL, ROOT, SERVER_BIN, Server, free_port, request, steady_traffic, stream

GPT2_MODEL = os.path.join(ROOT, "models", "gpt2-kjv")
# The default node liveness (--heartbeat-timeout 1 s; leader and follower give each other 2 s), which
# the bounds below hold the group to.
TIMERS = ("--heartbeat-timeout", "1")
PROMPTS = ["In the beginning God created", "And the LORD spake unto Moses, saying,", "Blessed are the"]


class Follower:
    """kraken-server --join on its own session: its own process tree, its own log."""

    def __init__(self, cluster_port, *args, model=DEFAULT_MODEL, devices="cpu:2", lws=False, tls="node"):
        """lws: find the leader as a LeaderWorkerSet worker pod does (LWS_LEADER_ADDRESS, LWS_WORKER_INDEX),
        not by --join. tls: the certificate it presents (cluster_certs.tls_args), or None for no flags."""
        self.log_path = f"/tmp/kraken-follower-test-{cluster_port}-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KRAKEN_", "LWS_"))}
        where = ["--join", f"127.0.0.1:{cluster_port}"]
        if lws:
            env.update(LWS_LEADER_ADDRESS="127.0.0.1", LWS_GROUP_SIZE="2", LWS_WORKER_INDEX="1")
            where = ["--cluster-port", str(cluster_port)]
        self.proc = subprocess.Popen(
            [SERVER_BIN, "--model", model, "--devices", devices, *where, "--node-address", "127.0.0.1",
             "--threads-per-worker", "1", *(tls_args(tls) if tls else []), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def read_log(self):
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def tree(self):
        """The follower and its workers."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [self.proc.pid] + [int(p) for p in out.stdout.split()]

    def signal_tree(self, sig):
        """Workers first, then the follower (which, woken, may end its workers at once)."""
        for pid in reversed(self.tree()):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout):
        return self.proc.wait(timeout=timeout)

    def close(self):
        for pid in self.tree() if self.proc.poll() is None else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.log.close()


def leader(cluster_port, *args, model=DEFAULT_MODEL, lws=False):
    """lws: the group size from LeaderWorkerSet's environment, not --nodes."""
    if lws:
        return Server("--cluster-port", str(cluster_port), "--node-address", "127.0.0.1", *TIMERS, *tls_args(), *args,
                      model=model, devices="cpu:2", env={"LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "0"})
    return Server("--nodes", "2", "--cluster-port", str(cluster_port), "--node-address", "127.0.0.1", *TIMERS,
                  *tls_args(), *args, model=model, devices="cpu:2")


def health_status(target):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    try:
        return health_pb2_grpc.HealthStub(grpc.insecure_channel(target)).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=1).status
    except grpc.RpcError:
        return None


def wait_for(predicate, timeout, step=0.02):
    """Seconds until predicate() held, or None after `timeout`."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return time.time() - t0
        time.sleep(step)
    return None


def gone(pid):
    return not os.path.exists(f"/proc/{pid}")


def greedy(stub, prompt, n=24):
    """(ids, [(logprob, [(alt id, alt logprob)...])...], prompt logprobs) of a greedy completion."""
    _, ids, msgs = stream(stub, request(text=prompt, max_tokens=n, temperature=0, top_logprobs=2,
                                        prompt_logprobs=True))
    lps = [(lp.logprob, [(t.token_id, t.logprob) for t in lp.top]) for m in msgs for lp in m.logprobs]
    prompt_lps = [(lp.token_id, lp.logprob) for m in msgs for lp in m.prompt_logprobs]
    assert len(ids) == n and len(lps) == n and prompt_lps
    return ids, lps, prompt_lps


@pytest.mark.parametrize("model", [DEFAULT_MODEL, GPT2_MODEL], ids=["kraken-4way", "gpt2"])
def test_two_nodes_compute_exactly_what_one_node_computes(model):
    # One node, four workers: the reference (the engine is batch-invariant: same shards, same sums).
    one = Server(model=model, devices="cpu:4")
    try:
        want = [greedy(one.stub, p) for p in PROMPTS]
    finally:
        one.close()
    cluster_port = free_port()
    # The follower starts first: it retries with back-off, saying why, until the leader listens.
    f = Follower(cluster_port, model=model)
    try:
        assert wait_for(lambda: "retrying in" in f.read_log(), 10) is not None, f.read_log()
        s = leader(cluster_port, model=model)
        try:
            info = s.stub.GetModelInfo(pb.GetModelInfoRequest())
            assert info.world_size == 4
            got = [greedy(s.stub, p) for p in PROMPTS]
            for p, g, w in zip(PROMPTS, got, want):
                assert g == w, f"{p!r}: two nodes {g[0]} vs one node {w[0]}"
            # 16 concurrent streams through the leader equal their serial results.
            reqs = [request(text=PROMPTS[i % 3], max_tokens=12 + i % 5, temperature=0.8, seed=100 + i)
                    for i in range(16)]
            serial = [stream(s.stub, r)[1] for r in reqs]
            with concurrent.futures.ThreadPoolExecutor(16) as ex:
                together = list(ex.map(lambda r: stream(s.stub, r)[1], reqs))
            assert together == serial
            log = f.read_log()
            assert "cannot join the leader at 127.0.0.1:" in log and "joined the leader" in log, log
            assert "as ranks 2..3 of 4" in log, log
        finally:
            s.close()
    finally:
        f.close()


def long_request(seed):
    return request(text="And it came to pass", max_tokens=200, temperature=1.0, seed=seed, ignore_eos=True)


@pytest.fixture
def group():
    """A leader and a follower that find each other through LeaderWorkerSet's environment."""
    cluster_port = free_port()
    f = Follower(cluster_port, lws=True)
    s = leader(cluster_port, lws=True)
    state = {"follower": f, "server": s, "port": cluster_port}
    yield state
    s.close()
    state["follower"].close()


def test_a_killed_follower_is_noticed_within_2_s_and_the_stream_in_flight_resumes_identically_when_it_returns(group):
    """docs/runtime.md "Requests across a failure": the stream in flight pauses while the node is gone
    and, once a node joins again and the group restarts, ends exactly as an undisturbed one."""
    from grpc_health.v1 import health_pb2
    s, f = group["server"], group["follower"]
    before = stream(s.stub, request(text=PROMPTS[0], max_tokens=8, temperature=0))[1]
    want = stream(s.stub, long_request(seed=1))
    call = s.stub.Generate(long_request(seed=1), timeout=120)
    first = next(call)
    tree = f.tree()
    t_kill = time.time()
    f.signal_tree(signal.SIGKILL)
    down = wait_for(lambda: health_status(s.target) == health_pb2.HealthCheckResponse.NOT_SERVING, 5)
    assert down is not None and time.time() - t_kill < 2.0, "NOT_SERVING later than 2 s after the kill"
    f.wait(5)
    assert all(wait_for(lambda: gone(p), 5) is not None for p in tree)
    # Nobody joins: the leader keeps waiting (NOT_SERVING), the stream paused.
    time.sleep(1.0)
    assert health_status(s.target) == health_pb2.HealthCheckResponse.NOT_SERVING
    # The node comes back: the group re-forms, the stream goes on, and it is the undisturbed one.
    t_back = time.time()
    group["follower"] = Follower(group["port"])
    rest = list(call)
    msgs = [first, *rest]
    assert "".join(m.text for m in msgs) == want[0]
    assert [t for m in msgs for t in m.token_ids] == want[1]
    assert msgs[-1].finish_reason == want[2][-1].finish_reason and msgs[-1].usage == want[2][-1].usage
    print(f"the stream resumed {time.time() - t_back:.2f} s after a follower was started again "
          f"({t_back - t_kill:.2f} s after the kill)")
    assert wait_for(lambda: health_status(s.target) == health_pb2.HealthCheckResponse.SERVING, 60) is not None
    assert stream(s.stub, request(text=PROMPTS[0], max_tokens=8, temperature=0))[1] == before
    log = s.read_log()
    assert "node 1 at ipv4:127.0.0.1:" in log and "disconnected" in log and "resumes:" in log, log[-3000:]


def test_requests_paused_for_a_follower_that_never_returns_fail_at_the_resume_timeout_naming_the_node():
    cluster_port = free_port()
    f = Follower(cluster_port)
    s = leader(cluster_port, "--resume-timeout", "3")
    try:
        call = s.stub.Generate(long_request(seed=2), timeout=120)
        next(call)
        t_kill = time.time()
        f.signal_tree(signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        waited = time.time() - t_kill
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert e.value.details().startswith("the workers did not come back within --resume-timeout 3 s after: "), \
            e.value.details()
        assert "node 1 at ipv4:127.0.0.1:" in e.value.details() and "disconnected" in e.value.details()
        assert 3.0 <= waited < 3.0 + 1.5, waited
        assert metric_value(s, "kraken_request_resume_failures_total", 'reason="timeout"') == 1
    finally:
        s.close()
        f.close()


def test_a_request_whose_deadline_falls_in_the_pause_fails_at_its_deadline_not_later():
    import urllib.error
    import urllib.request
    cluster_port = free_port()
    f = Follower(cluster_port)
    s = leader(cluster_port, "--resume-timeout", "30", "--request-timeout", "3")
    try:
        results = {}

        def grpc_call():
            t0 = time.time()
            try:
                list(s.stub.Generate(long_request(seed=3), timeout=120))
                results["grpc"] = ("OK", time.time() - t0)
            except grpc.RpcError as e:
                results["grpc"] = (e.code().name, time.time() - t0, e.details())

        def http_call():
            body = json.dumps({"model": "kraken-kjv-4way", "prompt": "And it came to pass", "max_tokens": 200,
                               "ignore_eos": True, "seed": 4}).encode()
            t0 = time.time()
            try:
                urllib.request.urlopen(urllib.request.Request(s.http_url + "/v1/completions", data=body, headers={
                    "Content-Type": "application/json"}), timeout=60)
                results["http"] = (200, time.time() - t0)
            except urllib.error.HTTPError as e:
                results["http"] = (e.code, time.time() - t0, e.read().decode())
        threads = [threading.Thread(target=grpc_call), threading.Thread(target=http_call)]
        for t in threads:
            t.start()
        assert wait_for(lambda: metric_value(s, "kraken_generation_tokens_total", "") >= 20, 10) is not None
        f.signal_tree(signal.SIGKILL)
        for t in threads:
            t.join(30)
        assert results["grpc"][0] == "DEADLINE_EXCEEDED" and results["grpc"][1] < 3.0 + 1.0, results
        assert "while the workers were being restarted" in results["grpc"][2], results
        assert results["http"][0] == 408 and results["http"][1] < 3.0 + 1.0, results
        assert metric_value(s, "kraken_request_resume_failures_total", 'reason="deadline"') == 2
    finally:
        s.close()
        f.close()


def metric_value(s, name, labels):
    from test_reliability import metric
    return metric(s.scrape(), name, labels)


def test_a_stopped_follower_is_noticed_within_its_node_timeout_and_leaves_when_it_wakes(group):
    from grpc_health.v1 import health_pb2
    s, f = group["server"], group["follower"]
    t_stop = time.time()
    f.signal_tree(signal.SIGSTOP)
    down = wait_for(lambda: health_status(s.target) == health_pb2.HealthCheckResponse.NOT_SERVING, 5)
    # The node timeout (2 x --heartbeat-timeout; this node never reported a freeze) plus the checks.
    assert down is not None and time.time() - t_stop < 2.0 + 0.5, "NOT_SERVING later than 2.5 s after the stop"
    assert "node 1 at ipv4:127.0.0.1:" in s.read_log() and "has been silent for" in s.read_log(), s.read_log()[-2000:]
    # Woken, it finds its place taken back (its workers' peers are gone): it exits non-zero.
    f.signal_tree(signal.SIGCONT)
    assert f.wait(10) == 1
    assert "exiting so the group is recreated" in f.read_log()
    group["follower"] = Follower(group["port"])
    assert wait_for(lambda: health_status(s.target) == health_pb2.HealthCheckResponse.SERVING, 60) is not None
    assert len(stream(s.stub, request(text=PROMPTS[1], max_tokens=6, temperature=0))[1]) == 6


def test_a_worker_killed_on_a_follower_is_named_and_only_the_workers_restart(group):
    from grpc_health.v1 import health_pb2
    s, f = group["server"], group["follower"]
    agent, first, second = f.tree()
    t_kill = time.time()
    os.kill(second, signal.SIGKILL)  # rank 3: the follower's second worker
    down = wait_for(lambda: health_status(s.target) == health_pb2.HealthCheckResponse.NOT_SERVING, 5)
    assert down is not None and time.time() - t_kill < 2.0, "NOT_SERVING later than 2 s after the kill"
    assert wait_for(lambda: health_status(s.target) == health_pb2.HealthCheckResponse.SERVING, 60) is not None
    log = s.read_log()
    assert f"worker rank 3 failed: worker rank 3 (pid {second}) was killed by signal 9" in log, log
    assert "(on node 1 at ipv4:127.0.0.1:" in log, log
    # The follower itself stayed; it started two new workers.
    assert f.proc.poll() is None and f.tree()[0] == agent and not set(f.tree()[1:]) & {first, second}
    assert len(stream(s.stub, request(text=PROMPTS[0], max_tokens=6, temperature=0))[1]) == 6


def test_a_leader_that_dies_takes_its_follower_down_at_once(group):
    s, f = group["server"], group["follower"]
    tree = f.tree()
    assert len(tree) == 3
    t_kill = time.time()
    s.proc.kill()
    assert f.wait(5) == 1
    assert time.time() - t_kill < 2.0, "the follower outlived its leader by more than 2 s"
    assert all(wait_for(lambda: gone(p), 2) is not None for p in tree), "a follower worker outlived the leader"
    assert "lost the leader at 127.0.0.1:" in f.read_log()


def test_a_leader_silent_longer_than_its_timeout_loses_its_follower(group):
    """Both directions of the follower's leader timeout (2 x --heartbeat-timeout = 2 s): an idle
    leader that still pings keeps it for 5 s; a frozen one loses it within the bound."""
    s, f = group["server"], group["follower"]
    time.sleep(5.0)
    assert f.proc.poll() is None
    assert len(stream(s.stub, request(text=PROMPTS[2], max_tokens=4, temperature=0))[1]) == 4
    t_stop = time.time()
    os.kill(s.proc.pid, signal.SIGSTOP)
    try:
        assert f.wait(5) == 1
        assert time.time() - t_stop < 2.0 + 1.0
        assert "the leader has been silent for" in f.read_log()
    finally:
        os.kill(s.proc.pid, signal.SIGCONT)


def test_a_node_the_leader_cannot_use_is_refused_by_name():
    cluster_port = free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("KRAKEN_", "LWS_"))}
    lead = subprocess.Popen([SERVER_BIN, "--model", DEFAULT_MODEL, "--devices", "cpu:2", "--nodes", "2",
                             "--cluster-port", str(cluster_port), "--port", str(free_port()), "--http-port", "-1",
                             "--metrics-port", "-1", "--start-timeout", "30", *tls_args()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=inherited)
    try:
        f = Follower(cluster_port, devices="cpu:1")
        try:
            assert f.wait(20) == 2
            assert "refused this node" in f.read_log()
            assert "has 1 workers; every node needs as many as the leader (2)" in f.read_log()
        finally:
            f.close()
        f = Follower(cluster_port, model=GPT2_MODEL)
        try:
            assert f.wait(20) == 2
            assert "loaded a different model" in f.read_log()
        finally:
            f.close()
        f = Follower(cluster_port, devices="cuda:0,1")  # refused before it starts anything
        try:
            assert f.wait(20) == 2
            assert "has a worker on cuda:0; the leader's are cpu devices" in f.read_log()
        finally:
            f.close()
        # Other CPU kernel numerics than the leader's (auto: an F32 level): a shard would compute
        # other bits on this node. Only where this CPU has a BF16-product level to ask for; the
        # rules themselves are unit-tested (tests/cluster/membership_test.cc) on every CPU.
        if "avx512_bf16" in open("/proc/cpuinfo").read().split():
            f = Follower(cluster_port, "--cpu-isa", "amx")
            try:
                assert f.wait(20) == 2
                log = f.read_log()
                assert "runs CPU kernels of numerics 'avx512bf16 on " in log or "runs CPU kernels of numerics 'amx on " in log, log
                assert "and the leader 'f32': BF16-weight products would differ between ranks" in log, log
            finally:
                f.close()
    finally:
        lead.kill()
        lead.wait()


def test_a_world_the_model_cannot_split_is_refused_before_waiting_for_nodes():
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("KRAKEN_", "LWS_"))}
    r = subprocess.run([SERVER_BIN, "--model", DEFAULT_MODEL, "--devices", "cpu:3", "--nodes", "2", "--cluster-port",
                        str(free_port()), "--port", str(free_port()), "--http-port", "-1", "--metrics-port", "-1"],
                       capture_output=True, text=True, env=inherited, timeout=30)
    assert r.returncode == 2
    assert "Kraken degree N = 4 is not a multiple of the world size 6" in r.stderr and "2 nodes x 3 workers" in r.stderr


def test_a_follower_without_a_leader_gives_up_after_its_start_timeout_saying_why():
    f = Follower(free_port(), "--start-timeout", "2")
    try:
        t0 = time.time()
        assert f.wait(10) == 1
        assert 1.5 < time.time() - t0 < 8
        log = f.read_log()
        assert log.count("retrying in") >= 2 and "could not join the leader" in log, log
    finally:
        f.close()


def test_throttled_nodes_serve_without_restarts_and_their_hangs_are_still_caught():
    """The container case across nodes: the leader's pod and the follower's pod (each with its workers)
    get 100 ms of CPU per 1 s period each, so once a quota is spent that node is frozen 0.9 s at a time,
    longer than the heartbeat timeout (0.75 s here), and its messages to the other node stop for as long. Its workers it judges itself, by its
    own host's scheduler. Neither node can read the other's scheduler: each gives the other the node
    timeout (2 x --heartbeat-timeout) plus the longest freeze the other reported lately (each message
    says how long its sender was kept from a CPU) plus its own freezes. Steady traffic must see no restart and no failed request. A stopped worker on that node is still caught by the
    node within its heartbeat timeout plus a period, and a stopped follower by the leader within the
    node timeout plus the freezes it reported (at most 10 x the heartbeat timeout)."""
    from grpc_health.v1 import health_pb2
    from test_hardening import CpuQuota
    try:
        quota, leader_quota = CpuQuota(quota_ms=100, period_ms=1000), CpuQuota(quota_ms=100, period_ms=1000)
    except OSError as e:
        pytest.skip(f"no writable cgroup CPU controller here: {e}")
    if quota.path is None:
        pytest.skip("no writable cgroup CPU controller here")
    cluster_port = free_port()
    f = Follower(cluster_port)
    s = leader(cluster_port, "--heartbeat-timeout", "0.75")
    try:
        for pid in f.tree():
            quota.add(pid)
        for pid in [s.proc.pid, *s.worker_pids()]:
            leader_quota.add(pid)
        outcomes = steady_traffic(s.stub, float(os.environ.get("KRAKEN_STARVATION_SECONDS", "60")))
        log, flog = s.read_log(), f.read_log()
        failed = {k: v for k, v in outcomes.items() if k != "ok"}
        assert not failed and outcomes["ok"] > 0, (outcomes, log[-3000:], flog[-3000:])
        for bad in ("stopped responding", "restarting the workers", "silent for", "disconnected"):
            assert bad not in log, log[-3000:]
        assert "lost the leader" not in flog, flog[-3000:]
        print(f"both nodes throttled to 100 ms per 1 s: {outcomes['ok']} requests, none failed, no restart")
        # A real hang of one of the node's workers, caught by the node itself.
        agent, first, second = f.tree()
        t0 = time.time()
        os.kill(second, signal.SIGSTOP)
        assert wait_for(lambda: health_status(s.target) == health_pb2.HealthCheckResponse.NOT_SERVING, 10)
        caught = time.time() - t0
        assert caught < 0.75 + 1.0 + 1.0, caught  # timeout + one period + the report's own throttling
        assert f"worker rank 3 (pid {second}) stopped responding" in s.read_log(), s.read_log()[-3000:]
        print(f"a stopped worker on the throttled node was caught in {caught:.2f} s")
        assert wait_for(lambda: health_status(s.target) == health_pb2.HealthCheckResponse.SERVING, 60) is not None
        # A stopped follower, caught by the leader.
        t0 = time.time()
        os.kill(agent, signal.SIGSTOP)
        assert wait_for(lambda: health_status(s.target) == health_pb2.HealthCheckResponse.NOT_SERVING, 15)
        caught = time.time() - t0
        assert caught < 10 * 0.75 + 0.5, caught  # the ceiling: 10 x the heartbeat timeout
        assert "node 1 at ipv4:127.0.0.1:" in s.read_log() and "silent for" in s.read_log(), s.read_log()[-3000:]
        print(f"a stopped follower agent was caught in {caught:.2f} s")
        os.kill(agent, signal.SIGCONT)
        assert f.wait(10) == 1
    finally:
        s.close()
        f.close()
        quota.close()
        leader_quota.close()
