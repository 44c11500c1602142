"""TextEncoder: a reference attention (torch SDPA) per block, padding invariance, parameter count."""
import torch
import torch.nn.functional as F

from bitmar_core.model.config import BitMarConfig
from bitmar_core.model.text_encoder import TextEncoder


def _reference_block(block, x, key_mask, n_heads):
    B, T, d = x.shape
    h = block.ln_1(x)
    q, k, v = block.attn.qkv(h).split(d, dim=-1)
    q, k, v = (t.view(B, T, n_heads, d // n_heads).transpose(1, 2) for t in (q, k, v))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    x = x + block.attn.proj(a.transpose(1, 2).reshape(B, T, d))
    return x + block.mlp.proj(F.gelu(block.mlp.fc(block.ln_2(x))))


def test_encoder_equals_reference(tiny_model, tiny_batch):
    enc, cfg = tiny_model.text_encoder, tiny_model.config
    ids, mask = tiny_batch["input_ids"], tiny_batch["attention_mask"].bool()
    with torch.no_grad():
        emb = tiny_model.wte(ids)
        x = emb + enc.wpe.weight[: ids.shape[1]]
        for block in enc.blocks:
            x = _reference_block(block, x, mask, cfg.n_heads)
        assert torch.allclose(enc(emb, mask), enc.ln_f(x), atol=1e-5)
        assert torch.allclose(tiny_model.encode_text(ids, mask), enc.ln_f(x), atol=1e-5)


def test_padding_does_not_change_real_tokens(tiny_model):
    ids = torch.tensor([[5, 9, 11, 3]])
    padded = torch.tensor([[5, 9, 11, 3, 40, 41]])
    with torch.no_grad():
        z = tiny_model.encode_text(ids, torch.ones(1, 4))
        zp = tiny_model.encode_text(padded, torch.tensor([[1, 1, 1, 1, 0, 0]]))
    assert torch.allclose(z, zp[:, :4], atol=1e-6)


def test_bidirectional(tiny_model):
    with torch.no_grad():
        a = tiny_model.encode_text(torch.tensor([[5, 9, 11, 3]]))
        b = tiny_model.encode_text(torch.tensor([[5, 9, 11, 4]]))
    assert not torch.allclose(a[:, 0], b[:, 0])  # the first token sees the last


def test_parameter_count_formula():
    c = BitMarConfig()
    d, L = c.d_model, c.n_encoder_layers
    per_layer = 2 * 2 * d + (3 * d * d + 1) + (d * d + 1) + (4 * d * d + 1) + (4 * d * d + 1)  # LNs, qkv, proj, fc, proj (+γ)
    expected = L * per_layer + c.max_text_len * d + 2 * d
    assert sum(p.numel() for p in TextEncoder(c).parameters()) == expected == 821_520
