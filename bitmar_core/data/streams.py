"""Training batches of episodes: scene streams and memory recall (what `BitMar.forward` trains on).

Scene streams — the node's continuing narration, in training form. One decoder stream per row:

    [eos]×S (sinks, no conditioning) | V_1 (N vision tokens) eos caption_1 | V_2 eos caption_2 | ...

Each scene's tokens are conditioned on that scene's [q ; M_r]; the loss covers every caption token
and the eos that closes it (the next input is the next scene's vision, never that eos: a running
session does not feed the eos it stopped on). With probability `offset_prob` the stream after the
sinks starts at a random later position (up to `offset_max`), so queries meet the sinks from as far
as the cache ever puts them (S+W−1).

Recall — episodes written one by one into a fresh memory, then a cue about one of them:

    episodes e_1..e_E (8–64 single-object scenes, caption + vision)  →  M
    cue "where was the purple cross?"  →  [eos]×S eos "A large purple cross in the top left." eos

The target episode's colour+shape is unique among the E, so the answer is well defined, and it sits
at a random place in the write order (older episodes have faded more). Cues vary their wording and
use the caption grammar's synonyms ("violet", "disk"), so a query in other words still reaches it.

Text — the paper's text-only language modelling (BabyLM / Wikipedia), one document per row:
[eos]×S eos text eos(target), no vision and no conditioning (q = 0 as in the paper's text items).

Deterministic by seed; `state_dict()` resumes exactly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .datasets import ImageCaptionDataset
from .scenes import COLOURS, POSITIONS, SHAPES, SIZE_WORDS, Scene

IGNORE = -100

CUE_TEMPLATES = ("the {c} {s}", "where was the {c} {s}?", "where is the {c} {s}?", "where did you see the {c} {s}?",
                 "{c} {s}", "have you seen a {c} {s}?", "find the {c} {s}", "the {c} {s} you saw")
CUE_COLOURS = {c: [c] for c in COLOURS} | {"purple": ["purple", "purple", "violet"]}
CUE_SHAPES = {s: [s] for s in SHAPES} | {"circle": ["circle", "circle", "disk"], "oval": ["oval", "oval", "ellipse"]}
ANSWER_POSITION = {"top left": "in the top left", "top": "at the top", "top right": "in the top right",
                   "left": "on the left", "center": "in the center", "right": "on the right",
                   "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right"}


def recall_answer(colour: str, shape: str, size: str, position: str) -> str:
    """The canonical answer to a cue about one stored object (parsed by `scenes.parse_caption`)."""
    return f"A {size} {colour} {shape} {ANSWER_POSITION[position]}."


def cue_text(rng: np.random.Generator, colour: str, shape: str) -> str:
    c = CUE_COLOURS[colour][int(rng.integers(len(CUE_COLOURS[colour])))]
    s = CUE_SHAPES[shape][int(rng.integers(len(CUE_SHAPES[shape])))]
    return CUE_TEMPLATES[int(rng.integers(len(CUE_TEMPLATES)))].format(c=c, s=s)


def vocabulary_texts() -> list[str]:
    """Every cue and answer the recall task can produce (the vocabulary must cover them)."""
    out = []
    for colour in COLOURS:
        for shape in SHAPES:
            for tpl in CUE_TEMPLATES:
                for c in CUE_COLOURS[colour]:
                    for s in CUE_SHAPES[shape]:
                        out.append(tpl.format(c=c, s=s))
            for size in SIZE_WORDS:
                for pos in POSITIONS.values():
                    out.append(recall_answer(colour, shape, size, pos))
    return out


def load_scenes(folder: str | Path) -> list[Scene]:
    """The `scenes.jsonl` that `extract_features` writes beside generated scenes' features."""
    path = Path(folder) / "scenes.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: recall needs the scenes' ground truth")
    return [Scene.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


class EpisodeBatches:
    """Infinite, seeded batches of scene streams (+ recall items) from an `ImageCaptionDataset`.

    tokenizer: the model's (`tokenizer_for`); n_vision: vision tokens per scene (N of the pooled
    grid); scenes: ground truth per dataset row (needed for recall; None disables it)."""

    def __init__(self, data: ImageCaptionDataset, tokenizer, *, streams: int, scenes_per_stream: int,
                 n_vision: int, sink: int, seed: int, caption_max_tokens: int = 64,
                 scenes: Sequence[Scene] | None = None, recall_items: int = 0,
                 recall_episodes: tuple[int, int] = (8, 64), offset_prob: float = 0.0, offset_max: int = 2048,
                 texts: Sequence[str] | None = None, text_items: int = 0, text_max_tokens: int = 256,
                 rank: int = 0, world: int = 1):
        if streams % world or (recall_items and recall_items % world) or (text_items and text_items % world):
            raise ValueError(f"streams ({streams}), recall_items ({recall_items}) and text_items ({text_items}) "
                             f"must be multiples of the {world} ranks")
        self.texts = list(texts) if texts else []
        self.text_items = text_items if self.texts else 0
        self.text_max_tokens = text_max_tokens
        self.data, self.tok = data, tokenizer
        self.streams, self.per_stream = streams, scenes_per_stream
        self.n_vision, self.sink = n_vision, sink
        self.max_tokens = caption_max_tokens
        self.recall_items = recall_items if scenes is not None else 0
        self.recall_episodes = recall_episodes
        self.offset_prob, self.offset_max = offset_prob, offset_max
        self.rank, self.world = rank, world
        self.eos = tokenizer.eos_id
        self.vision_shape = tuple(data.vision_shape)
        self._ids_cache: dict[int, list[int]] = {}
        self.singles: list[int] = []
        self.scenes = scenes
        if scenes is not None:
            if len(scenes) != len(data):
                raise ValueError(f"{len(scenes)} scenes for {len(data)} dataset rows")
            self.singles = [i for i, s in enumerate(scenes) if len(s.objects) == 1]
            if self.recall_items and len(self.singles) < recall_episodes[0]:
                raise ValueError(f"recall needs >= {recall_episodes[0]} single-object scenes, the data has "
                                 f"{len(self.singles)}")
            # a small (validation) split writes at most the single-object scenes it has
            self.recall_episodes = (recall_episodes[0], min(recall_episodes[1], len(self.singles)))
        self.rng = np.random.default_rng([seed, 11])

    # ------------------------------------------------------------------ pieces
    def _caption(self, i: int) -> list[int]:
        ids = self._ids_cache.get(i)
        if ids is None:
            ids = self.tok.encode(self.data[i]["caption"])[: self.max_tokens] or [self.eos]
            self._ids_cache[i] = ids
        return ids

    def _positions(self, L: int) -> torch.Tensor:
        offset = 0
        if self.offset_prob > 0 and self.rng.random() < self.offset_prob:
            offset = int(self.rng.integers(1, self.offset_max + 1))
        S = min(self.sink, L)
        return torch.cat([torch.arange(S), S + offset + torch.arange(L - S)]).long()

    @staticmethod
    def _pad(rows: list[list[int]], fill: int) -> torch.Tensor:
        T = max(len(r) for r in rows)
        out = torch.full((len(rows), T), fill, dtype=torch.long)
        for b, r in enumerate(rows):
            out[b, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        return out

    def _vision(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([torch.as_tensor(np.asarray(self.data[i]["vision"]), dtype=torch.float32)
                            for i in indices])

    # ------------------------------------------------------------------ the two tasks
    def _scene_part(self) -> dict[str, torch.Tensor]:
        n_all = len(self.data)
        chosen = self.rng.integers(n_all, size=(self.streams, self.per_stream))
        mine = chosen[self.rank::self.world]
        episodes = [int(i) for row in mine for i in row]
        captions = [self._caption(i) for i in episodes]
        ids_rows, vis_rows, seg_rows, tgt_rows = [], [], [], []
        N = self.n_vision
        for b, row in enumerate(mine):
            ids = [self.eos] * self.sink
            vis, seg, tgt = [-1] * self.sink, [-1] * self.sink, [IGNORE] * self.sink
            for s_ in range(len(row)):
                e = b * len(row) + s_
                cap = captions[e]
                ids += [self.eos] * N + [self.eos] + cap
                vis += [e * N + n for n in range(N)] + [-1] * (1 + len(cap))
                seg += [e] * (N + 1 + len(cap))
                tgt += [IGNORE] * N + cap + [self.eos]
            ids_rows.append(ids), vis_rows.append(vis), seg_rows.append(seg), tgt_rows.append(tgt)
        cap_ids = self._pad(captions, self.eos)
        cap_mask = self._pad([[1] * len(c) for c in captions], 0).bool()
        stream_ids = self._pad(ids_rows, self.eos)
        return {"caption_ids": cap_ids, "caption_mask": cap_mask, "vision": self._vision(episodes),
                "stream_ids": stream_ids, "stream_vision": self._pad(vis_rows, -1),
                "stream_segment": self._pad(seg_rows, -1), "stream_targets": self._pad(tgt_rows, IGNORE),
                "stream_pos": self._positions(stream_ids.shape[1])}

    def _recall_item(self) -> tuple[list[int], int, str, str]:
        """(episode rows in write order, index of the target in it, cue, answer)."""
        lo, hi = self.recall_episodes
        for _ in range(100):  # a draw where every colour+shape repeats has no well-defined answer: redraw
            E = int(self.rng.integers(lo, hi + 1))
            rows = [self.singles[int(k)] for k in self.rng.choice(len(self.singles), size=E, replace=False)]
            desc = [self.scenes[r].objects[0].descriptor for r in rows]
            counts: dict = {}
            for d in desc:
                counts[d] = counts.get(d, 0) + 1
            unique = [k for k, d in enumerate(desc) if counts[d] == 1]
            if unique:
                break
        else:
            raise ValueError(f"recall: no draw of {lo}-{hi} single-object scenes has a colour+shape of its own; "
                             "the data needs more varied single-object scenes")
        target = unique[int(self.rng.integers(len(unique)))]
        o = self.scenes[rows[target]].objects[0]
        return rows, target, cue_text(self.rng, o.colour, o.shape), recall_answer(o.colour, o.shape, o.size, o.position)

    def _recall_part(self) -> dict[str, torch.Tensor]:
        items = [self._recall_item() for _ in range(self.recall_items)][self.rank::self.world]
        episodes, order, cues, answers = [], [], [], []
        for rows, _, cue, answer in items:
            order.append(list(range(len(episodes), len(episodes) + len(rows))))
            episodes += rows
            cues.append(self.tok.encode(cue) or [self.eos])
            answers.append(self.tok.encode(answer))
        captions = [self._caption(i) for i in episodes]
        ans_in = [[self.eos] * self.sink + [self.eos] + a for a in answers]
        ans_tgt = [[IGNORE] * self.sink + a + [self.eos] for a in answers]
        answer_ids = self._pad(ans_in, self.eos)
        return {"recall_ids": self._pad(captions, self.eos),
                "recall_mask": self._pad([[1] * len(c) for c in captions], 0).bool(),
                "recall_vision": self._vision(episodes), "recall_order": self._pad(order, -1),
                "cue_ids": self._pad(cues, self.eos), "cue_mask": self._pad([[1] * len(c) for c in cues], 0).bool(),
                "answer_ids": answer_ids, "answer_targets": self._pad(ans_tgt, IGNORE),
                "answer_pos": self._positions(answer_ids.shape[1])}

    def _text_part(self) -> dict[str, torch.Tensor]:
        chosen = self.rng.integers(len(self.texts), size=self.text_items)[self.rank::self.world]
        rows = [self.tok.encode(self.texts[int(i)])[: self.text_max_tokens] or [self.eos] for i in chosen]
        ids = [[self.eos] * self.sink + [self.eos] + r for r in rows]
        tgt = [[IGNORE] * self.sink + r + [self.eos] for r in rows]
        text_ids = self._pad(ids, self.eos)
        return {"text_ids": text_ids, "text_targets": self._pad(tgt, IGNORE),
                "text_pos": self._positions(text_ids.shape[1])}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self._scene_part()
        if self.recall_items:
            batch.update(self._recall_part())
        if self.text_items:
            batch.update(self._text_part())
        return batch

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
