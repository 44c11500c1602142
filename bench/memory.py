"""Benchmark 4: episodic memory read and write latency at K = 512 (the paper's), 4,096 and 32,768
slots, on the runtime's `EpisodicMemoryState` (read with usage touch; write with usage update and
forgetting). The baseline is the paper's K = 512, timed in the same rounds.
"""
from __future__ import annotations

import torch

from bitmar_core.model.memory import EpisodicMemory

from .common import Table, bitmar_config, interleaved, median, ms, per_call, spread, threads

SLOTS = (512, 4_096, 32_768)


def read_write(quick: bool) -> Table:
    rounds, n512 = (3, 200) if quick else (5, 1000)
    n = {K: max(10, n512 * 512 // K) for K in SLOTS}  # calls per round: about the same time per K
    states, q = {}, {}
    g = torch.Generator().manual_seed(0)
    for K in SLOTS:
        torch.manual_seed(0)
        mem = EpisodicMemory(bitmar_config(memory_slots=K))
        states[K] = mem.new_state()
        q[K] = torch.randn(128, generator=g)
    variants = {}
    for K in SLOTS:
        variants[f"read {K}"] = (lambda K=K: per_call(lambda: states[K].read(q[K]), n[K]))
        variants[f"write {K}"] = (lambda K=K: per_call(lambda: states[K].write_(q[K]), n[K]))
    with threads(1):
        for f in variants.values():
            f()
        res = interleaved(variants, rounds)
    t = Table("4. Episodic memory, one query (C = 128), 1 thread",
              ["slots K", "M size", "read ms", "read vs K=512", "write ms", "write vs K=512"])
    r0, w0 = median(res["read 512"]), median(res["write 512"])
    for K in SLOTS:
        r, w = median(res[f"read {K}"]), median(res[f"write {K}"])
        t.add(f"{K:,}" + (" (paper, baseline)" if K == 512 else ""), f"{K * 128 * 4 / 2**20:.2f} MiB",
              f"{ms(r)} {spread(res[f'read {K}'])}", f"{r / r0:.1f}×", f"{ms(w)} {spread(res[f'write {K}'])}",
              f"{w / w0:.1f}×")
    t.notes.append("read: w_r = softmax(M q), M_r = w_rᵀ M, usage += w_r; write: w_w = softmax(W_w q), "
                   "M += α w_w qᵀ, usage decay and forgetting over all K slots (bitmar_core/model/memory.py)")
    t.notes.append(f"median of {rounds} interleaved rounds of {n512:,}·512/K calls")
    return t
