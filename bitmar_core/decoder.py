"""Decoder with attention sinks (paper §3.4.1): 4 causal pre-LN BitLinear layers, each conditioned
on c_ℓ = P_ℓ([q ; M_r]), with a fixed-size KV cache of S sink tokens + a window of W recent ones.

Positions. A token's position id is min(t, S+W−1), t its index in the stream, assigned once when it
enters and added through a learned absolute embedding (S+W = 1024 entries); cached keys are never
re-positioned. Every token past S+W−1 thus shares the last position: order inside the window is
carried only by what the causal attention has already mixed into each key — the price of a fixed
table, as the paper's "positions are clamped to [0, S+W−1]".

Which keys a query at stream index i sees: j ≤ i and (j < S or j > i − W) — the first S tokens for
ever and the W most recent, itself included. The parallel (training) form applies exactly that mask;
`SinkKVCache` holds exactly those keys, so both compute the same thing.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import BitMarConfig
from .quant import BitLinear
from .text_encoder import MLP, attention, merge_heads, split_heads


def sink_window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """(Tq, Tk) bool, True where query at stream index q_pos[a] may attend key at k_pos[b]."""
    i, j = q_pos.unsqueeze(1), k_pos.unsqueeze(0)
    return (j <= i) & (j >= 0) & ((j < sink) | (j > i - window))


class SinkKVCache:
    """One layer's keys/values: S sink slots (never evicted) then a ring of W slots, preallocated.

    Token t lives in slot t if t < S, else in slot S + (t − S) mod W, so writing token t evicts
    token t − W, the one that just left the window. Slots are not in stream order once the ring
    wraps; that is harmless because softmax attention is invariant to permuting keys together with
    their values, and positions are baked into the keys at embedding time (absolute, not rotary).
    Nothing here grows or is recomputed: k, v and slot_pos are allocated once.
    """

    def __init__(self, batch: int, n_heads: int, head_dim: int, sink: int, window: int,
                 device: torch.device | str | None = None):
        self.sink, self.window = sink, window
        self.capacity = sink + window
        self.k = torch.zeros(batch, n_heads, self.capacity, head_dim, device=device)
        self.v = torch.zeros_like(self.k)
        self.slot_pos = torch.full((self.capacity,), -1, dtype=torch.long, device=device)  # stream index per slot
        self.length = 0  # tokens seen so far (= stream index of the next token)

    def reset(self) -> None:
        self.slot_pos.fill_(-1)
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.k, self.v, self.slot_pos))

    def slot_of(self, t: torch.Tensor) -> torch.Tensor:
        return torch.where(t < self.sink, t, self.sink + (t - self.sink) % self.window)

    def _store(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        last = int(pos[-1])
        keep = (pos < self.sink) | (pos > last - self.window)  # only these survive this chunk
        slots = self.slot_of(pos[keep])
        self.k.index_copy_(2, slots, k[:, :, keep].float())
        self.v.index_copy_(2, slots, v[:, :, keep].float())
        self.slot_pos.index_copy_(0, slots, pos[keep])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Attention of new tokens (B,H,n,hd) at stream indices pos (n,) over the cache + themselves."""
        n = q.shape[2]
        n_cached = min(self.length, self.capacity)  # filled slots are always the prefix [0, n_cached)
        if n == 1:
            # Storing first evicts token t − W, which the query t may not see anyway: then every
            # filled slot is visible and no mask is needed.
            self._store(k, v, pos)
            n_valid = min(self.length + 1, self.capacity)
            out = attention(q, self.k[:, :, :n_valid], self.v[:, :, :n_valid], None)
        else:
            K = torch.cat([self.k[:, :, :n_cached], k.float()], dim=2)
            V = torch.cat([self.v[:, :, :n_cached], v.float()], dim=2)
            k_pos = torch.cat([self.slot_pos[:n_cached], pos])
            out = attention(q, K, V, sink_window_mask(pos, k_pos, self.sink, self.window))
            self._store(k, v, pos)
        self.length += n
        return out


class CausalSelfAttention(nn.Module):
    def __init__(self, config: BitMarConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.sink, self.window = config.sink_tokens, config.window
        self.qkv = BitLinear(config.d_model, 3 * config.d_model)
        self.proj = BitLinear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: SinkKVCache | None = None) -> torch.Tensor:
        q, k, v = (split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        if cache is None:
            y = attention(q, k, v, sink_window_mask(pos, pos, self.sink, self.window))
        else:
            y = cache.attend(q, k, v, pos)
        return self.dropout(self.proj(merge_heads(y)))


class DecoderLayer(nn.Module):
    """Pre-LN causal block; the conditioning c_ℓ = P_ℓ([q ; M_r]) enters at the layer's input."""

    def __init__(self, config: BitMarConfig):
        super().__init__()
        d, C = config.d_model, config.memory_dim
        self.conditioning = config.conditioning
        self.cond_proj = BitLinear(2 * C, d)  # P_ℓ
        if self.conditioning == "concat":
            self.cond_mix = BitLinear(2 * d, d)  # [x ; c_ℓ] → d
        self.ln_1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, pos: torch.Tensor,
                cache: SinkKVCache | None = None) -> torch.Tensor:
        c = self.cond_proj(cond).unsqueeze(1)  # (B,1,d), the same at every position
        if self.conditioning == "add":
            x = x + c
        else:
            x = self.cond_mix(torch.cat([x, c.expand_as(x)], dim=-1))
        x = x + self.attn(self.ln_1(x), pos, cache)
        return x + self.mlp(self.ln_2(x))


class Decoder(nn.Module):
    def __init__(self, config: BitMarConfig):
        super().__init__()
        self.config = config
        self.wpe = nn.Embedding(config.max_positions, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.head = BitLinear(config.d_model, config.vocab_size)

    def new_caches(self, batch: int = 1, device: torch.device | str | None = None) -> list[SinkKVCache]:
        c = self.config
        device = device if device is not None else self.wpe.weight.device
        return [SinkKVCache(batch, c.n_heads, c.d_model // c.n_heads, c.sink_tokens, c.window, device)
                for _ in self.layers]

    def position_ids(self, stream_pos: torch.Tensor) -> torch.Tensor:
        return stream_pos.clamp(max=self.config.max_positions - 1)

    def forward(self, tok_emb: torch.Tensor, cond: torch.Tensor | None = None,
                caches: list[SinkKVCache] | None = None, start: int = 0) -> torch.Tensor:
        """tok_emb (B,T,d), cond (B,2C) = [q ; M_r] (None = zeros) → FP32 logits (B,T,V).

        Without caches: the parallel form over stream indices start..start+T−1. With caches: the
        tokens continue the cached stream (start is taken from the caches)."""
        B, T, _ = tok_emb.shape
        if cond is None:
            cond = tok_emb.new_zeros(B, 2 * self.config.memory_dim)
        if caches is not None:
            start = caches[0].length
        pos = torch.arange(start, start + T, device=tok_emb.device)
        x = self.drop(tok_emb + self.wpe(self.position_ids(pos)))
        for i, layer in enumerate(self.layers):
            if caches is not None:
                x = layer(x, cond, pos, caches[i])
            elif self.config.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cond, pos, use_reentrant=False)
            else:
                x = layer(x, cond, pos)
        with torch.autocast(x.device.type, enabled=False):  # the paper's FP32 logits
            return self.head(self.ln_f(x.float()))
