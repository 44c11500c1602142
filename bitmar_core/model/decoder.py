"""Decoder with attention sinks (paper §3.4.1): 4 causal pre-LN BitLinear layers, each conditioned
on c_ℓ = P_ℓ([q ; M_r]), with a fixed-size KV cache of S sink tokens + a window of W recent ones.

Positions are rotary (RoPE) and assigned by place in the cache at attention time, as StreamingLLM
does, so a stream keeps its order however long it runs:
* a window key j seen from a query i sits i − j places back (its true distance, < W);
* a sink key j (j < S, kept for ever) sits at its slot: min(i, S+W−1) − j places back, the distance
  it would have if the query stood at the end of a full cache.
With absolute positions clamped at S+W−1 (the previous design) every token past the first ~2,047
carried the same position and the window had no order at all.

How it is computed without re-rotating the window at every step: keys are stored rotated by their
stream index t and the query is rotated by its own, so their relative rotation is i − j. Angles are
computed in float64 and rounded once (`RotaryTable`), so this stays exact at any stream length. The
S sink keys are also kept unrotated and re-rotated by j + shift, shift = max(0, i − (S+W−1)), once
the stream passes S+W−1 — S·d values per layer and step.

Which keys a query at stream index i sees: j ≤ i and (j < S or j > i − W). The parallel (training)
form applies exactly that mask; `SinkKVCache` holds exactly those keys, so both compute the same.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import BitMarConfig
from .layers import MLP, attention, merge_heads, split_heads
from .quant import BitLinear


def sink_window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """(Tq, Tk) bool, True where query at stream index q_pos[a] may attend key at k_pos[b]."""
    i, j = q_pos.unsqueeze(1), k_pos.unsqueeze(0)
    return (j <= i) & (j >= 0) & ((j < sink) | (j > i - window))


class RotaryTable:
    """cos/sin of t·θ_f (θ_f = base^(−2f/hd)) for stream positions t, as FP32 (n, hd/2).

    Angles are formed in float64 (exact to ~1e-7 rad for t < 10^9) and computed in fixed chunks of
    `CHUNK` positions, so every caller — the parallel forward, the cache, the fast decoder — gets
    the very same FP32 values for a position, whatever else it asked for at the same time."""

    CHUNK = 4096
    KEEP = 8  # chunks kept (a stream only ever needs the one or two around its position)

    def __init__(self, head_dim: int, base: float):
        if head_dim % 2:
            raise ValueError(f"RotaryTable: head width {head_dim} must be even")
        self.half = head_dim // 2
        self.inv_freq = base ** (-(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self._chunks: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _chunk(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._chunks.get(k)
        if hit is None:
            pos = torch.arange(k * self.CHUNK, (k + 1) * self.CHUNK, dtype=torch.float64)
            ang = pos.unsqueeze(1) * self.inv_freq.unsqueeze(0)
            hit = (ang.cos().float(), ang.sin().float())
            self._chunks[k] = hit
            while len(self._chunks) > self.KEEP:
                self._chunks.popitem(last=False)
        else:
            self._chunks.move_to_end(k)
        return hit

    def __call__(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (n,) int64 stream indices ≥ 0 → (cos, sin), each (n, hd/2) FP32 on pos's device."""
        p = pos.reshape(-1).to("cpu", torch.long)
        if p.numel() == 0:
            e = torch.empty(0, self.half)
            return e.to(pos.device), e.to(pos.device)
        if int(p.min()) < 0:
            raise ValueError(f"RotaryTable: negative stream position {int(p.min())}")
        k0, k1 = int(p.min()) // self.CHUNK, int(p.max()) // self.CHUNK
        if k0 == k1:
            c, s = self._chunk(k0)
            idx = p - k0 * self.CHUNK
            cos, sin = c[idx], s[idx]
        else:
            cos, sin = torch.empty(p.numel(), self.half), torch.empty(p.numel(), self.half)
            for k in range(k0, k1 + 1):
                sel = (p // self.CHUNK) == k
                if sel.any():
                    c, s = self._chunk(k)
                    cos[sel], sin[sel] = c[p[sel] - k * self.CHUNK], s[p[sel] - k * self.CHUNK]
        return cos.to(pos.device), sin.to(pos.device)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (..., T, hd) with cos/sin (T, hd/2): pairs (x_f, x_{f+hd/2}) turned by t·θ_f.
    (The fast decoder's C++ step makes these same four products and two sums per pair.)"""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def sink_window_attention(q_raw: torch.Tensor, q_rot: torch.Tensor, q_pos: torch.Tensor,
                          k_rot: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor,
                          sink: int, window: int, rotary: RotaryTable) -> torch.Tensor:
    """Attention of queries (B,H,Tq,hd) at q_pos over keys rotated by their own stream index k_pos,
    with the sink-window mask; a query past S+W−1 sees the sink keys from min(i, S+W−1)."""
    allowed = sink_window_mask(q_pos, k_pos, sink, window)
    last = sink + window - 1
    sink_cols = k_pos < sink
    if not bool((q_pos > last).any()) or not bool(sink_cols.any()):
        return attention(q_rot, k_rot, v, allowed)
    cos, sin = rotary(q_pos.clamp(max=last))
    q_cap = rotate(q_raw, cos, sin)
    with torch.autocast(q_rot.device.type, enabled=False):
        scale = 1.0 / math.sqrt(q_rot.shape[-1])
        att = (q_rot.float() @ k_rot.float().transpose(-2, -1)) * scale
        att_s = (q_cap.float() @ k_rot[:, :, sink_cols].float().transpose(-2, -1)) * scale
        att[..., sink_cols] = att_s
        att = att.masked_fill(~allowed, torch.finfo(att.dtype).min)
        return att.softmax(dim=-1) @ v.float()


class SinkKVCache:
    """One layer's keys/values: S sink slots (never evicted) then a ring of W slots, preallocated.

    Token t lives in slot t if t < S, else in slot S + (t − S) mod W, so writing token t evicts
    token t − W, the one that just left the window. Slots are not in stream order once the ring
    wraps; that is harmless because softmax attention is invariant to permuting keys together with
    their values. Window keys are stored rotated by their stream index; the sinks also unrotated
    (`sink_raw`), to be re-rotated to their slot distance (`refresh_sinks`). Nothing here grows.
    """

    def __init__(self, batch: int, n_heads: int, head_dim: int, sink: int, window: int,
                 device: torch.device | str | None = None):
        self.sink, self.window = sink, window
        self.capacity = sink + window
        self.k = torch.zeros(batch, n_heads, self.capacity, head_dim, device=device)
        self.v = torch.zeros_like(self.k)
        self.sink_raw = torch.zeros(batch, n_heads, sink, head_dim, device=device)
        self.slot_pos = torch.full((self.capacity,), -1, dtype=torch.long, device=device)  # stream index per slot
        self.length = 0  # tokens seen so far (= stream index of the next token)
        self.sink_shift = 0  # the shift the sink slots of `k` are rotated with

    def reset(self) -> None:
        self.slot_pos.fill_(-1)
        self.length = 0
        self.sink_shift = 0

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.k, self.v, self.sink_raw, self.slot_pos))

    def slot_of(self, t: torch.Tensor) -> torch.Tensor:
        return torch.where(t < self.sink, t, self.sink + (t - self.sink) % self.window)

    def refresh_sinks(self, t: int, rotary: RotaryTable) -> None:
        """Rotate the sink slots for a query at stream index t: sink j by j + max(0, t − (S+W−1))."""
        shift = max(0, t - (self.capacity - 1))
        if shift != self.sink_shift:
            cos, sin = rotary(torch.arange(shift, shift + self.sink, device=self.k.device))
            self.k[:, :, :self.sink] = rotate(self.sink_raw, cos, sin)
            self.sink_shift = shift

    def _store(self, k_raw: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        last = int(pos[-1])
        keep = (pos < self.sink) | (pos > last - self.window)  # only these survive this chunk
        slots = self.slot_of(pos[keep])
        self.k.index_copy_(2, slots, k[:, :, keep].float())
        self.v.index_copy_(2, slots, v[:, :, keep].float())
        self.slot_pos.index_copy_(0, slots, pos[keep])
        sinks = pos < self.sink
        if bool(sinks.any()):
            self.sink_raw.index_copy_(2, pos[sinks], k_raw[:, :, sinks].float())

    def attend(self, q_raw: torch.Tensor, q: torch.Tensor, k_raw: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, pos: torch.Tensor, rotary: RotaryTable) -> torch.Tensor:
        """Attention of new tokens at stream indices pos (n,) over the cache + themselves; q, k
        rotated by pos, q_raw and k_raw before rotation (B,H,n,hd)."""
        n = q.shape[2]
        n_cached = min(self.length, self.capacity)  # filled slots are always the prefix [0, n_cached)
        if n == 1:
            # Storing first evicts token t − W, which the query t may not see anyway: then every
            # filled slot is visible and no mask is needed.
            self._store(k_raw, k, v, pos)
            self.refresh_sinks(int(pos[0]), rotary)
            n_valid = min(self.length + 1, self.capacity)
            out = attention(q, self.k[:, :, :n_valid], self.v[:, :, :n_valid], None)
        else:
            K = self.k[:, :, :n_cached]
            if self.sink_shift and n_cached:
                # the parallel form wants sinks rotated by their own index (it caps the query instead)
                cos, sin = rotary(torch.arange(self.sink, device=K.device))
                K = torch.cat([rotate(self.sink_raw, cos, sin), K[:, :, self.sink:]], dim=2)
            K = torch.cat([K, k.float()], dim=2)
            V = torch.cat([self.v[:, :, :n_cached], v.float()], dim=2)
            k_pos = torch.cat([self.slot_pos[:n_cached], pos])
            out = sink_window_attention(q_raw, q, pos, K, V, k_pos, self.sink, self.window, rotary)
            self._store(k_raw, k, v, pos)
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

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rotary: RotaryTable,
                cache: SinkKVCache | None = None) -> torch.Tensor:
        q, k, v = (split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        cos, sin = rotary(pos)
        q_rot, k_rot = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is None:
            y = sink_window_attention(q, q_rot, pos, k_rot, v, pos, self.sink, self.window, rotary)
        else:
            y = cache.attend(q, q_rot, k, k_rot, v, pos, rotary)
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

    def forward(self, x: torch.Tensor, cond: torch.Tensor, pos: torch.Tensor, rotary: RotaryTable,
                cache: SinkKVCache | None = None) -> torch.Tensor:
        c = self.cond_proj(cond)  # (B,d): the same at every position, or (B,T,d): per segment
        if c.dim() == 2:
            c = c.unsqueeze(1)
        if self.conditioning == "add":
            x = x + c
        else:
            x = self.cond_mix(torch.cat([x, c.expand_as(x)], dim=-1))
        x = x + self.attn(self.ln_1(x), pos, rotary, cache)
        return x + self.mlp(self.ln_2(x))


class Decoder(nn.Module):
    def __init__(self, config: BitMarConfig):
        super().__init__()
        self.config = config
        self.rotary = RotaryTable(config.d_model // config.n_heads, config.rope_base)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.head = BitLinear(config.d_model, config.vocab_size)

    def new_caches(self, batch: int = 1, device: torch.device | str | None = None) -> list[SinkKVCache]:
        c = self.config
        device = device if device is not None else self.ln_f.weight.device
        return [SinkKVCache(batch, c.n_heads, c.d_model // c.n_heads, c.sink_tokens, c.window, device)
                for _ in self.layers]

    def forward(self, tok_emb: torch.Tensor, cond: torch.Tensor | None = None,
                caches: list[SinkKVCache] | None = None, start: int = 0,
                pos: torch.Tensor | None = None) -> torch.Tensor:
        """tok_emb (B,T,d), cond (B,2C) or per position (B,T,2C) = [q ; M_r] (None = zeros) →
        FP32 logits (B,T,V).

        Without caches: the parallel form over stream indices `pos` (T,) (default start..start+T−1;
        training passes a sink prefix 0..S−1 followed by a later stretch). With caches: the tokens
        continue the cached stream (start and pos are taken from the caches)."""
        B, T, _ = tok_emb.shape
        if cond is None:
            cond = tok_emb.new_zeros(B, 2 * self.config.memory_dim)
        if caches is not None:
            start, pos = caches[0].length, None
        if pos is None:
            pos = torch.arange(start, start + T, device=tok_emb.device)
        return self.head(self.hidden(tok_emb, cond, caches, pos))

    def hidden(self, tok_emb: torch.Tensor, cond: torch.Tensor, caches: list[SinkKVCache] | None,
               pos: torch.Tensor) -> torch.Tensor:
        """The final normalised states (B,T,d) the head reads (what the probes of bitmar-eval read)."""
        x = self.drop(tok_emb)
        for i, layer in enumerate(self.layers):
            if caches is not None:
                x = layer(x, cond, pos, self.rotary, caches[i])
            elif self.config.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cond, pos, self.rotary, use_reentrant=False)
            else:
                x = layer(x, cond, pos, self.rotary)
        with torch.autocast(x.device.type, enabled=False):  # the paper's FP32 logits
            return self.ln_f(x.float())
