#!/usr/bin/env python3
"""Makes the three random-weight models of the TTFT benchmark (equal parameter counts, shapes
scaled down from the paper's so a run fits this machine), then runs build/bench/ttft_bench.

    .venv/bin/python bench/ttft_bench.py                     # every preset, W = 2, 4, T = 128, 2048
    .venv/bin/python bench/ttft_bench.py --presets none,a100-nvswitch --repeats 2
    # On a DGX (CUDA build in build-gpu): paper-scale 1.3B models in BF16, one GPU per rank, NCCL
    .venv/bin/python bench/ttft_bench.py --build build-gpu --shapes gpu-1.3b-8way --device cuda \
        --presets none --worlds 4,8 --tokens 128,2048
    # Two nodes over a real, shaped link (root: network namespaces, a veth pair, tc htb), 124M shapes
    sudo .venv/bin/python bench/ttft_bench.py --multinode

Shapes (docs/kraken.md "Equal-parameter configurations"): standard GPT-2 and parallel-block with
L = 4, D = 512, 8 heads, FFN 4D; Kraken 4-way with L = 4 and d = 324 (4 heads of 81, FFN 2d),
chosen so the whole parameter count matches (d ~ 0.61 D plus the embedding and conjunction).
Vocabulary 4096, 2048 positions, F32 weights.
"""

import argparse
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from kraken_ref import reference as ref  # noqa: E402
from kraken_ref.checkpoint import kraken_config_json, save_model_dir  # noqa: E402

V, P = 4096, 2048
SHAPES = {
    "standard": ref.Config("gpt2", n_layer=4, n_embd=512, n_head=8, vocab_size=V, n_positions=P, ffn_hidden=2048,
                           bias=True),
    "parallel": ref.Config("parallel_block", n_layer=4, n_embd=512, n_head=8, vocab_size=V, n_positions=P,
                           ffn_hidden=2048, bias=True),
    "kraken": ref.Config("kraken", n_layer=4, n_embd=324, n_head=4, vocab_size=V, n_positions=P, kraken_degree=4,
                         ffn_hidden=648, bias=False),
}

# The paper's 1.3B scale (docs/kraken.md "Equal-parameter configurations"): GPT-2 1.3B (L = 24,
# D = 2048, 16 heads, FFN 4D) against a 4-way Kraken of d = 1248 (~0.61 D, 8 heads of 156, FFN 2d),
# BF16 weights, 50304-token vocabulary.
V_GPU = 50304
GPU_SHAPES = {
    "standard": ref.Config("gpt2", n_layer=24, n_embd=2048, n_head=16, vocab_size=V_GPU, n_positions=P,
                           ffn_hidden=8192, bias=True),
    "parallel": ref.Config("parallel_block", n_layer=24, n_embd=2048, n_head=16, vocab_size=V_GPU, n_positions=P,
                           ffn_hidden=8192, bias=True),
    "kraken": ref.Config("kraken", n_layer=24, n_embd=1248, n_head=8, vocab_size=V_GPU, n_positions=P,
                         kraken_degree=4, ffn_hidden=2496, bias=False),
}
# GPT-2 124M (L = 12, D = 768, 12 heads, FFN 4D) against the authors' released 125M 4-way Kraken
# (L = 12, d = 504, 3 heads of 168 per sub-layer, FFN 2d; docs/kraken.md "Released configurations"),
# F32, 1024 positions: the multi-node benchmark's pair.
SHAPES_124M = {
    "standard": ref.Config("gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=V_GPU, n_positions=1024,
                           ffn_hidden=3072, bias=True),
    "kraken": ref.Config("kraken", n_layer=12, n_embd=504, n_head=3, vocab_size=V_GPU, n_positions=1024,
                         kraken_degree=4, ffn_hidden=1008, bias=False),
}
# 8-way (W = 8 on a DGX): d = D sqrt(12 / (8 * 8)) ~ 0.43 D -> 880 (8 heads of 110, FFN 2d).
GPU_SHAPES_8WAY = dict(GPU_SHAPES, kraken=ref.Config("kraken", n_layer=24, n_embd=880, n_head=8, vocab_size=V_GPU,
                                                     n_positions=P, kraken_degree=8, ffn_hidden=1760, bias=False))


def config_json(cfg):
    if cfg.model_type == "kraken":
        return kraken_config_json(cfg)
    if cfg.model_type == "gpt2":
        return {"model_type": "gpt2", "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions}
    return {"model_type": "parallel_block", "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
            "ffn_expansion": cfg.ffn_hidden // cfg.n_embd, "vocab_size": cfg.vocab_size, "n_positions": P,
            "bias": True}


# --- Two nodes over a shaped link -------------------------------------------------------------------
# Each node is a network namespace the benchmark creates (kb-leader, kb-follower), joined by a veth
# pair with addresses from 10.213.0.0/30; tc's htb shapes each end's egress to the link's rate. The
# leader's ttft_bench runs the group (two workers per node, W = 4); the follower's joins it. The
# link model's prediction for the same link comes from one node with W = 4 and the matching
# preset applied raw (engine/comm/link_model.h: ethernet-10g, ethernet-1g).
NETNS = ("kb-leader", "kb-follower")
ADDR = ("10.213.0.1", "10.213.0.2")
LINKS = {"10gbit": "ethernet-10g", "1gbit": "ethernet-1g"}


def sh(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")


def make_namespaces():
    remove_namespaces()
    for ns in NETNS:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", "kb-l", "type", "veth", "peer", "name", "kb-f")
    for ns, dev, addr in zip(NETNS, ("kb-l", "kb-f"), ADDR):
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")


def shape(rate):
    """Both directions of the veth at `rate` (tc rate syntax, e.g. 1gbit)."""
    for ns, dev in zip(NETNS, ("kb-l", "kb-f")):
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
        sh("ip", "netns", "exec", ns, "tc", "class", "replace", "dev", dev, "parent", "1:", "classid", "1:10", "htb",
           "rate", rate, "ceil", rate)


def remove_namespaces():
    for ns in NETNS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def cells(out):
    """{(arch, T): seconds} from ttft_bench's `cell` lines."""
    got = {}
    for line in out.splitlines():
        if line.startswith("cell "):
            f = dict(kv.split("=") for kv in line.split()[1:])
            got[(f["arch"], int(f["T"]))] = float(f["ttft_s"])
    return got


def run_two_nodes(bench, models, tokens, repeats, port):
    follower = subprocess.Popen(["ip", "netns", "exec", NETNS[1], bench, "--join", f"{ADDR[0]}:{port}",
                                 "--node-address", ADDR[1], "--local-workers", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lead = subprocess.run(["ip", "netns", "exec", NETNS[0], bench, "--models", models, "--nodes", "2",
                               "--cluster-listen", f"{ADDR[0]}:{port}", "--node-address", ADDR[0], "--presets", "none",
                               "--tokens", tokens, "--repeats", str(repeats), "--archs", "standard,kraken"],
                              capture_output=True, text=True, timeout=1800)
        follower_log = follower.communicate(timeout=60)[0]
    finally:
        if follower.poll() is None:
            follower.kill()
    if lead.returncode != 0:
        raise RuntimeError(f"leader: {lead.stderr}\nfollower: {follower_log}")
    relay = [line.split("): ", 1)[1] for line in follower_log.splitlines() if "plan relay" in line]
    return cells(lead.stdout), relay[-1] if relay else "?"


def run_link_model(bench, models, tokens, repeats, preset):
    out = subprocess.run([bench, "--models", models, "--worlds", "4", "--presets", preset, "--link-scale", "raw",
                          "--tokens", tokens, "--repeats", str(repeats), "--archs", "standard,kraken"],
                         capture_output=True, text=True, check=True, timeout=1800).stdout
    return cells(out)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def multinode(a, models) -> int:
    if os.geteuid() != 0:
        print("ttft_bench --multinode creates network namespaces, a veth pair and tc qdiscs: run it as root")
        return 1
    bench = os.path.join(a.build, "bench", "ttft_bench")
    tokens = [int(t) for t in a.tokens.split(",")]
    measured = {link: {} for link in LINKS}   # link -> (arch, T) -> [round medians]
    predicted = {link: {} for link in LINKS}
    relays = {link: [] for link in LINKS}
    make_namespaces()
    try:
        for rnd in range(a.rounds):  # interleaved: every link and the model in each round
            for link, preset in LINKS.items():
                shape(link)
                got, relay = run_two_nodes(bench, models, a.tokens, a.repeats, 29400 + rnd)
                relays[link].append(relay)
                for k, v in got.items():
                    measured[link].setdefault(k, []).append(v)
                for k, v in run_link_model(bench, models, a.tokens, a.repeats, preset).items():
                    predicted[link].setdefault(k, []).append(v)
                print(f"round {rnd + 1}/{a.rounds} {link}: done", flush=True)
    finally:
        remove_namespaces()
    print(f"\nTTFT, two nodes x two CPU workers (W = 4) over a veth shaped with tc htb; GPT-2-124M-shaped "
          f"(standard TP) vs Kraken-124M-shaped 4-way; medians of {a.rounds} rounds of {a.repeats} prefills")
    print(f"{'link':>7} {'T':>5} {'standard ms':>12} {'kraken ms':>10} {'speed-up':>9} | {'model: std ms':>13} "
          f"{'kraken ms':>10} {'speed-up':>9}")
    for link in LINKS:
        for t in tokens:
            st, kr = median(measured[link][("standard", t)]), median(measured[link][("kraken", t)])
            pst, pkr = median(predicted[link][("standard", t)]), median(predicted[link][("kraken", t)])
            print(f"{link:>7} {t:>5} {st * 1e3:12.1f} {kr * 1e3:10.1f} {100 * (st / kr - 1):8.1f}% | "
                  f"{pst * 1e3:13.1f} {pkr * 1e3:10.1f} {100 * (pst / pkr - 1):8.1f}%")
    for link in LINKS:
        print(f"plan relay to the follower over {link} (last round): {relays[link][-1]}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--shapes", choices=["cpu", "gpu-1.3b", "gpu-1.3b-8way", "124m"], default="cpu",
                    help="cpu: the small F32 models above; gpu-1.3b(-8way): the paper's 1.3B scale in BF16 with a "
                         "4-way (W = 2, 4) or 8-way (W = 2, 4, 8) Kraken")
    ap.add_argument("--multinode", action="store_true",
                    help="two nodes (network namespaces) over a veth shaped to 10 and 1 Gbit/s, 124M shapes, "
                         "against the link model's prediction; needs root")
    ap.add_argument("--rounds", type=int, default=3, help="--multinode: interleaved rounds (medians reported)")
    ap.add_argument("--repeats", type=int, help="timed prefills per cell (and round); default 3")
    ap.add_argument("--tokens", help="prompt lengths; default 128,2048 (--multinode: 128,512,1024)")
    a, rest = ap.parse_known_args()
    if a.multinode:
        a.shapes, a.tokens, a.repeats = "124m", a.tokens or "128,512,1024", a.repeats or 3
    else:  # ttft_bench's own options
        rest += ["--repeats", str(a.repeats)] if a.repeats else []
        rest += ["--tokens", a.tokens] if a.tokens else []
    shapes, dtype = {"cpu": (SHAPES, torch.float32), "gpu-1.3b": (GPU_SHAPES, torch.bfloat16),
                     "gpu-1.3b-8way": (GPU_SHAPES_8WAY, torch.bfloat16), "124m": (SHAPES_124M, torch.float32)}[a.shapes]
    models = os.path.join(a.build, "bench-models", "ttft" if a.shapes == "cpu" else "ttft-" + a.shapes)
    for name, cfg in shapes.items():
        d = os.path.join(models, name)
        if not os.path.exists(os.path.join(d, "model.safetensors")):
            save_model_dir(d, config_json(cfg), ref.random_weights(cfg, seed=7, std=0.02), dtype)
    if a.multinode:
        return multinode(a, models)
    return subprocess.call([os.path.join(a.build, "bench", "ttft_bench"), "--models", models, *rest])


if __name__ == "__main__":
    sys.exit(main())
