"""What every benchmark section shares: interleaved timing on a shared machine, the machine's
description, markdown tables, and the model the sections measure.

Timing rule: a figure and its baseline are timed in the same process, in rounds; each round runs
every variant once, in an order that rotates, so a burst of load from another process lands on all
of them alike. A figure is the median over rounds, with half the interquartile range beside it.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "bitmar_default.safetensors"


# ------------------------------------------------------------------ timing
def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each variant once per round (rotating the order); each call returns its own figure
    (e.g. seconds per token over a block). Returns the figures per variant."""
    names = list(variants)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            out[n].append(variants[n]())
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> str:
    """Half the interquartile range of the rounds, relative to the median (e.g. '±4%'): robust to
    the odd round that another process's burst of load lands on."""
    if len(xs) < 3:
        return ""
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return f"±{50 * (q3 - q1) / median(xs):.0f}%"


def per_call(fn: Callable[[], object], n: int) -> float:
    """Seconds per call of fn over n back-to-back calls (wall clock)."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


class threads:
    """`with threads(n):` runs the block with n intra-op threads, then restores the setting."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev)


# ------------------------------------------------------------------ the machine
def machine() -> dict[str, str]:
    model = platform.processor() or "unknown CPU"
    try:
        info = dict(line.split(":", 1) for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        model = info.get("Model name", model)
        isa = [f for f in ("avx512_vnni", "avx_vnni", "avx512f", "avx2") if f in info.get("Flags", "").split()]
        model += (f" (family {info.get('CPU family', '?')} model {info.get('Model', '?')}; "
                  f"{', '.join(isa[:2]) or 'no AVX2'})")
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "n/a"
    return {"cpu": model, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "python": platform.python_version(), "load": load}


# ------------------------------------------------------------------ tables
@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # figures the targets are checked on

    def add(self, *cells) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        out = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
               "| " + " | ".join(["---"] + ["---:"] * (len(self.columns) - 1)) + " |"]
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out)


def ms(seconds: float, digits: int = 3) -> str:
    return "n/a" if seconds != seconds else f"{1e3 * seconds:.{digits}f}"


# ------------------------------------------------------------------ the model measured
def bitmar_config(**overrides):
    """The deployed architecture: config/model_default.yaml (the paper's sizes) with the tied
    2-bit embedding of config/train_default.yaml."""
    from bitmar_core.model.config import BitMarConfig

    d = BitMarConfig.from_yaml(REPO / "config" / "model_default.yaml").to_dict()
    d.update(tie_embeddings=True)
    d.update(overrides)
    return BitMarConfig.from_dict(d)


def packed_model(checkpoint: str | None = None, seed: int = 0, **overrides):
    """The bundled (or given) packed checkpoint; without one, a random init of `bitmar_config`,
    packed (speed and size do not depend on the weights' values)."""
    from bitmar_core.inference.checkpoint import load_checkpoint
    from bitmar_core.model.bitmar import BitMar
    from bitmar_core.model.quant import pack_model

    if checkpoint and Path(checkpoint).is_file() and not overrides:
        return load_checkpoint(checkpoint), str(checkpoint)
    torch.manual_seed(seed)
    return pack_model(BitMar(bitmar_config(**overrides)).eval()), "random init (no checkpoint)"
