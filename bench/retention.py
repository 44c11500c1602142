"""Benchmark 10: a memory that lives for months. Bytes per episode as the node stores them (128-D
embedding, a 96-px JPEG thumbnail of a rendered scene, its caption), with and without a pose; and
the cost of retention per episode: committing episodes one at a time (as the node does, one
transaction each) into a store at its byte budget with the budget enforced after every commit,
next to the same commits into a store without a budget (the baseline), in interleaved rounds.

    .venv/bin/python -m bench.retention [--quick]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import Table, interleaved, machine, median, spread

DIM = 128
IDENTITY = "bench-retention C=128"
SECTION_TITLE = "10. Retention: bytes per episode and the cost of a byte budget (bench/retention.py)"


def _episodes(n0: int, n: int, posed: bool, thumbs: list[bytes], captions: list[str]):
    from bitmar_core.episodes.pose import Pose
    from bitmar_core.episodes.store_api import NewEpisode

    rng = np.random.default_rng(n0)
    emb = rng.standard_normal((n, DIM)).astype(np.float32)
    return [NewEpisode((n0 + i) * 200_000_000, captions[(n0 + i) % len(captions)], "caption", emb[i],
                       thumbs[(n0 + i) % len(thumbs)],
                       Pose("map", (0.01 * (n0 + i), 2.0, 0.0), (0.0, 0.0, 0.2, 0.98)) if posed else None)
            for i in range(n)]


def _samples(k: int = 32) -> tuple[list[bytes], list[str]]:
    """Thumbnails and captions of k rendered scenes (what the node stores, sizes included)."""
    from bitmar_core.data.scenes import make_scene
    from bitmar_core.episodes.store_api import make_thumbnail

    scenes = [make_scene(7_000 + i, size=224) for i in range(k)]
    return [make_thumbnail(rgb, max_side=96) for rgb, _ in scenes], [s.caption for _, s in scenes]


def run(quick: bool = False) -> Table:
    from bitmar_core.episodes.store import EpisodeStore
    from bitmar_core.episodes.store_api import RetentionPolicy

    n_fill = 5_000 if quick else 20_000
    per_round, rounds = (50, 3) if quick else (200, 5)
    thumbs, captions = _samples()
    tmp = Path(tempfile.mkdtemp(prefix="bitmar-bench-retention-"))
    t = Table(SECTION_TITLE, ["what", "figure", "baseline (same run)"])
    try:
        sizes = {}
        for posed in (False, True):
            with EpisodeStore.open(tmp / f"size{int(posed)}", DIM, IDENTITY) as s:
                for n0 in range(0, n_fill, 2_000):
                    s.add_episodes(_episodes(n0, min(2_000, n_fill - n0), posed, thumbs, captions))
                s.compact()
                sizes[posed] = s.bytes_used() / s.count()
        t.add(f"bytes per episode at {n_fill:,} (database pages in use ÷ episodes)",
              f"{sizes[True]:,.0f} with a pose", f"{sizes[False]:,.0f} without")
        t.add("episodes a day at 5 Hz (432,000) would need", f"{sizes[True] * 432_000 / 2**30:.2f} GiB", "")

        # Two stores filled alike; the budget is the first one's size: every commit then sits at it.
        for name in ("budget", "none"):
            with EpisodeStore.open(tmp / name, DIM, IDENTITY) as s:
                for n0 in range(0, n_fill, 2_000):
                    s.add_episodes(_episodes(n0, min(2_000, n_fill - n0), True, thumbs, captions))
                s.compact()
                budget = s.bytes_used()
        stores = {name: EpisodeStore.open(tmp / name, DIM, IDENTITY) for name in ("budget", "none")}
        policy = RetentionPolicy(max_bytes=budget)
        next_n = {"budget": n_fill, "none": n_fill}
        deleted = {"n": 0, "passes": 0, "pass_s": []}

        def commits(name: str) -> float:
            s = stores[name]
            batch = _episodes(next_n[name], per_round, True, thumbs, captions)
            next_n[name] += per_round
            t0 = time.perf_counter()
            for e in batch:
                s.add_episode(e.stamp_ns, e.caption, e.source, e.embedding, e.thumbnail_jpeg, pose=e.pose)
                if name == "budget":  # what EpisodicMemoryService.record does after each commit
                    p0 = time.perf_counter()
                    r = s.enforce_retention(policy)
                    if r.deleted:
                        deleted["n"] += r.deleted
                        deleted["passes"] += 1
                        deleted["pass_s"].append(time.perf_counter() - p0)
            return (time.perf_counter() - t0) / per_round

        got = interleaved({"budget": lambda: commits("budget"), "none": lambda: commits("none")}, rounds)
        with_b, without = median(got["budget"]), median(got["none"])
        t.add("commit of one episode (node path, one transaction)",
              f"{1e3 * with_b:.2f} ms {spread(got['budget'])} with the budget enforced",
              f"{1e3 * without:.2f} ms {spread(got['none'])} without a budget")
        t.add("retention cost per episode (difference)", f"{1e3 * (with_b - without):+.2f} ms "
              f"({100 * (with_b - without) / without:+.0f}%)", "")
        if deleted["passes"]:
            t.add("a deleting pass", f"{deleted['n'] / deleted['passes']:,.0f} episodes in "
                  f"{1e3 * median(deleted['pass_s']):.1f} ms (median of {deleted['passes']})", "")
        over = max(0, stores["budget"].bytes_used() - budget)
        t.add("store after the run", f"{stores['budget'].bytes_used():,} bytes of a {budget:,} budget "
              f"({over:,} over), {stores['budget'].count():,} episodes",
              f"{stores['none'].bytes_used():,} bytes, {stores['none'].count():,} episodes")
        for s in stores.values():
            s.close()
        m = machine()
        t.notes.append(f"{m['cpu']}, {m['cores']} cores, load {m['load']}; {rounds} interleaved rounds of "
                       f"{per_round} commits per store (synchronous=FULL: each commit waits for the disk)")
        t.metrics.update(bytes_per_episode=sizes[True], retention_cost_s=with_b - without)
        return t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    print(run(p.parse_args().quick).markdown())


if __name__ == "__main__":
    main()
