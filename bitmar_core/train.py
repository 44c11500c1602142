"""Training entry point (`bitmar-train`, `python -m bitmar_core.train`): the paper's objective
L = L_lm + 1.5·L_cm + 0.1·L_mem, AdamW (8-bit on CUDA when bitsandbytes is there), cosine warm
restarts, gradient accumulation, AMP, the adaptive controller, exact resume, DDP under torchrun.

    bitmar-train --config config/train_default.yaml [--run-dir runs/x] [--steps N] [--resume DIR]
                 [--set train.lr=1e-3 --set model.d_model=64 ...]

A run directory holds metrics.csv, TensorBoard events (tb/), controller events, the resumable
checkpoint (checkpoint/: safetensors + JSON, no pickle), the packed model and the figures.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file

from .checkpoint import load_checkpoint, save_checkpoint
from .config import BitMarConfig
from .controller import AdaptiveController, ControllerConfig
from .data.datasets import IMAGE, ImageCaptionDataset, MixedSampler, TextCorpus, collate, tokenize
from .memory import read as memory_read
from .model import BitMar
from .quant import zero_weight_fraction
from .schedule import CosineWarmRestarts

log = logging.getLogger("bitmar.train")

# Every key the recipe may hold, with its default; a YAML key not listed here is an error.
DEFAULTS: dict[str, Any] = {
    "model": {},  # BitMarConfig fields; unspecified ones keep the paper's values
    "data": {
        "backbone": "efficientnet_lite0",
        "cache_dir": "runs/cache",  # precomputed scene features (rebuilt when missing)
        "scenes": None,  # {n, split, start, image_size}: generated image–caption pairs
        "captions": None,  # or a captions.jsonl (CC3M / Localized Narratives style) ...
        "features": None,  # ... and its features.npy (default: beside the JSONL)
        "text": "wiki",  # 'wiki' (offline Wikipedia summaries), a .txt path/folder, a list, or null
        "image_fraction": 0.5,
        "caption_max_tokens": 256,
        "text_max_tokens": 256,
        "val_scenes": 0,  # validation-split scenes for val loss and the memory probe
        "val_captions": None,
        "val_features": None,
        "val_batches": 4,
        "bucket_batches": 1,  # >1: sort this many batches' worth of items by length (less padding)
        "probe_size": 16,
    },
    "train": {
        "seed": 0,
        "steps": 1000,  # optimizer steps
        "batch_size": 64,  # per optimizer micro-step, summed over all ranks
        "grad_accum": 1,
        "lr": 2e-4,
        "warmup_steps": 0,
        "t0": 1000,
        "t_mult": 2,
        "min_lr_ratio": 0.1,
        "weight_decay": 0.01,
        "betas": [0.9, 0.95],
        "grad_clip": 1.0,
        "optimizer": "auto",  # auto: AdamW8bit on CUDA with bitsandbytes, else torch AdamW
        "precision": "auto",  # auto: fp16 on CUDA, fp32 on CPU; or fp32 | fp16 | bf16
        "gradient_checkpointing": "auto",  # auto: on for CUDA
        "device": "auto",
        "num_threads": 0,  # torch CPU threads; 0 keeps torch's default
        "log_every": 10,
        "eval_every": 200,
        "save_every": 500,
        "max_time_s": None,  # stop (and save) once this much wall time has passed
    },
    "controller": {},  # ControllerConfig fields
    "output": {
        "run_dir": "runs/bitmar",
        "packed_checkpoint": None,  # also copy the packed model here at the end
    },
}


# --------------------------------------------------------------------------- configuration

def merge(base: dict, override: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if k not in base and where != "model" and where != "controller":
            raise ValueError(f"train config: unknown key {where + '.' if where else ''}{k}; "
                             f"expected one of {sorted(base)}")
        if isinstance(v, dict) and isinstance(base.get(k), dict) and base.get(k) is not None and k not in ("scenes",):
            out[k] = merge(base[k], v, k if not where else f"{where}.{k}")
        else:
            out[k] = v
    return out


def load_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> dict:
    """DEFAULTS ← YAML file ← `section.key=value` overrides (values parsed as YAML)."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"train config {path} does not exist")
        d = yaml.safe_load(path.read_text()) or {}
        if not isinstance(d, dict):
            raise ValueError(f"train config {path}: expected a mapping of sections, got {type(d).__name__}")
        cfg = merge(cfg, d)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set {item!r}: expected section.key=value, e.g. train.lr=1e-3")
        section, _, name = key.partition(".")
        if section not in cfg:
            raise ValueError(f"--set {item!r}: unknown section {section!r}; expected one of {sorted(cfg)}")
        cfg = merge(cfg, {section: {name: yaml.safe_load(value)}})
    BitMarConfig.from_dict(cfg["model"])  # validate early, with the field's name
    ControllerConfig(**cfg["controller"])
    return cfg


# --------------------------------------------------------------------------- distributed

class Dist:
    """Rank/world from torchrun's environment; a single process otherwise."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather(self, obj: Any) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- data

def scene_cache(cache_dir: str | Path, n: int, split: str = "train", start: int = 0, image_size: int = 224,
                backbone: str = "efficientnet_lite0") -> Path:
    """Folder of precomputed features for scenes start..start+n−1 of `split`; built (with
    bitmar_core.extract_features) when missing. Scenes and features are deterministic."""
    out = Path(cache_dir) / f"scenes_{split}_{start}_{n}_{backbone}_{image_size}px"
    meta_path = out / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (meta.get("generated_scenes"), meta.get("split"), meta.get("start"), meta.get("backbone")) == \
                (n, split, start, backbone):
            return out
    from .backbones import build_backbone
    from .extract_features import extract_generated

    log.info("building scene feature cache %s (%d scenes)", out, n)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bb = build_backbone(backbone)
    extract_generated(tmp, n, split, start, bb, image_size)
    meta = {"backbone": backbone, "feature_dim": bb.feature_dim, "grid_size": list(bb.grid_size),
            "dtype": "float16", "generated_scenes": n, "split": split, "start": start, "image_size": image_size}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def image_dataset(data: dict, which: str, d: Dist) -> ImageCaptionDataset | None:
    """'train' or 'val' image–caption data from the recipe (scenes built by rank 0 first)."""
    if which == "train":
        scenes, captions, features = data["scenes"], data["captions"], data["features"]
    else:
        n = data["val_scenes"]
        scenes = {"n": n, "split": "validation", "start": 0} if n else None
        captions, features = data["val_captions"], data["val_features"]
    if scenes:
        spec = {"split": "train", "start": 0, "image_size": 224, **scenes}
        if d.main:
            folder = scene_cache(data["cache_dir"], spec["n"], spec["split"], spec["start"], spec["image_size"],
                                 data["backbone"])
        d.barrier()
        folder = scene_cache(data["cache_dir"], spec["n"], spec["split"], spec["start"], spec["image_size"],
                             data["backbone"])
        return ImageCaptionDataset(folder / "captions.jsonl")
    if captions:
        return ImageCaptionDataset(captions, features)
    return None


def text_corpus(data: dict, split: str) -> TextCorpus | None:
    src = data["text"]
    if src is None:
        return None
    if src == "wiki":
        from .data.text import wiki_text_split

        return TextCorpus(wiki_text_split(split))
    if split != "train":
        return None
    return TextCorpus.from_files(src)


class ShardedBatches:
    """One global stream of (source, index) from a `MixedSampler`, cut into global batches of
    `global_batch` items; rank r keeps items r, r+W, r+2W, ... So W ranks see exactly the data a
    single process would with the same global batch, and the sampler state is rank-independent.

    With `bucket` > 1, `bucket` global batches are drawn at once, sorted by token count and
    handed out in a seeded random order: batches of similar lengths waste less on padding (the
    captions run from 10 to 80 tokens). The undelivered batches are part of the state."""

    def __init__(self, image_data: ImageCaptionDataset | None, text_data: TextCorpus | None, tokenizer,
                 global_batch: int, image_fraction: float, seed: int, rank: int = 0, world: int = 1,
                 caption_max_tokens: int = 256, text_max_tokens: int = 256, eos_id: int = 50256,
                 vision_shape: tuple[int, int, int] | None = None, bucket: int = 1):
        if global_batch % world:
            raise ValueError(f"train.batch_size = {global_batch} must be a multiple of the {world} ranks")
        self.image_data, self.text_data, self.tokenizer = image_data, text_data, tokenizer
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.max_tokens = {IMAGE: caption_max_tokens, "text": text_max_tokens}
        self.eos_id = eos_id
        self.vision_shape = tuple(vision_shape or image_data.vision_shape)
        self.bucket = max(1, int(bucket))
        self.sampler = MixedSampler(len(image_data) if image_data else 0, len(text_data) if text_data else 0,
                                    image_fraction=image_fraction, seed=seed)
        self._pending: list[list[list]] = []  # global batches of [source, index] not yet delivered
        self._n_pools = 0
        self._seed = seed

    def _text(self, source: str, index: int) -> str:
        return self.image_data[index]["caption"] if source == IMAGE else self.text_data[index]

    def _ids(self, source: str, index: int) -> list[int]:
        # No eos here: BitMar.forward frames every sequence as [eos] + ids + [eos] itself.
        return tokenize(self.tokenizer, self._text(source, index), self.max_tokens[source], self.eos_id,
                        append_eos=False)

    def item(self, source: str, index: int) -> dict:
        vision = self.image_data[index]["vision"] if source == IMAGE else None
        return {"input_ids": self._ids(source, index), "vision": vision}

    def _refill(self) -> None:
        drawn = [list(next(self.sampler)) for _ in range(self.global_batch * self.bucket)]
        if self.bucket > 1:
            lengths = [len(self._ids(*d)) for d in drawn]
            drawn = [drawn[i] for i in sorted(range(len(drawn)), key=lambda i: (lengths[i], i))]
        batches = [drawn[i:i + self.global_batch] for i in range(0, len(drawn), self.global_batch)]
        order = np.random.default_rng([self._seed, 7, self._n_pools]).permutation(len(batches))
        self._pending = [batches[i] for i in order]
        self._n_pools += 1

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._pending:
            self._refill()
        drawn = self._pending.pop(0)
        mine = [self.item(*drawn[i]) for i in range(self.rank, self.global_batch, self.world)]
        return collate(mine, self.vision_shape, pad_id=self.eos_id)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "pending": self._pending, "n_pools": self._n_pools}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self._pending = [[list(x) for x in b] for b in state.get("pending", [])]
        self._n_pools = state.get("n_pools", 0)


# --------------------------------------------------------------------------- optimizer

def build_optimizer(model: BitMar, t: dict, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not embeddings, M0, norms or scales)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.dim() >= 2 and not name.startswith(("wte.", "memory.M0")) and ".wpe." not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    kind = t["optimizer"]
    if kind not in ("auto", "adamw", "adamw8bit"):
        raise ValueError(f"train.optimizer = {kind!r}: expected auto, adamw or adamw8bit")
    if kind == "adamw8bit" or (kind == "auto" and device.type == "cuda"):
        try:
            import bitsandbytes as bnb  # optional: only for CUDA training
        except ImportError:
            if kind == "adamw8bit":
                raise ImportError("train.optimizer = adamw8bit needs `pip install bitsandbytes`") from None
            log.warning("bitsandbytes not installed: using torch AdamW instead of 8-bit AdamW")
        else:
            return bnb.optim.AdamW8bit(groups, lr=t["lr"], betas=tuple(t["betas"]))
    return torch.optim.AdamW(groups, lr=t["lr"], betas=tuple(t["betas"]), foreach=True)


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
                        batches: ShardedBatches, step: int, recipe: dict, rng: list, extra: dict) -> None:
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


# --------------------------------------------------------------------------- probes and plots

@torch.no_grad()
def memory_read_weights(model: BitMar, batch: dict) -> np.ndarray:
    """w_r (B, K) of a probe batch under the training protocol: every item's q_ep is written into
    M0, then each image-only query q_desc reads. The paper's Figure 2 (slot activations)."""
    was = model.training
    model.eval()
    ids, mask, vision = batch["input_ids"], batch["attention_mask"].bool(), batch["vision"]
    Z = model.encode_text(ids, mask)
    V = model.compress_vision(vision)
    M, _ = model.memory.write(model.memory.M0.float(), model.fuse(Z, mask, V))
    _, w_r = memory_read(M, model.fuse(None, None, V))
    model.train(was)
    return w_r.float().cpu().numpy()


def plot_memory_activations(first: np.ndarray, last: np.ndarray, steps: tuple[int, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 4.5), constrained_layout=True)
    vmax = max(first.max(), last.max())
    for ax, w, s in zip(axes, (first, last), steps):
        im = ax.imshow(w, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"memory read weights w_r, step {s} (max {w.max():.3f}, "
                     f"slots with w_r > 1/K: {(w.max(0) > 1.0 / w.shape[1]).sum()}/{w.shape[1]})")
        ax.set_ylabel("probe item")
    axes[-1].set_xlabel("memory slot")
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_zero_fraction(steps: list[int], fractions: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    ax.plot(steps, [100 * f for f in fractions])
    ax.axhline(42.8, color="grey", linestyle="--", linewidth=1, label="paper: 42.8%")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("zero ternary weights (%)")
    ax.set_title("zero-weight fraction over training")
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    s = [int(r["step"]) for r in rows]
    for k in ("loss", "lm", "cm"):
        ax.plot(s, [float(r[k]) for r in rows], label=k)
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss") not in ("", None)]
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_yscale("log")
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the loop

CSV_FIELDS = ["step", "loss", "lm", "cm", "mem", "similarity", "similarity_ema", "lr", "cm_weight", "grad_norm",
              "zero_fraction", "tokens_per_s", "elapsed_s", "val_loss", "val_lm", "val_cm", "controller"]


def resolve_device(t: dict) -> torch.device:
    if t["device"] == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(t["device"])


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def evaluate(model: BitMar, batches: list[dict], device: torch.device, precision: str, seed: int) -> dict:
    """Mean losses over fixed validation batches; the training RNG stream is left untouched."""
    was = model.training
    model.eval()
    sums: dict[str, float] = {}
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for b in batches:
            with autocast_for(precision, device):
                out = model(to_device(b, device))
            for k in ("loss", "lm", "cm"):
                sums[k] = sums.get(k, 0.0) + float(out[k])
    model.train(was)
    return {k: v / len(batches) for k, v in sums.items()}


def train(recipe: dict, run_dir: Path, resume: Path | None = None) -> dict:
    t, data, out_cfg = recipe["train"], recipe["data"], recipe["output"]
    device = resolve_device(t)
    if t["num_threads"]:
        torch.set_num_threads(int(t["num_threads"]))
    d = Dist(device)
    if device.type == "cuda" and d.enabled:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    precision = t["precision"]
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        log.warning("train.precision fp16 needs CUDA; training in fp32 on %s", device)
        precision = "fp32"
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"train.precision = {precision!r}: expected auto, fp32, fp16 or bf16")
    grad_ckpt = t["gradient_checkpointing"]
    grad_ckpt = device.type == "cuda" if grad_ckpt == "auto" else bool(grad_ckpt)

    # --- model (identical init on every rank: seeded before construction) ---
    seed = int(t["seed"])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    state = state_tensors = None
    if resume is not None:
        model, state, state_tensors = load_training_state(resume)
        if state["world"] != d.world:
            raise ValueError(f"resume: {resume} was saved by {state['world']} ranks, this run has {d.world}")
        model.train()
    else:
        model = BitMar(BitMarConfig.from_dict({**recipe["model"], "gradient_checkpointing": grad_ckpt}))
    model.config.gradient_checkpointing = grad_ckpt
    model.to(device)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))

    # --- data ---
    from .tokenizer import GPT2Tokenizer

    tokenizer = GPT2Tokenizer()
    image_train = image_dataset(data, "train", d)
    text_train = text_corpus(data, "train")
    vision_shape = (image_train.vision_shape if image_train is not None
                    else (model.config.vision_feature_dim, 7, 7))
    if image_train is not None and vision_shape[0] != model.config.vision_feature_dim:
        raise ValueError(f"image features have D={vision_shape[0]}, model.vision_feature_dim is "
                         f"{model.config.vision_feature_dim}; set model.vision_feature_dim/backbone to match")
    global_micro = int(t["batch_size"])
    batches = ShardedBatches(image_train, text_train, tokenizer, global_micro, data["image_fraction"], seed,
                             d.rank, d.world, data["caption_max_tokens"], data["text_max_tokens"],
                             model.config.eos_id, vision_shape, bucket=int(data["bucket_batches"]))
    val_batches, probe = [], None
    image_val = image_dataset(data, "val", d)
    if image_val is not None or data["text"] == "wiki":
        text_val = text_corpus(data, "validation")
        if image_val is not None or text_val is not None:
            frac = data["image_fraction"] if (image_val is not None and text_val is not None) else \
                (1.0 if image_val is not None else 0.0)
            vb = ShardedBatches(image_val, text_val, tokenizer, global_micro // d.world, frac, seed + 1,
                                caption_max_tokens=data["caption_max_tokens"], text_max_tokens=data["text_max_tokens"],
                                vision_shape=vision_shape)
            val_batches = [next(vb) for _ in range(int(data["val_batches"]))]
    probe_source = image_val if image_val is not None else image_train
    if probe_source is not None:
        n = min(int(data["probe_size"]), len(probe_source))
        probe = collate([{"input_ids": tokenize(tokenizer, probe_source[i]["caption"], data["caption_max_tokens"],
                                                append_eos=False),
                          "vision": probe_source[i]["vision"]} for i in range(n)], vision_shape)
        probe = to_device(probe, device)

    # --- optimisation ---
    optimizer = build_optimizer(model, t, device)
    schedule = CosineWarmRestarts(float(t["lr"]), int(t["t0"]), int(t["t_mult"]), float(t["min_lr_ratio"]),
                                  int(t["warmup_steps"]))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16") if device.type == "cuda" else None
    controller = AdaptiveController(ControllerConfig(**recipe["controller"]), model)
    start_step, elapsed_before = 0, 0.0
    zero_log: tuple[list[int], list[float]] = ([], [])
    probe_first = None
    if state is not None:
        optimizer.load_state_dict(unflatten_state(state["optimizer"], state_tensors))
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        controller.load_state_dict(state["controller"])
        batches.load_state_dict(state["data"])
        rng_t = {k.split("/", 2)[2]: v for k, v in state_tensors.items() if k.startswith(f"rng/{d.rank}/")}
        set_rng_state(rng_t, state["rng"][d.rank])
        start_step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
        zero_log = (state.get("zero_steps", []), state.get("zero_fractions", []))
        if state.get("probe_first") is not None:
            probe_first = (state["probe_first_step"], np.asarray(state["probe_first"], dtype=np.float32))
    else:
        # Per-rank stochasticity (dropout, write masks) after the identical initialisation.
        torch.manual_seed(seed + 1000 * d.rank)

    ddp_model = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Text-only micro-batches leave the vision path unused on some ranks; frozen encoders too.
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=True)

    # --- logging (rank 0) ---
    writer = csv_file = csv_writer = bar = None
    if d.main:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        csv_path = run_dir / "metrics.csv"
        keep = []
        if start_step and csv_path.is_file():
            with open(csv_path, newline="") as f:
                keep = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        csv_file = open(csv_path, "w", newline="")
        csv_writer = csv.DictWriter(csv_file, fieldnames=CSV_FIELDS)
        csv_writer.writeheader()
        csv_writer.writerows(keep)
        bar = tqdm(total=int(t["steps"]), initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr, mininterval=2.0)
        log.info("%s: %d parameters, device %s, %d rank(s), precision %s, optimizer %s, "
                 "global batch %d × %d accumulation", run_dir, model.num_parameters(), device, d.world,
                 precision, type(optimizer).__name__, global_micro, t["grad_accum"])

    steps, accum = int(t["steps"]), int(t["grad_accum"])
    summary: dict = {}
    first_loss = None
    t_start = time.perf_counter()
    tokens_window, time_window = 0.0, time.perf_counter()
    model.train()
    step = start_step
    try:
        for step in range(start_step + 1, steps + 1):
            lr = schedule.apply(optimizer, step - 1)
            cm_w = controller.cm_weight(model.config.cm_weight)
            sums = torch.zeros(7, dtype=torch.float64)  # loss lm cm mem sim·n_vis n_vis tokens
            for micro in range(accum):
                batch = to_device(next(batches), device)
                sync = nullcontext() if (micro == accum - 1 or not d.enabled) else ddp_model.no_sync()
                with sync:
                    with autocast_for(precision, device):
                        out = ddp_model(batch, cm_weight=cm_w)
                    loss = out["loss"] / accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                n_vis = float(batch["has_vision"].sum())
                sums += torch.tensor([float(out[k].detach()) for k in ("loss", "lm", "cm", "mem")] +
                                     [float(out["similarity"]) * n_vis, n_vis,
                                      float(batch["attention_mask"].sum())], dtype=torch.float64)
            for p in controller.frozen_parameters():
                p.grad = None
            if scaler is not None:
                scaler.unscale_(optimizer)
            params = [p for p in model.parameters() if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, float(t["grad_clip"]))) \
                if t["grad_clip"] else float("nan")
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            sums = d.all_reduce_sum(sums)
            n = accum * d.world
            loss_v, lm_v, cm_v, mem_v = (float(x) / n for x in sums[:4])
            similarity = float(sums[4] / sums[5]) if sums[5] > 0 else None
            event = controller.update(step, similarity)
            tokens_window += float(sums[6])
            if first_loss is None:
                first_loss = loss_v
            if not math.isfinite(loss_v):
                raise FloatingPointError(f"step {step}: loss is {loss_v}; lower train.lr or check the data")

            if d.main:
                bar.update(1)
                if event is not None:
                    with open(run_dir / "controller_events.jsonl", "a") as f:
                        f.write(json.dumps(event) + "\n")
                    writer.add_text("controller", json.dumps(event), step)
                if step % int(t["log_every"]) == 0 or step == steps or step == start_step + 1 or event:
                    now = time.perf_counter()
                    tok_s = tokens_window / max(now - time_window, 1e-9)
                    tokens_window, time_window = 0.0, now
                    zf = zero_weight_fraction(model)
                    zero_log[0].append(step)
                    zero_log[1].append(zf)
                    row = {"step": step, "loss": loss_v, "lm": lm_v, "cm": cm_v, "mem": mem_v,
                           "similarity": "" if similarity is None else similarity,
                           "similarity_ema": "" if controller.ema is None else controller.ema,
                           "lr": lr, "cm_weight": cm_w, "grad_norm": grad_norm, "zero_fraction": zf,
                           "tokens_per_s": tok_s, "elapsed_s": elapsed_before + now - t_start,
                           "controller": (controller.active or {}).get("action", "")}
                    if val_batches and (step % int(t["eval_every"]) == 0 or step == steps):
                        v = evaluate(model, val_batches, device, precision, seed)
                        row.update(val_loss=v["loss"], val_lm=v["lm"], val_cm=v["cm"])
                        writer.add_scalars("val", v, step)
                    for k in ("loss", "lm", "cm", "mem", "lr", "cm_weight", "grad_norm", "zero_fraction",
                              "tokens_per_s"):
                        writer.add_scalar(f"train/{k}", row[k], step)
                    if similarity is not None:
                        writer.add_scalar("train/similarity", similarity, step)
                        writer.add_scalar("train/similarity_ema", controller.ema, step)
                    csv_writer.writerow(row)
                    csv_file.flush()
                    bar.set_postfix(loss=f"{loss_v:.3f}", lm=f"{lm_v:.3f}", cm=f"{cm_v:.3f}", tok_s=f"{tok_s:.0f}")
                    if probe is not None and probe_first is None:
                        probe_first = (step, memory_read_weights(model, probe))
            out_of_time = t["max_time_s"] is not None and elapsed_before + time.perf_counter() - t_start > float(t["max_time_s"])
            if d.enabled:  # every rank must stop at the same step
                out_of_time = bool(d.all_reduce_sum(torch.tensor([float(out_of_time)]))[0] > 0)
            if step % int(t["save_every"]) == 0 or step == steps or out_of_time:
                save_all(run_dir, model, optimizer, scaler, controller, batches, step, recipe, d,
                         {"elapsed_s": elapsed_before + time.perf_counter() - t_start,
                          "zero_steps": zero_log[0], "zero_fractions": zero_log[1],
                          "probe_first_step": probe_first[0] if probe_first else None,
                          "probe_first": probe_first[1].tolist() if probe_first else None})
            if out_of_time:
                log.warning("train.max_time_s = %s reached at step %d; stopping", t["max_time_s"], step)
                break
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if csv_file is not None:
            csv_file.close()

    wall = elapsed_before + time.perf_counter() - t_start
    if d.main:
        packed = save_checkpoint(model, run_dir / "model_packed.safetensors", packed=True)
        if out_cfg.get("packed_checkpoint"):
            dest = Path(out_cfg["packed_checkpoint"])
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(packed, dest)
        with open(run_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        if rows:
            plot_losses(rows, run_dir / "losses.png")
        if zero_log[0]:
            plot_zero_fraction(*zero_log, run_dir / "zero_fraction.png")
        if probe is not None and probe_first is not None:
            plot_memory_activations(probe_first[1], memory_read_weights(model, probe),
                                    (probe_first[0], step), run_dir / "memory_activations.png")
        last = rows[-1] if rows else {}
        vals = [r for r in rows if r.get("val_loss")]
        summary = {"steps": step, "wall_time_s": wall, "first_loss": float(rows[0]["loss"]) if rows else first_loss,
                   "final": {k: float(last[k]) for k in ("loss", "lm", "cm", "mem") if k in last},
                   "final_val": {k: float(vals[-1][k]) for k in ("val_loss", "val_lm", "val_cm")} if vals else None,
                   "zero_fraction": zero_weight_fraction(model),
                   "packed_bytes": packed.stat().st_size, "parameters": model.num_parameters(),
                   "controller_events": controller.events, "world": d.world, "device": str(device),
                   "optimizer": type(optimizer).__name__, "precision": precision}
        if rows:
            tok = [float(r["tokens_per_s"]) for r in rows[1:]] or [float(rows[0]["tokens_per_s"])]
            summary["tokens_per_s_mean"] = float(np.mean(tok))
            summary["steps_per_s"] = (step - start_step) / max(wall - elapsed_before, 1e-9)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("done: %s", json.dumps({k: v for k, v in summary.items() if k != "controller_events"}))
    if d.enabled:
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
        (run_dir / f"checksum_rank{d.rank}.json").parent.mkdir(parents=True, exist_ok=True)
        (run_dir / f"checksum_rank{d.rank}.json").write_text(json.dumps({"rank": d.rank, "checksum": checksum,
                                                                         "loss": summary.get("final")}))
        d.barrier()
    d.close()
    return summary


def save_all(run_dir: Path, model, optimizer, scaler, controller, batches, step, recipe, d: Dist, extra: dict) -> None:
    rng = d.gather(rng_state())
    if d.main:
        save_training_state(run_dir / "checkpoint", model, optimizer, scaler, controller, batches, step,
                            recipe, rng, extra)
    d.barrier()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bitmar-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="training recipe YAML (config/train_default.yaml)")
    p.add_argument("--run-dir", type=Path, help="output folder (default: output.run_dir of the recipe)")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides train.steps)")
    p.add_argument("--resume", type=Path, help="a checkpoint folder (RUN_DIR/checkpoint) to continue from")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one recipe value (YAML syntax), repeatable")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    try:
        if args.resume is not None and args.config is None:
            # Continue with the recipe the checkpoint was trained with (plus any --set).
            saved = args.resume / "recipe.yaml"
            if not saved.is_file():
                raise FileNotFoundError(f"resume: {saved} is missing; pass --config")
            recipe = load_recipe(saved, overrides)
        else:
            recipe = load_recipe(args.config, overrides)
    except (FileNotFoundError, ValueError) as e:
        print(f"bitmar-train: {e}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or Path(recipe["output"]["run_dir"])
    recipe["output"]["run_dir"] = str(run_dir)
    train(recipe, run_dir, args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
