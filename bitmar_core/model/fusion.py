"""Cross-modal fusion (paper §3.3): text (and learned) queries attend over vision keys/values.

F = LayerNorm(Q + Attn(Q, V)), pooled (mean or learned) to one vector q ∈ R^C that queries the
episodic memory and conditions the decoder. Learned query tokens let fusion run without text
(describing an image), which the paper's text-only queries cannot. Also the InfoNCE heads.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import BitMarConfig
from .layers import attention, merge_heads, split_heads
from .quant import BitLinear


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of (B,T,C) where mask (B,T) is 1; an all-zero row gives 0."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class CrossModalFusion(nn.Module):
    def __init__(self, config: BitMarConfig):
        super().__init__()
        C = config.memory_dim
        self.n_heads = config.n_heads
        self.pooling = config.fusion_pooling
        self.queries = nn.Parameter(torch.randn(config.n_fusion_queries, C) * 0.02)
        self.ln_kv = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (BitLinear(C, C) for _ in range(4))
        self.ln = nn.LayerNorm(C, eps=config.layer_norm_eps)
        if self.pooling == "learned":
            self.pool_vector = nn.Parameter(torch.randn(C) * 0.02)
        self.text_head = BitLinear(C, C)
        self.vision_head = BitLinear(C, C)

    def forward(self, Z: torch.Tensor | None, text_mask: torch.Tensor | None, V: torch.Tensor | None) -> torch.Tensor:
        """Z (B,T,C) or None/empty, text_mask (B,T), V (B,N,C) or None → q (B,C).

        V None (text alone: a memory cue such as "where was the purple cross?") skips the
        cross-attention: q is the pooled LN(Q), in the same space as an episode's q, so a cue can
        address what `fuse(caption, V)` wrote into memory."""
        if V is None and (Z is None or Z.shape[1] == 0):
            raise ValueError("CrossModalFusion: needs text tokens, vision tokens or both")
        ref = V if V is not None else Z
        B = ref.shape[0]
        learned = self.queries.unsqueeze(0).expand(B, -1, -1).float()
        q_mask = torch.ones(B, learned.shape[1], dtype=torch.bool, device=ref.device)
        if Z is not None and Z.shape[1] > 0:
            tm = torch.ones(Z.shape[:2], dtype=torch.bool, device=ref.device) if text_mask is None else text_mask.bool()
            Q, q_mask = torch.cat([learned, Z.float()], dim=1), torch.cat([q_mask, tm], dim=1)
        else:
            Q = learned
        if V is None:
            Fused = self.ln(Q)
        else:
            kv = self.ln_kv(V.float())
            a = attention(split_heads(self.q_proj(Q), self.n_heads), split_heads(self.k_proj(kv), self.n_heads),
                          split_heads(self.v_proj(kv), self.n_heads), None)
            Fused = self.ln(Q + self.out_proj(merge_heads(a)))  # residual and LN in FP32
        if self.pooling == "mean":
            return masked_mean(Fused, q_mask)
        score = (Fused @ self.pool_vector.float()).masked_fill(~q_mask, torch.finfo(torch.float32).min)
        return (score.softmax(dim=-1).unsqueeze(-1) * Fused).sum(dim=1)

    def text_embedding(self, Z: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """L2-normalised caption embedding (B,C) for InfoNCE."""
        return F.normalize(self.text_head(masked_mean(Z.float(), mask)), dim=-1)

    def vision_embedding(self, V: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embedding (B,C) for InfoNCE."""
        return F.normalize(self.vision_head(V.float().mean(dim=1)), dim=-1)
