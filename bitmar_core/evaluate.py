"""`bitmar-eval`: captioning on held-out generated scenes, the episodic-memory recall ablation and
the paper's zero-shot language benchmarks, for one checkpoint; prints a table, writes JSON.

    bitmar-eval --checkpoint checkpoints/bitmar_default.safetensors \
        --tasks captioning,memory,benchmarks --n 200 --out results.json

Captions are greedy from a fresh decoder stream and a fresh memory (M0), conditioned on the image
only, as `BitMar.forward` trains them. See docs/EVALUATION.md for each protocol.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .benchmarks import TASK_FILES, evaluate_benchmarks
from .data.datasets import tokenize
from .data.scenes import (Scene, attribute_facts, caption_scene, generate_scene, parse_caption, render_scene,
                          split_seed, true_facts)
from .generation import DecoderSession
from .metrics import FactCounts, corpus_bleu, sentence_bleu

TASKS = ("captioning", "memory", "benchmarks")
DEFAULT_BENCHMARKS_DIR = Path("data/benchmarks")
ALT_REFERENCES = 4  # extra wordings of each test caption for multi-reference BLEU
MEMORY_START = 100_000  # the memory task's scenes come from here in the test split, apart from captioning's


# --------------------------------------------------------------------------- held-out scenes

class HeldOutScenes:
    """Scenes of the generator's test split with their backbone patch grids (B, D, h, w).

    Grids come from `features` (a `PrecomputedFeatures` of test items `features_start`...) or are
    computed by `encode_images` (a backbone's `encode`) on rendered scenes, rounded through float16
    exactly as the training features are stored, and optionally cached as one `.npy` per item."""

    def __init__(self, encode_images: Callable[[list[np.ndarray]], torch.Tensor] | None = None,
                 features=None, features_start: int = 0, image_size: int = 224, batch_size: int = 32,
                 cache_dir: str | Path | None = None):
        if (encode_images is None) == (features is None):
            raise ValueError("HeldOutScenes needs exactly one of encode_images (a backbone) or features (precomputed)")
        self.encode_images, self.features = encode_images, features
        self.features_start, self.image_size, self.batch_size = features_start, image_size, batch_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._scenes: dict[int, Scene] = {}
        self._grids: dict[int, torch.Tensor] = {}

    def scene(self, index: int) -> Scene:
        if index not in self._scenes:
            self._scenes[index] = generate_scene(split_seed("test", index))
        return self._scenes[index]

    def _cache_path(self, index: int) -> Path | None:
        return self.cache_dir / f"{index}.npy" if self.cache_dir is not None else None

    def grids(self, indices: Sequence[int]) -> torch.Tensor:
        indices = [int(i) for i in indices]
        if self.features is not None:
            rows = [i - self.features_start for i in indices]
            bad = [i for i, r in zip(indices, rows) if not 0 <= r < len(self.features)]
            if bad:
                raise ValueError(f"test scene {bad[0]} is not in the precomputed features {self.features.path} "
                                 f"(rows hold test items {self.features_start}..{self.features_start + len(self.features) - 1})")
            return self.features[np.asarray(rows)]
        todo = []
        for i in dict.fromkeys(indices):
            if i in self._grids:
                continue
            path = self._cache_path(i)
            if path is not None and path.is_file():
                self._grids[i] = torch.from_numpy(np.load(path).astype(np.float32))
            else:
                todo.append(i)
        for k in range(0, len(todo), self.batch_size):
            chunk = todo[k:k + self.batch_size]
            images = [render_scene(self.scene(i), self.image_size) for i in chunk]
            grids = self.encode_images(images).detach().cpu().half()
            for i, g in zip(chunk, grids):
                self._grids[i] = g.float()
                path = self._cache_path(i)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.save(path, g.numpy())
        return torch.stack([self._grids[i] for i in indices])


def alternative_captions(scene: Scene, k: int = ALT_REFERENCES) -> list[str]:
    """k more wordings of the scene's caption (same facts, other phrasing), deterministic."""
    return [caption_scene(scene, np.random.default_rng([scene.seed, 100 + j])) for j in range(k)]


def most_frequent_caption(n_train: int, split: str = "train") -> tuple[str, int]:
    """The most frequent caption among items 0..n_train-1 of `split` (ties: alphabetically first)."""
    counts = Counter(generate_scene(split_seed(split, i)).caption for i in range(n_train))
    caption, count = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return caption, count


# --------------------------------------------------------------------------- decoding

def caption_ids(tokenizer, captions: Sequence[str], max_len: int, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, mask) of captions tokenised as in training: no eos, since BitMar frames
    every decoder sequence as [eos] + ids + [eos] itself."""
    rows = [tokenize(tokenizer, c, max_len, eos_id, append_eos=False) for c in captions]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), eos_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
    return ids, mask


@torch.no_grad()
def describe_condition(model, V: torch.Tensor, M: torch.Tensor | None = None) -> torch.Tensor:
    """[q ; read(M, q)] with q = fuse(no text, V): the training-time conditioning of a caption.
    M defaults to the fresh memory M0."""
    q = model.fuse(None, None, V)
    M = model.memory.M0.detach().float() if M is None else M
    return model.condition(q, model.read_memory(M, q))


@torch.no_grad()
def greedy_decode(model, cond: torch.Tensor, max_new_tokens: int, batch_size: int = 32) -> list[list[int]]:
    """Greedy continuations of [eos] for each row of cond (B, 2C), each in a fresh stream; the same
    tokens as `generate(model, [eos], cond[b:b+1], max_new_tokens)`, decoded `batch_size` at a time."""
    eos = model.config.eos_id
    out: list[list[int]] = []
    device = model.memory.M0.device
    for s in range(0, cond.shape[0], batch_size):
        c = cond[s:s + batch_size].to(device)
        B = c.shape[0]
        caches = model.decoder.new_caches(B, device)
        rows: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool)
        logits = model.decode(torch.full((B, 1), eos, dtype=torch.long, device=device), c, caches)[:, -1]
        for _ in range(max_new_tokens):
            tok = logits.argmax(dim=-1)
            for b in range(B):
                if not done[b]:
                    if int(tok[b]) == eos:
                        done[b] = True
                    else:
                        rows[b].append(int(tok[b]))
            if done.all():
                break
            logits = model.decode(tok.unsqueeze(1), c, caches)[:, -1]
        out += rows
    return out


@torch.no_grad()
def caption_nll(model, tokenizer, captions: Sequence[str], cond: torch.Tensor, batch_size: int = 32) -> list[float]:
    """Teacher-forced mean negative log-likelihood per token of each caption (its tokens and the
    closing eos after [eos]) under its row of cond: what the decoder knows even when greedy
    decoding fails."""
    eos = model.config.eos_id
    out: list[float] = []
    device = model.memory.M0.device
    for s in range(0, len(captions), batch_size):
        rows = [tokenizer.encode(c)[: model.config.max_positions - 2] for c in captions[s:s + batch_size]]
        ids = torch.full((len(rows), max(len(r) for r in rows) + 2), eos, dtype=torch.long, device=device)
        for b, r in enumerate(rows):
            ids[b, 1:1 + len(r)] = torch.tensor(r, device=device)
        logp = model.decode(ids[:, :-1], cond[s:s + len(rows)].to(device)).log_softmax(dim=-1)
        nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        out += [float(nll[b, :len(r) + 1].mean()) for b, r in enumerate(rows)]
    return out


# --------------------------------------------------------------------------- captioning

def score_captions(texts: Sequence[str], scenes: Sequence[Scene], refs_multi: Sequence[Sequence[str]]) -> dict:
    """Attribute P/R/F1 (micro, macro, per category), corpus BLEU-4 against the shipped caption and
    against it plus its alternative wordings, mean smoothed sentence BLEU, mean length in words."""
    facts = FactCounts()
    for text, scene in zip(texts, scenes):
        facts.add(parse_caption(text), attribute_facts(scene), true_facts(scene))
    single = [[s.caption] for s in scenes]
    return {"attributes": facts.summary(),
            "bleu4": corpus_bleu(texts, single).score,
            "bleu4_multi_ref": corpus_bleu(texts, refs_multi).score,
            "sentence_bleu4": float(np.mean([sentence_bleu(t, r).score for t, r in zip(texts, single)])),
            "mean_words": float(np.mean([len(t.split()) for t in texts])),
            "empty_fraction": float(np.mean([not t.strip() for t in texts])),  # eos straight away
            "n": len(texts)}


@torch.no_grad()
def session_captions(model, tokenizer, cond: torch.Tensor, max_new_tokens: int) -> tuple[list[str], int]:
    """Runtime-style: one decoder session describes every frame in turn (the stream continues and
    its positions clamp at S+W−1 once long). → (captions, final stream position)."""
    session = DecoderSession(model, tokenizer)
    eos = model.config.eos_id
    texts = [tokenizer.decode(session.generate(session.separator(eos), cond[b:b + 1], max_new_tokens))
             for b in range(cond.shape[0])]
    return texts, session.position


@torch.no_grad()
def evaluate_captioning(model, tokenizer, test: HeldOutScenes, n: int = 200, max_new_tokens: int = 96,
                        baseline_train_n: int = 8000, session_n: int = 0, batch_size: int = 32,
                        n_examples: int = 5) -> dict:
    indices = list(range(n))
    scenes = [test.scene(i) for i in indices]
    alts = [alternative_captions(s) for s in scenes]
    refs_multi = [[s.caption] + a[1:] for s, a in zip(scenes, alts)]
    cond = torch.cat([describe_condition(model, model.compress_vision(test.grids(indices[k:k + batch_size])))
                      for k in range(0, n, batch_size)])
    texts = [tokenizer.decode(ids) for ids in greedy_decode(model, cond, max_new_tokens, batch_size)]
    refs = [sc.caption for sc in scenes]
    nll = caption_nll(model, tokenizer, refs, cond, batch_size)
    nll_other = caption_nll(model, tokenizer, refs, cond.roll(1, dims=0), batch_size)  # another scene's image
    frequent, count = most_frequent_caption(baseline_train_n)
    systems = {
        "model": score_captions(texts, scenes, refs_multi),
        "most_frequent_train_caption": score_captions([frequent] * n, scenes, refs_multi),
        # Another wording of the true caption: the ceiling of the parser and of BLEU's wording penalty.
        "reference_rewording": score_captions([a[0] for a in alts], scenes, refs_multi),
    }
    out = {"n": n, "max_new_tokens": max_new_tokens, "systems": systems,
           "caption_nll": {"own_image": float(np.mean(nll)), "other_image": float(np.mean(nll_other)),
                           "own_minus_other": paired_difference(nll, nll_other)},
           "baseline_caption": frequent, "baseline_caption_count": count, "baseline_train_n": baseline_train_n,
           "examples": [{"test_index": i, "reference": s.caption, "generated": t}
                        for i, s, t in list(zip(indices, scenes, texts))[:n_examples]]}
    if session_n:
        m = min(session_n, n)
        session_texts, position = session_captions(model, tokenizer, cond[:m], max_new_tokens)
        out["session"] = {**score_captions(session_texts, scenes[:m], refs_multi[:m]), "final_position": position,
                          "fresh_stream_same_scenes": score_captions(texts[:m], scenes[:m], refs_multi[:m])}
    return out


# --------------------------------------------------------------------------- memory recall

def receptive_field(config) -> int:
    """R = L·(W−1): a token followed by at least R stream tokens no longer reaches the next query
    through the sink KV cache (the S sinks aside). A query sees W−1 tokens back and each layer's
    cached keys/values were mixed over W−1 more, so L layers reach back L·(W−1) tokens."""
    return config.n_decoder_layers * (config.window - 1)


@dataclass
class StreamEvent:
    kind: str  # "preamble" | "episode" | "distractor"
    start: int  # stream index of its first token
    n_tokens: int
    episode: int | None = None  # position in MemoryTrial.episodes


@dataclass
class MemoryTrial:
    """One robot-like stream: a preamble of S tokens (so the sinks hold no episode), then per
    episode its caption tokens and ≥ `gap_tokens` of unrelated text; the query comes last."""
    episodes: list[int]  # test-split indices, in the order they were experienced (and written)
    events: list[StreamEvent] = field(default_factory=list)
    query_start: int = 0

    def position_of_lag(self, lag: int) -> int:
        """The episode experienced `lag` episodes before the last one (lag 0: the last)."""
        if not 0 <= lag < len(self.episodes):
            raise ValueError(f"lag {lag} outside [0, {len(self.episodes)})")
        return len(self.episodes) - 1 - lag

    def tokens_since(self, position: int) -> int:
        """Stream tokens between the end of episode `position`'s caption and the query."""
        ev = next(e for e in self.events if e.kind == "episode" and e.episode == position)
        return self.query_start - (ev.start + ev.n_tokens)


def build_memory_trial(episodes: Sequence[int], caption_tokens: Sequence[int], distractor_tokens: Iterable[int],
                       gap_tokens: int, sink_tokens: int) -> MemoryTrial:
    """Lay out the stream: `caption_tokens[k]` is episode k's length; distractor texts of the given
    token counts are drawn in order until each gap holds at least `gap_tokens`."""
    trial = MemoryTrial(list(episodes), [StreamEvent("preamble", 0, sink_tokens)])
    pos = sink_tokens
    distractors = iter(distractor_tokens)
    for k, n in enumerate(caption_tokens):
        trial.events.append(StreamEvent("episode", pos, int(n), k))
        pos += int(n)
        gap = 0
        while gap < gap_tokens:
            try:
                d = int(next(distractors))
            except StopIteration:
                raise ValueError("ran out of distractor text before filling a gap") from None
            trial.events.append(StreamEvent("distractor", pos, d))
            pos, gap = pos + d, gap + d
    trial.query_start = pos
    return trial


def distractor_texts(n: int = 400) -> list[str]:
    """Unrelated text for the gaps: Wikipedia validation summaries where installed, else captions
    of validation-split scenes."""
    try:
        from .data.text import wiki_text_split

        texts = wiki_text_split("validation")[:n]
        if texts:
            return texts
    except (FileNotFoundError, ValueError):
        pass
    return [generate_scene(split_seed("validation", i)).caption for i in range(n)]


def _cycle(items: Sequence[int]):
    while True:
        yield from items


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def object_set(facts: set) -> set:
    return {f for f in facts if f[0] == "object"}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of a − b over paired items, its standard error and a normal 95% interval."""
    d = np.asarray(a, float) - np.asarray(b, float)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    m = float(d.mean()) if len(d) else float("nan")
    return {"mean": m, "se": se, "ci95": [m - 1.96 * se, m + 1.96 * se]}


MEMORY_CONDITIONS = ("on", "on_without_target", "off_fresh", "off_zero")


@torch.no_grad()
def memory_conditions(model, q_ep: torch.Tensor, q_desc: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Episodes q_ep (N,C) written in order by `EpisodicMemoryState.write_`; each episode p is then
    described from its image q_desc[p] under every condition → ({name: (N, 2C)}, M after the writes)."""
    N = q_ep.shape[0]
    state = model.memory.new_state()
    for k in range(N):
        state.write_(q_ep[k])
    without = []
    for p in range(N):
        ctrl = model.memory.new_state()
        for k in range(N):
            if k != p:
                ctrl.write_(q_ep[k])
        without.append(model.read_memory(ctrl.M, q_desc[p:p + 1]))
    M0 = model.memory.M0.detach().float()
    conds = {"on": model.condition(q_desc, model.read_memory(state.M, q_desc)),
             "on_without_target": model.condition(q_desc, torch.cat(without)),
             "off_fresh": model.condition(q_desc, model.read_memory(M0, q_desc)),
             "off_zero": model.condition(q_desc, torch.zeros_like(q_desc))}
    return conds, state.M


@torch.no_grad()
def evaluate_memory(model, tokenizer, test: HeldOutScenes, trials: int = 12, episodes: int = 16,
                    start: int = MEMORY_START, max_new_tokens: int = 96, gap_tokens: int | None = None,
                    batch_size: int = 32, distractors: Sequence[str] | None = None) -> dict:
    """Write `episodes` scene+caption episodes per trial (q = fuse(caption, V), sequential
    `EpisodicMemoryState.write_` with forgetting), then re-present each episode's image alone and
    describe it greedily under four memory conditions; score against that episode's caption.

    on: read the written memory; on_without_target: the same writes minus the target's (is it the
    episode, or just a used memory?); off_fresh: read M0 (nothing written); off_zero: M_r = 0."""
    c = model.config
    eos = c.eos_id
    gap_tokens = receptive_field(c) if gap_tokens is None else gap_tokens
    pool = [len(tokenizer.encode(t)) for t in (distractors if distractors is not None else distractor_texts())]
    if not pool or min(pool) < 1:
        raise ValueError("distractor texts must be non-empty")
    distractor_stream = _cycle(pool)
    conds: dict[str, list[torch.Tensor]] = {k: [] for k in MEMORY_CONDITIONS}
    targets, lags, gaps, layouts = [], [], [], []
    retrieval = {"store_image_to_episode": [], "image_to_caption": [], "fused_query": [], "memory_slots": []}
    for t in range(trials):
        idx = [start + t * episodes + k for k in range(episodes)]
        scenes = [test.scene(i) for i in idx]
        ids, mask = caption_ids(tokenizer, [s.caption for s in scenes], c.max_text_len, eos)
        trial = build_memory_trial(idx, mask.sum(1).tolist(), distractor_stream, gap_tokens, c.sink_tokens)
        layouts.append({"episodes": len(idx), "query_start": trial.query_start,
                        "min_tokens_since": min(trial.tokens_since(p) for p in range(len(idx)))})
        V = model.compress_vision(test.grids(idx))
        Z = model.encode_text(ids, mask)
        q_ep = model.fuse(Z, mask, V)  # what is written: the episode (caption and image)
        q_desc = model.fuse(None, None, V)  # what describes: the image alone
        trial_conds, M_on = memory_conditions(model, q_ep, q_desc)
        for name in MEMORY_CONDITIONS:
            conds[name].append(trial_conds[name])
        for p in range(len(idx)):
            targets.append(scenes[p])
            lags.append(len(idx) - 1 - p)
            gaps.append(trial.tokens_since(p))
        # Retrieval of the right episode among this trial's, from the re-presented image.
        t_emb, v_emb = model.fusion.text_embedding(Z, mask), model.fusion.vision_embedding(V)
        store_keys = _unit(t_emb + v_emb)  # what the runtime indexes an episode by
        w_r = model.memory.read(M_on, q_desc)[1]
        w_w = model.memory.write_weights(q_ep)
        truth = torch.arange(len(idx))
        retrieval["store_image_to_episode"] += (((_unit(v_emb) @ store_keys.T).argmax(1)) == truth).tolist()
        retrieval["image_to_caption"] += ((v_emb @ t_emb.T).argmax(1) == truth).tolist()
        retrieval["fused_query"] += ((_unit(q_desc) @ _unit(q_ep).T).argmax(1) == truth).tolist()
        retrieval["memory_slots"] += ((w_r @ w_w.T).argmax(1) == truth).tolist()

    results: dict[str, dict] = {}
    per_item_f1: dict[str, list[float]] = {}
    per_item_nll: dict[str, list[float]] = {}
    for name in MEMORY_CONDITIONS:
        per_item_nll[name] = caption_nll(model, tokenizer, [s.caption for s in targets], torch.cat(conds[name]),
                                         batch_size)
        texts = [tokenizer.decode(x) for x in greedy_decode(model, torch.cat(conds[name]), max_new_tokens, batch_size)]
        facts = FactCounts()
        f1s, obj_ok = [], []
        for text, scene in zip(texts, targets):
            pred = parse_caption(text)
            f1s.append(facts.add(pred, attribute_facts(scene), true_facts(scene))["f1"])
            obj_ok.append(object_set(pred) == object_set(attribute_facts(scene)))
        per_item_f1[name] = f1s
        by_lag = {}
        for lag in sorted(set(lags)):
            sel = [i for i, l in enumerate(lags) if l == lag]
            by_lag[str(lag)] = {"f1": float(np.mean([f1s[i] for i in sel])),
                                "object_accuracy": float(np.mean([obj_ok[i] for i in sel]))}
        results[name] = {"f1": float(np.mean(f1s)), "object_accuracy": float(np.mean(obj_ok)),
                         "caption_nll": float(np.mean(per_item_nll[name])),
                         "attributes": facts.summary(), "by_lag": by_lag, "example": texts[0]}
    chance = float(np.mean([1.0 / episodes] * len(lags)))
    return {
        "trials": trials, "episodes_per_trial": episodes, "queries": len(lags), "start": start,
        "gap_tokens_min": gap_tokens, "sink_plus_window": c.max_positions, "receptive_field": receptive_field(c),
        "min_tokens_since_target": int(min(gaps)), "stream_tokens_per_trial": float(np.mean([l["query_start"] for l in layouts])),
        "conditions": results,
        "on_minus_off_fresh_f1": paired_difference(per_item_f1["on"], per_item_f1["off_fresh"]),
        "on_minus_on_without_target_f1": paired_difference(per_item_f1["on"], per_item_f1["on_without_target"]),
        "on_minus_off_fresh_nll": paired_difference(per_item_nll["on"], per_item_nll["off_fresh"]),
        "on_minus_on_without_target_nll": paired_difference(per_item_nll["on"], per_item_nll["on_without_target"]),
        "retrieval_top1": {k: float(np.mean(v)) for k, v in retrieval.items()}, "retrieval_chance": chance,
        "example_target": targets[0].caption,
    }


# --------------------------------------------------------------------------- report

def _pct(x: float) -> str:
    return f"{100 * x:6.1f}"


def format_report(results: dict) -> str:
    lines = []
    cap = results.get("captioning")
    if cap:
        lines += [f"Captioning: {cap['n']} held-out test scenes, greedy, fresh stream and memory",
                  f"{'system':34s} {'attrP':>6s} {'attrR':>6s} {'attrF1':>6s} {'macF1':>6s} {'BLEU4':>6s} "
                  f"{'BLEU4m':>6s} {'words':>6s} {'empty':>6s}"]
        rows = list(cap["systems"].items())
        if "session" in cap:
            rows.append((f"model, one session ({cap['session']['n']} scenes)", cap["session"]))
            rows.append((f"model, fresh stream (same {cap['session']['n']})", cap["session"]["fresh_stream_same_scenes"]))
        for name, s in rows:
            a = s["attributes"]
            lines.append(f"{name:34s} {_pct(a['precision'])} {_pct(a['recall'])} {_pct(a['f1'])} "
                         f"{_pct(a['macro_f1'])} {_pct(s['bleu4'])} {_pct(s['bleu4_multi_ref'])} {s['mean_words']:6.1f} "
                         f"{_pct(s['empty_fraction'])}")
        cn = cap["caption_nll"]
        lines.append(f"reference caption NLL/token: own image {cn['own_image']:.3f}, another scene's image "
                     f"{cn['other_image']:.3f} (paired diff {cn['own_minus_other']['mean']:+.3f} ± "
                     f"{1.96 * cn['own_minus_other']['se']:.3f})")
        cats = cap["systems"]["model"]["attributes"]["by_category"]
        lines.append("model attribute F1 by category: " + ", ".join(f"{k} {_pct(v['f1']).strip()}" for k, v in cats.items()))
        lines.append("")
    mem = results.get("memory")
    if mem:
        lines += [f"Memory recall: {mem['trials']} trials × {mem['episodes_per_trial']} episodes = {mem['queries']} "
                  f"queries; ≥ {mem['min_tokens_since_target']} stream tokens since each target "
                  f"(S+W = {mem['sink_plus_window']}, receptive field {mem['receptive_field']})",
                  f"{'condition':22s} {'attrF1':>6s} {'objAcc':>6s} {'NLL':>6s}"]
        buckets = [(lo, hi) for lo, hi in ((0, 0), (1, 3), (4, 7), (8, 15), (16, 10**9)) if lo < mem["episodes_per_trial"]]
        lines[-1] += "   F1 by lag " + " ".join(f"{lo}-{min(hi, mem['episodes_per_trial'] - 1)}".rjust(6)
                                             for lo, hi in buckets)
        for name, r in mem["conditions"].items():
            by_lag = {int(k): v["f1"] for k, v in r["by_lag"].items()}
            cells = []
            for lo, hi in buckets:
                vals = [f for lag, f in by_lag.items() if lo <= lag <= hi]
                cells.append(_pct(float(np.mean(vals))) if vals else "     -")
            lines.append(f"{name:22s} {_pct(r['f1'])} {_pct(r['object_accuracy'])} {r['caption_nll']:6.3f}"
                         + " " * 13 + " ".join(cells))
        for key in ("on_minus_off_fresh_f1", "on_minus_on_without_target_f1"):
            d = mem[key]
            lines.append(f"{key:30s} {100 * d['mean']:+.2f} pp (95% CI {100 * d['ci95'][0]:+.2f} .. {100 * d['ci95'][1]:+.2f})")
        for key in ("on_minus_off_fresh_nll", "on_minus_on_without_target_nll"):
            d = mem[key]
            lines.append(f"{key:30s} {d['mean']:+.4f} nats/token (95% CI {d['ci95'][0]:+.4f} .. {d['ci95'][1]:+.4f})")
        lines.append("retrieval top-1 among the trial's episodes (chance "
                     f"{_pct(mem['retrieval_chance']).strip()}%): " +
                     ", ".join(f"{k} {_pct(v).strip()}" for k, v in mem["retrieval_top1"].items()))
        lines.append("")
    bench = results.get("benchmarks")
    if bench:
        lines += ["Zero-shot benchmarks (log-likelihood multiple choice)",
                  f"{'task':16s} {'n':>5s} {'acc':>6s} {'acc_n':>6s} {'chance':>6s}"]
        for task, r in bench["tasks"].items():
            if "missing" in r:
                lines.append(f"{task:16s} missing: {r['missing']}")
            else:
                lines.append(f"{task:16s} {r['n']:5d} {_pct(r['acc'])} {_pct(r['acc_norm'])} {_pct(r['chance'])}")
    return "\n".join(lines)


def format_markdown(results: dict) -> str:
    """The same numbers as Markdown tables (for docs/EVALUATION.md and the model card)."""
    out = []
    cap = results.get("captioning")
    if cap:
        out += [f"**Captioning**, {cap['n']} held-out test scenes (greedy, fresh stream and memory). "
                "Attribute P/R/F1 micro-averaged (macro F1 = mean per caption); BLEU-4 against the shipped "
                "caption, BLEU-4m against it and 4 other wordings; all in %.", "",
                "| system | attr P | attr R | attr F1 | macro F1 | BLEU-4 | BLEU-4m | words | empty |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        rows = list(cap["systems"].items())
        if "session" in cap:
            rows.append((f"model, one continuing session ({cap['session']['n']} scenes)", cap["session"]))
            rows.append((f"model, fresh streams (same {cap['session']['n']} scenes)",
                         cap["session"]["fresh_stream_same_scenes"]))
        for name, s in rows:
            a = s["attributes"]
            out.append(f"| {name} | {100 * a['precision']:.1f} | {100 * a['recall']:.1f} | {100 * a['f1']:.1f} | "
                       f"{100 * a['macro_f1']:.1f} | {100 * s['bleu4']:.1f} | {100 * s['bleu4_multi_ref']:.1f} | "
                       f"{s['mean_words']:.1f} | {100 * s['empty_fraction']:.0f} |")
        cn = cap["caption_nll"]
        cats = cap["systems"]["model"]["attributes"]["by_category"]
        out += ["", f"Teacher-forced NLL of the reference caption: {cn['own_image']:.3f} nats/token with its own image, "
                f"{cn['other_image']:.3f} with another scene's (paired difference {cn['own_minus_other']['mean']:+.3f}, "
                f"95% CI {cn['own_minus_other']['ci95'][0]:+.3f} … {cn['own_minus_other']['ci95'][1]:+.3f}).",
                "", "Model attribute F1 by category: " +
                ", ".join(f"{k} {100 * v['f1']:.1f}" for k, v in cats.items()) + ".",
                f"Baseline caption ({cap['baseline_caption_count']}× in {cap['baseline_train_n']} training scenes): "
                f"\"{cap['baseline_caption']}\"", ""]
        for e in cap["examples"][:3]:
            out.append(f"- test {e['test_index']}: reference \"{e['reference']}\" → generated \"{e['generated'].strip()}\"")
        out.append("")
    mem = results.get("memory")
    if mem:
        out += [f"**Memory recall**, {mem['trials']} trials × {mem['episodes_per_trial']} episodes = {mem['queries']} "
                f"queries; each target ≥ {mem['min_tokens_since_target']:,} stream tokens back (S+W = "
                f"{mem['sink_plus_window']:,}, receptive field {mem['receptive_field']:,}). In %.", "",
                "| condition | attr F1 | object accuracy | caption NLL (nats/token) | F1 lag 0 | F1 lag 1–3 | F1 lag 4–7 | F1 lag 8+ |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, r in mem["conditions"].items():
            by_lag = {int(k): v["f1"] for k, v in r["by_lag"].items()}
            cells = []
            for lo, hi in ((0, 0), (1, 3), (4, 7), (8, 10**9)):
                vals = [f for lag, f in by_lag.items() if lo <= lag <= hi]
                cells.append(f"{100 * float(np.mean(vals)):.1f}" if vals else "–")
            out.append(f"| {name} | {100 * r['f1']:.1f} | {100 * r['object_accuracy']:.1f} | {r['caption_nll']:.4f} | "
                       + " | ".join(cells) + " |")
        out.append("")
        for key, label in (("on_minus_off_fresh_f1", "ON − OFF (fresh M0)"),
                           ("on_minus_on_without_target_f1", "ON − ON without the target's write")):
            d = mem[key]
            out.append(f"- {label}: {100 * d['mean']:+.2f} pp F1 (95% CI {100 * d['ci95'][0]:+.2f} … "
                       f"{100 * d['ci95'][1]:+.2f})")
        for key, label in (("on_minus_off_fresh_nll", "ON − OFF (fresh M0)"),
                           ("on_minus_on_without_target_nll", "ON − ON without the target's write")):
            d = mem[key]
            out.append(f"- {label}, caption NLL: {d['mean']:+.4f} nats/token (95% CI {d['ci95'][0]:+.4f} … "
                       f"{d['ci95'][1]:+.4f}; negative = memory helps)")
        out += ["", f"Retrieval top-1 among {mem['episodes_per_trial']} episodes (chance "
                f"{100 * mem['retrieval_chance']:.1f}%): " +
                ", ".join(f"{k} {100 * v:.1f}%" for k, v in mem["retrieval_top1"].items()) + ".", ""]
    bench = results.get("benchmarks")
    if bench:
        out += [f"**Zero-shot benchmarks** from `{bench['dir']}` (accuracy %).", "",
                "| task | n | acc | acc_norm | chance |", "| --- | ---: | ---: | ---: | ---: |"]
        for task, r in bench["tasks"].items():
            if "missing" in r:
                out.append(f"| {task} | – | missing | | |")
            else:
                out.append(f"| {task} | {r['n']} | {100 * r['acc']:.1f} | {100 * r['acc_norm']:.1f} | "
                           f"{100 * r['chance']:.1f} |")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- CLI

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bitmar-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a .safetensors written by save_checkpoint")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {','.join(TASKS)}")
    p.add_argument("--n", type=int, default=200, help="held-out test scenes to caption")
    p.add_argument("--out", type=Path, help="write every number as JSON here")
    p.add_argument("--markdown", type=Path, help="also write the tables as Markdown here")
    p.add_argument("--max-new-tokens", type=int, default=96, help="caption length cap (test captions: ≤ 83 tokens)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    g = p.add_argument_group("vision features")
    g.add_argument("--backbone", help="backbone for rendered scenes (default: the checkpoint's)")
    g.add_argument("--weights-dir", type=Path, help="local DINOv2 weights")
    g.add_argument("--features", type=Path, help="precomputed test-split features .npy (N, D, h, w) instead")
    g.add_argument("--features-start", type=int, default=0, help="test index of the first --features row")
    g.add_argument("--image-size", type=int, default=224)
    g.add_argument("--cache-dir", type=Path, default=Path("runs/cache/eval"),
                   help="per-scene feature cache ('' to disable)")
    g = p.add_argument_group("captioning")
    g.add_argument("--baseline-train-n", type=int, default=8000,
                   help="training scenes the most-frequent-caption baseline is counted over")
    g.add_argument("--session-n", type=int, default=50,
                   help="also caption this many scenes in one continuing decoder session (0: skip)")
    g = p.add_argument_group("memory")
    g.add_argument("--memory-trials", type=int, default=12)
    g.add_argument("--memory-episodes", type=int, default=16, help="episodes written per trial (lags 0..N-1)")
    g.add_argument("--memory-start", type=int, default=MEMORY_START, help="first test-split index the task uses")
    g.add_argument("--gap-tokens", type=int, help="stream tokens after each episode (default: the receptive field)")
    g = p.add_argument_group("benchmarks")
    g.add_argument("--benchmarks-dir", type=Path, default=DEFAULT_BENCHMARKS_DIR,
                   help=f"folder of {', '.join(TASK_FILES.values())}")
    g.add_argument("--benchmark-limit", type=int, help="first N items of each task")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown or not args.tasks:
        p.error(f"--tasks: unknown {unknown}; expected some of {list(TASKS)}")
    for name in ("n", "max_new_tokens", "batch_size", "memory_trials", "memory_episodes", "baseline_train_n"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1")
    return args


def build_test_scenes(args, config) -> HeldOutScenes:
    if args.features is not None:
        from .backbones import PrecomputedFeatures

        return HeldOutScenes(features=PrecomputedFeatures(args.features), features_start=args.features_start)
    name = args.backbone or config.backbone
    if name == "precomputed":
        raise SystemExit("bitmar-eval: the checkpoint was trained on precomputed features of an unnamed backbone; "
                         "pass --features (test-split features) or --backbone")
    from .backbones import build_backbone

    kwargs = {"weights_dir": args.weights_dir} if name.startswith("dinov2") else {}
    backbone = build_backbone(name, **kwargs)
    if backbone.feature_dim != config.vision_feature_dim:
        raise SystemExit(f"bitmar-eval: backbone {name!r} gives {backbone.feature_dim}-D features, the checkpoint "
                         f"expects {config.vision_feature_dim}-D")
    cache = None
    if args.cache_dir and str(args.cache_dir):
        cache = Path(args.cache_dir) / f"test_{name}_{args.image_size}px"
    return HeldOutScenes(backbone.encode, image_size=args.image_size, batch_size=args.batch_size, cache_dir=cache)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .checkpoint import CheckpointError, load_checkpoint
    from .tokenizer import default_tokenizer

    try:
        model = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"bitmar-eval: {e}", file=sys.stderr)
        return 2
    tokenizer = default_tokenizer()
    results: dict = {"checkpoint": str(args.checkpoint), "config": model.config.to_dict(),
                     "args": {k: str(v) for k, v in vars(args).items()}}
    timings = {}
    test = build_test_scenes(args, model.config) if {"captioning", "memory"} & set(args.tasks) else None
    if "captioning" in args.tasks:
        t0 = time.time()
        results["captioning"] = evaluate_captioning(model, tokenizer, test, args.n, args.max_new_tokens,
                                                    args.baseline_train_n, args.session_n, args.batch_size)
        timings["captioning"] = time.time() - t0
    if "memory" in args.tasks:
        t0 = time.time()
        results["memory"] = evaluate_memory(model, tokenizer, test, args.memory_trials, args.memory_episodes,
                                            args.memory_start, args.max_new_tokens, args.gap_tokens, args.batch_size)
        timings["memory"] = time.time() - t0
    if "benchmarks" in args.tasks:
        t0 = time.time()
        tasks = evaluate_benchmarks(model, tokenizer, args.benchmarks_dir, limit=args.benchmark_limit)
        for r in tasks.values():
            r.pop("items", None)
        results["benchmarks"] = {"dir": str(args.benchmarks_dir), "tasks": tasks}
        timings["benchmarks"] = time.time() - t0
    results["seconds"] = timings
    print(format_report(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(format_markdown(results))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
