"""The shared transformer parts (bitmar_core/model/layers.py) against the formulas, in float64."""
import math

import numpy as np
import torch

from bitmar_core.model.layers import MLP, attention, merge_heads, split_heads


def _reference_attention(q, k, v, allowed):
    """softmax(q kᵀ / √hd) v per head, row by row in numpy float64; a row with nothing allowed
    averages every value uniformly (what a finite fill gives)."""
    q, k, v = (t.double().numpy() for t in (q, k, v))
    B, H, Tq, hd = q.shape
    out = np.zeros((B, H, Tq, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                s = k[b, h] @ q[b, h, i] / math.sqrt(hd)
                row = None if allowed is None else allowed[b if allowed.shape[0] > 1 else 0, 0, i]
                ok = np.ones(len(s), bool) if row is None else row.numpy()
                w = np.where(ok, np.exp(s - s[ok].max()), 0.0) if ok.any() else np.ones(len(s))
                out[b, h, i] = (w / w.sum()) @ v[b, h]
    return torch.from_numpy(out)


def test_attention_matches_the_softmax_formula_with_and_without_a_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None, None]
    for allowed in (None, causal):
        got = attention(q, k, v, allowed)
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), _reference_attention(q, k, v, allowed), atol=1e-5)
    # causal: the first query sees only the first key, so it returns the first value exactly
    assert torch.allclose(attention(q, k, v, causal)[:, :, 0], v[:, :, 0], atol=1e-6)


def test_a_row_with_nothing_allowed_is_the_mean_of_the_values_not_nan():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g) for _ in range(3))
    allowed = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    allowed[0, 0, 1] = False  # query 1: all keys masked (an all-padding row)
    got = attention(q, k, v, allowed)
    assert torch.isfinite(got).all()
    assert torch.allclose(got[:, :, 1], v.mean(dim=2), atol=1e-6)
    assert torch.allclose(got.double(), _reference_attention(q, k, v, allowed), atol=1e-5)


def test_attention_softmax_stays_fp32_under_autocast():
    q = k = v = torch.randn(1, 1, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(q, k, v, None)
    assert got.dtype == torch.float32
    assert torch.allclose(got, attention(q, k, v, None))


def test_split_and_merge_heads_are_inverse_and_put_each_head_in_its_slice():
    x = torch.arange(2 * 3 * 12, dtype=torch.float32).reshape(2, 3, 12)
    h = split_heads(x, 4)
    assert h.shape == (2, 4, 3, 3)
    assert torch.equal(h[1, 2, 0], x[1, 0, 6:9])  # head 2 = features 6..8 of token 0
    assert torch.equal(merge_heads(h), x)


def test_mlp_is_proj_of_gelu_of_fc(tiny_config):
    mlp = MLP(tiny_config).eval()
    x = torch.randn(2, 5, tiny_config.d_model)
    want = mlp.proj(torch.nn.functional.gelu(mlp.fc(x)))
    assert torch.equal(mlp(x), want)
    assert mlp.fc.out_features == tiny_config.mlp_ratio * tiny_config.d_model
    mlp.train()
    mlp.dropout.p = 1.0
    assert torch.equal(mlp(x), torch.zeros_like(x))

