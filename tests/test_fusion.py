"""CrossModalFusion against a reference cross-attention (SDPA), pooling modes, InfoNCE heads."""
import pytest
import torch
import torch.nn.functional as F

from bitmar_core.model.config import BitMarConfig
from bitmar_core.model.fusion import CrossModalFusion

from conftest import tiny_config_dict


def _reference_fused(f, Z, V, H):
    B = V.shape[0]
    Q = f.queries.unsqueeze(0).expand(B, -1, -1)
    if Z is not None:
        Q = torch.cat([Q, Z], dim=1)
    kv = F.layer_norm(V, (V.shape[-1],), f.ln_kv.weight, f.ln_kv.bias, f.ln_kv.eps)
    heads = lambda t: t.view(B, t.shape[1], H, -1).transpose(1, 2)
    a = F.scaled_dot_product_attention(heads(f.q_proj(Q)), heads(f.k_proj(kv)), heads(f.v_proj(kv)))
    return f.ln(Q + f.out_proj(a.transpose(1, 2).reshape(B, Q.shape[1], -1)))


def _setup(pooling):
    torch.manual_seed(0)
    cfg = BitMarConfig(**tiny_config_dict(fusion_pooling=pooling))
    f = CrossModalFusion(cfg).eval()
    Z, V = torch.randn(2, 5, 32), torch.randn(2, 4, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    return f, Z, V, mask, cfg.n_heads


def test_mean_pooling_equals_reference():
    f, Z, V, mask, H = _setup("mean")
    with torch.no_grad():
        Fz = _reference_fused(f, Z, V, H)
        m = torch.cat([torch.ones(2, 2), mask.float()], dim=1)  # 2 learned queries always count
        ref = torch.stack([Fz[b][m[b] > 0].mean(dim=0) for b in range(2)])
        assert torch.allclose(f(Z, mask, V), ref, atol=1e-5)
        # no text: only the learned queries
        assert torch.allclose(f(None, None, V), _reference_fused(f, None, V, H).mean(dim=1), atol=1e-5)
        assert torch.allclose(f(Z[:, :0], mask[:, :0], V), f(None, None, V))


def test_learned_pooling_equals_reference():
    f, Z, V, mask, H = _setup("learned")
    with torch.no_grad():
        Fz = _reference_fused(f, Z, V, H)
        m = torch.cat([torch.ones(2, 2), mask.float()], dim=1)
        ref = []
        for b in range(2):
            rows = Fz[b][m[b] > 0]
            ref.append((torch.softmax(rows @ f.pool_vector, dim=0).unsqueeze(1) * rows).sum(0))
        assert torch.allclose(f(Z, mask, V), torch.stack(ref), atol=1e-5)


def test_padding_is_ignored():
    f, Z, V, mask, _ = _setup("mean")
    Z2 = Z.clone()
    Z2[1, 2:] = 100.0  # padded positions of item 1
    with torch.no_grad():
        assert torch.allclose(f(Z, mask, V), f(Z2, mask, V), atol=1e-6)


def test_infonce_heads_are_unit_vectors_of_the_projected_means():
    f, Z, V, mask, _ = _setup("mean")
    with torch.no_grad():
        t, v = f.text_embedding(Z, mask), f.vision_embedding(V)
        assert torch.allclose(t.norm(dim=-1), torch.ones(2)) and torch.allclose(v.norm(dim=-1), torch.ones(2))
        mean1 = Z[1, :2].mean(0, keepdim=True)
        assert torch.allclose(t[1:], F.normalize(f.text_head(mean1), dim=-1), atol=1e-6)
        assert torch.allclose(v, F.normalize(f.vision_head(V.mean(1)), dim=-1), atol=1e-6)


def test_text_alone_is_the_pooled_layer_norm_of_the_queries():
    """V None (a memory cue): no cross-attention, q = pool(LN([learned queries ; Z]))."""
    for pooling in ("mean", "learned"):
        f, Z, V, mask, _ = _setup(pooling)
        with torch.no_grad():
            Q = torch.cat([f.queries.unsqueeze(0).expand(2, -1, -1), Z], dim=1)
            Fq = F.layer_norm(Q, (32,), f.ln.weight, f.ln.bias, f.ln.eps)
            m = torch.cat([torch.ones(2, 2), mask.float()], dim=1) > 0
            ref = []
            for b in range(2):
                rows = Fq[b][m[b]]
                w = torch.softmax(rows @ f.pool_vector, 0) if pooling == "learned" else torch.full((len(rows),), 1 / len(rows))
                ref.append((w.unsqueeze(1) * rows).sum(0))
            assert torch.allclose(f(Z, mask, None), torch.stack(ref), atol=1e-5)
            assert not torch.allclose(f(Z, mask, None), f(Z, mask, V), atol=1e-3)
    with pytest.raises(ValueError, match="needs text tokens, vision tokens or both"):
        f(None, None, None)
    with pytest.raises(ValueError, match="needs text tokens"):
        f(Z[:, :0], mask[:, :0], None)
