"""BitMar (paper Fig. 1): shared token embedding, text encoder, vision compressor, fusion,
episodic memory and the memory-conditioned sink decoder; the training forward computes eq. 4:
L = L_lm + 1.5·L_cm (symmetric InfoNCE) + 0.1·L_mem (||ΔM||_F²).

Training-time memory protocol (so the decoder learns to use memory without seeing its target):
M = M0; q_ep = fuse(caption, V) of a random `write_fraction` of image–caption items is written
(one batched write); the decoder reads with q_desc = fuse(no text, V) — the image only — and is
conditioned on [q_desc ; read(M_after, q_desc)]. Text-only items use q_desc = 0 (so M_r = mean slot).
Decoder tokens are [eos] + caption + [eos]; the LM loss covers the caption and the final eos.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import BitMarConfig
from .decoder import Decoder, SinkKVCache
from .fusion import CrossModalFusion
from .memory import EpisodicMemory, delta_penalty
from .quant import PackedBitLinear, ste, unpack_ternary
from .text_encoder import TextEncoder
from .vision import VisionCompressor


class TiedEmbedding(nn.Module):
    """Token embedding read from the decoder head's ternary weight: row i of β·T (`tie_embeddings`).

    Owns no parameters (the head is saved once, under decoder.head); training reaches the head's
    latent weight through the straight-through estimator; a packed head gives the rows looked up
    (or its FP32 cache, when the head itself has already unpacked one)."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self._decoder = [decoder]  # a list, so the head is not registered (and saved) twice

    @property
    def weight(self) -> torch.Tensor:
        head = self._decoder[0].head
        if isinstance(head, PackedBitLinear):
            if head._w_cache is None or head._w_cache.device != head.weight_packed.device:
                head._w_cache = head.ternary().float() * head.weight_scale
            return head._w_cache
        t, beta = head.quantized_weight()
        return ste(head.weight.float(), t * beta)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self._decoder[0].head
        if isinstance(head, PackedBitLinear) and head._w_cache is None:
            # Unpack only the rows asked for: the same β·T values, without materialising the
            # 25.7 MB FP32 head in a node that never needs the whole of it (FastDecoder decodes).
            rows = unpack_ternary(head.weight_packed[ids.reshape(-1)], head.in_features).float() * head.weight_scale
            return rows.view(*ids.shape, -1)
        return F.embedding(ids, self.weight)


class BitMar(nn.Module):
    def __init__(self, config: BitMarConfig):
        super().__init__()
        self.config = config
        # Shared by encoder and decoder: at 50,257×128 it is 40% of the parameters.
        self.wte = None if config.tie_embeddings else nn.Embedding(config.vocab_size, config.d_model)
        self.text_encoder = TextEncoder(config)
        self.vision = VisionCompressor(config)
        self.fusion = CrossModalFusion(config)
        self.memory = EpisodicMemory(config)
        self.decoder = Decoder(config)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.wte = TiedEmbedding(self.decoder)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):  # BitLinear included
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    # --- the pieces, as the runtime calls them ---
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B,T), mask (B,T) → Z (B,T,C)."""
        return self.text_encoder(self.wte(ids), mask)

    def compress_vision(self, patch_grid: torch.Tensor) -> torch.Tensor:
        """(B,D,h,w) backbone features → V (B,N,C)."""
        return self.vision(patch_grid)

    def fuse(self, Z: torch.Tensor | None, mask: torch.Tensor | None, V: torch.Tensor) -> torch.Tensor:
        """Text (optional) and vision tokens → pooled query q (B,C)."""
        return self.fusion(Z, mask, V)

    def read_memory(self, M: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """M_r (B,C); zeros when the config turns memory off."""
        if not self.config.memory_enabled:
            return torch.zeros_like(q)
        return self.memory.read(M, q)[0]

    @staticmethod
    def condition(q: torch.Tensor, M_r: torch.Tensor) -> torch.Tensor:
        """The decoder's conditioning input [q ; M_r] (B,2C); each layer projects it by its own P_ℓ."""
        return torch.cat([q.float(), M_r.float()], dim=-1)

    def decode(self, ids: torch.Tensor, cond: torch.Tensor | None = None,
               caches: list[SinkKVCache] | None = None, start: int = 0) -> torch.Tensor:
        """ids (B,T) → FP32 logits (B,T,V); with caches the ids continue the cached stream."""
        return self.decoder(self.wte(ids), cond, caches, start)

    def cross_modal_similarity(self, Z: torch.Tensor, mask: torch.Tensor | None, V: torch.Tensor) -> torch.Tensor:
        """Mean cosine between matched caption and image embeddings (the adaptive controller's signal)."""
        return (self.fusion.text_embedding(Z, mask) * self.fusion.vision_embedding(V)).sum(-1).mean()

    # --- training ---
    def _decoder_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[eos] + caption + [eos] (padding = eos) → (inputs, targets, target_mask), each (B, T+1)."""
        eos = self.config.eos_id
        B, T = ids.shape
        lengths = mask.long().sum(dim=1)
        seq = torch.full((B, T + 2), eos, dtype=torch.long, device=ids.device)
        seq[:, 1:T + 1] = torch.where(mask.bool(), ids, torch.full_like(ids, eos))
        target_mask = torch.arange(T + 1, device=ids.device).unsqueeze(0) <= lengths.unsqueeze(1)
        return seq[:, :-1], seq[:, 1:], target_mask

    def forward(self, batch: dict[str, torch.Tensor], cm_weight: float | None = None) -> dict[str, torch.Tensor]:
        """batch: input_ids (B,T), attention_mask (B,T) right-padded, optional vision (B,D,h,w) and
        has_vision (B,) bool. cm_weight overrides config.cm_weight (the adaptive controller's lever).
        Returns loss, lm, cm, mem and similarity (detached)."""
        c = self.config
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        B = ids.shape[0]
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("BitMar.forward: attention_mask must be right-padded (1s then 0s) in every row")
        vision = batch.get("vision")
        has_vision = batch.get("has_vision")
        if has_vision is None:
            has_vision = torch.full((B,), vision is not None, dtype=torch.bool, device=ids.device)
        has_vision = has_vision.bool()
        zero = ids.new_zeros((), dtype=torch.float32)

        Z = self.encode_text(ids, mask)
        M0 = self.memory.M0.float()
        cm = mem = similarity = zero
        if vision is not None and has_vision.any():
            V = self.compress_vision(vision)
            hv = has_vision
            t_emb = self.fusion.text_embedding(Z[hv], mask[hv])
            v_emb = self.fusion.vision_embedding(V[hv])
            logits = (t_emb @ v_emb.T) / c.infonce_temperature
            labels = torch.arange(logits.shape[0], device=ids.device)
            cm = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
            similarity = (t_emb * v_emb).sum(-1).mean().detach()
            q_desc = torch.where(hv.unsqueeze(1), self.fuse(None, None, V), 0.0)
            if c.memory_enabled:
                q_ep = self.fuse(Z, mask, V)
                write_mask = hv & (torch.rand(B, device=ids.device) < c.write_fraction)
                M, _ = self.memory.write(M0, q_ep, write_mask)
                mem = delta_penalty(M, M0)
            else:
                M = M0
        else:
            q_desc = Z.new_zeros(B, c.memory_dim)
            M = M0
        cond = self.condition(q_desc, self.read_memory(M, q_desc))

        inputs, targets, target_mask = self._decoder_tokens(ids, mask)
        start = 0
        if self.training and c.position_offset_prob > 0 and float(torch.rand(())) < c.position_offset_prob:
            start = int(torch.randint(0, c.max_positions, ()))  # stream offset; positions clamp at S+W-1
        logits = self.decode(inputs, cond, start=start)
        lm = F.cross_entropy(logits[target_mask], targets[target_mask])
        w_cm = c.cm_weight if cm_weight is None else cm_weight
        loss = c.lm_weight * lm + w_cm * cm + c.mem_weight * mem
        return {"loss": loss, "lm": lm, "cm": cm, "mem": mem, "similarity": similarity}

    # --- bookkeeping ---
    def parameter_breakdown(self) -> "OrderedDict[str, int]":
        """Parameters per component (the shared embedding counted once)."""
        parts = OrderedDict()
        for name in ("wte", "text_encoder", "vision", "fusion", "memory", "decoder"):
            parts[name] = sum(p.numel() for p in getattr(self, name).parameters())
        parts["decoder.head"] = sum(p.numel() for p in self.decoder.head.parameters())
        return parts

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
