"""BitMar (paper Fig. 1): shared token embedding, text encoder, vision compressor, fusion,
episodic memory and the memory-conditioned sink decoder; the training forward computes eq. 4:
L = L_lm + 1.5·L_cm (symmetric InfoNCE) + 0.1·L_mem (||ΔM||_F²).

What the decoder reads (ours beyond the paper, docs/MODEL.md): each described scene enters the
stream as its N compressed vision tokens (`vision_prefix`), then [eos] and the words; every token
of that segment is conditioned on the segment's [q ; M_r] at every layer, as in the paper.

Training batches (`bitmar_core.data.streams`) hold two tasks:
* scene streams — several scenes in one decoder stream that starts with S sink tokens, each scene
  described after its own vision tokens and conditioned on [q_desc ; read(M, q_desc)], q_desc =
  fuse(no text, V). M = M0 after one batched write of a random `write_fraction` of the batch's
  episodes q_ep = fuse(caption, V) (so memory can, but need not, hold the scene being described);
* recall — 8–64 episodes written one by one into a memory of their own exactly as the robot writes
  them (read-before-write usage, forgetting); then a cue alone ("where was the purple cross?",
  q_cue = fuse(cue, no vision)) must be answered from [q_cue ; read(M, q_cue)] with the episode's
  other attributes. The decoder never sees that episode: the answer is only in memory.
"""
from __future__ import annotations

import math
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

IGNORE = -100  # target id with no loss (vision and sink positions, padding)
GPT2_EOS = 50256  # <|endoftext|>


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
            # whole FP32 head in a node that never needs it (FastDecoder decodes).
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
        if config.vision_prefix:
            G = config.vision_grid_max
            self.prefix_norm = nn.LayerNorm(config.memory_dim, eps=config.layer_norm_eps)
            self.prefix_row = nn.Embedding(G, config.d_model)
            self.prefix_col = nn.Embedding(G, config.d_model)
        if config.vocab_subset:
            # GPT-2 id of each row of the head (set from the training corpus; saved with the weights).
            # Until then: rows are GPT-2 ids 0.., and the eos row is <|endoftext|>.
            ids = torch.arange(config.vocab_size, dtype=torch.long)
            ids[config.eos_id] = GPT2_EOS
            self.register_buffer("token_ids", ids)
        self.apply(self._init_weights)
        # Write addressing starts content-dependent (logit spread ~1–2 for |q| ≈ 4–8), not uniform.
        nn.init.normal_(self.memory.write_proj.weight, mean=0.0, std=0.25)
        if self.memory.key_proj is not None:
            nn.init.eye_(self.memory.key_proj.weight)  # reads start as plain cosine
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

    def fuse(self, Z: torch.Tensor | None, mask: torch.Tensor | None, V: torch.Tensor | None) -> torch.Tensor:
        """Text and/or vision tokens → pooled query q (B,C)."""
        return self.fusion(Z, mask, V)

    def read_memory(self, M: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """M_r (B,C) from one memory M (K,C) or one per item (B,K,C); zeros with memory off."""
        if not self.config.memory_enabled:
            return torch.zeros_like(q)
        if M.dim() == 3:
            return self.memory.read_each(M, q)[0]
        return self.memory.read(M, q)[0]

    @staticmethod
    def condition(q: torch.Tensor, M_r: torch.Tensor) -> torch.Tensor:
        """The decoder's conditioning input [q ; M_r] (B,2C); each layer projects it by its own P_ℓ."""
        return torch.cat([q.float(), M_r.float()], dim=-1)

    def recall_condition(self, q: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """[q ; read(M, q)]: how every caller conditions the decoder on a query and a memory."""
        return self.condition(q, self.read_memory(M, q))

    def vision_prefix(self, V: torch.Tensor) -> torch.Tensor:
        """V (B,N,C) of a square pooled grid → the decoder's prefix embeddings (B,N,d): LN(V) plus
        learned row and column embeddings (RoPE orders the stream, not the 2-D layout)."""
        B, N, _ = V.shape
        side = math.isqrt(N)
        if side * side != N or side > self.config.vision_grid_max:
            raise ValueError(f"BitMar.vision_prefix: {N} vision tokens; expected a square grid of side "
                             f"<= vision_grid_max={self.config.vision_grid_max}")
        idx = torch.arange(N, device=V.device)
        return self.prefix_norm(V.float()) + self.prefix_row(idx // side) + self.prefix_col(idx % side)

    def scene_prefix(self, V: torch.Tensor) -> torch.Tensor | None:
        """The prefix a scene's decoder segment starts with: `vision_prefix(V)`, or None for a
        config without one (`vision_prefix: false`, the paper's form)."""
        return self.vision_prefix(V) if self.config.vision_prefix else None

    def scene_segment(self, V: torch.Tensor, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """How a scene (B=1) enters a description: its conditioning [q ; read(M, q)] with
        q = fuse(no text, V), and its prefix. Evaluation describes and scores scenes through this;
        the runtime does the same with its stateful memory (whose reads count as use)."""
        return self.recall_condition(self.fuse(None, None, V), M), self.scene_prefix(V)

    def decode(self, ids: torch.Tensor, cond: torch.Tensor | None = None,
               caches: list[SinkKVCache] | None = None, start: int = 0,
               prefix: torch.Tensor | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B,T) after an optional embedding prefix (B,P,d) → FP32 logits (B,P+T,V); with caches
        the input continues the cached stream."""
        emb = self.wte(ids)
        if prefix is not None:
            emb = torch.cat([prefix.to(emb.dtype), emb], dim=1)
        return self.decoder(emb, cond, caches, start, pos)

    def cross_modal_similarity(self, Z: torch.Tensor, mask: torch.Tensor | None, V: torch.Tensor) -> torch.Tensor:
        """Mean cosine between matched caption and image embeddings (the adaptive controller's signal)."""
        return (self.fusion.text_embedding(Z, mask) * self.fusion.vision_embedding(V)).sum(-1).mean()

    # --- training ---
    def _scene_streams(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss terms of the scene-stream task (see the module docstring)."""
        c = self.config
        ids, mask = batch["caption_ids"], batch["caption_mask"].bool()
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("BitMar.forward: caption_mask must be right-padded (1s then 0s) in every row")
        E = ids.shape[0]
        Z = self.encode_text(ids, mask)
        V = self.compress_vision(batch["vision"])
        t_emb = self.fusion.text_embedding(Z, mask)
        v_emb = self.fusion.vision_embedding(V)
        logits = (t_emb @ v_emb.T) / c.infonce_temperature
        labels = torch.arange(E, device=ids.device)
        cm = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        similarity = (t_emb * v_emb).sum(-1).mean().detach()
        M0 = self.memory.M0.float()
        mem = ids.new_zeros((), dtype=torch.float32)
        M = M0
        if c.memory_enabled:
            write_mask = torch.rand(E, device=ids.device) < c.write_fraction
            M, _ = self.memory.write(M0, self.fuse(Z, mask, V), write_mask)
            mem = delta_penalty(M, M0)
        cond_ep = self.recall_condition(self.fuse(None, None, V), M)  # (E, 2C)
        seg = batch["stream_segment"]
        cond = torch.where((seg >= 0).unsqueeze(-1), cond_ep[seg.clamp(min=0)], 0.0)
        emb = self.wte(batch["stream_ids"])
        if c.vision_prefix:
            prefix = self.vision_prefix(V).reshape(-1, c.d_model)
            slot = batch["stream_vision"]
            emb = torch.where((slot >= 0).unsqueeze(-1), prefix[slot.clamp(min=0)].to(emb.dtype), emb)
        out = self.decoder(emb, cond, pos=batch["stream_pos"])
        targets = batch["stream_targets"]
        sel = targets != IGNORE
        nll = F.cross_entropy(out[sel], targets[sel], reduction="sum")
        return {"nll": nll, "n": sel.sum(), "cm": cm, "mem": mem, "similarity": similarity}

    def _recall(self, batch: dict[str, torch.Tensor], use_memory: bool = True) -> dict[str, torch.Tensor]:
        """Loss terms of the recall task: episodes written one by one, a cue, the answer."""
        Z = self.encode_text(batch["recall_ids"], batch["recall_mask"])
        V = self.compress_vision(batch["recall_vision"])
        q = self.fuse(Z, batch["recall_mask"], V)  # (R, C)
        order = batch["recall_order"]  # (B, E) index into the R episodes, -1 = none
        written = order >= 0
        q_seq = q[order.clamp(min=0)] * written.unsqueeze(-1)
        M = self.memory.write_sequence(q_seq, written)
        if not use_memory:
            M = self.memory.M0.float().unsqueeze(0).expand_as(M)
        Zc = self.encode_text(batch["cue_ids"], batch["cue_mask"])
        q_cue = self.fuse(Zc, batch["cue_mask"], None)
        # the sinks carry no conditioning, as DecoderSession feeds them when the robot answers
        sinks = (batch["answer_pos"] < self.config.sink_tokens).view(1, -1, 1)
        cond = torch.where(sinks, 0.0, self.recall_condition(q_cue, M).unsqueeze(1))
        out = self.decode(batch["answer_ids"], cond, pos=batch["answer_pos"])
        targets = batch["answer_targets"]
        sel = targets != IGNORE
        nll = F.cross_entropy(out[sel], targets[sel], reduction="sum")
        return {"nll": nll, "n": sel.sum()}

    def _text(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss terms of text-only language modelling: no vision, conditioning zero."""
        out = self.decode(batch["text_ids"], None, pos=batch["text_pos"])
        targets = batch["text_targets"]
        sel = targets != IGNORE
        return {"nll": F.cross_entropy(out[sel], targets[sel], reduction="sum"), "n": sel.sum()}

    def forward(self, batch: dict[str, torch.Tensor], cm_weight: float | None = None) -> dict[str, torch.Tensor]:
        """batch: a scene-stream part (caption_ids/caption_mask (E,T) right-padded, vision (E,D,h,w),
        stream_ids/stream_vision/stream_segment/stream_targets (B,L), stream_pos (L,)) and optionally
        a recall part (recall_ids/recall_mask/recall_vision, recall_order (B',E'), cue_ids/cue_mask,
        answer_ids/answer_targets, answer_pos) and a text part (text_ids/text_targets (B'',L), text_pos).
        cm_weight overrides config.cm_weight (the adaptive controller's lever). loss = lm_weight·lm
        + cm_weight·cm + mem_weight·mem + recall_weight·lm_recall. Returns loss, lm (per
        target token over all tasks), lm_scene, lm_recall, lm_text, cm, mem and similarity (detached)."""
        c = self.config
        s = self._scene_streams(batch)
        nll, n = s["nll"], s["n"]
        zero = nll.new_zeros(())
        lm_recall = extra = zero
        if "answer_ids" in batch:
            r = self._recall(batch)
            nll, n = nll + r["nll"], n + r["n"]
            lm_recall = r["nll"] / r["n"].clamp(min=1)
            extra = c.recall_weight * lm_recall
            lm_recall = lm_recall.detach()
        lm_text = zero
        if "text_ids" in batch:
            r = self._text(batch)
            nll, n = nll + r["nll"], n + r["n"]
            lm_text = (r["nll"] / r["n"].clamp(min=1)).detach()
        lm = nll / n.clamp(min=1)
        w_cm = c.cm_weight if cm_weight is None else cm_weight
        loss = c.lm_weight * lm + w_cm * s["cm"] + c.mem_weight * s["mem"] + extra
        return {"loss": loss, "lm": lm, "lm_scene": (s["nll"] / s["n"].clamp(min=1)).detach(),
                "lm_recall": lm_recall, "lm_text": lm_text, "cm": s["cm"], "mem": s["mem"],
                "similarity": s["similarity"]}

    # --- bookkeeping ---
    def parameter_breakdown(self) -> "OrderedDict[str, int]":
        """Parameters per component (the shared embedding counted once)."""
        parts = OrderedDict()
        for name in ("wte", "text_encoder", "vision", "fusion", "memory", "decoder"):
            parts[name] = sum(p.numel() for p in getattr(self, name).parameters())
        if self.config.vision_prefix:
            parts["vision_prefix"] = sum(p.numel() for m in (self.prefix_norm, self.prefix_row, self.prefix_col)
                                         for p in m.parameters())
        parts["decoder.head"] = sum(p.numel() for p in self.decoder.head.parameters())
        return parts

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
