"""BitMarRuntime: the model as a perception node uses it — frame → vision tokens, episode →
memory write + retrieval embedding, streaming descriptions from one long-lived decoder session.

ROS-free, so the node stays a thin adapter and this can be driven from a script or a test. Every
model call takes one lock, held per call (and per decoded token), so a query from another thread
interleaves with a running description instead of waiting for it to finish.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..model.bitmar import BitMar
from .backbones import build_backbone
from .checkpoint import CheckpointError, load_checkpoint
from .decoding import DecoderSession
from .fast_decoder import FastDecoder
from .tokenizer import tokenizer_for


class RuntimeLoadError(Exception):
    """A runtime that cannot be built or a state that does not fit the model (named for what)."""


@dataclass
class FrameCode:
    """One camera frame through the quantized vision path."""
    V: torch.Tensor        # (1, N, C) compressed vision tokens
    q_scene: torch.Tensor  # (1, C) image-only fused query: what descriptions read memory with
    scene: np.ndarray      # (C,) unit vision embedding: retrieval by image and scene-change tests


@dataclass
class EpisodeCode:
    """A frame–caption episode: what is written to memory and what the store indexes."""
    q: torch.Tensor        # (C,) fused query q = fuse(caption, V), written into M
    embedding: np.ndarray  # (C,) unit; normalize(text_embedding + vision_embedding), the InfoNCE space


def _unit(x: torch.Tensor) -> np.ndarray:
    return F.normalize(x.reshape(-1).float(), dim=0).cpu().numpy().astype(np.float32)


class BitMarRuntime:
    def __init__(self, model: BitMar, backbone: torch.nn.Module, backbone_name: str, identity: str,
                 seed: int = 0) -> None:
        self.model = model.eval()
        self.backbone = backbone.eval()
        self.backbone_name = backbone_name
        self.identity = identity
        self.tokenizer = tokenizer_for(model)
        feat = getattr(backbone, "feature_dim", None)
        if feat is not None and feat != model.config.vision_feature_dim:
            raise RuntimeLoadError(f"backbone {backbone_name!r} gives {feat}-D features but the checkpoint's "
                                f"vision path expects {model.config.vision_feature_dim}-D")
        self._lock = threading.RLock()
        self._memory = model.memory.new_state()
        self._session = DecoderSession(FastDecoder(model), self.tokenizer)  # bit-identical, packed head
        self._generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_checkpoint(cls, path: str | Path, backbone: str | None = None, dinov2_weights_dir: str | None = None,
                        num_threads: int = 1, seed: int = 0) -> "BitMarRuntime":
        """Load a checkpoint (packed or FP32) and the backbone it was trained with (or ``backbone``)."""
        path = Path(path)
        if not path.is_file():
            raise RuntimeLoadError(f"checkpoint file not found: {path}")
        torch.set_num_threads(num_threads)
        try:
            model = load_checkpoint(path)
        except CheckpointError as exc:
            raise RuntimeLoadError(str(exc)) from None
        name = backbone or model.config.backbone
        kwargs = {"weights_dir": dinov2_weights_dir} if name.startswith("dinov2") else {}
        bb = build_backbone(name, **kwargs)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        identity = f"bitmar:{digest.hexdigest()[:16]}:{name}:C{model.config.memory_dim}"
        return cls(model, bb, name, identity, seed=seed)

    # ------------------------------------------------------------------ properties
    @property
    def input_size(self) -> tuple[int, int]:
        s = int(getattr(self.backbone, "input_size", 224))
        return s, s

    @property
    def embedding_dim(self) -> int:
        return self.model.config.memory_dim

    @property
    def memory_writes(self) -> int:
        return int(self._memory.n_writes)

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def embed_frame(self, rgb: np.ndarray) -> FrameCode:
        with self._lock:
            V = self.model.compress_vision(self.backbone.encode(rgb))
            q_scene = self.model.fuse(None, None, V)
            scene = self.model.fusion.vision_embedding(V)
        return FrameCode(V=V, q_scene=q_scene, scene=_unit(scene))

    def _text(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        # Words outside the model's vocabulary are dropped (VocabTokenizer); lexical search finds them.
        ids = self.tokenizer.encode(text)[: self.model.config.max_text_len] or [self.model.config.eos_id]
        t = torch.tensor([ids], dtype=torch.long)
        return t, torch.ones_like(t)

    @torch.no_grad()
    def encode_episode(self, code: FrameCode, caption: str) -> EpisodeCode:
        ids, mask = self._text(caption)
        with self._lock:
            Z = self.model.encode_text(ids, mask)
            q = self.model.fuse(Z, mask, code.V)
            t_emb = self.model.fusion.text_embedding(Z, mask)
            v_emb = self.model.fusion.vision_embedding(code.V)
        return EpisodeCode(q=q.reshape(-1), embedding=_unit(t_emb + v_emb))

    @torch.no_grad()
    def embed_query(self, text: str | None, code: FrameCode | None) -> np.ndarray:
        """The retrieval embedding of a query: text, image, or their sum, in the InfoNCE space."""
        if not text and code is None:
            raise ValueError("embed_query needs text, an image, or both")
        total = torch.zeros(self.embedding_dim)
        if text:
            ids, mask = self._text(text)
            with self._lock:
                total += self.model.fusion.text_embedding(self.model.encode_text(ids, mask), mask).reshape(-1)
        if code is not None:
            total += torch.from_numpy(code.scene)
        return _unit(total)

    # ------------------------------------------------------------------ episodic memory
    def write_memory(self, q: torch.Tensor) -> None:
        with self._lock:
            self._memory.write_(q)

    def memory_state(self) -> dict[str, np.ndarray]:
        with self._lock:
            return {k: v.cpu().numpy().copy() for k, v in self._memory.state_tensors().items()}

    def load_memory_state(self, state: dict[str, np.ndarray]) -> None:
        try:
            with self._lock:
                self._memory.load_state_tensors({k: torch.from_numpy(np.asarray(v).copy()) for k, v in state.items()})
        except (KeyError, ValueError) as exc:
            raise RuntimeLoadError(str(exc)) from None

    def reset_memory(self) -> None:
        with self._lock:
            self._memory.reset()

    # ------------------------------------------------------------------ generation
    def _cond(self, q: torch.Tensor, touch: bool = True) -> torch.Tensor:
        """[q ; read(M, q)] on the robot's memory (a read counts as use unless touch=False)."""
        M_r = self._memory.read(q, touch=touch)[0] if self.model.config.memory_enabled else torch.zeros_like(q)
        return self.model.condition(q, M_r)

    def describe(self, code: FrameCode, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, continue_session: bool = True) -> Iterator[tuple[int, str]]:
        """Stream (token_id, text_delta) of a description of ``code``: the scene's vision tokens
        and [eos] enter the decoder stream, conditioned on [q_scene ; read(M, q_scene)]. With
        ``continue_session`` it continues the one decoder session (attention sinks + window) that
        every description of this runtime shares; without, the session starts afresh."""
        with self._lock:
            if not continue_session:
                self._session.reset()
            cond = self._cond(code.q_scene)
            prefix = self.model.scene_prefix(code.V)
            it = self._session.stream([self.model.config.eos_id], cond, max_new_tokens, temperature,
                                      top_k or None, generator=self._generator, prefix=prefix)
        while True:
            with self._lock:
                item = next(it, None)
            if item is None:
                return
            # Python locks are not fair: without giving up the GIL here this loop takes the lock back
            # at once and a query waiting in another thread starves until the description ends.
            time.sleep(0)
            yield item

    @torch.no_grad()
    def answer(self, text: str | None, code: FrameCode | None, max_new_tokens: int = 32) -> str:
        """What memory holds about a query ("where was the purple cross?"), as the recall task
        trains it: q = fuse(query text, the image if any), the decoder conditioned on
        [q ; read(M, q)] in a fresh stream, greedy. The answer comes from memory, not from a frame."""
        if not text and code is None:
            raise ValueError("answer needs text, an image, or both")
        with self._lock:
            V = code.V if code is not None else None
            if text:
                ids, mask = self._text(text)
                q = self.model.fuse(self.model.encode_text(ids, mask), mask, V)
            else:
                q = self.model.fuse(None, None, V)
            cond = self._cond(q, touch=False)
            out = DecoderSession(self._session.model, self.tokenizer).generate([self.model.config.eos_id], cond,
                                                                               max_new_tokens)
        return self.tokenizer.decode(out)

    @property
    def session_position(self) -> int:
        return self._session.position

    def session_cache_bytes(self) -> int:
        return sum(c.nbytes() if callable(getattr(c, "nbytes", None)) else c.nbytes for c in self._session.caches)
