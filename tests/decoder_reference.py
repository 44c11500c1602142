"""An independent reference of the sink-window RoPE decoder, for the tests (not the code under test).

A head's pairs (x_f, x_{f+hd/2}) are read as complex numbers z_f = x_f + i·x_{f+hd/2}; the score of
query i for key j is Re Σ_f q_f · conj(k_f) · e^{i·θ_f·rel(i,j)} / √hd with θ_f = base^(−2f/hd) and

    rel(i, j) = i − j               for a window key,
    rel(i, j) = min(i, S+W−1) − j   for a sink key (j < S);

key j is visible from query i iff j ≤ i and (j < S or j > i − W). Everything in float64 from the
relative angle, query rows in chunks (bounded memory for long streams). The decoder around it
reuses the model's own projections, norms and MLPs; only the attention is re-derived here.
"""
from __future__ import annotations

import math

import torch


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                        sink: int, window: int, base: float, rows: int = 96) -> torch.Tensor:
    """q, k, v (B,H,T,hd) before any rotation, pos (T,) stream indices → (B,H,T,hd) float64."""
    B, H, T, hd = q.shape
    h = hd // 2
    theta = base ** (-(2.0 * torch.arange(h, dtype=torch.float64)) / hd)
    qc = torch.complex(q[..., :h].double(), q[..., h:].double())
    kc = torch.complex(k[..., :h].double(), k[..., h:].double()).conj()
    vd = v.double()
    pos = pos.long()
    out = torch.empty(B, H, T, hd, dtype=torch.float64)
    for a in range(0, T, rows):
        p = pos[a:a + rows]
        # only keys some query of this chunk may see (sinks, and the W before the chunk onwards):
        # the mask below decides; this merely skips columns it would zero anyway
        cols = ((pos < sink) | ((pos > int(p.min()) - window) & (pos <= int(p.max())))).nonzero().flatten()
        i, j = p.unsqueeze(1), pos[cols].unsqueeze(0)
        visible = (j <= i) & ((j < sink) | (j > i - window))
        rel = torch.where(j < sink, i.clamp(max=sink + window - 1) - j, i - j).double()
        angle = rel.unsqueeze(-1) * theta  # (r, n_cols, h)
        phase = torch.polar(torch.ones_like(angle), angle)
        scores = torch.einsum("bhrf,bhtf,rtf->bhrt", qc[:, :, a:a + rows], kc[:, :, cols], phase).real
        scores = (scores / math.sqrt(hd)).masked_fill(~visible, float("-inf"))
        out[:, :, a:a + rows] = scores.softmax(dim=-1) @ vd[:, :, cols]
    return out


def reference_decoder(model, emb: torch.Tensor, cond: torch.Tensor | None, pos: torch.Tensor | None = None,
                      sink: int | None = None, window: int | None = None) -> torch.Tensor:
    """emb (T,d) decoder inputs, cond (T,2C) per token (None = zeros), pos (T,) (default 0..T−1)
    → FP32 logits (T,V) of `model`'s decoder with the attention of `reference_attention`."""
    dec, cfg = model.decoder, model.config
    T, d = emb.shape
    H = cfg.n_heads
    sink = cfg.sink_tokens if sink is None else sink
    window = cfg.window if window is None else window
    pos = torch.arange(T) if pos is None else pos
    cond = torch.zeros(T, 2 * cfg.memory_dim) if cond is None else cond
    x = emb.float().unsqueeze(0)
    with torch.no_grad():
        for layer in dec.layers:
            c = layer.cond_proj(cond.float().unsqueeze(0))
            x = x + c if cfg.conditioning == "add" else layer.cond_mix(torch.cat([x, c], dim=-1))
            q, k, v = layer.attn.qkv(layer.ln_1(x)).split(d, dim=-1)
            q, k, v = (t.view(1, T, H, d // H).transpose(1, 2) for t in (q, k, v))
            a = reference_attention(q, k, v, pos, sink, window, cfg.rope_base).float()
            x = x + layer.attn.proj(a.transpose(1, 2).reshape(1, T, d))
            x = x + layer.mlp(layer.ln_2(x))
        return dec.head(dec.ln_f(x))[0]
