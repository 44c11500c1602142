"""The training recipe: what `bitmar-train` reads from YAML, as dataclasses beside `BitMarConfig`.

    model:      BitMarConfig fields (unspecified ones keep the paper's values)
    data:       DataConfig   — what is trained on
    train:      TrainConfig  — optimisation, precision, devices, logging cadence
    controller: ControllerConfig fields (the paper's adaptive controller)
    output:     OutputConfig — where the run and the packed model go

`load_recipe(path, overrides)` = defaults ← YAML ← `--set` overrides. An override is a dotted path to
any key, nested ones included (`data.scenes.n=64`, `train.lr=1e-3`, `model.window=60`), its value
parsed as YAML. Every unknown key is an error that names it and lists what was expected.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..model.config import BitMarConfig
from .controller import ControllerConfig

SCENE_KEYS = {"n": None, "split": "train", "start": 0, "image_size": 224}


@dataclass
class DataConfig:
    backbone: str = "efficientnet_lite0"
    cache_dir: str = "runs/cache"  # precomputed scene features (rebuilt deterministically when missing)
    scenes: dict | None = None  # {n, split, start, image_size}: generated image–caption scenes ...
    captions: str | None = None  # ... or a captions.jsonl (CC3M / Localized Narratives style) ...
    features: str | None = None  # ... and its features.npy (default: beside the JSONL)
    caption_max_tokens: int = 64
    scenes_per_stream: int = 3  # scenes described one after another in each training stream
    recall_items: int = 0  # memory-recall items per batch (needs generated scenes: their ground truth)
    recall_episodes: list[int] = field(default_factory=lambda: [8, 64])  # episodes written per cue (inclusive)
    stream_offset_max: int = 2048  # a stream offset is drawn from 1..this (model.position_offset_prob)
    vocab_extra_scenes: int = 20000  # captions of further train-split scenes (no pixels) in the vocabulary
    text: str | list | None = None  # 'wiki' (offline Wikipedia summaries), a .txt path/folder or a list of them
    text_items: int = 0  # text-only documents per batch
    text_max_tokens: int = 256
    val_scenes: int = 0  # validation-split scenes for val loss and the memory probe
    val_captions: str | None = None
    val_features: str | None = None
    val_batches: int = 4
    probe_size: int = 16

    def __post_init__(self) -> None:
        if self.scenes is not None:
            if not isinstance(self.scenes, dict):
                raise ValueError(f"data.scenes = {self.scenes!r}: expected a mapping with keys {sorted(SCENE_KEYS)}")
            unknown = sorted(set(self.scenes) - set(SCENE_KEYS))
            if unknown:
                raise ValueError(f"data.scenes: unknown key(s) {unknown}; expected some of {sorted(SCENE_KEYS)}")
            if not isinstance(self.scenes.get("n"), int) or self.scenes["n"] < 1:
                raise ValueError(f"data.scenes.n = {self.scenes.get('n')!r}: expected a number of scenes >= 1")
        lo_hi = self.recall_episodes
        if not (isinstance(lo_hi, (list, tuple)) and len(lo_hi) == 2 and 1 <= lo_hi[0] <= lo_hi[1]):
            raise ValueError(f"data.recall_episodes = {lo_hi!r}: expected [min, max] with 1 <= min <= max")
        for name in ("caption_max_tokens", "scenes_per_stream", "text_max_tokens", "val_batches", "probe_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} = {getattr(self, name)}: expected an integer >= 1")
        for name in ("recall_items", "text_items", "val_scenes", "vocab_extra_scenes", "stream_offset_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} = {getattr(self, name)}: expected an integer >= 0")

    def scene_spec(self, which: str) -> dict | None:
        """The generated scenes of 'train' (data.scenes) or 'val' (val_scenes of the validation split)."""
        if which == "train":
            return {**SCENE_KEYS, **self.scenes} if self.scenes else None
        return {**SCENE_KEYS, "n": self.val_scenes, "split": "validation"} if self.val_scenes else None


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # scene streams per micro-step, summed over all ranks
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 0
    t0: int = 1000
    t_mult: int = 2
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    optimizer: str = "auto"  # auto: AdamW8bit on CUDA with bitsandbytes, else torch AdamW
    precision: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU; or fp32 | fp16 | bf16
    gradient_checkpointing: Any = "auto"  # auto: on for CUDA
    device: str = "auto"
    num_threads: int = 0  # torch CPU threads; 0 keeps torch's default
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 500
    max_time_s: float | None = None  # stop (and save) once this much wall time has passed
    # A later stage: start from this checkpoint's weights (an FP32 model.safetensors), with its
    # config updated by the recipe's model section; optimizer, data and schedule
    # start afresh. Unlike --resume, which continues one run exactly.
    init_from: str | None = None

    def __post_init__(self) -> None:
        # YAML 1.1 reads 1e-3 (no dot) as a string: accept it as the number it is.
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "max_time_s"):
            v = getattr(self, name)
            if isinstance(v, str):
                try:
                    setattr(self, name, float(v))
                except ValueError:
                    raise ValueError(f"train.{name} = {v!r}: expected a number") from None
        for name in ("steps", "batch_size", "grad_accum", "t0", "t_mult", "log_every", "eval_every", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"train.{name} = {getattr(self, name)!r}: expected an integer >= 1")
        if self.optimizer not in ("auto", "adamw", "adamw8bit"):
            raise ValueError(f"train.optimizer = {self.optimizer!r}: expected auto, adamw or adamw8bit")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError(f"train.precision = {self.precision!r}: expected auto, fp32, fp16 or bf16")
        if not self.lr > 0:
            raise ValueError(f"train.lr = {self.lr}: expected > 0")


@dataclass
class OutputConfig:
    run_dir: str = "runs/bitmar"
    packed_checkpoint: str | None = None  # also copy the packed model here at the end


@dataclass
class Recipe:
    model: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    controller: dict = field(default_factory=dict)
    output: OutputConfig = field(default_factory=OutputConfig)

    SECTIONS = {"data": DataConfig, "train": TrainConfig, "output": OutputConfig}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        unknown = sorted(set(d) - {"model", "data", "train", "controller", "output"})
        if unknown:
            raise ValueError(f"train config: unknown section(s) {unknown}; expected some of "
                             "['controller', 'data', 'model', 'output', 'train']")
        parts = {}
        for name, kind in cls.SECTIONS.items():
            values = d.get(name) or {}
            if not isinstance(values, dict):
                raise ValueError(f"train config: section {name} must be a mapping, got {type(values).__name__}")
            known = {f.name for f in dataclasses.fields(kind)}
            bad = sorted(set(values) - known)
            if bad:
                raise ValueError(f"train config: unknown key {name}.{bad[0]}; expected one of {sorted(known)}")
            parts[name] = kind(**values)
        model, controller = dict(d.get("model") or {}), dict(d.get("controller") or {})
        BitMarConfig.from_dict(model)  # validate early, with the field's name
        try:
            ControllerConfig(**controller)
        except TypeError as e:
            raise ValueError(f"train config: controller: {e}") from None
        return cls(model=model, controller=controller, **parts)

    def to_dict(self) -> dict:
        return {"model": dict(self.model), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train), "controller": dict(self.controller),
                "output": dataclasses.asdict(self.output)}


def set_dotted(d: dict, key: str, value: Any) -> None:
    """d[a][b][c] = value for key 'a.b.c', creating a mapping where a None stands."""
    parts = key.split(".")
    node = d
    for i, p in enumerate(parts[:-1]):
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ValueError(f"--set {key}: {'.'.join(parts[:i + 1])} is {node[p]!r}, not a mapping")
        node = node[p]
    node[parts[-1]] = value


def load_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> Recipe:
    """Defaults ← YAML file ← `dotted.key=value` overrides (values parsed as YAML)."""
    d = Recipe().to_dict()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"train config {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"train config {path}: expected a mapping of sections, got {type(loaded).__name__}")
        for section, values in loaded.items():
            if isinstance(values, dict) and isinstance(d.get(section), dict):
                d[section].update(copy.deepcopy(values))
            else:
                d[section] = values  # an unknown section or a non-mapping: from_dict names it
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set {item!r}: expected section.key=value, e.g. train.lr=1e-3 or data.scenes.n=64")
        if key.split(".")[0] not in d:
            raise ValueError(f"--set {item!r}: unknown section {key.split('.')[0]!r}; expected one of {sorted(d)}")
        set_dotted(d, key, yaml.safe_load(value))
    return Recipe.from_dict(d)
