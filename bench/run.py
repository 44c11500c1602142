"""Run the benchmarks, print each table, and write bench/RESULTS.md (machine, date, command).

    .venv/bin/python -m bench.run               # everything (~6–10 min on 2 cores)
    .venv/bin/python -m bench.run --quick       # fewer rounds, positions by state (~1–2 min)
    .venv/bin/python -m bench.run --only decode,positions --no-write

Sections: decode (1), positions (2), vision (3), memory (4), node (5, bench/node_e2e.py; needs the
bundled checkpoint and ROS, skipped in --quick), footprint (6), retrieval (7, bench/retrieval.py; needs
a checkpoint: recall of lexical / embedding / hybrid memory queries and their latency up to 100k episodes),
train (8, bench/train_speed.py: training throughput of the default recipe beside the previous one),
answer_lag (9, bench/answer_lag.py; ROS, skipped in --quick: camera callback lag while memory-query
answers are generated, the node before and after answers left its executor thread), retention (10,
bench/retention.py: bytes per episode, and the cost per episode of a byte budget beside no budget).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


from .common import DEFAULT_CHECKPOINT, REPO, machine, packed_model

SECTIONS = ("decode", "positions", "vision", "memory", "node", "footprint", "retrieval", "train", "answer_lag",
            "retention")


@dataclass
class Raw:
    """A section that renders its own markdown (the node benchmark's table)."""
    title: str
    text: str
    metrics: dict

    def markdown(self) -> str:
        return f"### {self.title}\n\n{self.text}"


def node_section(quick: bool, checkpoint: str, seconds: float):
    title = "5. The node end to end on a replayed bag (bench/node_e2e.py)"
    if quick:
        return Raw(title, "Not run with --quick (`python -m bench.node_e2e` runs it alone).", {})
    if not Path(checkpoint).is_file():
        return Raw(title, f"Not run: no checkpoint at `{checkpoint}` (pass --checkpoint).", {})
    from . import node_e2e

    return Raw(title, node_e2e.table(node_e2e.run(seconds, checkpoint)), {})


def retrieval_section(quick: bool, checkpoint: str):
    from . import retrieval

    if not Path(checkpoint).is_file():
        return Raw(retrieval.SECTION_TITLE, f"Not run: no checkpoint at `{checkpoint}` (pass --checkpoint).", {})
    return retrieval.run(checkpoint, quick)


def answer_lag_section(quick: bool, checkpoint: str):
    from . import answer_lag

    if quick:
        return Raw(answer_lag.SECTION_TITLE, "Not run with --quick (`python -m bench.answer_lag` runs it alone).", {})
    if not Path(checkpoint).is_file():
        return Raw(answer_lag.SECTION_TITLE, f"Not run: no checkpoint at `{checkpoint}` (pass --checkpoint).", {})
    return Raw(answer_lag.SECTION_TITLE, answer_lag.main_table(checkpoint).split("\n", 2)[2], {})


def targets(sections: dict) -> list[str]:
    m: dict[str, float] = {}
    for s in sections.values():
        m.update(getattr(s, "metrics", {}))
    out = []
    if "ours_tok_s_1t" in m:
        which = "C++ step" if m.get("ours_is_ext") else "PyTorch step (extension not built)"
        tok, ratio = m["ours_tok_s_1t"], m["ours_vs_fp32_1t"]
        out.append(f"- decode at 1 thread ({which}): **{tok:,.0f} tok/s** — target ≥ 600: "
                   f"{'met' if tok >= 600 else 'NOT met'}; stretch ≥ 1,500: {'met' if tok >= 1500 else 'not met'}")
        out.append(f"- vs the FP32 eager baseline, same run: **{ratio:.2f}×** — target ≥ 3.5×: "
                   f"{'met' if ratio >= 3.5 else 'NOT met'}")
    if "train_speedup" in m:
        r = m["train_speedup"]
        out.append(f"- training, real tokens/s: **{m['train_tok_s_new']:,.0f}** vs the previous recipe's "
                   f"{m['train_tok_s_old']:,.0f} in the same run: **{r:.1f}×** — target ≥ 5× and ≥ 1,300 tok/s: "
                   f"{'met' if r >= 5 and m['train_tok_s_new'] >= 1300 else 'NOT met'}")
    if "flat_100k_over_1k" in m:
        f = m["flat_100k_over_1k"]
        out.append(f"- ms/token at position 100,000 / at 1,000: **{f:.3f}** — target ≤ 1.10: "
                   f"{'met' if f <= 1.10 else 'NOT met'}")
    from .retrieval import targets_summary

    out += targets_summary({k: v for k, v in m.items() if "|" in k})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds; positions by cache state; no node run")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                    help="packed checkpoint for decode/positions/node (default: the bundled one; "
                         "without it decode runs on a random init of the same sizes)")
    ap.add_argument("--node-seconds", type=float, default=20.0)
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args(argv)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        ap.error(f"--only: unknown section(s) {unknown}; expected some of {', '.join(SECTIONS)}")

    t_start = time.time()
    started = datetime.now(timezone.utc)
    before = machine()
    print(f"# {before['cpu']}, {before['cores']} cores, load {before['load']}, torch {before['torch']}", flush=True)
    model = source = None
    if {"decode", "positions"} & set(only):
        model, source = packed_model(a.checkpoint)
        print(f"# decoder weights: {source}", flush=True)

    sections: dict[str, object] = {}
    for name in only:
        t0 = time.time()
        if name == "decode":
            from .decode import decode_speed
            sec = decode_speed(model, a.quick)
        elif name == "positions":
            from .decode import position_latency
            sec = position_latency(model, a.quick)
        elif name == "vision":
            from .vision import frame_to_embedding
            sec = frame_to_embedding(a.quick)
        elif name == "memory":
            from .memory import read_write
            sec = read_write(a.quick)
        elif name == "node":
            sec = node_section(a.quick, a.checkpoint, a.node_seconds)
        elif name == "retrieval":
            sec = retrieval_section(a.quick, a.checkpoint)
        elif name == "answer_lag":
            sec = answer_lag_section(a.quick, a.checkpoint)
        elif name == "retention":
            from . import retention
            sec = retention.run(a.quick)
        elif name == "train":
            from .train_speed import train_speed
            sec = train_speed(a.quick)
        else:
            from .footprint import footprint
            sec = footprint(a.quick)
        sections[name] = sec
        print("\n" + sec.markdown() + f"\n\n({time.time() - t0:.0f} s)", flush=True)

    after = machine()
    took = time.time() - t_start
    command = "python -m bench.run" + ("" if argv is None and len(sys.argv) <= 1 else " " + shlex.join(
        argv if argv is not None else sys.argv[1:]))
    summary = targets(sections)
    if summary:
        print("\n" + "\n".join(summary))
    if not a.no_write:
        head = [
            "# Benchmark results",
            "",
            f"- machine: {before['cpu']}, {before['cores']} cores (lscpu; a shared VM: load average "
            f"{before['load']} at the start, {after['load']} at the end)",
            f"- software: torch {before['torch']} (CPU), Python {before['python']}",
            f"- date: {started:%Y-%m-%d %H:%M} UTC; took {took / 60:.1f} min",
            f"- command: `{command}`",
            f"- decoder weights: {source or 'n/a'}",
            "",
            "Every figure is measured in the same process and rounds as its baseline (see each table's "
            "notes): the median over rounds, ± half the interquartile range of the rounds.",
            "",
        ]
        if summary:
            head += ["## Targets", ""] + summary + [""]
        body = [sections[n].markdown() + "\n" for n in only]
        Path(a.out).write_text("\n".join(head + ["## Tables", ""] + body))
        print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
