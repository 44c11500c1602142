"""Fast batch-1 decoding for the node: `FastDecoder` takes a BitMar's place in `DecoderSession` and
gives the very same greedy tokens and caches as the reference forward, several times faster.

Why "the very same" shapes the design. Every FP32 rounding difference can flip one int8 activation
code (round(x·s) sits within an ulp of a .5 about once per few hundred values), and a flipped
code moves the next logits by far more than rounding; ternary heads also have exact integer ties
at the top. A path that merely rounds differently (even one that computes the ternary layers
exactly) left the reference's greedy stream after 0–215 tokens in our trials. So:

* the C++ step (csrc/bitmar_fast.cpp, built by `python -m bitmar_core.inference.fast_decoder --build`) makes the
  reference's own ATen calls — or the BLAS calls beneath them, where checked bit-identical — for
  every order-sensitive op, and replaces the Python around them;
* the 128 → vocabulary head stays packed, 2 bits/weight (4 bytes/weight unpacked),
  and is an exact integer dot product whose argmax is provably the reference's; an exact tie at the
  top is settled by running the reference's own head computation once (rare);
* without the extension (not built, a GPU, batch > 1) a streamlined PyTorch step with the same op
  sequence is used; prompts of more than one token always go through the reference layers.

Greedy tokens and the KV caches are bit-identical to the reference; the returned logits are within
FP32 rounding of its own (identical in the PyTorch step and at ties), so a sampled token
(temperature > 0) can differ only when the random draw falls within that rounding of a boundary.

    session = DecoderSession(FastDecoder(model), tokenizer)   # as with the model itself
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import shutil
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.decoder import rotate
from ..model.layers import attention
from ..model.quant import EPS, BitLinear, PackedBitLinear, absmax_int8, unpack_ternary

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "bitmar_fast.cpp"
# No -march: the head kernels pick AVX-512 VNNI / AVX2 / scalar at run time. No FP contraction: an
# a*b+c fused into one rounding would break bit-identity with the reference's separate ops.
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
TILE_ROWS, BLOCK_K = 16, 16  # must match kTileRows / kBlockK in the C++ source


# ------------------------------------------------------------------ the extension: build and load
def extension_dir() -> Path:
    """Where the built extension lives: per Python environment, since it is bound to its torch."""
    return Path(os.environ.get("BITMAR_FAST_EXT_DIR") or Path(sys.prefix) / "lib" / "bitmar_fast")


def _module_name(source_text: str) -> str:
    tag = hashlib.sha256((source_text + torch.__version__ + " ".join(CFLAGS)).encode()).hexdigest()[:12]
    return f"bitmar_fast_{tag}"


def build_extension(verbose: bool = False) -> Path:
    """Compile csrc/bitmar_fast.cpp against this torch (about a minute; nothing when up to date)."""
    from torch.utils.cpp_extension import is_ninja_available, load

    if not SOURCE.is_file():
        raise FileNotFoundError(f"bitmar fast extension: source {SOURCE} not found (build from a source checkout)")
    text = SOURCE.read_text()
    name = _module_name(text)
    out = extension_dir()
    manifest = out / f"{name}.json"
    if manifest.is_file() and (out / json.loads(manifest.read_text())["file"]).is_file():
        return out / json.loads(manifest.read_text())["file"]
    if not is_ninja_available():
        raise RuntimeError("bitmar fast extension: torch builds extensions with ninja, which is not on PATH "
                           "(apt install ninja-build, or pip install ninja)")
    build_dir = out / "build" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    mod = load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, build_directory=str(build_dir),
               verbose=verbose)
    so = Path(mod.__file__)
    (out / so.name).write_bytes(so.read_bytes())
    manifest.write_text(json.dumps({"file": so.name, "torch": torch.__version__,
                                    "source_sha256": hashlib.sha256(text.encode()).hexdigest()}))
    for old in out.glob("bitmar_fast_*"):  # builds of earlier sources
        if not old.name.startswith(name):
            old.unlink()
    for old in (out / "build").glob("bitmar_fast_*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return out / so.name


_EXT: types.ModuleType | None = None
_EXT_REASON = "not loaded yet"


def load_extension() -> types.ModuleType | None:
    """The built extension for this torch and source, or None (the reason in `extension_status()`)."""
    global _EXT, _EXT_REASON
    if _EXT is not None or _EXT_REASON != "not loaded yet":
        return _EXT
    out = extension_dir()
    if SOURCE.is_file():  # a source checkout: only the build of this very source will do
        name = _module_name(SOURCE.read_text())
        manifests = [out / f"{name}.json"]
    else:  # an installed package: whatever set-up built for this torch
        manifests = sorted(out.glob("bitmar_fast_*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for manifest in manifests:
        if not manifest.is_file():
            continue
        info = json.loads(manifest.read_text())
        if info.get("torch") != torch.__version__:
            continue
        path = out / info["file"]
        try:
            loader = importlib.machinery.ExtensionFileLoader(path.stem.split(".")[0], str(path))
            spec = importlib.util.spec_from_file_location(loader.name, str(path), loader=loader)
            mod = importlib.util.module_from_spec(spec)
            loader.exec_module(mod)
        except (ImportError, OSError) as exc:
            _EXT_REASON = f"{path}: {exc}"
            return None
        _EXT, _EXT_REASON = mod, f"loaded {path}"
        return _EXT
    _EXT_REASON = (f"not built for this source and torch {torch.__version__} in {out}; "
                   f"run scripts/setup.sh or `python -m bitmar_core.inference.fast_decoder --build`")
    return None


def extension_status() -> str:
    load_extension()
    return _EXT_REASON


# ------------------------------------------------------------------ packing the head
def ternary_of(layer: torch.nn.Module) -> tuple[torch.Tensor, float, float]:
    """(T int8 (out, in), β, γ) of a BitLinear or PackedBitLinear."""
    if getattr(layer, "bias", None) is not None:
        raise ValueError(f"FastDecoder: {type(layer).__name__} with a bias; the decoder's ternary layers have none")
    with torch.no_grad():
        if isinstance(layer, PackedBitLinear):
            return layer.ternary(), float(layer.weight_scale), float(layer.scale)
        if isinstance(layer, BitLinear):
            t, beta = layer.quantized_weight()
            return t.to(torch.int8), float(beta), float(layer.scale)
    raise TypeError(f"FastDecoder: expected a BitLinear or PackedBitLinear, got {type(layer).__name__}")


def pack_head(t: torch.Tensor) -> torch.Tensor:
    """Ternary (out, in) → the kernel's tile layout, uint8: tiles of 16 rows × blocks of 16 inputs,
    64 bytes each; byte 4r+m of block b holds at bits 2u the code T+1 of (row r, input 16b+4u+m).
    Padding rows and inputs get code 1 (T = 0), so they add nothing."""
    out_f, in_f = t.shape
    rows = -(-out_f // TILE_ROWS) * TILE_ROWS
    cols = -(-in_f // BLOCK_K) * BLOCK_K
    codes = torch.ones(rows, cols, dtype=torch.uint8)
    codes[:out_f, :in_f] = (t.to(torch.int16) + 1).to(torch.uint8)
    # (tile, r, block, u, m) → (tile, block, r, m, u)
    c = codes.view(rows // TILE_ROWS, TILE_ROWS, cols // BLOCK_K, 4, 4).permute(0, 2, 1, 4, 3)
    packed = c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)
    return packed.contiguous().view(-1)


def packed_head(layer: torch.nn.Module, chunk_rows: int = 4096) -> tuple[torch.Tensor, float, float]:
    """(tile-layout codes, β, γ) of the head, packed a few thousand rows at a time: a packed head
    is never unpacked whole (its int8 form alone would be 6.4 MB, the intermediates more)."""
    if isinstance(layer, PackedBitLinear):
        rows = lambda r0, r1: unpack_ternary(layer.weight_packed[r0:r1], layer.in_features)  # noqa: E731
        beta, gamma = float(layer.weight_scale), float(layer.scale)
    else:
        t, beta, gamma = ternary_of(layer)
        rows = lambda r0, r1: t[r0:r1]  # noqa: E731
    n = layer.out_features
    assert chunk_rows % TILE_ROWS == 0  # whole tiles per chunk, so the chunks concatenate
    with torch.no_grad():
        codes = torch.cat([pack_head(rows(r0, min(r0 + chunk_rows, n))) for r0 in range(0, n, chunk_rows)])
    return codes, beta, gamma


# ------------------------------------------------------------------ the decoder
class FastDecoder:
    """A BitMar as `DecoderSession` uses it — `config`, `decoder`, `wte.weight.device`, `decode` —
    whose batch-1 steps are fast and bit-identical to `model.decode` (logits and tokens).

    Built from a model in eval mode (FP32 or packed); it snapshots the ternary weights, so rebuild
    it after loading new weights. backend: "auto" (the C++ step when built and on CPU, else the
    PyTorch step), "ext" (fail if unavailable) or "torch".
    """

    def __init__(self, model, backend: str = "auto"):
        if backend not in ("auto", "ext", "torch"):
            raise ValueError(f"FastDecoder: backend {backend!r}, expected 'auto', 'ext' or 'torch'")
        if model.training:
            raise ValueError("FastDecoder: the model is in training mode (dropout); call model.eval() first")
        self.model = model
        self.config = model.config
        self.decoder = model.decoder
        dec, c = model.decoder, model.config
        # DecoderSession only reads model.wte.weight.device; a tied model's wte.weight would unpack
        # the whole head to FP32, which is what this class avoids.
        self.wte = types.SimpleNamespace(weight=dec.ln_f.weight)
        self._tied = bool(c.tie_embeddings)
        self._concat = c.conditioning == "concat"
        self._cond_obj: torch.Tensor | None = None
        self._cond_ver = -1
        self._conds: list[torch.Tensor] = []
        self._bound: tuple = ()
        self._ext = None
        ext = None
        on_cpu = dec.ln_f.weight.device.type == "cpu" and dec.ln_f.weight.dtype == torch.float32
        if backend != "torch":
            ext = load_extension() if on_cpu else None
            if ext is None:
                why = extension_status() if on_cpu else "the model is not FP32 on the CPU"
                if backend == "ext":
                    raise RuntimeError(f"FastDecoder: the C++ step is unavailable: {why}")
                log.info("FastDecoder: using the PyTorch step (%s)", why)
        self.backend = "ext" if ext is not None else "torch"
        if ext is not None:
            self._build_stepper(ext)

    # --------------------------------------------------------------- set-up
    def _build_stepper(self, ext) -> None:
        dec, c = self.decoder, self.config
        layer_tensors, layer_scalars = [], []
        for layer in dec.layers:
            lins = [layer.attn.qkv, layer.attn.proj, layer.mlp.fc, layer.mlp.proj]
            if self._concat:
                lins.append(layer.cond_mix)
            ws, gs = [], []
            for lin in lins:
                ws.append(self._dequantized(lin))
                gs.append(float(lin.scale.detach()))  # γ
            layer_tensors.append([layer.ln_1.weight.detach(), layer.ln_1.bias.detach(),
                                  layer.ln_2.weight.detach(), layer.ln_2.bias.detach(), *ws])
            layer_scalars.append([layer.ln_1.eps, layer.ln_2.eps, *gs])
        self._head_packed, beta, gamma = packed_head(dec.head)
        wte = torch.empty(0) if self._tied else self.model.wte.weight.detach().float().contiguous()
        self._ext = ext.Stepper(c.d_model, c.n_heads, c.vocab_size, self._concat, EPS, wte,
                                layer_tensors, layer_scalars, dec.ln_f.weight.detach(), dec.ln_f.bias.detach(),
                                dec.ln_f.eps, self._head_packed, dec.head.in_features, beta, gamma)

    @staticmethod
    def _dequantized(lin: torch.nn.Module) -> torch.Tensor:
        """β·T in FP32, as the reference computes it; a PackedBitLinear's own cache is shared."""
        with torch.no_grad():
            if isinstance(lin, PackedBitLinear):
                if lin._w_cache is None or lin._w_cache.device != lin.weight_packed.device:
                    lin._w_cache = lin.ternary().float() * lin.weight_scale
                return lin._w_cache
            t, beta = lin.quantized_weight()
            return (t * beta).contiguous()

    @property
    def kernel(self) -> str:
        """The head kernel in use: avx512vnni, avx2 or scalar (C++), or 'torch'."""
        return self._ext.kernel() if self._ext is not None else "torch"

    def head_bytes(self) -> int:
        """Bytes the decode path holds for the output head (packed codes, or the FP32 cache)."""
        if self._ext is not None:
            return self._head_packed.numel()
        return self.config.vocab_size * self.config.d_model * 4

    # --------------------------------------------------------------- DecoderSession's interface
    @torch.no_grad()
    def decode(self, ids: torch.Tensor, cond: torch.Tensor | None = None, caches=None, start: int = 0,
               prefix: torch.Tensor | None = None) -> torch.Tensor:
        """ids (1,T) after an optional embedding prefix (1,P,d) → FP32 logits (1,1,V) of the last
        position, continuing `caches`; equal to `model.decode(ids, cond, caches, prefix=prefix)[:, -1:]`.
        Without caches or with batch > 1: the reference."""
        if caches is None or ids.shape[0] != 1:
            return self.model.decode(ids, cond, caches, start, prefix=prefix)[:, -1:]
        if ids.shape[1] == 1 and prefix is None:
            return self._step(ids, cond, caches)
        return self._prefill(ids, cond, caches, prefix)

    def vision_prefix(self, V: torch.Tensor) -> torch.Tensor:
        return self.model.vision_prefix(V)

    def _cond_vectors(self, cond: torch.Tensor | None, like: torch.Tensor) -> list[torch.Tensor]:
        """c_ℓ = P_ℓ([q ; M_r]) per layer, (1,1,d): the reference recomputes them every step, with
        identical results; here once per conditioning tensor (and its in-place version)."""
        version = cond._version if cond is not None else -1
        if not self._conds or cond is not self._cond_obj or version != self._cond_ver:
            full = cond if cond is not None else like.new_zeros(1, 2 * self.config.memory_dim)
            self._conds = [layer.cond_proj(full).unsqueeze(1) for layer in self.decoder.layers]
            self._cond_obj, self._cond_ver = cond, version
            if self._ext is not None:
                self._ext.set_conditioning([x.contiguous() for x in self._conds])
        return self._conds

    def _bind(self, caches) -> None:
        if len(caches) != len(self._bound) or any(a is not b for a, b in zip(caches, self._bound)):
            if len(caches) != len(self.decoder.layers):
                raise ValueError(f"FastDecoder: {len(caches)} caches for {len(self.decoder.layers)} layers")
            c0 = caches[0]
            self._ext.set_caches([c.k for c in caches], [c.v for c in caches], [c.slot_pos for c in caches],
                                 [c.sink_raw for c in caches], c0.sink, c0.window)
            self._bound = tuple(caches)

    def _step(self, ids: torch.Tensor, cond: torch.Tensor | None, caches) -> torch.Tensor:
        t = caches[0].length
        if any(c.length != t for c in caches):
            raise ValueError("FastDecoder: the layers' caches disagree on the stream position")
        if self._ext is None:
            return self._torch_step(ids, cond, caches)
        self._cond_vectors(cond, self.decoder.ln_f.weight)
        self._bind(caches)
        rotary = self.decoder.rotary
        for c in caches:  # the reference does this inside attend, after storing token t (same result)
            c.refresh_sinks(t, rotary)
        cos, sin = rotary(torch.tensor([t]))
        logits = self._ext.step(int(ids[0, 0]), t, cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous())
        for c in caches:
            c.length += 1
        return logits.view(1, 1, -1)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (1,T,d); a tied model's rows of β·T come from the packed head."""
        if not self._tied or isinstance(self.decoder.head, PackedBitLinear):
            return self.model.wte(ids)  # a packed tied head gathers and unpacks the rows only
        t, beta = self.decoder.head.quantized_weight()
        return (t[ids.reshape(-1)] * beta).view(*ids.shape, -1)

    def _torch_step(self, ids: torch.Tensor, cond: torch.Tensor | None, caches) -> torch.Tensor:
        """One token with the reference's op sequence (bit-identical), minus its Python overhead."""
        dec, cfg = self.decoder, self.config
        t = caches[0].length
        x = dec.drop(self._embed(ids))
        conds = self._cond_vectors(cond, x)
        c0 = caches[0]
        slot = t if t < c0.sink else c0.sink + (t - c0.sink) % c0.window
        n_valid = min(t + 1, c0.capacity)
        H = cfg.n_heads
        cos, sin = dec.rotary(torch.tensor([t], device=x.device))
        for layer, c, cache in zip(dec.layers, conds, caches):
            x = x + c if not self._concat else layer.cond_mix(torch.cat([x, c.expand_as(x)], dim=-1))
            q, k, v = (y.view(1, 1, H, -1).transpose(1, 2) for y in layer.attn.qkv(layer.ln_1(x)).chunk(3, dim=-1))
            if t < cache.sink:
                cache.sink_raw[:, :, t] = k[:, :, 0]
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            cache.k[:, :, slot] = k[:, :, 0]
            cache.v[:, :, slot] = v[:, :, 0]
            cache.slot_pos[slot] = t
            cache.refresh_sinks(t, dec.rotary)
            cache.length += 1
            y = attention(q, cache.k[:, :, :n_valid], cache.v[:, :, :n_valid], None)
            x = x + layer.attn.proj(y.transpose(1, 2).reshape(1, 1, -1))
            x = x + layer.mlp(layer.ln_2(x))
        return dec.head(dec.ln_f(x.float()))

    def _prefill(self, ids: torch.Tensor, cond: torch.Tensor | None, caches,
                 prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Several tokens (or a prefix): the reference's layers (its batched matmuls round
        differently from T single steps, so only they give its cache), then the head on the last
        position."""
        dec = self.decoder
        tok_emb = self._embed(ids)
        if prefix is not None:
            tok_emb = torch.cat([prefix.to(tok_emb.dtype), tok_emb], dim=1)
        full = cond if cond is not None else tok_emb.new_zeros(1, 2 * self.config.memory_dim)
        start = caches[0].length
        pos = torch.arange(start, start + tok_emb.shape[1], device=tok_emb.device)
        x = dec.drop(tok_emb)
        for layer, cache in zip(dec.layers, caches):
            x = layer(x, full, pos, dec.rotary, cache)
        h = dec.ln_f(x.float())
        if self._ext is None:
            return dec.head(h)[:, -1:]
        logits, tie = self._ext.head_logits(h[0, -1].contiguous(), False)
        if tie:  # the reference's head over every row, as it computes it (rare)
            q, s = absmax_int8(h)
            w = self._ext.dequantized_head()
            return (F.linear(q / s, w) * dec.head.scale)[:, -1:]
        return logits.view(1, 1, -1)


# ------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitmar_core.inference.fast_decoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--build", action="store_true", help="compile the C++ extension for this environment")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.build:
        path = build_extension(verbose=args.verbose)
        print(f"bitmar fast extension: {path}")
    print(f"bitmar fast extension: {extension_status()}")
    return 0 if load_extension() is not None or not args.build else 1


if __name__ == "__main__":
    sys.exit(main())
