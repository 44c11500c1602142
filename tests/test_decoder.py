"""SinkKVCache and the decoder: streaming equals the parallel form; references built here by hand."""
import pytest
import torch
import torch.nn.functional as F

from bitmar_core.config import BitMarConfig
from bitmar_core.decoder import SinkKVCache, sink_window_mask
from bitmar_core.model import BitMar

from conftest import tiny_config_dict

S, W = 2, 6  # tiny sink/window from the conftest config


def _model(conditioning="add"):
    torch.manual_seed(0)
    return BitMar(BitMarConfig(**tiny_config_dict(conditioning=conditioning))).eval()


def _reference_decoder(model, ids, cond):
    """Independent parallel form: mask from the rule 'j ≤ i and (j < S or j > i − W)' written as
    loops, position ids min(t, S+W−1), attention via torch SDPA."""
    dec, cfg = model.decoder, model.config
    T, d, H = ids.shape[1], cfg.d_model, cfg.n_heads
    allowed = torch.tensor([[j <= i and (j < S or j > i - W) for j in range(T)] for i in range(T)])
    pos = torch.tensor([min(t, S + W - 1) for t in range(T)])
    x = model.wte(ids) + dec.wpe(pos)
    for layer in dec.layers:
        c = layer.cond_proj(cond).unsqueeze(1)
        x = x + c if cfg.conditioning == "add" else layer.cond_mix(torch.cat([x, c.expand_as(x)], -1))
        q, k, v = layer.attn.qkv(layer.ln_1(x)).split(d, dim=-1)
        q, k, v = (t.view(1, T, H, -1).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + layer.attn.proj(a.transpose(1, 2).reshape(1, T, d))
        x = x + layer.mlp(layer.ln_2(x))
    return dec.head(dec.ln_f(x))


def test_mask_rule():
    i = torch.arange(12)
    m = sink_window_mask(i, i, S, W)
    assert torch.equal(m[:8, :8], torch.ones(8, 8).tril().bool())  # fits: plain causal
    assert m[11].nonzero().flatten().tolist() == [0, 1, 6, 7, 8, 9, 10, 11]  # 2 sinks + last 6


@pytest.mark.parametrize("conditioning", ["add", "concat"])
def test_streaming_equals_full_causal_while_it_fits(conditioning):
    model = _model(conditioning)
    ids = torch.randint(0, 63, (1, S + W))
    cond = torch.randn(1, 64)
    with torch.no_grad():
        full = model.decode(ids, cond)
        ref = _reference_decoder(model, ids, cond)
        caches = model.decoder.new_caches(1)
        steps = torch.cat([model.decode(ids[:, t:t + 1], cond, caches) for t in range(ids.shape[1])], dim=1)
    assert torch.allclose(full, ref, atol=1e-5)
    assert torch.allclose(steps, full, atol=1e-5)


@pytest.mark.parametrize("conditioning", ["add", "concat"])
def test_streaming_beyond_window_equals_references(conditioning):
    model = _model(conditioning)
    T = 30
    ids = torch.randint(0, 63, (1, T))
    cond = torch.randn(1, 64)
    with torch.no_grad():
        ref = _reference_decoder(model, ids, cond)
        full = model.decode(ids, cond)
        caches = model.decoder.new_caches(1)
        steps = torch.cat([model.decode(ids[:, t:t + 1], cond, caches) for t in range(T)], dim=1)
        caches2 = model.decoder.new_caches(1)  # chunked prefill (chunks larger than W evict inside)
        chunks = torch.cat([model.decode(ids[:, a:b], cond, caches2) for a, b in [(0, 3), (3, 13), (13, 14), (14, 30)]], 1)
    assert torch.allclose(full, ref, atol=1e-5)
    assert torch.allclose(steps, ref, atol=1e-5)
    assert torch.allclose(chunks, ref, atol=1e-5)
    assert sorted(caches[0].slot_pos.tolist()) == [0, 1] + list(range(T - W, T))


def test_cache_attention_over_exactly_sinks_and_window():
    """One layer's attention: each step equals softmax attention over keys [0..S−1] ∪ [t−W+1..t]."""
    torch.manual_seed(0)
    cache = SinkKVCache(batch=2, n_heads=3, head_dim=4, sink=S, window=W)
    ks, vs = [], []
    for t in range(25):
        q, k, v = torch.randn(3, 2, 3, 1, 4).unbind(0)
        ks.append(k)
        vs.append(v)
        out = cache.attend(q, k, v, torch.tensor([t]))
        keep = sorted(set(range(min(S, t + 1))) | set(range(max(0, t - W + 1), t + 1)))
        K, V = torch.cat([ks[j] for j in keep], 2), torch.cat([vs[j] for j in keep], 2)
        ref = torch.softmax(q @ K.transpose(-1, -2) / 2.0, dim=-1) @ V
        assert torch.allclose(out, ref, atol=1e-6), t
    assert cache.length == 25


def test_cache_memory_constant_over_10k_tokens():
    model = _model()
    caches = model.decoder.new_caches(1)
    nbytes = [c.nbytes() for c in caches]
    ptrs = [c.k.data_ptr() for c in caches]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(100):
            logits = model.decode(torch.randint(0, 63, (1, 100), generator=g), None, caches)
            for _ in range(3):  # and single-token steps
                logits = model.decode(logits[:, -1:].argmax(-1), None, caches)
            assert [c.nbytes() for c in caches] == nbytes
    assert caches[0].length == 10_300
    assert [c.k.data_ptr() for c in caches] == ptrs  # never reallocated
    assert nbytes[0] == 2 * 1 * 4 * (S + W) * 8 * 4 + (S + W) * 8  # k, v (B,H,S+W,hd) fp32 + slot_pos int64
    assert sorted(caches[0].slot_pos.tolist()) == [0, 1] + list(range(10_300 - W, 10_300))
    assert torch.isfinite(logits).all()


def test_positions_clamped():
    model = _model()
    assert model.decoder.position_ids(torch.arange(12)).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 7, 7, 7, 7]
    assert model.decoder.wpe.num_embeddings == S + W
