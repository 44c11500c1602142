"""The transformer parts every BitMar block is built from: FP32-softmax attention, head split and
merge, and the ternary MLP. One home, shared by the text encoder, fusion, the decoder and the fast
decoder, so a change to how attention rounds reaches all of them at once (the fast decoder's
bit-identity depends on it).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import BitMarConfig
from .quant import BitLinear


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention with an FP32 softmax. q (B,H,Tq,hd), k/v (B,H,Tk,hd);
    allowed broadcasts to (B,H,Tq,Tk), True = may attend. A row with nothing allowed gets a
    uniform average instead of NaN (finite fill), which only happens for all-padding rows."""
    with torch.autocast(q.device.type, enabled=False):  # scores and softmax stay FP32 under AMP
        att = (q.float() @ k.float().transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        if allowed is not None:
            att = att.masked_fill(~allowed, torch.finfo(att.dtype).min)
        return att.softmax(dim=-1) @ v.float()


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B,T,D) → (B,H,T,D/H)."""
    B, T, D = x.shape
    return x.view(B, T, n_heads, D // n_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B,H,T,hd) → (B,T,H·hd), the inverse of `split_heads`."""
    B, H, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, H * hd)


class MLP(nn.Module):
    """BitLinear d → mlp_ratio·d, GELU, BitLinear back, dropout (the paper's feed-forward)."""

    def __init__(self, config: BitMarConfig):
        super().__init__()
        d = config.d_model
        self.fc = BitLinear(d, config.mlp_ratio * d)
        self.proj = BitLinear(config.mlp_ratio * d, d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))
