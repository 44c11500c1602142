"""The sink-window RoPE decoder against an independent reference (tests/decoder_reference.py: complex
rotation by the relative angle, mask from the rule); the cache, its size, and what RoPE buys."""
import contextlib
import copy
import math

import pytest
import torch

from bitmar_core.model.config import BitMarConfig
from bitmar_core.model.decoder import RotaryTable, SinkKVCache, rotate, sink_window_mask
from bitmar_core.model.bitmar import BitMar

from conftest import tiny_config_dict
from decoder_reference import reference_attention, reference_decoder

S, W = 2, 6  # tiny sink/window from the conftest config


def _model(**kw) -> BitMar:
    """A tiny model whose attention depends strongly on position: at init (weights ~0.02) every
    score is ~0 and any position rule would pass; γ of qkv = 8 makes the scores O(1)."""
    torch.manual_seed(0)
    model = BitMar(BitMarConfig(**tiny_config_dict(**kw))).eval()
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.attn.qkv.scale.fill_(8.0)
    return model


def _long_model(**kw) -> BitMar:
    """Tiny width (d=16, 2 heads of 8), the paper's S=4, W=1020."""
    return _model(d_model=16, memory_dim=16, n_heads=2, sink_tokens=4, window=1020, **kw)


def _segments_cond(T: int, C2: int, bounds, g) -> torch.Tensor:
    """(1,T,2C) per-token conditioning: zeros before bounds[0], then one random cond per segment."""
    cond = torch.zeros(1, T, C2)
    for a, b in zip(bounds, list(bounds[1:]) + [T]):
        cond[:, a:b] = torch.randn(C2, generator=g)
    return cond


@contextlib.contextmanager
def _capture_attention(model):
    """Per layer, every call's attention input (ln_1 output, what qkv reads) and output (what proj
    reads), concatenated over calls: comparing layer by layer keeps the int8 activation rounding
    of the next BitLinear from turning a 1e-7 difference into a one-step jump (see the long test)."""
    seen = [{"in": [], "out": []} for _ in model.decoder.layers]
    hooks = []
    for rec, layer in zip(seen, model.decoder.layers):
        hooks.append(layer.attn.qkv.register_forward_pre_hook(lambda m, a, rec=rec: rec["in"].append(a[0].detach())))
        hooks.append(layer.attn.proj.register_forward_pre_hook(lambda m, a, rec=rec: rec["out"].append(a[0].detach())))
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()
        for rec in seen:
            rec["in"], rec["out"] = torch.cat(rec["in"], 1), torch.cat(rec["out"], 1)


def _check_attention_layers(model, seen, pos, atol):
    """Each layer's attention output equals the reference attention of the same layer input."""
    cfg = model.config
    d, H = cfg.d_model, cfg.n_heads
    for layer, rec in zip(model.decoder.layers, seen):
        X = rec["in"]
        B, T, _ = X.shape
        with torch.no_grad():
            q, k, v = layer.attn.qkv(X).split(d, dim=-1)
        q, k, v = (t.view(B, T, H, d // H).transpose(1, 2) for t in (q, k, v))
        ref = reference_attention(q, k, v, pos, cfg.sink_tokens, cfg.window, cfg.rope_base)
        ref = ref.transpose(1, 2).reshape(B, T, d).float()
        assert torch.allclose(rec["out"], ref, atol=atol), (rec["out"] - ref).abs().max()


def _decode_three_ways(model, ids, cond, chunks):
    """(parallel, token by token through the caches, chunked prefill through the caches)."""
    with torch.no_grad():
        full = model.decode(ids, cond)
        caches = model.decoder.new_caches(ids.shape[0])
        steps = torch.cat([model.decode(ids[:, t:t + 1], cond[:, t:t + 1], caches)
                           for t in range(ids.shape[1])], dim=1)
        caches2 = model.decoder.new_caches(ids.shape[0])
        cuts = [0] + list(chunks)
        chunked = torch.cat([model.decode(ids[:, a:b], cond[:, a:b], caches2) for a, b in zip(cuts, cuts[1:])], 1)
    return full, steps, chunked, caches


# --------------------------------------------------------------------------- rules and pieces

def test_mask_rule():
    i = torch.arange(12)
    m = sink_window_mask(i, i, S, W)
    assert torch.equal(m[:8, :8], torch.ones(8, 8).tril().bool())  # fits: plain causal
    assert m[11].nonzero().flatten().tolist() == [0, 1, 6, 7, 8, 9, 10, 11]  # 2 sinks + last 6
    ref = torch.tensor([[j <= a and (j < S or j > a - W) for j in range(12)] for a in range(12)])
    assert torch.equal(m, ref)


def test_rotate_is_complex_multiplication_by_the_angle():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g)
    t = torch.tensor([0, 1, 7, 4095, 50_000])
    table = RotaryTable(8, 10000.0)
    cos, sin = table(t)
    theta = 10000.0 ** (-(2.0 * torch.arange(4, dtype=torch.float64)) / 8)
    z = torch.complex(x[..., :4].double(), x[..., 4:].double())
    angle = t.double().unsqueeze(1) * theta
    zr = z * torch.polar(torch.ones_like(angle), angle)
    assert torch.allclose(rotate(x, cos, sin).double(), torch.cat([zr.real, zr.imag], -1), atol=2e-6)


def test_rotary_table_values_do_not_depend_on_what_else_is_asked():
    hd, base = 8, 10000.0
    table = RotaryTable(hd, base)
    probe = [0, 5, 4095, 4096, 4097, 8191, 8192, 50_000, 1_000_003]
    together = table(torch.tensor(probe))
    for n, t in enumerate(probe):
        alone = table(torch.tensor([t]))
        assert torch.equal(alone[0][0], together[0][n]) and torch.equal(alone[1][0], together[1][n]), t
        # the formula, in float64, rounded once
        ang = [t * base ** (-2.0 * f / hd) for f in range(hd // 2)]
        assert torch.allclose(together[0][n].double(), torch.tensor([math.cos(a) for a in ang], dtype=torch.float64), atol=1e-7)
        assert torch.allclose(together[1][n].double(), torch.tensor([math.sin(a) for a in ang], dtype=torch.float64), atol=1e-7)
    # across a chunk boundary, in another grouping, and after the chunk cache evicted it
    span = table(torch.arange(4090, 4102))
    assert torch.equal(span[0][5], together[0][2]) and torch.equal(span[0][6], together[0][3])
    for k in range(20):  # more chunks than RotaryTable.KEEP
        table(torch.tensor([k * RotaryTable.CHUNK + 7]))
    again = table(torch.tensor(probe[::-1]))
    assert torch.equal(again[0].flip(0), together[0]) and torch.equal(again[1].flip(0), together[1])
    assert torch.equal(RotaryTable(hd, base)(torch.tensor([4096]))[0][0], together[0][3])  # a fresh table too
    cos, sin = table(torch.empty(0, dtype=torch.long))
    assert cos.shape == sin.shape == (0, hd // 2)
    with pytest.raises(ValueError, match="negative"):
        table(torch.tensor([3, -1]))
    with pytest.raises(ValueError, match="even"):
        RotaryTable(7, base)


def test_cache_attention_equals_reference():
    """SinkKVCache.attend alone, fed unrotated random q/k/v in calls of 1–9 tokens past the cap."""
    g = torch.Generator().manual_seed(0)
    table = RotaryTable(4, 10000.0)
    cache = SinkKVCache(batch=2, n_heads=3, head_dim=4, sink=S, window=W)
    qs, ks, vs, outs = [], [], [], []
    t = 0
    for n in [1, 1, 3, 1, 9, 1, 1, 2, 7, 1, 1, 1, 4, 1, 8, 1]:
        q, k, v = torch.randn(3, 2, 3, n, 4, generator=g).unbind(0)
        pos = torch.arange(t, t + n)
        cos, sin = table(pos)
        outs.append(cache.attend(q, rotate(q, cos, sin), k, rotate(k, cos, sin), v, pos, table))
        qs.append(q), ks.append(k), vs.append(v)
        t += n
    Q, K, V = (torch.cat(x, 2) for x in (qs, ks, vs))
    ref = reference_attention(Q, K, V, torch.arange(t), S, W, 10000.0)
    assert torch.allclose(torch.cat(outs, 2).double(), ref, atol=1e-5)
    assert cache.length == t == 43
    assert sorted(cache.slot_pos.tolist()) == [0, 1] + list(range(t - W, t))


# --------------------------------------------------------------------------- the decoder

@pytest.mark.parametrize("conditioning", ["add", "concat"])
def test_decoder_equals_reference_tiny(conditioning):
    """S=2, W=6, 30 tokens, 2 streams, per-segment conditioning: the parallel form, token-by-token
    streaming and chunked prefill (chunks longer than W, single steps after the cap) all equal the
    reference."""
    model = _model(conditioning=conditioning)
    g = torch.Generator().manual_seed(1)
    T = 30
    ids = torch.randint(0, 63, (2, T), generator=g)
    cond = torch.cat([_segments_cond(T, 64, [S, 9, 20], g), _segments_cond(T, 64, [S, 14], g)])
    full, steps, chunked, caches = _decode_three_ways(model, ids, cond, [3, 13, 14, 15, 16, 29, 30])
    for b in range(2):
        ref = reference_decoder(model, model.wte(ids[b]).detach(), cond[b])
        assert torch.allclose(full[b], ref, atol=1e-5)
        assert torch.allclose(steps[b], ref, atol=1e-5)
        assert torch.allclose(chunked[b], ref, atol=1e-5)
    assert sorted(caches[0].slot_pos.tolist()) == [0, 1] + list(range(T - W, T))


def test_parallel_form_at_training_positions_equals_reference():
    """Training decodes sinks 0..S−1 then a stretch starting later (pos given): same rule."""
    model = _model()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 63, (1, 20), generator=g)
    cond = _segments_cond(20, 64, [S, 11], g)
    for offset in (0, 3, 500, 40_000):
        pos = torch.cat([torch.arange(S), S + offset + torch.arange(20 - S)])
        with torch.no_grad():
            out = model.decode(ids, cond, pos=pos)[0]
        ref = reference_decoder(model, model.wte(ids[0]).detach(), cond[0], pos)
        assert torch.allclose(out, ref, atol=1e-5), offset


@pytest.mark.slow
def test_decoder_equals_reference_long_stream():
    """S=4, W=1020 on a tiny-width model, 3,300 tokens: the window wraps three times and the sinks
    are re-rotated from token 1,024 on. Layer by layer, the attention of each form equals the
    reference at 1e-5. The logits equal it at 1e-5 except where the per-token int8 activation
    rounding of the next BitLinear flips one step on a ~1e-7 difference (a handful of tokens,
    each an isolated jump of one quantisation step, never a drift)."""
    model = _long_model()
    cfg = model.config
    T = 3_300
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 63, (1, T), generator=g)
    cond = _segments_cond(T, 2 * cfg.memory_dim, [cfg.sink_tokens, 500, 1_700, 2_900], g)
    chunks = [3, 4, 5, 700, 1_100, 1_101, 1_102, 1_103, 2_700, 2_701, 2_702, T]
    pos = torch.arange(T)
    with torch.no_grad():
        with _capture_attention(model) as seen_full:
            full = model.decode(ids, cond)
        caches = model.decoder.new_caches(1)
        with _capture_attention(model) as seen_steps:
            steps = torch.cat([model.decode(ids[:, t:t + 1], cond[:, t:t + 1], caches) for t in range(T)], 1)
        caches2 = model.decoder.new_caches(1)
        cuts = [0] + chunks
        with _capture_attention(model) as seen_chunks:
            chunked = torch.cat([model.decode(ids[:, a:b], cond[:, a:b], caches2) for a, b in zip(cuts, cuts[1:])], 1)
    for seen in (seen_full, seen_steps, seen_chunks):
        _check_attention_layers(model, seen, pos, atol=1e-5)
    ref = reference_decoder(model, model.wte(ids[0]).detach(), cond[0])
    for out in (full[0], steps[0], chunked[0]):
        err = (out - ref).abs().amax(dim=-1)
        assert int((err > 1e-5).sum()) <= 5 and float(err.max()) < 1e-2, err.topk(6)
    assert caches[0].sink_shift == T - 1 - (cfg.sink_tokens + cfg.window - 1)
    assert sorted(caches[0].slot_pos.tolist()) == list(range(4)) + list(range(T - 1_020, T))


def test_cache_bytes_constant_over_10k_tokens():
    model = _model()
    caches = model.decoder.new_caches(1)
    nbytes = [c.nbytes() for c in caches]
    ptrs = [(c.k.data_ptr(), c.v.data_ptr(), c.sink_raw.data_ptr()) for c in caches]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(100):
            logits = model.decode(torch.randint(0, 63, (1, 100), generator=g), None, caches)
            for _ in range(3):  # and single-token steps
                logits = model.decode(logits[:, -1:].argmax(-1), None, caches)
            assert [c.nbytes() for c in caches] == nbytes
    T, H, hd = 10_300, 4, 8
    assert caches[0].length == T
    assert [(c.k.data_ptr(), c.v.data_ptr(), c.sink_raw.data_ptr()) for c in caches] == ptrs  # never reallocated
    # k, v (B,H,S+W,hd) fp32 + sink_raw (B,H,S,hd) fp32 + slot_pos (S+W,) int64
    assert nbytes[0] == 2 * 1 * H * (S + W) * hd * 4 + 1 * H * S * hd * 4 + (S + W) * 8
    assert sorted(caches[0].slot_pos.tolist()) == [0, 1] + list(range(T - W, T))
    assert torch.isfinite(logits).all()
    # the sink slots hold the raw sink keys turned by j + shift, shift = (T−1) − (S+W−1), the
    # last query's cap: checked with complex rotation
    c = caches[0]
    shift = (T - 1) - (S + W - 1)
    assert c.sink_shift == shift
    theta = 10000.0 ** (-(2.0 * torch.arange(hd // 2, dtype=torch.float64)) / hd)
    z = torch.complex(c.sink_raw[..., :hd // 2].double(), c.sink_raw[..., hd // 2:].double())
    angle = (torch.arange(S, dtype=torch.float64) + shift).unsqueeze(1) * theta
    zr = z * torch.polar(torch.ones_like(angle), angle)
    assert torch.allclose(c.k[:, :, :S].double(), torch.cat([zr.real, zr.imag], -1), atol=1e-5)


def _prefill(model, ids: torch.Tensor, chunk: int = 256):
    caches = model.decoder.new_caches(1)
    with torch.no_grad():
        for a in range(0, ids.shape[1], chunk):
            model.decode(ids[:, a:a + chunk], None, caches)
    return caches


def test_order_is_kept_far_into_the_stream():
    """A one-layer decoder ~50,000 tokens into a stream reads [sinks, …, A, B, Q] and [sinks, …,
    B, A, Q] differently. With the old absolute positions clamped at S+W−1, A and B (like every
    token past S+W−1) had the same position id, so with one layer their keys and values were the
    same in both orders; the query's softmax over a set of keys is invariant to permuting keys with
    their values, so the outputs at Q were equal: the window had no order. With RoPE, A sits 2
    places back in one order and 1 in the other. Each order also equals the reference (one layer:
    a key depends on its own token only, so the sinks and the last W tokens at their true stream
    indices are all the reference needs)."""
    model = _model(n_decoder_layers=1)
    g = torch.Generator().manual_seed(4)
    hist = torch.randint(0, 63, (1, 50_000), generator=g)
    hist[0, :S] = 63
    A, B, Q = 5, 40, 17
    base = _prefill(model, hist)
    outs = {}
    for name, tail in (("AB", [A, B, Q]), ("BA", [B, A, Q])):
        caches = copy.deepcopy(base)
        with torch.no_grad():
            for t in tail:
                last = model.decode(torch.tensor([[t]]), None, caches)[0, -1]
        outs[name] = last
        stream = torch.cat([hist[0], torch.tensor(tail)])
        keep = torch.cat([torch.arange(S), torch.arange(len(stream) - W, len(stream))])
        ref = reference_decoder(model, model.wte(stream[keep]).detach(), None, keep)[-1]
        assert torch.allclose(last, ref, atol=1e-5), name
    assert (outs["AB"] - outs["BA"]).abs().max() > 1e-3


def test_translation_invariance_past_the_cap():
    """Past S+W−1 only distances matter: the same tokens at offsets 20,000 and 50,000 after the
    sinks give the same logits, in the parallel form and through the caches (whose histories share
    their last 200 tokens: with 2 layers a token depends on at most 2·W tokens back and the sinks)."""
    model = _model()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 63, (1, 40), generator=g)
    cond = _segments_cond(40, 64, [S, 20], g)
    with torch.no_grad():
        near, far = (model.decode(ids, cond, pos=torch.cat([torch.arange(S), S + off + torch.arange(40 - S)]))
                     for off in (20_000, 50_000))
    assert torch.allclose(near, far, atol=1e-5)
    assert not torch.allclose(near, model.decode(ids, cond).detach(), atol=1e-3)  # before the cap it differs
    tail = torch.randint(0, 63, (1, 200), generator=g)
    sinks = torch.full((1, S), 63)
    outs = []
    for n in (20_000, 50_000):
        hist = torch.cat([sinks, torch.randint(0, 63, (1, n - S - 200), generator=g), tail], 1)
        caches = _prefill(model, hist)
        with torch.no_grad():
            outs.append(torch.cat([model.decode(ids[:, t:t + 1], cond[:, t], caches) for t in range(S, 40)], 1))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
