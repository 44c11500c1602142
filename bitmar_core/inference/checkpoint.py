"""Checkpoints as safetensors (never pickle), the config riding along as JSON in the metadata.

The packed form stores each BitLinear as 2-bit codes (4 per byte) + β + γ and loads into
`PackedBitLinear` layers: the deployable file. The FP32 form keeps latent weights for training.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..model.bitmar import BitMar
from ..model.config import BitMarConfig
from ..model.memory import EpisodicMemoryState
from ..model.quant import BitLinear, PackedBitLinear, pack_model, pack_ternary

FORMAT = "bitmar-1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what was expected."""


def save_checkpoint(model: BitMar, path: str | os.PathLike, packed: bool = False,
                    float_dtype: torch.dtype = torch.float32) -> Path:
    """Write `model` to `path`. packed=True: ternary layers as uint8 codes + scales. float_dtype
    applies to the remaining float tensors (embeddings, norms, M0); β and γ stay FP32."""
    path = Path(path)
    has_packed = any(isinstance(m, PackedBitLinear) for m in model.modules())
    if has_packed and not packed:
        raise CheckpointError(f"{path}: the model is already packed; save it with packed=True")
    tensors = dict(model.state_dict())
    if packed:
        for name, m in model.named_modules():
            if isinstance(m, BitLinear):
                t, beta = m.quantized_weight()
                del tensors[f"{name}.weight"]
                tensors[f"{name}.weight_packed"] = pack_ternary(t)
                tensors[f"{name}.weight_scale"] = beta.detach()
    exact = {k for k in tensors if k.endswith((".weight_scale", ".scale"))}
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if v.is_floating_point() and k not in exact:
            v = v.to(float_dtype)
        out[k] = v.contiguous()
    meta = {"format": FORMAT, "packed": "true" if packed else "false",
            "config": json.dumps(model.config.to_dict())}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=meta)
    return path


def read_header(path: str | os.PathLike) -> dict:
    """Parse and check a safetensors header without loading tensors; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size - 8} after the length "
                                  "field (truncated, or not a safetensors file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: tensors need {8 + n + end} bytes, the file has {size}")
    return header


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> BitMar:
    """Load a BitMar (FP32 or packed form) in eval mode; a packed file gives PackedBitLinear layers."""
    path = Path(path)
    meta = read_header(path).get("__metadata__") or {}
    if "config" not in meta:
        raise CheckpointError(f"{path}: no 'config' in the safetensors metadata; expected a file written by save_checkpoint")
    try:
        config = BitMarConfig.from_dict(json.loads(meta["config"]))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid config in metadata: {e}") from None
    model = BitMar(config)
    if meta.get("packed") == "true":
        pack_model(model)
    tensors = load_file(str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the config: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: tensor {k!r} has shape {tuple(tensors[k].shape)}, "
                                  f"expected {tuple(v.shape)} for this config")
        tensors[k] = tensors[k].to(v.dtype)
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()


def save_memory_state(state: EpisodicMemoryState, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.state_tensors().items()}, str(path),
              metadata={"format": FORMAT + "-memory"})
    return path


def load_memory_state(state: EpisodicMemoryState, path: str | os.PathLike) -> EpisodicMemoryState:
    """Restore M, usage and n_writes into `state` (shapes checked against its model)."""
    read_header(path)
    try:
        state.load_state_tensors(load_file(str(path)))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return state
