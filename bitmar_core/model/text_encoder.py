"""Text encoder (paper §3.1): 4 bidirectional pre-LN layers, d=128, 4 heads, ≤256 tokens, BitLinear.

The token embedding is owned by `BitMar` and shared with the decoder, so the encoder takes
embeddings, not ids; its blocks are built from `layers`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import BitMarConfig
from .layers import MLP, attention, merge_heads, split_heads
from .quant import BitLinear


class SelfAttention(nn.Module):
    def __init__(self, config: BitMarConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = BitLinear(config.d_model, 3 * config.d_model)
        self.proj = BitLinear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.dropout(self.proj(merge_heads(attention(q, k, v, allowed))))


class EncoderBlock(nn.Module):
    def __init__(self, config: BitMarConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), allowed)
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    """Bidirectional: every real token attends to every real token; padding keys are masked out."""

    def __init__(self, config: BitMarConfig):
        super().__init__()
        self.config = config
        self.wpe = nn.Embedding(config.max_text_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_encoder_layers))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, tok_emb: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tok_emb (B,T,d) from the shared embedding, attention_mask (B,T) 1 = real → Z (B,T,d)."""
        B, T, _ = tok_emb.shape
        if T > self.config.max_text_len:
            raise ValueError(f"TextEncoder: {T} tokens, expected at most max_text_len={self.config.max_text_len}")
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=tok_emb.device)
        allowed = attention_mask.bool()[:, None, None, :]  # (B,1,1,T): keys only
        x = self.drop(tok_emb + self.wpe(torch.arange(T, device=tok_emb.device)))
        for block in self.blocks:
            if self.config.gradient_checkpointing and self.training:
                x = checkpoint(block, x, allowed, use_reentrant=False)
            else:
                x = block(x, allowed)
        return self.ln_f(x)
