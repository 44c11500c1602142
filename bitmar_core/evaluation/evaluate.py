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
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.scenes import (Scene, attribute_facts, caption_scene, generate_scene, parse_caption, render_scene,
                           split_seed, true_facts)
from ..data.streams import recall_answer
from ..inference.decoding import DecoderSession
from .metrics import FactCounts, attribute_prf, corpus_bleu, sentence_bleu
from .zero_shot import TASK_FILES, evaluate_benchmarks

TASKS = ("captioning", "memory", "stream", "probes", "benchmarks")
DEFAULT_TASKS = ("captioning", "memory", "stream", "probes")
DEFAULT_BENCHMARKS_DIR = Path("data/benchmarks")
ALT_REFERENCES = 4  # extra wordings of each test caption for multi-reference BLEU
MEMORY_START = 100_000  # the memory task's scenes come from here in the test split, apart from captioning's
STREAM_START = 200_000  # ... the long stream's
PROBE_START = 300_000  # ... and the probes


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

def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of a − b over paired items, its standard error and a normal 95% interval."""
    d = np.asarray(a, float) - np.asarray(b, float)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    m = float(d.mean()) if len(d) else float("nan")
    return {"mean": m, "se": se, "ci95": [m - 1.96 * se, m + 1.96 * se]}


@torch.no_grad()
def scene_codes(model, test: "HeldOutScenes", indices: Sequence[int], batch_size: int = 32) -> torch.Tensor:
    """Compressed vision tokens V (n, N, C) of test scenes, as the runtime computes them."""
    return torch.cat([model.compress_vision(test.grids(indices[k:k + batch_size]))
                      for k in range(0, len(indices), batch_size)])


@torch.no_grad()
def describe_scenes(model, V: torch.Tensor, continuing: bool, max_new_tokens: int, M: torch.Tensor | None = None
                    ) -> tuple[list[str], int]:
    """Describe each scene as the node does (`BitMarRuntime.describe`): its vision tokens and
    [eos] enter a decoder stream conditioned on [q ; read(M, q)], q = fuse(no text, V), M the
    fresh memory M0 by default; greedy, through the FastDecoder. continuing: one session for every
    scene in turn (the node's default); else a fresh stream per scene. → (texts, final position)."""
    from ..inference.fast_decoder import FastDecoder

    fast = FastDecoder(model)
    session = DecoderSession(fast)
    M = model.memory.M0.detach().float() if M is None else M
    texts = []
    for b in range(V.shape[0]):
        if not continuing:
            session.reset()
        v = V[b:b + 1]
        cond, prefix = model.scene_segment(v, M)
        ids = session.generate([model.config.eos_id], cond, max_new_tokens, prefix=prefix)
        texts.append(session.tokenizer.decode(ids))
    return texts, session.position


@torch.no_grad()
def caption_nll(model, tokenizer, captions: Sequence[str], V: torch.Tensor) -> list[float]:
    """Teacher-forced mean negative log-likelihood per token of each caption (its tokens and the
    closing eos) read after its scene's vision tokens in a fresh stream: what the decoder knows
    even when greedy decoding fails."""
    eos = model.config.eos_id
    M0 = model.memory.M0.detach().float()
    out = []
    for b, caption in enumerate(captions):
        v = V[b:b + 1]
        session = DecoderSession(model, tokenizer)
        cond, prefix = model.scene_segment(v, M0)
        logp = session.score([eos] + tokenizer.encode(caption) + [eos], cond, prefix)
        out.append(float(-logp.mean()))
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
def evaluate_captioning(model, tokenizer, test: HeldOutScenes, n: int = 200, max_new_tokens: int = 96,
                        baseline_train_n: int = 8000, session_n: int = 0, batch_size: int = 32,
                        n_examples: int = 5) -> dict:
    indices = list(range(n))
    scenes = [test.scene(i) for i in indices]
    alts = [alternative_captions(s) for s in scenes]
    refs_multi = [[s.caption] + a[1:] for s, a in zip(scenes, alts)]
    V = scene_codes(model, test, indices, batch_size)
    texts, _ = describe_scenes(model, V, continuing=False, max_new_tokens=max_new_tokens)
    refs = [sc.caption for sc in scenes]
    nll = caption_nll(model, tokenizer, refs, V)
    nll_other = caption_nll(model, tokenizer, refs, V.roll(1, dims=0))  # another scene's image
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
        session_texts, position = describe_scenes(model, V[:m], continuing=True, max_new_tokens=max_new_tokens)
        fresh = score_captions(texts[:m], scenes[:m], refs_multi[:m])
        cont = score_captions(session_texts, scenes[:m], refs_multi[:m])
        out["session"] = {**cont, "final_position": position, "fresh_stream_same_scenes": fresh,
                          "f1_continuing_minus_fresh": cont["attributes"]["f1"] - fresh["attributes"]["f1"],
                          "examples": session_texts[:3]}
    return out


# --------------------------------------------------------------------------- memory recall

MEMORY_CUE = "where was the {c} {s}?"


def recall_facts(colour: str, shape: str, size: str, position: str) -> set:
    """What an answer about one stored object should state (as `parse_caption` reads it)."""
    return {("colour", colour), ("shape", shape), ("object", colour, shape), ("count", colour, shape, 1),
            ("size", colour, shape, size), ("position", colour, shape, position)}


@torch.no_grad()
def evaluate_memory(model, tokenizer, test: HeldOutScenes, trials: int = 8, episodes: int = 32,
                    start: int = MEMORY_START, max_new_tokens: int = 24, batch_size: int = 32) -> dict:
    """The recall task as the robot meets it. Per trial, `episodes` single-object test scenes are
    written one by one with `EpisodicMemoryState.write_` (q = fuse(caption, V), forgetting on);
    then every episode whose colour+shape is unique in the trial is asked about by a cue alone
    ("where was the purple cross?", q = fuse(cue, no vision)), answered greedily from
    [q ; read(M, q)] in a fresh decoder stream — the episode is never in the decoder's stream, so
    only memory can supply its size and position. on: the written memory; off: the fresh M0.
    Scored by attribute F1 against the object's facts, and position / size accuracy."""
    from ..inference.fast_decoder import FastDecoder

    fast = FastDecoder(model)
    pool, k = [], start
    while len(pool) < trials * episodes:
        sc = test.scene(k)
        if len(sc.objects) == 1:
            pool.append(k)
        k += 1
    per = {name: {"f1": [], "position": [], "size": []} for name in ("on", "off")}
    lags, examples = [], []
    for t in range(trials):
        idx = pool[t * episodes:(t + 1) * episodes]
        scenes = [test.scene(i) for i in idx]
        V = scene_codes(model, test, idx, batch_size)
        state = model.memory.new_state()
        for e, sc in enumerate(scenes):
            ids = torch.tensor([tokenizer.encode(sc.caption)])
            Z = model.encode_text(ids, torch.ones_like(ids))
            state.write_(model.fuse(Z, torch.ones_like(ids), V[e:e + 1]))
        desc = [sc.objects[0].descriptor for sc in scenes]
        unique = [e for e, d in enumerate(desc) if desc.count(d) == 1]
        for e in unique:
            o = scenes[e].objects[0]
            ids = torch.tensor([tokenizer.encode(MEMORY_CUE.format(c=o.colour, s=o.shape))])
            q = model.fuse(model.encode_text(ids, torch.ones_like(ids)), torch.ones_like(ids), None)
            truth = recall_facts(o.colour, o.shape, o.size, o.position)
            for name, M in (("on", state.M), ("off", model.memory.M0.detach().float())):
                out = DecoderSession(fast).generate([model.config.eos_id], model.recall_condition(q, M), max_new_tokens)
                text = tokenizer.decode(out)
                pred = parse_caption(text)
                per[name]["f1"].append(attribute_prf(pred, truth)["f1"])
                per[name]["position"].append(float(("position", o.colour, o.shape, o.position) in pred))
                per[name]["size"].append(float(("size", o.colour, o.shape, o.size) in pred))
                if len(examples) < 6 and name == "on":
                    examples.append({"cue": MEMORY_CUE.format(c=o.colour, s=o.shape), "answer": text,
                                     "truth": recall_answer(o.colour, o.shape, o.size, o.position)})
            lags.append(len(scenes) - 1 - e)
    summary = {name: {k: float(np.mean(v)) for k, v in r.items()} for name, r in per.items()}
    by_lag = {}
    for lo, hi in ((0, 3), (4, 15), (16, 10**9)):
        sel = [i for i, l in enumerate(lags) if lo <= l <= hi]
        if sel:
            by_lag[f"{lo}-{min(hi, episodes - 1)}"] = {name: float(np.mean([per[name]["f1"][i] for i in sel]))
                                                      for name in per}
    return {"trials": trials, "episodes_per_trial": episodes, "queries": len(lags), "start": start,
            "cue": MEMORY_CUE, "conditions": summary, "by_lag": by_lag, "examples": examples,
            "on_minus_off_f1": paired_difference(per["on"]["f1"], per["off"]["f1"]),
            "on_minus_off_position": paired_difference(per["on"]["position"], per["off"]["position"]),
            "position_chance": 1 / 9, "size_chance": 1 / 2}


# --------------------------------------------------------------------------- long stream

@torch.no_grad()
def evaluate_stream(model, tokenizer, test: HeldOutScenes, tokens: int = 20_000, first: int = 1_000,
                    start: int = STREAM_START, batch_size: int = 32) -> dict:
    """Perplexity of one continuing stream of scene descriptions `tokens` long (each scene: its
    vision tokens, eos, its reference caption, the closing eos predicted), with the attention sinks
    (S + W) and without them (a window of S + W, sinks evicted like any token): the whole stream's
    perplexity over that of its first `first` caption tokens. Positions run to ~26,000, far past
    S + W: a stream that lost its order or its sinks would show it here."""
    c = model.config
    out = {}
    for name, sink, window in (("sinks", c.sink_tokens, c.window), ("window_only", 0, c.sink_tokens + c.window)):
        session = DecoderSession(model, tokenizer, sink=sink, window=window)
        logps, i = [], start
        while len(logps) < tokens:
            V = scene_codes(model, test, list(range(i, i + batch_size)), batch_size)
            for b in range(V.shape[0]):
                v = V[b:b + 1]
                cond, prefix = model.scene_segment(v, model.memory.M0.detach().float())
                ids = [c.eos_id] + tokenizer.encode(test.scene(i + b).caption) + [c.eos_id]
                logps += session.score(ids, cond, prefix).tolist()
            i += batch_size
        lp = np.asarray(logps[:tokens])
        ppl_first = float(np.exp(-lp[:first].mean()))
        ppl_all = float(np.exp(-lp.mean()))
        ppl_last = float(np.exp(-lp[-first:].mean()))
        out[name] = {"ppl_first": ppl_first, "ppl_all": ppl_all, "ppl_last": ppl_last,
                     "ratio_all_to_first": ppl_all / ppl_first, "ratio_last_to_first": ppl_last / ppl_first,
                     "final_position": session.position}
    out.update(tokens=tokens, first=first, scenes=i - start, sink_tokens=c.sink_tokens, window=c.window)
    return out


# --------------------------------------------------------------------------- probes

def linear_probe(X_train: torch.Tensor, y_train: torch.Tensor, X_test: torch.Tensor, y_test: torch.Tensor,
                 classes: int, weight_decay: float = 1e-3) -> float:
    """Test accuracy of a multinomial logistic regression (LBFGS) on standardised features."""
    mu, sd = X_train.mean(0), X_train.std(0) + 1e-6
    Xtr, Xte = (X_train - mu) / sd, (X_test - mu) / sd
    torch.manual_seed(0)
    W = torch.zeros(Xtr.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(Xtr @ W + b, y_train) + weight_decay * (W ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(((Xte @ W + b).argmax(1) == y_test).float().mean())


@torch.no_grad()
def evaluate_probes(model, test: HeldOutScenes, n: int = 1000, start: int = PROBE_START, batch_size: int = 32) -> dict:
    """Where the picture is lost: linear probes for colour, shape, layout cell and size of single-
    object test scenes on (a) the backbone's pooled patch grid, (b) the compressed vision tokens V
    (what the decoder's prefix reads), (c) q = fuse(no text, V) (the pooled 128-D vector that alone
    conditioned the paper's decoder), (d) the decoder's final state at the eos that starts a
    description (what the first word is predicted from). 80% of the scenes train the probe, 20% test it."""
    from ..data.scenes import COLOURS, SHAPES

    idx, k = [], start
    while len(idx) < n:
        if len(test.scene(k).objects) == 1:
            idx.append(k)
        k += 1
    feats = {"backbone_pooled": [], "vision_tokens": [], "q_pooled": [], "decoder_state": []}
    c = model.config
    M0 = model.memory.M0.detach().float()
    for s in range(0, n, batch_size):
        grid = test.grids(idx[s:s + batch_size]).float()
        feats["backbone_pooled"].append(F.avg_pool2d(grid, 2, 2, ceil_mode=True).flatten(1))
        V = model.compress_vision(grid)
        feats["vision_tokens"].append(V.flatten(1))
        q = model.fuse(None, None, V)
        feats["q_pooled"].append(q)
        # the decoder's last state before the first word: [sinks] [V] [eos], as a description starts
        B = V.shape[0]
        eos = torch.full((B, 1), c.eos_id, dtype=torch.long)
        parts = [model.wte(eos.expand(B, c.sink_tokens))]
        if c.vision_prefix:
            parts.append(model.vision_prefix(V))
        parts.append(model.wte(eos))
        emb = torch.cat(parts, dim=1)
        cond = model.recall_condition(q, M0).unsqueeze(1).expand(B, emb.shape[1], -1).clone()
        cond[:, :c.sink_tokens] = 0.0
        h = model.decoder.hidden(emb, cond, None, torch.arange(emb.shape[1]))
        feats["decoder_state"].append(h[:, -1])
    objs = [test.scene(i).objects[0] for i in idx]
    labels = {"colour": ([list(COLOURS).index(o.colour) for o in objs], 8),
              "shape": ([SHAPES.index(o.shape) for o in objs], 8),
              "cell": ([o.cell[1] * 3 + o.cell[0] for o in objs], 9),
              "size": ([int(o.size == "large") for o in objs], 2)}
    cut = int(0.8 * n)
    out = {}
    for name, rows in feats.items():
        X = torch.cat(rows).float()
        out[name] = {attr: linear_probe(X[:cut], torch.tensor(y[:cut]), X[cut:], torch.tensor(y[cut:]), k_)
                     for attr, (y, k_) in labels.items()}
    out["chance"] = {attr: 1 / k_ for attr, (_, k_) in labels.items()}
    out["n"] = n
    return out


# --------------------------------------------------------------------------- report

def _pct(x: float) -> str:
    return f"{100 * x:6.1f}"


def _caption_rows(cap: dict) -> list[tuple[str, dict]]:
    rows = list(cap["systems"].items())
    if "session" in cap:
        rows.append((f"model, one continuing session ({cap['session']['n']} scenes)", cap["session"]))
        rows.append((f"model, fresh streams (same {cap['session']['n']} scenes)", cap["session"]["fresh_stream_same_scenes"]))
    return rows


def target_lines(results: dict) -> list[tuple[str, str, str]]:
    """(target, figure, met/missed) for the targets of the model issue, from whatever was run."""
    out = []
    cap = results.get("captioning")
    if cap:
        a = cap["systems"]["model"]["attributes"]
        cats = a["by_category"]
        f1 = lambda k: cats.get(k, {}).get("f1", 0.0)  # noqa: E731
        out.append(("attribute F1 >= 60% (stretch 90%)", f"{100 * a['f1']:.1f}%", "met" if a["f1"] >= 0.6 else "missed"))
        for k in ("colour", "shape"):
            out.append((f"{k} F1 >= 80%", f"{100 * f1(k):.1f}%", "met" if f1(k) >= 0.8 else "missed"))
        out.append(("position F1 >= 50%", f"{100 * f1('position'):.1f}%", "met" if f1("position") >= 0.5 else "missed"))
        if "session" in cap:
            se = cap["session"]
            d = se["f1_continuing_minus_fresh"]
            ok = abs(d) <= 0.05 and se["empty_fraction"] == 0
            out.append((f"continuing session over {se['n']} scenes: F1 within 5 points of fresh, no empty",
                        f"{100 * d:+.1f} points, {100 * se['empty_fraction']:.0f}% empty", "met" if ok else "missed"))
    mem = results.get("memory")
    if mem:
        d = mem["on_minus_off_f1"]
        ok = d["mean"] >= 0.10 and d["ci95"][0] > 0
        out.append(("memory task on - off >= +10 points (stretch +20), 95% CI above 0",
                    f"{100 * d['mean']:+.1f} points (CI {100 * d['ci95'][0]:+.1f} .. {100 * d['ci95'][1]:+.1f})",
                    "met" if ok else "missed"))
    st = results.get("stream")
    if st:
        r = st["sinks"]["ratio_all_to_first"]
        out.append((f"{st['tokens']:,}-token stream: perplexity with sinks <= 1.1x its first {st['first']:,} tokens",
                    f"{r:.3f}x (window only: {st['window_only']['ratio_all_to_first']:.3f}x)",
                    "met" if r <= 1.1 else "missed"))
    if "zero_fraction" in results:
        out.append(("zero-weight fraction (paper: 42.8%)", f"{100 * results['zero_fraction']:.1f}%", "reported"))
    return out


def format_report(results: dict) -> str:
    lines = []
    cap = results.get("captioning")
    if cap:
        lines += [f"Captioning: {cap['n']} held-out test scenes, greedy, fresh memory",
                  f"{'system':46s} {'attrP':>6s} {'attrR':>6s} {'attrF1':>6s} {'macF1':>6s} {'BLEU4':>6s} "
                  f"{'BLEU4m':>6s} {'words':>6s} {'empty':>6s}"]
        for name, s in _caption_rows(cap):
            a = s["attributes"]
            lines.append(f"{name:46s} {_pct(a['precision'])} {_pct(a['recall'])} {_pct(a['f1'])} "
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
        lines += [f"Memory recall: {mem['trials']} trials × {mem['episodes_per_trial']} episodes, {mem['queries']} cues "
                  f"(\"{mem['cue']}\"); the answer is only in memory",
                  f"{'condition':10s} {'attrF1':>6s} {'pos':>6s} {'size':>6s}   (chance: position 11.1, size 50.0)"]
        for name, r in mem["conditions"].items():
            lines.append(f"{name:10s} {_pct(r['f1'])} {_pct(r['position'])} {_pct(r['size'])}")
        for key in ("on_minus_off_f1", "on_minus_off_position"):
            d = mem[key]
            lines.append(f"{key:24s} {100 * d['mean']:+.2f} points (95% CI {100 * d['ci95'][0]:+.2f} .. {100 * d['ci95'][1]:+.2f})")
        lines.append("F1 by lag (episodes written after the target): " +
                     ", ".join(f"{k}: on {_pct(v['on']).strip()} / off {_pct(v['off']).strip()}" for k, v in mem["by_lag"].items()))
        lines.append("")
    st = results.get("stream")
    if st:
        lines.append(f"Long stream: {st['tokens']:,} caption tokens over {st['scenes']} scenes in one session")
        for name in ("sinks", "window_only"):
            r = st[name]
            lines.append(f"{name:12s} ppl first {st['first']:,}: {r['ppl_first']:.3f}, all: {r['ppl_all']:.3f} "
                         f"({r['ratio_all_to_first']:.3f}x), last {st['first']:,}: {r['ppl_last']:.3f} "
                         f"({r['ratio_last_to_first']:.3f}x); final position {r['final_position']:,}")
        lines.append("")
    pr = results.get("probes")
    if pr:
        lines.append(f"Linear probes ({pr['n']} single-object test scenes, 20% held out), accuracy %:")
        lines.append(f"{'features':18s} " + " ".join(f"{k:>7s}" for k in pr["chance"]))
        for name in ("backbone_pooled", "vision_tokens", "q_pooled", "decoder_state", "chance"):
            lines.append(f"{name:18s} " + " ".join(f"{100 * pr[name][k]:7.1f}" for k in pr["chance"]))
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
        lines.append("")
    targets = target_lines(results)
    if targets:
        lines.append("Targets")
        lines += [f"  {t}: {f} — {m}" for t, f, m in targets]
    return "\n".join(lines)


def format_markdown(results: dict) -> str:
    """The same numbers as Markdown tables (for docs/EVALUATION.md and the model card)."""
    out = []
    targets = target_lines(results)
    if targets:
        out += ["| target | figure | |", "| --- | --- | --- |"] + [f"| {t} | {f} | {m} |" for t, f, m in targets] + [""]
    cap = results.get("captioning")
    if cap:
        out += [f"**Captioning**, {cap['n']} held-out test scenes (greedy, fresh memory, through the node's "
                "FastDecoder). Attribute P/R/F1 micro-averaged (macro F1 = mean per caption); BLEU-4 against the "
                "shipped caption, BLEU-4m against it and 4 other wordings; all in %.", "",
                "| system | attr P | attr R | attr F1 | macro F1 | BLEU-4 | BLEU-4m | words | empty |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, s in _caption_rows(cap):
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
        out += [f"**Memory recall**, {mem['trials']} trials × {mem['episodes_per_trial']} single-object episodes "
                f"written one by one, {mem['queries']} cues (\"{mem['cue']}\"); the episode never enters the "
                "decoder's stream. In %.", "",
                "| condition | attr F1 | position | size |", "| --- | ---: | ---: | ---: |"]
        for name, r in mem["conditions"].items():
            out.append(f"| {name} | {100 * r['f1']:.1f} | {100 * r['position']:.1f} | {100 * r['size']:.1f} |")
        out.append("| chance | | 11.1 | 50.0 |")
        out.append("")
        for key, label in (("on_minus_off_f1", "ON − OFF, attribute F1"), ("on_minus_off_position", "ON − OFF, position")):
            d = mem[key]
            out.append(f"- {label}: {100 * d['mean']:+.2f} points (95% CI {100 * d['ci95'][0]:+.2f} … "
                       f"{100 * d['ci95'][1]:+.2f})")
        out.append("- F1 by lag: " + ", ".join(f"{k}: on {100 * v['on']:.1f} / off {100 * v['off']:.1f}"
                                            for k, v in mem["by_lag"].items()))
        for e in mem["examples"][:3]:
            out.append(f"- \"{e['cue']}\" → \"{e['answer'].strip()}\" (stored: \"{e['truth']}\")")
        out.append("")
    st = results.get("stream")
    if st:
        out += [f"**Long stream**: {st['tokens']:,} caption tokens of {st['scenes']} scenes in one session.", "",
                f"| cache | ppl, first {st['first']:,} | ppl, all | all ÷ first | ppl, last {st['first']:,} | last ÷ first |",
                "| --- | ---: | ---: | ---: | ---: | ---: |"]
        S, W = st["sink_tokens"], st["window"]
        for name, label in (("sinks", f"S={S} sinks + W={W} window"), ("window_only", f"window of {S + W}, no sinks")):
            r = st[name]
            out.append(f"| {label} | {r['ppl_first']:.3f} | {r['ppl_all']:.3f} | {r['ratio_all_to_first']:.3f} | "
                       f"{r['ppl_last']:.3f} | {r['ratio_last_to_first']:.3f} |")
        out.append("")
    pr = results.get("probes")
    if pr:
        out += [f"**Linear probes**, {pr['n']} single-object test scenes (20% held out), accuracy %.", "",
                "| features | " + " | ".join(pr["chance"]) + " |", "| --- |" + " ---: |" * len(pr["chance"])]
        for name, label in (("backbone_pooled", "backbone, 2×2 pooled grid"), ("vision_tokens", "V (the decoder's prefix)"),
                            ("q_pooled", "q = fuse(no text, V), pooled"),
                            ("decoder_state", "decoder state at the eos that starts a description"), ("chance", "chance")):
            out.append(f"| {label} | " + " | ".join(f"{100 * pr[name][k]:.1f}" for k in pr["chance"]) + " |")
        out.append("")
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
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, from {','.join(TASKS)}")
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
    g.add_argument("--memory-trials", type=int, default=8)
    g.add_argument("--memory-episodes", type=int, default=32, help="episodes written per trial (lags 0..N-1)")
    g.add_argument("--memory-start", type=int, default=MEMORY_START, help="first test-split index the task uses")
    g = p.add_argument_group("stream")
    g.add_argument("--stream-tokens", type=int, default=20_000, help="caption tokens in the long stream")
    g.add_argument("--stream-start", type=int, default=STREAM_START, help="first test-split index the task uses")
    g = p.add_argument_group("probes")
    g.add_argument("--probe-n", type=int, default=1000, help="single-object scenes for the linear probes")
    g.add_argument("--probe-start", type=int, default=PROBE_START, help="first test-split index the task uses")
    g = p.add_argument_group("benchmarks")
    g.add_argument("--benchmarks-dir", type=Path, default=DEFAULT_BENCHMARKS_DIR,
                   help=f"folder of {', '.join(TASK_FILES.values())}")
    g.add_argument("--benchmark-limit", type=int, help="first N items of each task")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown or not args.tasks:
        p.error(f"--tasks: unknown {unknown}; expected some of {list(TASKS)}")
    for name in ("n", "max_new_tokens", "batch_size", "memory_trials", "memory_episodes", "baseline_train_n",
                 "stream_tokens", "probe_n"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1")
    for name in ("features_start", "memory_start", "stream_start", "probe_start"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be a test-split index ≥ 0")
    return args


def build_test_scenes(args, config) -> HeldOutScenes:
    if args.features is not None:
        from ..inference.backbones import PrecomputedFeatures

        return HeldOutScenes(features=PrecomputedFeatures(args.features), features_start=args.features_start)
    name = args.backbone or config.backbone
    if name == "precomputed":
        raise SystemExit("bitmar-eval: the checkpoint was trained on precomputed features of an unnamed backbone; "
                         "pass --features (test-split features) or --backbone")
    from ..inference.backbones import build_backbone

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
    from ..inference.checkpoint import CheckpointError, load_checkpoint
    from ..model.quant import zero_weight_fraction
    from ..inference.tokenizer import tokenizer_for

    try:
        model = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"bitmar-eval: {e}", file=sys.stderr)
        return 2
    tokenizer = tokenizer_for(model)
    results: dict = {"checkpoint": str(args.checkpoint), "config": model.config.to_dict(),
                     "args": {k: str(v) for k, v in vars(args).items()},
                     "zero_fraction": zero_weight_fraction(model), "parameters": model.num_parameters()}
    timings = {}
    test = build_test_scenes(args, model.config) if {"captioning", "memory", "stream", "probes"} & set(args.tasks) else None
    if "captioning" in args.tasks:
        t0 = time.time()
        results["captioning"] = evaluate_captioning(model, tokenizer, test, args.n, args.max_new_tokens,
                                                    args.baseline_train_n, args.session_n, args.batch_size)
        timings["captioning"] = time.time() - t0
    if "memory" in args.tasks:
        t0 = time.time()
        results["memory"] = evaluate_memory(model, tokenizer, test, args.memory_trials, args.memory_episodes,
                                            args.memory_start, batch_size=args.batch_size)
        timings["memory"] = time.time() - t0
    if "stream" in args.tasks:
        t0 = time.time()
        results["stream"] = evaluate_stream(model, tokenizer, test, args.stream_tokens, start=args.stream_start,
                                            batch_size=args.batch_size)
        timings["stream"] = time.time() - t0
    if "probes" in args.tasks:
        t0 = time.time()
        results["probes"] = evaluate_probes(model, test, args.probe_n, start=args.probe_start,
                                            batch_size=args.batch_size)
        timings["probes"] = time.time() - t0
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
