"""BitMarConfig: every size and weight of the model in one place (paper §3).

Values default to the paper's; loaded from YAML (`config/model_default.yaml`), a dict, or the JSON
that a checkpoint carries. `__post_init__` rejects impossible values with the field's name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Any

# Patch-feature width of each vision backbone (what `backbones.py` emits as D in (B, D, h, w)).
BACKBONE_FEATURE_DIMS = {
    "efficientnet_lite0": 1280,
    "dinov2_vitb14": 768,
    "dinov2_vits14": 384,
    "precomputed": None,  # whatever the .npy files hold
}


@dataclass
class BitMarConfig:
    # --- text (GPT-2 BPE) and shared width ---
    vocab_size: int = 50257
    eos_id: int = 50256  # <|endoftext|>; also the decoder's start token
    d_model: int = 128
    n_heads: int = 4
    n_encoder_layers: int = 4
    n_decoder_layers: int = 4
    mlp_ratio: int = 4
    max_text_len: int = 256  # text encoder positions
    dropout: float = 0.0  # the model is tiny and ternary; quantisation noise already regularises
    layer_norm_eps: float = 1e-5
    # Input embedding = the output head's ternary weight (β·T rows), as nanoGPT ties wte and
    # lm_head: the 50,257×128 table is then stored once at 2 bits/weight (packed file ≤ 5 MB)
    # instead of a second FP16 copy of 12.9 MB.
    tie_embeddings: bool = False
    # The head (and the tied embedding) cover only the GPT-2 tokens of the training corpus, listed
    # in the model's `token_ids` buffer (row i ↔ GPT-2 id token_ids[i]); ids the model reads and
    # writes are row indices, translated by `bitmar_core.inference.tokenizer.VocabTokenizer`. Training and
    # inference then share one softmax (over these rows), and the head shrinks from 50,257 rows to
    # a few hundred: most of a training step and of a decode step was that head.
    vocab_subset: bool = False

    # --- vision ---
    backbone: str = "efficientnet_lite0"  # paper: dinov2_vitb14 (768-D); its weights are not offline
    vision_feature_dim: int = 1280  # D of the backbone's patch grid; must match `backbone`
    vision_hidden: int = 384
    vision_dropout: float = 0.1
    # Ours: the decoder also reads the N compressed vision tokens V as a prefix of each described
    # scene (with learned row/column embeddings), beside the paper's per-layer [q ; M_r]; a single
    # pooled 128-D q lost colour, shape and position (docs/MODEL.md, the ablation table).
    vision_prefix: bool = True
    vision_grid_max: int = 16  # largest pooled grid side the row/column embeddings cover

    # --- fusion ---
    n_fusion_queries: int = 4  # learned queries, so fusion works with no text (image-only describe)
    fusion_pooling: str = "mean"  # 'mean' | 'learned'
    infonce_temperature: float = 0.07

    # --- episodic memory (§3.4) ---
    memory_enabled: bool = True  # off: the decoder is conditioned on M_r = 0
    memory_slots: int = 512  # K
    memory_dim: int = 128  # C; equals d_model in the paper (one shared 128-D space)
    memory_alpha: float = 0.2  # write rate α
    memory_usage_decay: float = 0.99  # γ in u <- γ·u + mean_b(w_w + w_r)
    memory_forget_base: float = 0.002  # f0: every slot decays a little per write, so |M| stays bounded
    memory_forget_rate: float = 0.02  # f: extra decay of the least-used slots
    write_fraction: float = 0.5  # share of image–caption items written to M during training
    # Ours (docs/MODEL.md, "Memory that matters"); the defaults are the paper's eq. 1–2.
    memory_read: str = "dot"  # 'dot': w_r = softmax(τ M q); 'cosine': softmax(τ cos(M_k, q)), so a slot's age (decay) does not change what finds it
    memory_write_usage: float = 0.0  # λ: write logits W_w q − λ·u, so a new episode avoids slots that already hold one
    memory_init: str = "learned"  # 'learned': M0 a parameter; 'zero': the memory starts empty (M0 = 0, a buffer)

    # --- decoder with attention sinks (§3.4.1) ---
    sink_tokens: int = 4  # S, never evicted
    window: int = 1020  # W most recent tokens, the current one included; S + W = 1024 positions
    # Training only: share of streams whose tokens after the sinks start at a random later position,
    # so queries meet the sink keys from as far as the cache ever puts them (S+W−1).
    position_offset_prob: float = 0.0
    # Rotary positions (RoPE) assigned by place in the cache at attention time, as StreamingLLM:
    # a window key sits at its distance from the query, a sink key at its slot (≤ S+W−1 away), so
    # order inside the window is kept however long the stream runs.
    rope_base: float = 10000.0
    conditioning: str = "add"  # 'add' (x + c_l) | 'concat' (BitLinear([x ; c_l]) -> d)

    # --- objective (eq. 4) ---
    lm_weight: float = 1.0
    cm_weight: float = 1.5  # paper: prioritise cross-modal alignment
    mem_weight: float = 0.1  # paper: a light stabiliser
    # Ours: an extra weight on the recall task's mean token loss. Its answers are ~5% of a batch's
    # tokens, and only they need M_r, so pooled per token they barely steer the memory path.
    recall_weight: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"BitMarConfig.{name} = {getattr(self, name)!r}: expected {expected}")

        for name in ("vocab_size", "d_model", "n_heads", "n_encoder_layers", "n_decoder_layers",
                     "mlp_ratio", "max_text_len", "vision_feature_dim", "vision_hidden",
                     "n_fusion_queries", "memory_slots", "memory_dim", "sink_tokens", "window",
                     "vision_grid_max"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(name, "an integer >= 1")
        if not 0 <= self.eos_id < self.vocab_size:
            fail("eos_id", f"an id in [0, vocab_size={self.vocab_size})")
        if self.d_model % self.n_heads:
            fail("d_model", f"a multiple of n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            fail("n_heads", "a divisor of d_model leaving an even head width (rotary pairs)")
        if not self.rope_base > 1.0:
            fail("rope_base", "a number > 1")
        if self.memory_dim != self.d_model:
            fail("memory_dim", f"equal to d_model={self.d_model} (text, vision and memory share one space)")
        for name in ("dropout", "vision_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, "a probability in [0, 1)")
        for name in ("memory_alpha", "memory_usage_decay", "infonce_temperature", "layer_norm_eps"):
            if not 0.0 < getattr(self, name) <= 1.0:
                fail(name, "a number in (0, 1]")
        if not 0.0 <= self.write_fraction <= 1.0:
            fail("write_fraction", "a fraction in [0, 1]")
        if not 0.0 <= self.position_offset_prob <= 1.0:
            fail("position_offset_prob", "a probability in [0, 1]")
        if self.memory_forget_base < 0 or self.memory_forget_rate < 0:
            fail("memory_forget_base" if self.memory_forget_base < 0 else "memory_forget_rate", "a rate >= 0")
        if self.memory_forget_base + self.memory_forget_rate >= 1.0:
            fail("memory_forget_rate", f"memory_forget_base + memory_forget_rate < 1 (a slot must not be wiped in one step)")
        for name in ("lm_weight", "cm_weight", "mem_weight", "recall_weight"):
            if getattr(self, name) < 0:
                fail(name, "a loss weight >= 0")
        if self.memory_read not in ("dot", "cosine"):
            fail("memory_read", "'dot' or 'cosine'")
        if self.memory_init not in ("learned", "zero"):
            fail("memory_init", "'learned' or 'zero'")
        if self.memory_write_usage < 0:
            fail("memory_write_usage", "a weight >= 0")
        if self.fusion_pooling not in ("mean", "learned"):
            fail("fusion_pooling", "'mean' or 'learned'")
        if self.conditioning not in ("add", "concat"):
            fail("conditioning", "'add' or 'concat'")
        if self.backbone not in BACKBONE_FEATURE_DIMS:
            fail("backbone", f"one of {sorted(BACKBONE_FEATURE_DIMS)}")
        want = BACKBONE_FEATURE_DIMS[self.backbone]
        if want is not None and self.vision_feature_dim != want:
            fail("vision_feature_dim", f"{want} for backbone {self.backbone!r}")

    @property
    def max_positions(self) -> int:
        """Cache capacity S + W: a query is never more than S + W − 1 places from a key it sees."""
        return self.sink_tokens + self.window

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BitMarConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"BitMarConfig: unknown field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "BitMarConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"BitMarConfig: no such YAML file {path}")
        d = yaml.safe_load(path.read_text())
        if not isinstance(d, dict):
            raise ValueError(f"BitMarConfig: {path} must hold a mapping of field: value, got {type(d).__name__}")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
