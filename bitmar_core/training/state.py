"""The optimizer, and a training run's resumable state: model, optimizer, scaler, controller, data
stream and every RNG, as safetensors + JSON (no pickle), written atomically."""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from ..data.streams import EpisodeBatches
from ..inference.checkpoint import load_checkpoint, save_checkpoint
from ..model.bitmar import BitMar
from .controller import AdaptiveController
from .recipe import TrainConfig

log = logging.getLogger("bitmar.train")


def build_optimizer(model: BitMar, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not embeddings, M0, norms or scales)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.dim() >= 2 and not name.startswith(("wte.", "memory.M0")) and ".wpe." not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kind = t.optimizer
    if kind == "adamw8bit" or (kind == "auto" and device.type == "cuda"):
        try:
            import bitsandbytes as bnb  # optional: only for CUDA training
        except ImportError:
            if kind == "adamw8bit":
                raise ImportError("train.optimizer = adamw8bit needs `pip install bitsandbytes`") from None
            log.warning("bitsandbytes not installed: using torch AdamW instead of 8-bit AdamW")
        else:
            return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=tuple(t.betas))
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), foreach=True)


def flatten_state(prefix: str, obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor in a nested dict/list into `tensors` (key = path) and return the JSON rest,
    with tensors replaced by {"__tensor__": key}."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten_state(f"{prefix}/{k}", v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(f"{prefix}/{i}", v, tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(f"{prefix}/{i}", v, tensors) for i, v in enumerate(obj)]
    return obj


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__tuple__" in obj:
        return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


# --------------------------------------------------------------------------- RNG

def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, py_gauss = random.getstate()
    return tensors, {"numpy": [name, int(pos), int(has_gauss), float(gauss)],
                     "python": [version, list(internal), py_gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda/"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = meta["python"]
    random.setstate((version, tuple(internal), py_gauss))


# --------------------------------------------------------------------------- checkpoint

def save_training_state(folder: Path, model: BitMar, optimizer, scaler, controller: AdaptiveController,
                        batches: EpisodeBatches, step: int, recipe: dict, rng: list, extra: dict) -> None:
    """folder/model.safetensors (FP32 latent weights + config), folder/state.safetensors
    (optimizer and RNG tensors), folder/state.json (everything else). Written to a temporary
    folder and renamed, so a crash never leaves a half-written checkpoint."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_checkpoint(model, tmp / "model.safetensors", packed=False)
    tensors: dict[str, torch.Tensor] = {}
    optim_json = flatten_state("optimizer", optimizer.state_dict(), tensors)
    rng_json = []
    for r, (rt, rm) in enumerate(rng):
        for k, v in rt.items():
            tensors[f"rng/{r}/{k}"] = v.contiguous()
        rng_json.append(rm)
    save_file(tensors, str(tmp / "state.safetensors"))
    state = {"step": step, "recipe": recipe, "optimizer": optim_json,
             "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
             "controller": controller.state_dict(), "data": batches.state_dict(),
             "rng": rng_json, "world": len(rng), **extra}
    (tmp / "state.json").write_text(json.dumps(state))
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_training_state(folder: Path) -> tuple[BitMar, dict, dict[str, torch.Tensor]]:
    for name in ("model.safetensors", "state.safetensors", "state.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"resume: {folder / name} is missing; expected a checkpoint folder "
                                    "written by bitmar-train (run_dir/checkpoint)")
    model = load_checkpoint(folder / "model.safetensors")
    return model, json.loads((folder / "state.json").read_text()), load_file(str(folder / "state.safetensors"))
