"""The PyTorch reference against Hugging Face transformers, and its own KV-cache path."""

import torch

from kraken_ref import reference as ref


def test_reference_gpt2_equals_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = ref.Config("gpt2", n_layer=3, n_embd=48, n_head=6, vocab_size=97, n_positions=40, ffn_hidden=192,
                     bias=True)
    W = ref.random_weights(cfg, seed=5)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=40, n_embd=48, n_layer=3, n_head=6,
                                    resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0,
                                    eos_token_id=0)).eval()
    hf.load_state_dict(W, strict=False)
    tokens = torch.randint(0, 97, (25,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens.unsqueeze(0)).logits[0]
    got = ref.forward(cfg, W, tokens)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_reference_decode_with_cache_equals_full_forward():
    for cfg in (ref.Config("kraken", n_layer=3, n_embd=30, n_head=2, vocab_size=50, n_positions=32,
                           kraken_degree=3, ffn_hidden=60, bias=True),
                ref.Config("parallel_block", n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=32,
                           ffn_hidden=128, bias=False)):
        W = ref.random_weights(cfg, seed=3)
        tokens = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(2))
        full = ref.forward(cfg, W, tokens)
        cache = ref.KVCache()
        rows = [ref.forward(cfg, W, tokens[:5], cache=cache)]
        for t in range(5, 12):
            rows.append(ref.forward(cfg, W, tokens[t:t + 1], positions=[t], cache=cache))
        stepped = torch.cat(rows)
        assert (stepped - full).abs().max().item() < 1e-5


def test_kraken_reference_matches_the_authors_block_structure():
    """The authors' KrakenBlock (training/kraken.py) computes, per sub-layer i of layer l >= 1,
    x = y_i + Attn(LN1(y_i)); x = x + FFN(LN2(x + sum_{j != i} y_j)). Restated here with plain
    torch ops and compared with the reference's forward."""
    cfg = ref.Config("kraken", n_layer=3, n_embd=24, n_head=3, vocab_size=40, n_positions=16, kraken_degree=2,
                     ffn_hidden=48, bias=False)
    W = ref.random_weights(cfg, seed=9)
    tokens = torch.arange(10) % 40
    eps = cfg.layer_norm_epsilon

    def w(i, l, n):
        return W.get(f"transformer.h.{i}.{l}.{n}")

    def attn(i, l, x):
        return ref.attention(x, w(i, l, "attn.c_attn.weight"), None, w(i, l, "attn.c_proj.weight"), None, cfg.n_head)

    def mlp(i, l, x):
        return ref.linear(ref.gelu_tanh(ref.linear(x, w(i, l, "mlp.c_fc.weight"))), w(i, l, "mlp.c_proj.weight"))

    x = W["transformer.wte.weight"][tokens] + W["transformer.wpe.weight"][torch.arange(10)]
    outs = []
    for i in range(2):
        h = x + attn(i, 0, ref.layer_norm(x, w(i, 0, "ln_1.weight"), None, eps))
        outs.append(h + mlp(i, 0, ref.layer_norm(h, w(i, 0, "ln_2.weight"), None, eps)))
    for l in range(1, 3):
        new = []
        for i in range(2):
            y = outs[i] + attn(i, l, ref.layer_norm(outs[i], w(i, l, "ln_1.weight"), None, eps))
            others = sum(outs[j] for j in range(2) if j != i)
            new.append(y + mlp(i, l, ref.layer_norm(y + others, w(i, l, "ln_2.weight"), None, eps)))
        outs = new
    z = ref.linear(torch.cat(outs, -1), W["transformer.conjunction.weight"])
    logits = ref.layer_norm(z, W["transformer.ln_f.weight"], None, eps) @ W["transformer.wte.weight"].t()
    assert (ref.forward(cfg, W, tokens) - logits).abs().max().item() < 1e-5
