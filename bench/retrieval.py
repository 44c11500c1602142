"""Benchmark 7: memory retrieval. Recall@1, recall@5 and MRR@10 of lexical (BM25 over the
captions), embedding (the model's) and hybrid (reciprocal rank fusion) retrieval, for queries
built from held-out scenes, with 100 and 10,000 episodes stored; and the query latency p95 at 1k,
10k and 100k episodes next to the pre-change query path (the model's embedding alone), timed in
the same rounds.

    .venv/bin/python -m bench.retrieval [--checkpoint PATH] [--quick] [--write]

Targets come from the 'test' split of bitmar_core.data.scenes; the filler that takes a store to
10,000 episodes from the 'validation' split, rendered and embedded by the same checkpoint (its
embeddings are cached under .cache/bench_retrieval/, keyed by the checkpoint's identity, so a new
checkpoint is embedded afresh). Every figure is computed by this run: nothing is hard-coded.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import DEFAULT_CHECKPOINT, REPO, Table, machine, threads

K_EVAL = 10  # each query asks for the top 10: MRR@10
SECTION_TITLE = "7. Memory retrieval on held-out scenes (bench/retrieval.py)"


# ------------------------------------------------------------------ data
def _content_words(caption: str) -> list[str]:
    from bitmar_core.episodes.store_api import STOPWORDS
    return list(dict.fromkeys(w for w in re.findall(r"[a-z]+", caption.lower()) if w not in STOPWORDS))


def _paraphrase(words: list[str]) -> tuple[list[str], int]:
    """Each word with a synonym in the caption grammar replaced by another of its group
    ("purple" → "violet", "circle" → "disk", "big" → "large"); plurals keep their "s"."""
    from bitmar_core.episodes.service import CAPTION_SYNONYM_GROUPS

    other = {g[i]: g[(i + 1) % len(g)] for g in CAPTION_SYNONYM_GROUPS for i in range(len(g))}
    def plural(w: str) -> str:
        return w + "es" if w.endswith("s") else w + "s"  # "rhombuses", "disks"

    out, changed = [], 0
    for w in words:
        if w in other:
            out.append(other[w])
        elif w.endswith("s") and w[:-1] in other:  # "circles", "ellipses"
            out.append(plural(other[w[:-1]]))
        elif w.endswith("es") and w[:-2] in other:  # "rhombuses"
            out.append(plural(other[w[:-2]]))
        else:
            out.append(w)
            continue
        changed += 1
    return out, changed


def _jittered(scene, rng: np.random.Generator):
    """The same scene seen again: each object moved by ≤ 1.5% of the image, turned by ≤ 20°,
    resized by ≤ 10%, its colour shifted by ≤ 10 per channel; new background noise."""
    objects = [dataclasses.replace(
        o, x=o.x + rng.uniform(-0.015, 0.015), y=o.y + rng.uniform(-0.015, 0.015),
        angle=o.angle + rng.uniform(-20, 20), radius=o.radius * rng.uniform(0.9, 1.1),
        rgb=tuple(int(np.clip(c + rng.integers(-10, 11), 0, 255)) for c in o.rgb)) for o in scene.objects]
    background = dict(scene.background, noise_seed=int(rng.integers(2**31)))
    return dataclasses.replace(scene, objects=objects, background=background)


@dataclasses.dataclass
class Target:
    index: int
    caption: str
    embedding: np.ndarray     # what the store holds for it
    frame_code: object        # the stored frame through the vision path (query set c, same frame)
    jitter_code: object       # a re-rendered, jittered view (query set c, re-rendered)
    words: list[str]          # content words of the caption


def embed_targets(runtime, n: int) -> list[Target]:
    from bitmar_core.data.scenes import generate_split, render_scene

    out = []
    for i, (rgb, scene) in enumerate(generate_split("test", n)):
        code = runtime.embed_frame(rgb)
        jitter = runtime.embed_frame(render_scene(_jittered(scene, np.random.default_rng(i)), pixel_noise=3.0))
        out.append(Target(i, scene.caption, runtime.encode_episode(code, scene.caption).embedding, code, jitter,
                          _content_words(scene.caption)))
    return out


def embed_filler(runtime, n: int, cache_dir: Path | None) -> tuple[list[str], np.ndarray]:
    """Captions and model embeddings of validation scenes 0..n-1 (cached per checkpoint identity)."""
    from bitmar_core.data.scenes import generate_split

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", runtime.identity)
    path = cache_dir / f"{safe}-validation-{n}.npz" if cache_dir else None
    if path is not None and path.is_file():
        data = np.load(path)
        return [str(c) for c in data["captions"]], data["embeddings"]
    captions, embs = [], np.zeros((n, runtime.embedding_dim), np.float32)
    t0 = time.time()
    for i, (rgb, scene) in enumerate(generate_split("validation", n)):
        captions.append(scene.caption)
        embs[i] = runtime.encode_episode(runtime.embed_frame(rgb), scene.caption).embedding
        if (i + 1) % 1000 == 0:
            print(f"  filler {i + 1:,}/{n:,} embedded ({time.time() - t0:.0f} s)", flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, captions=np.array(captions), embeddings=embs)
    return captions, embs


def _drop(store) -> None:
    """Close a benchmark store and delete its directory (tmpfs is RAM)."""
    store.close()
    shutil.rmtree(store.path.parent, ignore_errors=True)


def _store_dir() -> Path:
    # Query timings do not depend on fsync; tmpfs makes filling 100,000 one-commit episodes quick.
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="bitmar-retrieval-", dir=shm if shm.is_dir() else None))


def build_store(runtime, captions: list[str], embeddings: np.ndarray):
    """A store with episode i at stamp (i + 1) s; returns it and the ids in input order."""
    from bitmar_core.episodes.service import EpisodicMemoryService

    store = EpisodicMemoryService.open_store(runtime, _store_dir())
    ids = [store.add_episode((i + 1) * 1_000_000_000, c, "caption", e) for i, (c, e) in
           enumerate(zip(captions, embeddings))]
    return store, ids


# ------------------------------------------------------------------ recall
def _rank(hits, target_id: int) -> int:
    for r, h in enumerate(hits, 1):
        if h.episode.id == target_id:
            return r
    return 0


def evaluate(runtime, store, ids: dict[int, int], stamps: dict[int, int],
             targets: list[Target]) -> dict[tuple[str, str], list[int]]:
    """Rank of each target (0 = not in the top K_EVAL) per (query set, retrieval)."""
    n = store.count()
    half_window = max(1, n // 20) * 1_000_000_000  # the window holds ~10% of the store
    ranks: dict[tuple[str, str], list[int]] = {}

    def run(qset: str, text, code, window=(None, None)):
        emb = runtime.embed_query(text, code)
        tid = ids[t.index]
        if text:
            ranks.setdefault((qset, "lexical"), []).append(
                _rank(store.search(text, None, K_EVAL, *window), tid))
        ranks.setdefault((qset, "embedding"), []).append(_rank(store.search(None, emb, K_EVAL, *window), tid))
        ranks.setdefault((qset, "hybrid"), []).append(
            _rank(store.search(text, emb, K_EVAL, *window), tid))

    for t in targets:
        rng = np.random.default_rng([7, t.index])
        three = " ".join(rng.choice(t.words, size=min(3, len(t.words)), replace=False))
        run("a. content words of the caption", " ".join(t.words), None)
        run("a3. three content words", three, None)
        run("b. attribute paraphrase", " ".join(_paraphrase(t.words)[0]), None)
        run("c. image: the same frame", None, t.frame_code)
        run("c. image: re-rendered with jitter", None, t.jitter_code)
        s = stamps[t.index]
        run("d. three content words + time window (~10%)", three, None, (max(0, s - half_window), s + half_window))
    return ranks


def bag_ceiling(captions: list[str], target_captions: list[str]) -> float:
    """Expected recall@1 of a perfect bag-of-words ranker for query set (a): a target whose content
    words (synonyms merged) are exactly those of m other stored captions can win only 1 in m + 1."""
    from collections import Counter

    from bitmar_core.episodes.service import CAPTION_SYNONYM_GROUPS

    head = {w: g[0] for g in CAPTION_SYNONYM_GROUPS for w in g}

    def bag(c: str) -> frozenset:
        out = set()
        for w in _content_words(c):
            base = next((w[: -len(e)] for e in ("es", "s") if w.endswith(e) and w[: -len(e)] in head), w)
            out.add(head.get(base, base.rstrip("s")))
        return frozenset(out)

    bags = Counter(bag(c) for c in captions)
    return float(np.mean([1 / bags[bag(c)] for c in target_captions]))


def _metrics(r: list[int]) -> tuple[float, float, float]:
    a = np.array(r)
    return float(np.mean(a == 1)), float(np.mean((a >= 1) & (a <= 5))), float(np.mean(np.where(a > 0, 1 / np.maximum(a, 1), 0)))


# ------------------------------------------------------------------ latency
def latency(runtime, captions: list[str], embeddings: np.ndarray, sizes: list[int],
            queries: list[str]) -> dict[int, dict[str, list[float]]]:
    """Per store size, seconds per query of the pre-change path (query embedding + brute-force
    cosine, as the node did) and of the hybrid path (EpisodicMemoryService.query), interleaved."""
    from bitmar_core.episodes.service import EpisodicMemoryService

    out = {}
    for size in sizes:
        t0 = time.time()
        store = EpisodicMemoryService.open_store(runtime, _store_dir())
        for i in range(size):  # the real episodes, cycled: duplicates are what a long-lived robot stores too
            store.add_episode((i + 1) * 1_000_000_000, captions[i % len(captions)], "caption",
                              embeddings[i % len(embeddings)])
        print(f"  latency store of {size:,} episodes built in {time.time() - t0:.0f} s", flush=True)
        memory = EpisodicMemoryService(runtime, store)
        times = {"before": [], "after": [], "lexical": []}

        def before(q):
            t = time.perf_counter()
            store.query(runtime.embed_query(q, None), 5)
            times["before"].append(time.perf_counter() - t)

        def after(q):
            t = time.perf_counter()
            memory.query(q, k=5)
            times["after"].append(time.perf_counter() - t)

        def lexical(q):
            t = time.perf_counter()
            store.search(q, None, 5)  # the lexical ranking alone, as the hybrid query runs it
            times["lexical"].append(time.perf_counter() - t)

        for q in queries[:10]:  # warm-up: page cache, allocator
            before(q), after(q)
        times = {"before": [], "after": [], "lexical": []}
        variants = [before, after, lexical]
        for r, q in enumerate(queries):
            for f in variants[r % 3:] + variants[:r % 3]:
                f(q)
        out[size] = times
        _drop(store)
    return out


# ------------------------------------------------------------------ report
class Section:
    """Two tables under one heading, in bench.run's section shape."""

    def __init__(self, title: str, tables: list[Table], notes: list[str], metrics: dict) -> None:
        self.title, self.tables, self.notes, self.metrics = title, tables, notes, metrics

    def markdown(self) -> str:
        parts = [f"### {self.title}", ""]
        for t in self.tables:
            parts += [t.markdown().split("\n", 2)[2], ""]  # without each table's own heading
        parts += [f"- {n}" for n in self.notes]
        return "\n".join(parts).rstrip()


def run(checkpoint: str, quick: bool = False, cache_dir: Path | None = REPO / ".cache" / "bench_retrieval",
        n_targets: int | None = None, n_large: int | None = None, sizes: list[int] | None = None) -> Section:
    from bitmar_core.inference.runtime import BitMarRuntime

    n_targets = n_targets or (40 if quick else 100)
    n_large = n_large or (2_000 if quick else 10_000)
    sizes = sizes or ([1_000, 10_000] if quick else [1_000, 10_000, 100_000])
    t_start = time.time()
    with threads(1):
        runtime = BitMarRuntime.from_checkpoint(checkpoint, num_threads=1)
        targets = embed_targets(runtime, n_targets)
        print(f"  {n_targets} held-out targets embedded ({time.time() - t_start:.0f} s)", flush=True)
        filler_caps, filler_embs = embed_filler(runtime, n_large - n_targets, cache_dir)

        results = {}
        ceiling = {n_targets: bag_ceiling([t.caption for t in targets], [t.caption for t in targets]),
                   n_large: bag_ceiling([t.caption for t in targets] + filler_caps, [t.caption for t in targets])}
        small, small_ids = build_store(runtime, [t.caption for t in targets], np.stack([t.embedding for t in targets]))
        stamps = {t.index: (i + 1) * 1_000_000_000 for i, t in enumerate(targets)}
        results[n_targets] = evaluate(runtime, small, dict(enumerate(small_ids)), stamps, targets)
        _check_product_path(runtime, small, targets)
        _drop(small)

        # The large store: targets at random places in time among the filler.
        order = np.random.default_rng(0).permutation(n_large)
        caps = [""] * n_large
        embs = np.zeros((n_large, runtime.embedding_dim), np.float32)
        slot_of_target = {}
        for j, pos in enumerate(order):
            if j < n_targets:
                caps[pos], embs[pos] = targets[j].caption, targets[j].embedding
                slot_of_target[j] = int(pos)
            else:
                caps[pos], embs[pos] = filler_caps[j - n_targets], filler_embs[j - n_targets]
        large, large_ids = build_store(runtime, caps, embs)
        results[n_large] = evaluate(runtime, large, {j: large_ids[p] for j, p in slot_of_target.items()},
                                    {j: (p + 1) * 1_000_000_000 for j, p in slot_of_target.items()}, targets)
        _drop(large)
        print(f"  recall measured ({time.time() - t_start:.0f} s)", flush=True)

        all_caps = [t.caption for t in targets] + filler_caps
        all_embs = np.concatenate([np.stack([t.embedding for t in targets]), filler_embs])
        qs = []
        for t in targets:
            rng = np.random.default_rng([7, t.index])
            qs += [" ".join(t.words), " ".join(rng.choice(t.words, size=min(3, len(t.words)), replace=False)),
                   " ".join(_paraphrase(t.words)[0])]
        lat = latency(runtime, all_caps, all_embs, sizes, qs[: (150 if quick else 300)])
    return report(results, lat, n_targets, n_large, checkpoint, runtime.identity, ceiling)


def _check_product_path(runtime, store, targets) -> None:
    """The hybrid rows call EpisodeStore.search directly; EpisodicMemoryService.query (what the node
    serves) must return the same list."""
    from bitmar_core.episodes.service import EpisodicMemoryService

    memory = EpisodicMemoryService(runtime, store)
    for t in targets[:10]:
        text = " ".join(t.words)
        direct = store.search(text, runtime.embed_query(text, None), K_EVAL)
        assert [h.episode.id for h in memory.query(text, k=K_EVAL).hits] == [h.episode.id for h in direct]


def report(results, lat, n_small: int, n_large: int, checkpoint: str, identity: str,
           ceiling: dict[int, float]) -> Section:
    sets = list(dict.fromkeys(s for s, _ in results[n_small]))
    cols = ["query set", "retrieval"]
    for n in (n_small, n_large):
        cols += [f"R@1 ({n:,})", f"R@5 ({n:,})", f"MRR ({n:,})"]
    recall = Table(SECTION_TITLE, cols)
    metrics: dict[str, float] = {}
    for s in sets:
        for method in ("lexical", "embedding", "hybrid"):
            if (s, method) not in results[n_small]:
                recall.add(s, method, *(["—"] * 6))
                continue
            cells = []
            for n in (n_small, n_large):
                r1, r5, mrr = _metrics(results[n][(s, method)])
                cells += [f"{r1:.2f}", f"{r5:.2f}", f"{mrr:.3f}"]
                metrics[f"{s}|{method}|{n}|r1"], metrics[f"{s}|{method}|{n}|r5"] = r1, r5
                metrics[f"{s}|{method}|{n}|mrr"] = mrr
            recall.add(s, f"**{method}**" if method == "hybrid" else method, *cells)
    lt = Table("", ["episodes stored", "before: embedding only p50 / p95 ms", "after: hybrid p50 / p95 ms",
                    "after vs before (p95)", "its lexical part alone p95 ms"])
    for size, t in lat.items():
        b50, b95 = np.percentile(t["before"], [50, 95]) * 1e3
        a50, a95 = np.percentile(t["after"], [50, 95]) * 1e3
        l95 = np.percentile(t["lexical"], 95) * 1e3
        lt.add(f"{size:,}", f"{b50:.1f} / {b95:.1f}", f"{a50:.1f} / {a95:.1f}", f"{a95 / b95:.2f}×", f"{l95:.1f}")
        metrics[f"latency_p95_ms|{size}"] = a95
        metrics[f"latency_before_p95_ms|{size}"] = b95
    notes = [
        f"checkpoint `{Path(checkpoint).name}` (identity {identity}); {n_small} held-out scenes ('test' split) are "
        f"the targets; at {n_large:,} episodes the other {n_large - n_small:,} are 'validation' scenes, each "
        "rendered and embedded by the same checkpoint (frame + caption → `encode_episode`), the targets at random "
        "places in time among them; one episode per second",
        "query sets, one query per target: (a) every content word of its caption (stop words out); (a3) three of "
        "them at random; (b) (a) with each word that has a synonym in the caption grammar swapped for it "
        "(purple→violet, circle→disk, oval→ellipse, large→big, top→upper, ...); (c) the stored frame itself, and "
        "the scene re-rendered with jitter (objects moved ≤ 1.5%, turned ≤ 20°, resized ≤ 10%, colour ±10, new "
        "noise); (d) (a3) restricted to a time window around the target holding ~10% of the store",
        "lexical: BM25 over the captions (FTS5, porter stemmer, the grammar's synonym groups as one word each, "
        "every-word matches first); embedding: cosine of the model's query embedding (`embed_query`) to the "
        "stored episode embeddings; hybrid (`EpisodeStore.search`, what `EpisodicMemoryService.query` and the node "
        "serve): captions with every word first, then reciprocal rank fusion of both rankings, k = 60; image "
        "queries have no words, so hybrid is the embedding ranking. R@n: the target among the first n; MRR over "
        "the top 10 (0 when absent)",
        "a caption is not unique: scenes with the same objects and places get the same content words. A perfect "
        f"bag-of-words ranker would reach R@1 {ceiling[n_small]:.2f} on (a) at {n_small:,} episodes and "
        f"{ceiling[n_large]:.2f} at {n_large:,} (ties broken at random); (a3) and (d) give three words, which "
        "many captions share",
        f"latency: 1 thread, text queries ((a), (a3), (b) mixed, {len(next(iter(lat.values()))['after'])} per size), "
        "each timed once per variant in rotating order; before = the query path before this change (query "
        "embedding + brute-force cosine + fetch, as the node ran it), after = `EpisodicMemoryService.query` (embedding "
        "+ FTS5 + fusion + fetch); the real episodes above cycled to fill each size; stores on tmpfs",
        "where the lexical part's time goes: FTS5's bm25 counts the captions holding each query word on every "
        "query, reading that word's whole posting list; the caption grammar has ~60 content words, so each is "
        "held by a large share of the episodes and the lists grow with the store",
    ]
    return Section(SECTION_TITLE, [recall, lt], notes, metrics)


def targets_summary(m: dict[str, float]) -> list[str]:
    """Lines for bench.run's Targets list (issue 12)."""
    if not m:
        return []
    out = []
    sizes = sorted({int(k.split("|")[2]) for k in m if k.count("|") == 3})
    big = sizes[-1]
    for s, label in (("a. content words of the caption", "(a) content words"),
                     ("c. image: the same frame", "(c) same frame")):
        r1 = m.get(f"{s}|hybrid|{big}|r1")
        if r1 is not None:
            out.append(f"- retrieval recall@1, hybrid, {label}, {big:,} episodes: **{r1:.2f}** — target ≥ 0.9: "
                       f"{'met' if r1 >= 0.9 else 'NOT met'}")
    worse = []
    for key, value in m.items():
        if key.count("|") != 3 or "|hybrid|" not in key:
            continue
        qset, _, n, metric = key.split("|")
        if any(m.get(f"{qset}|{other}|{n}|{metric}", -1.0) > value + 1e-9 for other in ("lexical", "embedding")):
            worse.append(f"{qset.split('.')[0]} at {int(n):,} ({metric})")
    out.append("- hybrid ≥ lexical and ≥ embedding on every set and metric: "
               + ("met" if not worse else f"NOT met ({', '.join(sorted(set(worse)))})"))
    if "latency_p95_ms|100000" in m:
        p = m["latency_p95_ms|100000"]
        out.append(f"- hybrid query p95 at 100,000 episodes: **{p:.1f} ms** (before: "
                   f"{m['latency_before_p95_ms|100000']:.1f} ms) — target ≤ 50 ms: {'met' if p <= 50 else 'NOT met'}")
    return out


def replace_section(title: str, block: str, path: Path = REPO / "bench" / "RESULTS.md") -> None:
    """Put ``block`` (starting with ``### title``) in RESULTS.md in place of that section, or at its
    end, leaving the other sections as they are."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n\n## Tables\n"
    head = f"### {title}"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n### ", start + len(head))
        text = text[:start] + block + ("\n" + text[nxt + 1:] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def write_section(section: Section, path: Path = REPO / "bench" / "RESULTS.md", command: str = "") -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the others as they are."""
    info = machine()
    block = (section.markdown() + "\n\n"
             + f"- run: {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, `{command or 'python -m bench.retrieval'}`, "
               f"{info['cpu']}, {info['cores']} cores, load average {info['load']} at the end\n"
             + "\n".join(targets_summary(section.metrics)) + "\n")
    replace_section(section.title, block, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.retrieval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="packed checkpoint (default: the bundled one)")
    ap.add_argument("--quick", action="store_true", help="40 targets, 2,000 episodes, latency at 1k and 10k")
    ap.add_argument("--cache-dir", default=str(REPO / ".cache" / "bench_retrieval"),
                    help="where the filler embeddings are cached per checkpoint identity ('' = no cache)")
    ap.add_argument("--write", action="store_true", help="replace this section of bench/RESULTS.md")
    a = ap.parse_args(argv)
    if not Path(a.checkpoint).is_file():
        ap.error(f"--checkpoint: no file at {a.checkpoint}")
    section = run(a.checkpoint, a.quick, Path(a.cache_dir) if a.cache_dir else None)
    print("\n" + section.markdown() + "\n\n" + "\n".join(targets_summary(section.metrics)))
    if a.write:
        write_section(section, command="python -m bench.retrieval " + " ".join(argv if argv is not None else sys.argv[1:]))
        print(f"\nwrote the section to {REPO / 'bench' / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
