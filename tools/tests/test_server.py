"""kraken-server end to end: the real binary serving the bundled Kraken model over gRPC."""
import os
import signal
import threading
import time

import grpc
import pytest

from kraken_client import pb
from serving import Server, request, stream

PROMPTS = ["And God said,", "In the beginning", "The LORD is my shepherd;", "Blessed are the", "And it came to pass"]


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch-seqs", "64", "--max-batch-tokens", "512")
    yield s
    s.close()


def test_model_info(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))
    for service in ("", "kraken.v1.Kraken"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.architecture == "kraken"
    assert info.kraken_degree == 4
    assert info.world_size == 2
    assert info.context_length == 256
    assert info.vocab_size == 4096
    assert info.eos_token_id == 0


def test_tokenize_detokenize_round_trip(server):
    text = "And God said, Let there be light: and there was light."
    ids = server.stub.Tokenize(pb.TokenizeRequest(text=text)).token_ids
    assert len(ids) > 5
    assert server.stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text == text


def test_streaming_equals_unary(server):
    req = request(text=PROMPTS[0], max_tokens=40, seed=7, logprobs=True, top_logprobs=3)
    text, ids, msgs = stream(server.stub, req)
    unary = server.stub.Complete(req)
    assert len(msgs) >= 2
    assert text == unary.text
    assert ids == list(unary.token_ids)
    assert [lp.token_id for lp in unary.logprobs] == ids
    # The three most likely, then the sampled token when it is not among them (as OpenAI reports them).
    assert all(len(lp.top) == 3 + (lp.token_id not in [t.token_id for t in lp.top[:3]]) for lp in unary.logprobs)
    assert all((lp.token_id, lp.logprob) in [(t.token_id, t.logprob) for t in lp.top] for lp in unary.logprobs)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    last = msgs[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 40 == len(ids)
    assert last.usage.prompt_tokens == len(server.stub.Tokenize(pb.TokenizeRequest(text=PROMPTS[0])).token_ids)
    assert msgs[0].seed == 7 and last.seed == 7
    t = last.timings
    assert 0 <= t.queue_seconds <= t.ttft_seconds <= t.e2e_seconds


def test_sixty_four_concurrent_streams_equal_their_serial_results(server):
    reqs = [request(text=PROMPTS[i % len(PROMPTS)], max_tokens=12, seed=1000 + i, request_id=f"c{i}") for i in range(64)]
    serial = [server.stub.Complete(r) for r in reqs]
    results = [None] * 64

    def run(i):
        results[i] = stream(server.stub, reqs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(64):
        text, ids, msgs = results[i]
        assert ids == list(serial[i].token_ids), f"stream {i}"
        assert text == serial[i].text, f"stream {i}"
        assert all(m.request_id == f"c{i}" for m in msgs)
    assert len({tuple(s.token_ids) for s in serial}) > 30, "different seeds give different samples"


def test_greedy_is_deterministic_and_seed_reproducible(server):
    a = server.stub.Complete(request(text=PROMPTS[1], max_tokens=16, temperature=0))
    b = server.stub.Complete(request(text=PROMPTS[1], max_tokens=16, temperature=0, seed=99))
    assert list(a.token_ids) == list(b.token_ids)
    c = server.stub.Complete(request(text=PROMPTS[1], max_tokens=16, seed=5))
    d = server.stub.Complete(request(text=PROMPTS[1], max_tokens=16, seed=5))
    assert list(c.token_ids) == list(d.token_ids)


def test_max_tokens_zero_and_one(server):
    r0 = server.stub.Complete(request(text=PROMPTS[0], max_tokens=0, echo=True))
    assert r0.finish_reason == pb.FINISH_REASON_LENGTH
    assert list(r0.token_ids) == [] and r0.text == ""
    assert r0.usage.completion_tokens == 0 and r0.usage.prompt_tokens > 0
    assert r0.prompt_text == PROMPTS[0]
    text, ids, msgs = stream(server.stub, request(text=PROMPTS[0], max_tokens=1, temperature=0))
    assert len(ids) == 1
    assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_stop_string_spanning_tokens(server):
    base = server.stub.Complete(request(text=PROMPTS[2], max_tokens=40, temperature=0))
    ids = list(base.token_ids)
    # Text of each token, to pick a stop string that starts inside one token and ends in another.
    pieces = [server.stub.Detokenize(pb.DetokenizeRequest(token_ids=[i])).text for i in ids]
    assert "".join(pieces) == base.text
    k = next(k for k in range(3, len(pieces) - 1) if len(pieces[k]) >= 2 and len(pieces[k + 1]) >= 2)
    start = sum(len(p) for p in pieces[:k]) + 1
    stop = base.text[start:start + len(pieces[k]) - 1 + 2]
    for resp_text, last in [
        (lambda r: (r.text, r))(server.stub.Complete(request(text=PROMPTS[2], max_tokens=40, temperature=0, stop=[stop]))),
        (lambda s: (s[0], s[2][-1]))(stream(server.stub, request(text=PROMPTS[2], max_tokens=40, temperature=0, stop=[stop]))),
    ]:
        assert resp_text == base.text[:base.text.index(stop)]
        assert last.finish_reason == pb.FINISH_REASON_STOP
        assert last.stop_reason == stop


def test_stop_string_never_matching_releases_everything(server):
    base = server.stub.Complete(request(text=PROMPTS[2], max_tokens=30, temperature=0))
    # A stop string whose proper prefixes keep matching the end of the text holds text back;
    # at LENGTH it must all be released.
    r = server.stub.Complete(request(text=PROMPTS[2], max_tokens=30, temperature=0, stop=[base.text[-3:] + "\u2603"]))
    assert r.text == base.text
    assert r.finish_reason == pb.FINISH_REASON_LENGTH


def test_stop_token_ids_and_min_tokens(server):
    base = server.stub.Complete(request(text=PROMPTS[3], max_tokens=20, temperature=0))
    first = base.token_ids[0]
    r = server.stub.Complete(request(text=PROMPTS[3], max_tokens=20, temperature=0, stop_token_ids=[first]))
    assert list(r.token_ids) == [first]
    assert r.text == ""
    assert r.finish_reason == pb.FINISH_REASON_STOP and r.stop_reason == f"token:{first}"
    m = server.stub.Complete(request(text=PROMPTS[3], max_tokens=20, temperature=0, stop_token_ids=[first],
                                     min_tokens=5))
    assert len(m.token_ids) >= 5
    assert first not in list(m.token_ids)[:5]


def test_random_bytes_stream_as_valid_utf8_identical_to_detokenize(server):
    # Near-uniform sampling emits many byte-level tokens that split or break multi-byte
    # characters; every message must be valid UTF-8 (protobuf refuses anything else) and the
    # deltas must add up to the one-shot decode of the ids.
    for seed in range(3):
        text, ids, msgs = stream(server.stub, request(ids=[95, 160, 120], max_tokens=200, temperature=100.0, top_p=1.0, seed=seed,
                                                      ignore_eos=True))
        assert len(ids) == 200
        assert text == server.stub.Detokenize(pb.DetokenizeRequest(token_ids=ids, skip_special_tokens=True)).text
        assert any(ord(c) > 127 for c in text)


INVALID = [
    (dict(text=""), "field 'text' must not be empty"),
    (dict(), "field 'prompt' must be set"),
    (dict(ids=[1, 4096]), "field 'token_ids[1]' must be in [0, 4096), got 4096"),
    (dict(ids=[-1]), "field 'token_ids[0]' must be in [0, 4096), got -1"),
    (dict(ids=[5] * 256), "has 256 tokens; the context length is 256"),
    (dict(text="a", temperature=-0.5), "field 'temperature' must be >= 0, got -0.5"),
    (dict(text="a", temperature=float("nan")), "field 'temperature' must be finite, got nan"),
    (dict(text="a", top_p=0.0), "field 'top_p' must be in (0, 1], got 0"),
    (dict(text="a", top_p=1.5), "field 'top_p' must be in (0, 1], got 1.5"),
    (dict(text="a", min_p=2.0), "field 'min_p' must be in [0, 1], got 2"),
    (dict(text="a", typical_p=0.0), "field 'typical_p' must be in (0, 1], got 0"),
    (dict(text="a", repetition_penalty=0.0), "field 'repetition_penalty' must be > 0, got 0"),
    (dict(text="a", presence_penalty=float("inf")), "field 'presence_penalty' must be finite, got inf"),
    (dict(text="a", frequency_penalty=3.0), "field 'frequency_penalty' must be in [-2, 2], got 3"),
    (dict(text="a", top_k=-2), "field 'top_k' must be in [-1, 2147483647] (0 or -1 = off), got -2"),
    (dict(text="a", top_logprobs=21), "field 'top_logprobs' must be in [0, 20], got 21"),
    (dict(text="a", stop=["x"] * 17), "field 'stop' may hold at most 16 strings, got 17"),
    (dict(text="a", stop=["x" * 257]), "field 'stop[0]' must be at most 256 bytes, got 257"),
    (dict(text="a", stop=[""]), "field 'stop[0]' must not be empty"),
    (dict(text="a", stop_token_ids=[9999]), "field 'stop_token_ids[0]' must be in [0, 4096), got 9999"),
    (dict(text="a", max_tokens=5, min_tokens=6), "field 'min_tokens' must be <= max_tokens (5"),
    (dict(text="a", request_id="r" * 129), "field 'request_id' must be at most 128 bytes, got 129"),
    (dict(text="a", n=0), "field 'n' must be in [1, 16], got 0"),
    (dict(text="a", n=17), "field 'n' must be in [1, 16], got 17"),
]


@pytest.mark.parametrize("fields,message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_requests_are_refused_precisely(server, fields, message):
    for call in (server.stub.Complete, lambda r: list(server.stub.Generate(r))):
        with pytest.raises(grpc.RpcError) as e:
            call(request(**fields))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in e.value.details()
    # The server is unharmed.
    assert len(server.stub.Complete(request(text="a", max_tokens=2, ignore_eos=True)).token_ids) == 2


def test_invalid_utf8_prompt_is_refused(server):
    # proto3 strings must be UTF-8, so send the raw bytes through a hand-built message.
    raw = pb.GenerateRequest(text="ab").SerializeToString().replace(b"ab", b"a\xff")
    channel = grpc.insecure_channel(server.target)
    fn = channel.unary_unary("/kraken.v1.Kraken/Complete", request_serializer=lambda b: b,
                             response_deserializer=pb.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as e:
        fn(raw, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "field 'text' is not valid UTF-8 (first invalid byte at offset 1)" in e.value.details()


def test_prompt_plus_max_tokens_beyond_context_is_clamped(server):
    ids = [5] * 250
    r = server.stub.Complete(request(ids=ids, max_tokens=100, temperature=0, ignore_eos=True))
    assert len(r.token_ids) == 6
    assert r.finish_reason == pb.FINISH_REASON_LENGTH


def test_oversized_message_is_refused(server):
    with pytest.raises(grpc.RpcError) as e:
        server.stub.Complete(request(text="a" * (5 << 20)))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(server.stub.Complete(request(text="a", max_tokens=1)).token_ids) == 1


@pytest.fixture()
def small_server():
    """One sequence at a time, one waiting slot, KV cache for one full context (16 blocks) + 1."""
    s = Server("--max-batch-seqs", "1", "--max-waiting", "1", "--num-kv-blocks", "17", "--kv-watermark", "0",
               devices="cpu:1")
    yield s
    s.close()


def complete_when_admitted(stub, req, timeout=60):
    """Complete, retrying while the one waiting slot is still held by a request the server is
    about to drop (cancellation and deadlines are acted on at the next engine iteration)."""
    t_end = time.time() + 10
    while True:
        try:
            return stub.Complete(req, timeout=timeout)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.time() > t_end:
                raise
            time.sleep(0.05)


def long_request(**kw):
    return request(ids=[1, 2, 3], max_tokens=240, ignore_eos=True, **kw)


def test_cancel_mid_stream_frees_blocks(small_server):
    call = small_server.stub.Generate(long_request(seed=1))
    next(call)
    call.cancel()
    # This prompt needs 16 of the 17 blocks: it runs only if the cancelled stream's were freed.
    r = complete_when_admitted(small_server.stub, request(ids=[7] * 250, max_tokens=2, ignore_eos=True))
    assert len(r.token_ids) == 2


def test_deadline_while_running_and_while_queued(small_server):
    # 240 tokens take over 0.16 s even at the tiny model's fastest decode (~1500 tokens/s here); the
    # first arrives well before 0.1 s (prefill ~10 ms).
    running = small_server.stub.Generate(long_request(seed=2), timeout=0.1)
    received = []
    with pytest.raises(grpc.RpcError) as e:
        for m in running:
            received.append(m)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received, "the deadline passed while the request was generating"
    assert sum(len(m.token_ids) for m in received) < 240
    blocker = small_server.stub.Generate(long_request(seed=3), timeout=60)
    next(blocker)
    # The blocker's other 239 tokens take over 0.1 s even at the tiny model's fastest decode, so
    # this request is still queued when its 0.05 s pass (0.3 s let a fast run finish the blocker
    # first and serve it in time).
    with pytest.raises(grpc.RpcError) as e:
        small_server.stub.Complete(request(text="a", max_tokens=4), timeout=0.05)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    blocker.cancel()
    # Both freed their blocks: a near-full-context prompt still runs.
    r = complete_when_admitted(small_server.stub, request(ids=[7] * 250, max_tokens=2, ignore_eos=True))
    assert len(r.token_ids) == 2


def test_queue_full_is_resource_exhausted_at_once(small_server):
    running = small_server.stub.Generate(long_request(seed=4), timeout=60)
    next(running)
    waiting = small_server.stub.Generate(long_request(seed=5), timeout=60)
    # Wait until the server reports it queued (the gauge is refreshed every step).
    t_end = time.time() + 10
    while "kraken_num_requests_waiting 1\n" not in small_server.scrape() and time.time() < t_end:
        time.sleep(0.02)
    t0 = time.time()
    with pytest.raises(grpc.RpcError) as e:
        small_server.stub.Complete(request(text="a", max_tokens=4), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "waiting queue is full (1 requests waiting)" in e.value.details()
    assert time.time() - t0 < 2
    running.cancel()
    waiting.cancel()


def test_worker_killed_during_streaming_pauses_the_stream_which_then_ends_as_undisturbed(small_server):
    want = [i for m in small_server.stub.Generate(long_request(seed=6), timeout=60) for i in m.token_ids]
    call = small_server.stub.Generate(long_request(seed=6), timeout=60)
    first = next(call)
    pids = small_server.worker_pids()
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    got = list(first.token_ids) + [i for m in call for i in m.token_ids]
    assert got == want
    r = complete_when_admitted(small_server.stub, request(text="And God said,", max_tokens=4))
    assert len(r.token_ids) == 4
    assert small_server.worker_pids() != pids
    log = small_server.read_log()
    assert "signal 9" in log or "SIGKILL" in log or "Killed" in log, log


def test_sigterm_drains_in_flight_streams_and_exits_zero():
    s = Server(devices="cpu:1")
    try:
        call = s.stub.Generate(request(ids=[1, 2, 3], max_tokens=60, ignore_eos=True, seed=1), timeout=60)
        first = next(call)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        with pytest.raises(grpc.RpcError) as e:
            s.stub.Complete(request(text="a", max_tokens=2), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(call)
        ids = list(first.token_ids) + [i for m in rest for i in m.token_ids]
        assert len(ids) == 60
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.close()


def test_api_key_is_required_and_health_stays_open():
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    s = Server("--api-key", "sekret", devices="cpu:1", api_key="sekret")
    try:
        assert len(s.stub.Complete(request(text="a", max_tokens=2, ignore_eos=True)).token_ids) == 2
        from kraken_client import connect
        for stub in (connect(s.target), connect(s.target, api_key="wrong")):
            with pytest.raises(grpc.RpcError) as e:
                stub.Complete(request(text="a", max_tokens=2))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(s.target))
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        s.close()


def _make_certs(d):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, with the openssl CLI."""
    import subprocess as sp

    def run(*a):
        sp.run(["openssl", *a], check=True, capture_output=True, cwd=d)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=kraken-test-ca")
    for name, ext in [("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")]:
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=kraken-test-{name}")
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {n: open(os.path.join(d, n), "rb").read() for n in
            ["ca.pem", "server.pem", "server.key", "client.pem", "client.key"]}


def test_tls_and_mutual_tls(tmp_path):
    c = _make_certs(str(tmp_path))
    d = str(tmp_path)
    s = Server("--tls-cert", f"{d}/server.pem", "--tls-key", f"{d}/server.key", "--tls-client-ca", f"{d}/ca.pem",
               devices="cpu:1", health_creds=(c["ca.pem"], c["client.key"], c["client.pem"]))
    try:
        good = grpc.ssl_channel_credentials(root_certificates=c["ca.pem"], private_key=c["client.key"],
                                            certificate_chain=c["client.pem"])
        from kraken_client import pb_grpc
        stub = pb_grpc.KrakenStub(grpc.secure_channel(s.target, good))
        assert len(stub.Complete(request(text="a", max_tokens=2), timeout=30).token_ids) == 2
        # Without a client certificate the handshake is refused.
        bare = pb_grpc.KrakenStub(grpc.secure_channel(s.target, grpc.ssl_channel_credentials(c["ca.pem"])))
        with pytest.raises(grpc.RpcError) as e:
            bare.Complete(request(text="a", max_tokens=2), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # Plain text is refused too.
        with pytest.raises(grpc.RpcError):
            pb_grpc.KrakenStub(grpc.insecure_channel(s.target)).Complete(request(text="a", max_tokens=2), timeout=10)
    finally:
        s.close()


def test_flags_from_environment_and_config_file(tmp_path):
    cfg = tmp_path / "server.toml"
    cfg.write_text('max-waiting = 7\nmax-batch-seqs = 3\n')
    s = Server("--config", str(cfg), devices="cpu:1", env={"KRAKEN_MAX_BATCH_TOKENS": "96"})
    try:
        info = s.stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.max_waiting_requests == 7
        assert info.max_batch_sequences == 3
        assert info.max_batch_tokens == 96
    finally:
        s.close()


def _reflection_v1_modules(tmp_path_factory):
    """Python stubs for reflection v1 (grpcio-reflection ships v1alpha only), from grpc-proto's
    file, generated under a module path of their own (grpcio owns the 'grpc' package)."""
    import importlib
    import shutil
    import sys as _sys
    from grpc_tools import protoc
    out = tmp_path_factory.mktemp("reflection_v1")
    (out / "reflection_v1").mkdir()
    shutil.copy("/usr/share/grpc-proto/grpc/reflection/v1/reflection.proto", out / "reflection_v1" / "reflection.proto")
    assert protoc.main(["protoc", f"-I{out}", f"--python_out={out}", f"--grpc_python_out={out}",
                        "reflection_v1/reflection.proto"]) == 0
    (out / "reflection_v1" / "__init__.py").write_text("")
    _sys.path.insert(0, str(out))
    return (importlib.import_module("reflection_v1.reflection_pb2"),
            importlib.import_module("reflection_v1.reflection_pb2_grpc"))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_server_reflection_describes_every_service_it_lists_and_the_health_check_runs_from_it(
        server, version, tmp_path_factory):
    # What grpcurl does: list the services, fetch the file of each by symbol (with its imports),
    # build the messages from those descriptors alone, and call grpc.health.v1.Health/Check.
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    if version == "v1":
        pb2, pb2_grpc = _reflection_v1_modules(tmp_path_factory)
    else:
        from grpc_reflection.v1alpha import reflection_pb2 as pb2, reflection_pb2_grpc as pb2_grpc
    channel = grpc.insecure_channel(server.target)
    stub = pb2_grpc.ServerReflectionStub(channel)

    def ask(**kw):
        return list(stub.ServerReflectionInfo(iter([pb2.ServerReflectionRequest(**kw)])))[0]

    names = {x.name for x in ask(list_services="").list_services_response.service}
    assert {"kraken.v1.Kraken", "inference.GRPCInferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
    pool = descriptor_pool.DescriptorPool()
    added = set()
    for name in sorted(names):
        r = ask(file_containing_symbol=name)
        assert not r.HasField("error_response"), (name, r.error_response.error_message)
        files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                 for b in r.file_descriptor_response.file_descriptor_proto]
        assert files, name
        for f in reversed(files):  # imports come after the file that needs them
            if f.name not in added:
                pool.Add(f)
                added.add(f.name)
        assert pool.FindServiceByName(name).full_name == name
    health = pool.FindServiceByName("grpc.health.v1.Health")
    check = health.FindMethodByName("Check")
    request_cls = message_factory.GetMessageClass(check.input_type)
    response_cls = message_factory.GetMessageClass(check.output_type)
    call = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=request_cls.SerializeToString,
                               response_deserializer=response_cls.FromString)
    assert call(request_cls(service="")).status == 1  # SERVING
    assert call(request_cls(service="kraken.v1.Kraken")).status == 1
    missing = ask(file_containing_symbol="no.such.Service")
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_typical_p_is_seed_reproducible_and_narrows_the_choices(server):
    """typical_p reaches the sampler: reproducible per seed, and a small typical_p changes what a
    seeded request draws at temperature 1."""
    base = dict(text="And God said,", max_tokens=24, temperature=1.0, seed=17, ignore_eos=True)
    a = server.stub.Complete(request(**base, typical_p=0.2))
    b = server.stub.Complete(request(**base, typical_p=0.2))
    off = server.stub.Complete(request(**base))
    assert list(a.token_ids) == list(b.token_ids)
    assert len(a.token_ids) == 24
    assert list(a.token_ids) != list(off.token_ids)



def _order_behind_a_blocker(s):
    """Runs a long blocker, then queues 'early' (priority 5) and 'urgent' (priority -1) behind it.
    Returns the order they finished in, or None when the blocker ended before both were seen
    waiting together (the gauge reaches 2 only while both are queued behind it)."""
    blocker = s.stub.Generate(request(ids=[1, 2, 3], max_tokens=240, ignore_eos=True, seed=1), timeout=60)
    next(blocker)
    done = []

    def run(name, priority):
        s.stub.Complete(request(ids=[4, 5], max_tokens=4, ignore_eos=True, priority=priority), timeout=60)
        done.append(name)
    threads = [threading.Thread(target=run, args=("early", 5))]
    threads[0].start()
    t_end = time.time() + 5
    while "kraken_num_requests_waiting 1\n" not in s.scrape() and time.time() < t_end:
        time.sleep(0.005)
    threads.append(threading.Thread(target=run, args=("urgent", -1)))
    threads[1].start()
    both = False
    while not both and time.time() < t_end and not done:
        both = "kraken_num_requests_waiting 2\n" in s.scrape()
    list(blocker)
    for t in threads:
        t.join()
    return done if both else None


@pytest.mark.parametrize("policy", ["priority", "fcfs"])
def test_scheduling_policy_orders_the_waiting_queue(policy):
    """One sequence at a time: behind a running request, a request with priority 5 arrives before
    one with priority -1. Under priority the later, more urgent one runs first; under fcfs the
    earlier one does."""
    s = Server("--max-batch-seqs", "1", "--scheduling-policy", policy, devices="cpu:1")
    try:
        for _ in range(5):  # the blocker's 240 tokens take ~0.25 s: retry if both were not seen queued
            order = _order_behind_a_blocker(s)
            if order is not None:
                break
        assert order == (["urgent", "early"] if policy == "priority" else ["early", "urgent"])
    finally:
        s.close()
