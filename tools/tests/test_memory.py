"""The KV cache sized from a memory budget, end to end: what kraken-server reports in GetModelInfo,
the log and /metrics, and the budgets it refuses."""
import json
import os
import re
import subprocess

import pytest

from kraken_client import pb
from serving import SERVER_BIN, DEFAULT_MODEL, Server, request, stream


def metric(text, name, **labels):
    """The value of the sample `name{labels}` in a Prometheus text exposition."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(got.get(k) == str(v) for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name}{labels} not in the exposition")


def test_an_explicit_budget_buys_its_blocks_and_every_report_agrees():
    s = Server("--kv-cache-memory", "1GiB", "--max-batch-seqs", "64")
    try:
        info = s.stub.GetModelInfo(pb.GetModelInfoRequest())
        # 1 GiB buys more than 64 full contexts of this small model: capped at max-batch-seqs contexts.
        assert info.kv_cache_blocks == 64 * info.context_length // info.kv_cache_block_size
        assert info.kv_cache_tokens == info.kv_cache_blocks * info.kv_cache_block_size
        block_bytes = info.kv_cache_bytes // info.kv_cache_blocks
        assert block_bytes * info.kv_cache_blocks == info.kv_cache_bytes
        # The bundled Kraken model: L = 6, d = 160, N = 4 on two workers, BF16 weights and so (auto) a
        # BF16 cache: 2 x 2 B x L x d x N/W per token.
        assert info.kv_cache_dtype == "BF16"
        assert block_bytes == 16 * 2 * 2 * 6 * 160 * 2
        text = s.scrape()
        for rank in ("0", "1"):
            assert metric(text, "kraken_worker_memory_bytes", rank=rank, kind="kv_cache") == info.kv_cache_bytes
            assert metric(text, "kraken_worker_memory_bytes", rank=rank, kind="activations") > 0
            assert metric(text, "kraken_worker_memory_bytes", rank=rank, kind="scratch") > 0
        assert metric(text, "kraken_worker_memory_bytes", rank="0", kind="weights") == info.weight_bytes
        assert metric(text, "kraken_cache_config_info", block_size=16, num_gpu_blocks=info.kv_cache_blocks,
                      kv_cache_bytes=info.kv_cache_bytes, cache_dtype="BF16") == 1
        log = s.read_log()
        assert (f"rank 1: KV cache {info.kv_cache_blocks} blocks of 16 tokens = {info.kv_cache_tokens} tokens, "
                f"{info.kv_cache_bytes / 2**20:.1f} MiB BF16") in log
    finally:
        s.close()

    # 20.5 blocks' worth buys 20 blocks, whatever --max-batch-seqs allows.
    s = Server("--kv-cache-memory", str(block_bytes * 41 // 2), "--max-batch-seqs", "64")
    try:
        assert s.stub.GetModelInfo(pb.GetModelInfoRequest()).kv_cache_blocks == 20
    finally:
        s.close()


def test_kv_cache_dtype_sets_the_bytes_per_token_and_a_budget_buys_tokens_by_it():
    budget = 16 * 2 * 4 * 6 * 160 * 2 * 40  # 40 blocks of F32 (80 of BF16/F16)
    seen = {}
    for dtype, want in (("f32", "F32"), ("bf16", "BF16"), ("f16", "F16"), ("auto", "BF16")):
        s = Server("--kv-cache-memory", str(budget), "--kv-cache-dtype", dtype, "--max-batch-seqs", "64")
        try:
            info = s.stub.GetModelInfo(pb.GetModelInfoRequest())
            assert info.kv_cache_dtype == want
            seen[dtype] = info.kv_cache_blocks
            assert metric(s.scrape(), "kraken_cache_config_info", cache_dtype=want) == 1
            # Served end to end: the tokens asked for come back.
            _, ids, _ = stream(s.stub, request(ids=[5, 6, 7], max_tokens=4, ignore_eos=True))
            assert len(ids) == 4
        finally:
            s.close()
    assert seen == {"f32": 40, "bf16": 80, "f16": 80, "auto": 80}


def test_the_default_budget_is_a_share_of_host_memory_and_num_kv_blocks_overrides_it():
    s = Server()
    try:
        info = s.stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.kv_cache_blocks >= info.context_length // info.kv_cache_block_size
        text = s.scrape()
        assert metric(text, "kraken_cache_config_info", gpu_memory_utilization="0.1") == 1
    finally:
        s.close()
    s = Server("--num-kv-blocks", "17", "--kv-cache-memory", "1GiB")
    try:
        assert s.stub.GetModelInfo(pb.GetModelInfoRequest()).kv_cache_blocks == 17
    finally:
        s.close()


def start_fails(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_")}
    return subprocess.run([SERVER_BIN, "--model", DEFAULT_MODEL, "--devices", "cpu:2", "--port", "0",
                           "--http-port", "-1", "--metrics-port", "-1", *args],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("args,needle", [
    (["--kv-cache-memory", "100KiB"],
     "the KV cache cannot hold one full-context sequence: rank 0 (cpu) has 100.0 KiB for it (--kv-cache-memory "
     "102400 bytes), 0 blocks of 16 tokens at 120.0 KiB each, and one full-context sequence needs 16 blocks "
     "(1.9 MiB): raise --kv-cache-memory or --memory-utilization"),
    (["--kv-cache-dtype", "int8"], "--kv-cache-dtype: int8 not in {auto,f32,bf16,f16}"),
    (["--memory-utilization", "0.000001"], "--memory-utilization 1e-06 of this worker's"),
    (["--num-kv-blocks", "15"], "--num-kv-blocks 15 is below one full context (16 blocks of 16 tokens)"),
    (["--memory-utilization", "1.5"], "--memory-utilization: Value 1.5 not in range"),
    (["--kv-cache-memory", "lots"], "--kv-cache-memory"),
])
def test_a_budget_that_cannot_serve_is_refused_at_start_with_its_numbers(args, needle):
    r = start_fails(*args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr, r.stderr


@pytest.mark.parametrize("flag,dtype,size", [((), "BF16", 2), (("--kv-cache-dtype", "f32"), "F32", 4),
                                             (("--kv-cache-dtype", "f16"), "F16", 2)])
def test_print_resources_gives_the_kv_bytes_per_token_of_the_cache_dtype(flag, dtype, size):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_")}
    out = subprocess.run([SERVER_BIN, "--model", DEFAULT_MODEL, "--devices", "cpu:2", "--print-resources", *flag],
                         capture_output=True, text=True, timeout=60, check=True, env=env)
    need = json.loads(out.stdout)
    assert need["kv_cache_dtype"] == dtype
    # The bundled Kraken model (BF16 weights): L = 6, d = 160, N = 4 over W = 2 workers.
    assert need["kv_cache_bytes_per_token_per_worker"] == 2 * size * 6 * 160 * 4 // 2
