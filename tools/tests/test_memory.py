"""The KV cache sized from a memory budget, end to end: what kraken-server reports in GetModelInfo,
the log and /metrics, and the budgets it refuses."""
import os
import re
import subprocess

import pytest

from kraken_client import pb
from serving import SERVER_BIN, DEFAULT_MODEL, Server


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
        # The bundled Kraken model: L = 6, d = 160, N = 4 on two workers: 2 x 4 B x L x d x N/W per token.
        assert block_bytes == 16 * 2 * 4 * 6 * 160 * 2
        text = s.scrape()
        for rank in ("0", "1"):
            assert metric(text, "kraken_worker_memory_bytes", rank=rank, kind="kv_cache") == info.kv_cache_bytes
            assert metric(text, "kraken_worker_memory_bytes", rank=rank, kind="activations") > 0
            assert metric(text, "kraken_worker_memory_bytes", rank=rank, kind="scratch") > 0
        assert metric(text, "kraken_worker_memory_bytes", rank="0", kind="weights") == info.weight_bytes
        assert metric(text, "kraken_cache_config_info", block_size=16, num_gpu_blocks=info.kv_cache_blocks,
                      kv_cache_bytes=info.kv_cache_bytes) == 1
        log = s.read_log()
        assert f"rank 1: KV cache {info.kv_cache_blocks} blocks of 16 tokens = {info.kv_cache_tokens} tokens" in log
    finally:
        s.close()

    # 20.5 blocks' worth buys 20 blocks, whatever --max-batch-seqs allows.
    s = Server("--kv-cache-memory", str(block_bytes * 41 // 2), "--max-batch-seqs", "64")
    try:
        assert s.stub.GetModelInfo(pb.GetModelInfoRequest()).kv_cache_blocks == 20
    finally:
        s.close()


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
     "102400 bytes), 0 blocks of 16 tokens at 240.0 KiB each, and one full-context sequence needs 16 blocks "
     "(3.8 MiB): raise --kv-cache-memory or --memory-utilization"),
    (["--memory-utilization", "0.000001"], "--memory-utilization 1e-06 of this worker's"),
    (["--num-kv-blocks", "15"], "--num-kv-blocks 15 is below one full context (16 blocks of 16 tokens)"),
    (["--memory-utilization", "1.5"], "--memory-utilization: Value 1.5 not in range"),
    (["--kv-cache-memory", "lots"], "--kv-cache-memory"),
])
def test_a_budget_that_cannot_serve_is_refused_at_start_with_its_numbers(args, needle):
    r = start_fails(*args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr, r.stderr
