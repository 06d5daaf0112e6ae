"""Starts and stops a real kraken-server for the serving tests."""
import os
import signal
import socket
import subprocess
import time

import grpc

from kraken_client import connect, pb

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("KRAKEN_BUILD_DIR", os.path.join(ROOT, "build"))
SERVER_BIN = os.path.join(BUILD, "server", "kraken-server")
DEFAULT_MODEL = os.path.join(ROOT, "models", "kraken-kjv-4way")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """kraken-server on a free loopback port; `stub` talks to it."""

    def __init__(self, *args, model=DEFAULT_MODEL, devices="cpu:2", env=None, api_key=None, health_creds=None,
                 binary=SERVER_BIN):
        """health_creds: (root CA, client key, client cert) PEM bytes when the server requires mutual TLS;
        binary: the kraken-server to run (another build, for a before/after benchmark)."""
        self.health_creds = health_creds
        if not os.path.exists(binary):
            raise RuntimeError(f"{binary} is missing: build first (scripts/build.sh) or set KRAKEN_BUILD_DIR")
        self.port = free_port()
        self.metrics_port = free_port()
        self.http_port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        cmd = [binary, "--model", model, "--devices", devices, "--host", "127.0.0.1", "--port", str(self.port),
               "--metrics-port", str(self.metrics_port), "--http-port", str(self.http_port), "--threads-per-worker", "1",
               *args]
        self.log_path = f"/tmp/kraken-server-test-{self.port}.log"
        self.log = open(self.log_path, "w")
        # The server refuses KRAKEN_* variables that name no flag (the harness's own, such as
        # KRAKEN_BUILD_DIR, among them): it sees only those a test gives it.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_")}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**inherited, **(env or {})})
        self.stub = connect(self.target, api_key=api_key)
        self._wait_ready()

    def _wait_ready(self, timeout=120):
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        if self.health_creds:
            ca, key, cert = self.health_creds
            channel = grpc.secure_channel(self.target, grpc.ssl_channel_credentials(ca, key, cert))
        else:
            channel = grpc.insecure_channel(self.target)
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kraken-server exited with {self.proc.returncode}: {self.read_log()}")
            try:
                r = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"kraken-server not ready after {timeout} s: {self.read_log()}")

    def openai(self, api_key="none", **kw):
        """An `openai.OpenAI` client of the server's OpenAI-compatible API (no retries: a test sees every error)."""
        import openai
        return openai.OpenAI(base_url=self.http_url + "/v1", api_key=api_key, max_retries=0, **kw)

    def read_log(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def scrape(self) -> str:
        """The text of /metrics."""
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def worker_pids(self):
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def terminate(self, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self.log.closed:
            self.log.close()


def request(**kw):
    """A GenerateRequest; `text` or `ids` for the prompt."""
    ids = kw.pop("ids", None)
    req = pb.GenerateRequest(**kw)
    if ids is not None:
        req.token_ids.ids.extend(ids)
    return req


def stream(stub, req, timeout=120):
    """Runs Generate; returns (joined text, ids, messages)."""
    msgs = list(stub.Generate(req, timeout=timeout))
    return "".join(m.text for m in msgs), [i for m in msgs for i in m.token_ids], msgs


def steady_traffic(stub, seconds, clients=2):
    """`clients` threads sending 8-token Complete calls back to back for `seconds`; the outcomes counted
    by name ("ok", or the gRPC status code's name)."""
    import concurrent.futures
    outcomes = {"ok": 0}
    stop_at = time.time() + seconds

    def client(seed):
        while time.time() < stop_at:
            try:
                r = stub.Complete(request(text="And God said", max_tokens=8, seed=seed, ignore_eos=True), timeout=60)
                assert len(r.token_ids) == 8
                outcomes["ok"] += 1
            except grpc.RpcError as e:
                outcomes[e.code().name] = outcomes.get(e.code().name, 0) + 1
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return outcomes
