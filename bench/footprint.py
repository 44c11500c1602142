"""Benchmark 6: checkpoint bytes (packed vs FP32) and the peak RSS of the model alone while it loads
and decodes, each measured in a fresh subprocess (`python -m bench.footprint --worker ...`): peak
resident memory (VmHWM) minus the resident memory after the imports (Python, torch, bitmar_core,
the extension and the tokenizer), so what is left is the model, its caches and its decode.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .common import REPO, Table, bitmar_config

MODES = {
    "fp32-reference": ("FP32 checkpoint, reference forward (BitLinear) — baseline", "fp32"),
    "packed-reference": ("packed checkpoint, reference forward (PackedBitLinear FP32 caches)", "packed"),
    "packed-fast": ("packed checkpoint, FastDecoder (head stays 2-bit)", "packed"),
}


def _status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process (per address space: unlike getrusage's ru_maxrss, which
    survives exec, the high-water mark starts afresh in this subprocess and can be reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _trim() -> None:
    """Hand freed heap back to the OS, so resident memory is what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker(path: str, mode: str, tokens: int) -> dict:
    """Runs in the subprocess: load, decode `tokens` greedily through DecoderSession, report."""
    import bitmar_core.inference.checkpoint as ckpt
    from bitmar_core.inference import fast_decoder as fast
    from bitmar_core.inference.decoding import DecoderSession
    from bitmar_core.inference.tokenizer import default_tokenizer

    tokenizer = default_tokenizer()  # not the model: loaded before the baseline
    fast.load_extension()
    torch.set_num_threads(1)
    _trim()
    base = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    model = ckpt.load_checkpoint(path)
    peak_load = _status_bytes("VmHWM")
    _trim()
    Path("/proc/self/clear_refs").write_text("5")
    decoder = fast.FastDecoder(model) if mode == "packed-fast" else model
    session = DecoderSession(decoder, tokenizer)
    session.generate([model.config.eos_id], None, tokens, eos_id=-1)
    peak_decode = _status_bytes("VmHWM")
    _trim()
    return {"base": base, "peak_load": peak_load, "peak_decode": peak_decode, "now": _status_bytes("VmRSS"),
            "backend": getattr(decoder, "backend", "reference")}


def footprint(quick: bool) -> Table:
    from bitmar_core.inference.checkpoint import save_checkpoint
    from bitmar_core.model.bitmar import BitMar

    tokens = 32 if quick else 128
    t = Table("6. Checkpoint size and peak RSS of the model alone",
              ["model", "file", "bytes", "vs FP32", "peak while loading", "peak while decoding",
               "resident after decoding"])
    with tempfile.TemporaryDirectory(prefix="bitmar-bench-") as tmp:
        files = {}
        for label, tied in (("deployed (tied 2-bit embedding)", True), ("paper (separate FP32 embedding)", False)):
            torch.manual_seed(0)
            model = BitMar(bitmar_config(tie_embeddings=tied)).eval()
            fp32 = save_checkpoint(model, Path(tmp) / f"fp32_{tied}.safetensors")
            packed = save_checkpoint(model, Path(tmp) / f"packed_{tied}.safetensors", packed=True)
            files[tied] = {"fp32": fp32, "packed": packed}
            b32, bp = fp32.stat().st_size, packed.stat().st_size
            t.add(label, "FP32 (baseline)", f"{b32:,}", "1.00×", "", "", "")
            t.add(label, "packed", f"{bp:,}", f"{bp / b32:.2f}×", "", "", "")
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for mode, (label, form) in MODES.items():
            out = subprocess.run([sys.executable, "-m", "bench.footprint", "--worker", str(files[True][form]),
                                  "--mode", mode, "--tokens", str(tokens)], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                t.add(label, form, "", "", f"failed: {out.stderr.strip().splitlines()[-1:]}", "", "")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            mib = lambda k: f"{(r[k] - r['base']) / 2**20:.1f} MiB"  # noqa: E731
            t.add(f"{label} [{r['backend']}]", form, "", "", mib("peak_load"), mib("peak_decode"), mib("now"))
    t.notes.append("sizes: a random init of the paper's sizes (14.9M parameters counted by BitMar); packed = "
                   "ternary layers as 2-bit codes + β + γ, other tensors FP32 (save_checkpoint's defaults)")
    t.notes.append(f"RSS: the deployed (tied) model in a fresh process: load_checkpoint, then {tokens} greedy "
                   "tokens through DecoderSession. Every figure is minus the resident memory after the imports "
                   "and the tokenizer: peak while loading = VmHWM over load_checkpoint (which builds the FP32 "
                   "BitMar, then packs it); peak while decoding = VmHWM from then on (building the decoder, "
                   "its caches, the tokens); resident after = VmRSS at the end, after malloc_trim")
    return t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worker", required=True, help="checkpoint to load in this process")
    ap.add_argument("--mode", choices=sorted(MODES), required=True)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args(argv)
    print(json.dumps(worker(a.worker, a.mode, a.tokens)))


if __name__ == "__main__":
    main()
