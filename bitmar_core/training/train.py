"""Training entry point (`bitmar-train`, `python -m bitmar_core.training.train`): the paper's objective
L = L_lm + 1.5·L_cm + 0.1·L_mem on scene streams, memory recall and text (bitmar_core/data/streams.py),
AdamW (8-bit on CUDA when bitsandbytes is there), cosine warm restarts, gradient accumulation, AMP,
the adaptive controller, exact resume, DDP under torchrun.

    bitmar-train --config config/train_default.yaml [--run-dir runs/x] [--steps N] [--resume DIR]
                 [--set train.lr=1e-3 --set data.scenes.n=64 --set model.window=60 ...]

The loop reads top to bottom: `set_up` (device and ranks, `build_model`, `build_data`, the
optimizer, `restore` on resume), `train_step` (one optimizer step), `RunLog` (metrics, TensorBoard,
progress) and `finish` (packed model, figures, summary). The pieces they use live beside this file:
the recipe (`recipe.py`), the data (`data.py`), the optimizer and resumable state (`state.py`),
torchrun (`distributed.py`) and the figures (`plots.py`).
A run directory holds metrics.csv, TensorBoard events (tb/), controller events, the resumable
checkpoint (checkpoint/: safetensors + JSON, no pickle), the packed model and the figures.
"""
from __future__ import annotations

import argparse
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml

from ..data.streams import IGNORE
from ..inference.checkpoint import load_checkpoint, read_header, save_checkpoint
from ..inference.tokenizer import tokenizer_for
from ..model.bitmar import BitMar
from ..model.config import BitMarConfig
from ..model.quant import zero_weight_fraction
from .controller import AdaptiveController, ControllerConfig
from .data import (episode_batches, image_dataset, scene_cache, scene_ground_truth, text_corpus,
                   training_vocabulary)
from .distributed import Dist
from .plots import memory_read_weights, plot_losses, plot_memory_activations, plot_zero_fraction
from .recipe import Recipe, load_recipe
from .schedule import CosineWarmRestarts
from .state import (build_optimizer, flatten_state, load_training_state, rng_state, save_training_state,
                    set_rng_state, unflatten_state)

log = logging.getLogger("bitmar.train")

__all__ = ["train", "main", "load_recipe", "build_optimizer", "flatten_state", "unflatten_state", "scene_cache"]

# --------------------------------------------------------------------------- helpers

CSV_FIELDS = ["step", "loss", "lm", "cm", "mem", "lm_scene", "lm_recall", "similarity", "similarity_ema", "lr",
              "cm_weight", "grad_norm", "zero_fraction", "tokens_per_s", "elapsed_s", "val_loss", "val_lm",
              "val_cm", "val_lm_scene", "val_lm_recall", "controller"]


def resolve_device(t: dict) -> torch.device:
    if t.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(t.device)


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
            for k in ("loss", "lm", "cm", "lm_scene", "lm_recall"):
                sums[k] = sums.get(k, 0.0) + float(out[k])
    model.train(was)
    return {k: v / len(batches) for k, v in sums.items()}


def init_from_checkpoint(path: Path, fields: dict) -> BitMar:
    """A model with `path`'s weights and its config updated by `fields` (the recipe's model
    section); the fields may change behaviour, not shapes. A memory that starts empty
    (`memory_init: zero`) drops the learned M0 it may have had."""
    if not path.is_file():
        raise FileNotFoundError(f"train.init_from: {path} is not a file; expected a BitMar checkpoint "
                                "(run_dir/checkpoint/model.safetensors or a packed .safetensors)")
    source = load_checkpoint(path)
    fixed = {"vocab_size", "eos_id"}  # set from the corpus when the first stage was built
    config = BitMarConfig.from_dict({**source.config.to_dict(),
                                     **{k: v for k, v in fields.items() if k not in fixed}})
    model = BitMar(config)
    if read_header(path).get("__metadata__", {}).get("packed") == "true":
        raise ValueError(f"train.init_from: {path} is a packed (ternary) checkpoint; training continues from "
                         "the FP32 latent weights of run_dir/checkpoint/model.safetensors")
    tensors = model.state_dict()
    unknown = sorted(set(source.state_dict()) - set(tensors))
    if unknown:
        raise ValueError(f"train.init_from: {path} has tensors this config does not: {unknown[:5]}")
    kept = source.state_dict()
    if source.config.memory_read != config.memory_read:
        # the addressing changes meaning (raw logits → cosines): its trained values do not carry over
        for k in ("memory.write_proj.weight", "memory.read_log_scale"):
            kept.pop(k)
    fresh = sorted(set(tensors) - set(kept))
    tensors.update(kept)
    if config.memory_init == "zero":
        tensors["memory.M0"] = torch.zeros_like(model.memory.M0)
    model.load_state_dict(tensors, strict=True)
    if fresh:
        log.info("init_from: new in this stage (initialised): %s", ", ".join(fresh))
    return model.train()


# --------------------------------------------------------------------------- the loop

@dataclass
class Run:
    """What a training run holds from set-up to its last step: where it runs, the model, its data
    and its optimisation, and where a resumed run starts."""

    recipe: Recipe
    run_dir: Path
    d: Dist
    device: torch.device
    precision: str
    seed: int
    model: BitMar
    ddp_model: torch.nn.Module  # the model, or its DDP wrapper under torchrun
    batches: object             # EpisodeBatches: an iterator with state_dict/load_state_dict
    val_batches: list[dict]
    probe: dict
    optimizer: torch.optim.Optimizer
    schedule: CosineWarmRestarts
    scaler: torch.amp.GradScaler | None
    controller: AdaptiveController
    start_step: int = 0
    elapsed_before: float = 0.0  # seconds trained before a resume
    zero_steps: list[int] = field(default_factory=list)
    zero_fractions: list[float] = field(default_factory=list)
    probe_first: tuple[int, np.ndarray] | None = None  # memory reads at the first logged step

    def resumable_extra(self, elapsed_s: float) -> dict:
        """What the resumable checkpoint keeps beyond model, optimizer and data."""
        return {"elapsed_s": elapsed_s, "zero_steps": self.zero_steps, "zero_fractions": self.zero_fractions,
                "probe_first_step": self.probe_first[0] if self.probe_first else None,
                "probe_first": self.probe_first[1].tolist() if self.probe_first else None}


def train(recipe: Recipe, run_dir: Path, resume: Path | None = None) -> dict:
    """Set up, then step to train.steps (or train.max_time_s), logging and saving on the way; then
    the packed model, the figures and summary.json."""
    run = set_up(recipe, run_dir, resume)
    t = recipe.train
    steps = int(t.steps)
    log_ = RunLog(run) if run.d.main else None
    t_start = time.perf_counter()

    def elapsed() -> float:
        return run.elapsed_before + time.perf_counter() - t_start

    first_loss = None
    step = run.start_step
    run.model.train()
    try:
        for step in range(run.start_step + 1, steps + 1):
            stats = train_step(run, step)
            if first_loss is None:
                first_loss = stats["loss"]
            if log_ is not None:
                log_.step(step, stats, elapsed())
            out_of_time = t.max_time_s is not None and elapsed() > float(t.max_time_s)
            if run.d.enabled:  # every rank must stop at the same step
                out_of_time = bool(run.d.all_reduce_sum(torch.tensor([float(out_of_time)]))[0] > 0)
            if step % int(t.save_every) == 0 or step == steps or out_of_time:
                save_all(run_dir, run.model, run.optimizer, run.scaler, run.controller, run.batches, step,
                         recipe.to_dict(), run.d, run.resumable_extra(elapsed()))
            if out_of_time:
                log.warning("train.max_time_s = %s reached at step %d; stopping", t.max_time_s, step)
                break
    finally:
        if log_ is not None:
            log_.close()
    return finish(run, step, elapsed(), first_loss)


# --------------------------------------------------------------------------- set-up

def set_up(recipe: Recipe, run_dir: Path, resume: Path | None) -> Run:
    """Device and ranks, the model (fresh, from a first stage, or resumed), the data, the optimizer,
    schedule and controller, and DDP. Every rank builds the same model: seeded before construction."""
    t, data = recipe.train, recipe.data
    device = resolve_device(t)
    if t.num_threads:
        torch.set_num_threads(int(t.num_threads))
    d = Dist(device)
    if device.type == "cuda" and d.enabled:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    precision = t.precision
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        log.warning("train.precision fp16 needs CUDA; training in fp32 on %s", device)
        precision = "fp32"
    grad_ckpt = t.gradient_checkpointing
    grad_ckpt = device.type == "cuda" if grad_ckpt == "auto" else bool(grad_ckpt)

    seed = int(t.seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    image_train = image_dataset(data, "train", d)
    if image_train is None:
        raise ValueError("train config: data.scenes or data.captions must name image–caption training data")
    text_train = text_corpus(data, "train")
    model, state, state_tensors = build_model(recipe, resume, grad_ckpt, image_train, text_train, d)
    model.to(device)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    batches, val_batches, probe = build_data(recipe, model, image_train, text_train, seed, d, device)

    optimizer = build_optimizer(model, t, device)
    schedule = CosineWarmRestarts(float(t.lr), int(t.t0), int(t.t_mult), float(t.min_lr_ratio),
                                  int(t.warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16") if device.type == "cuda" else None
    controller = AdaptiveController(ControllerConfig(**recipe.controller), model)
    run = Run(recipe, run_dir, d, device, precision, seed, model, model, batches, val_batches, probe, optimizer,
              schedule, scaler, controller)
    if state is not None:
        restore(run, state, state_tensors)
    else:
        # Per-rank stochasticity (dropout, write masks) after the identical initialisation.
        torch.manual_seed(seed + 1000 * d.rank)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Text-only micro-batches leave the vision path unused on some ranks; frozen encoders too.
        run.ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                            find_unused_parameters=True)
    return run


def build_model(recipe: Recipe, resume: Path | None, grad_ckpt: bool, image_train, text_train, d: Dist):
    """→ (model, resumed state or None, its tensors or None): resumed from a checkpoint folder,
    initialised from a first stage (`train.init_from`), or new (with the corpus vocabulary when
    `model.vocab_subset`)."""
    t, data = recipe.train, recipe.data
    state = state_tensors = None
    if resume is not None:
        model, state, state_tensors = load_training_state(resume)
        if state["world"] != d.world:
            raise ValueError(f"resume: {resume} was saved by {state['world']} ranks, this run has {d.world}")
        model.train()
    elif t.init_from:
        model = init_from_checkpoint(Path(t.init_from), {**recipe.model, "gradient_checkpointing": grad_ckpt})
        log.info("weights from %s", t.init_from)
    else:
        fields = {**recipe.model, "gradient_checkpointing": grad_ckpt}
        token_ids = None
        if fields.get("vocab_subset"):
            token_ids = training_vocabulary(data, image_train, text_train)
            fields.update(vocab_size=len(token_ids), eos_id=0)
        model = BitMar(BitMarConfig.from_dict(fields))
        if token_ids is not None:
            model.token_ids.copy_(torch.tensor(token_ids, dtype=torch.long))
            log.info("vocabulary: %d GPT-2 tokens (the head's rows)", len(token_ids))
    model.config.gradient_checkpointing = grad_ckpt
    return model, state, state_tensors


def build_data(recipe: Recipe, model: BitMar, image_train, text_train, seed: int, d: Dist,
               device: torch.device) -> tuple[object, list[dict], dict]:
    """→ (this rank's training batches, fixed validation batches, the probe captions whose memory
    reads the figures show)."""
    t, data = recipe.train, recipe.data
    tokenizer = tokenizer_for(model)
    vision_shape = image_train.vision_shape
    if vision_shape[0] != model.config.vision_feature_dim:
        raise ValueError(f"image features have D={vision_shape[0]}, model.vision_feature_dim is "
                         f"{model.config.vision_feature_dim}; set model.vision_feature_dim/backbone to match")
    if int(t.batch_size) % d.world:
        raise ValueError(f"train.batch_size = {t.batch_size} must be a multiple of the {d.world} ranks")
    scenes_train = scene_ground_truth(data, "train") if data.recall_items else None
    batches = episode_batches(data, t, image_train, scenes_train, tokenizer, model.config, seed, d.rank, d.world,
                              text_train)
    val_batches = []
    image_val = image_dataset(data, "val", d)
    if image_val is not None:
        scenes_val = scene_ground_truth(data, "val") if data.recall_items else None
        vb = episode_batches(data, t, image_val, scenes_val, tokenizer, model.config, seed + 1,
                             text=text_corpus(data, "validation"))
        val_batches = [next(vb) for _ in range(int(data.val_batches))]
    probe_source = image_val if image_val is not None else image_train
    n = min(int(data.probe_size), len(probe_source))
    rows = [tokenizer.encode(probe_source[i]["caption"])[: int(data.caption_max_tokens)] for i in range(n)]
    T = max(len(r) for r in rows)
    probe = {"caption_ids": torch.tensor([r + [tokenizer.eos_id] * (T - len(r)) for r in rows]),
             "caption_mask": torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows]).bool(),
             "vision": torch.stack([torch.as_tensor(np.asarray(probe_source[i]["vision"]), dtype=torch.float32)
                                    for i in range(n)])}
    return batches, val_batches, to_device(probe, device)


def restore(run: Run, state: dict, state_tensors: dict) -> None:
    """A resumed run continues exactly: optimizer, scaler, controller, data position, every RNG."""
    run.optimizer.load_state_dict(unflatten_state(state["optimizer"], state_tensors))
    if run.scaler is not None and state["scaler"] is not None:
        run.scaler.load_state_dict(state["scaler"])
    run.controller.load_state_dict(state["controller"])
    run.batches.load_state_dict(state["data"])
    rng_t = {k.split("/", 2)[2]: v for k, v in state_tensors.items() if k.startswith(f"rng/{run.d.rank}/")}
    set_rng_state(rng_t, state["rng"][run.d.rank])
    run.start_step, run.elapsed_before = state["step"], state.get("elapsed_s", 0.0)
    run.zero_steps, run.zero_fractions = state.get("zero_steps", []), state.get("zero_fractions", [])
    if state.get("probe_first") is not None:
        run.probe_first = (state["probe_first_step"], np.asarray(state["probe_first"], dtype=np.float32))


# --------------------------------------------------------------------------- one step

def train_step(run: Run, step: int) -> dict:
    """One optimizer step over train.grad_accum micro-batches (eq. 4 with the controller's L_cm
    weight), gradients clipped, losses averaged over micro-batches and ranks."""
    t, model, optimizer, scaler = run.recipe.train, run.model, run.optimizer, run.scaler
    accum = int(t.grad_accum)
    lr = run.schedule.apply(optimizer, step - 1)
    cm_w = run.controller.cm_weight(model.config.cm_weight)
    sums = torch.zeros(9, dtype=torch.float64)  # loss lm cm mem sim·n_vis n_vis tokens lm_scene lm_recall
    for micro in range(accum):
        batch = to_device(next(run.batches), run.device)
        sync = nullcontext() if (micro == accum - 1 or not run.d.enabled) else run.ddp_model.no_sync()
        with sync:
            with autocast_for(run.precision, run.device):
                out = run.ddp_model(batch, cm_weight=cm_w)
            loss = out["loss"] / accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        n_vis = float(batch["caption_ids"].shape[0])
        n_tok = float((batch["stream_targets"] != IGNORE).sum())
        if "answer_targets" in batch:
            n_tok += float((batch["answer_targets"] != IGNORE).sum())
        sums += torch.tensor([float(out[k].detach()) for k in ("loss", "lm", "cm", "mem")] +
                             [float(out["similarity"]) * n_vis, n_vis, n_tok,
                              float(out["lm_scene"]), float(out["lm_recall"])], dtype=torch.float64)
    for p in run.controller.frozen_parameters():
        p.grad = None
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, float(t.grad_clip))) if t.grad_clip else float("nan")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    sums = run.d.all_reduce_sum(sums)
    n = accum * run.d.world
    loss_v, lm_v, cm_v, mem_v = (float(x) / n for x in sums[:4])
    similarity = float(sums[4] / sums[5]) if sums[5] > 0 else None
    event = run.controller.update(step, similarity)
    if not math.isfinite(loss_v):
        raise FloatingPointError(f"step {step}: loss is {loss_v}; lower train.lr or check the data")
    return {"loss": loss_v, "lm": lm_v, "cm": cm_v, "mem": mem_v, "lm_scene": float(sums[7]) / n,
            "lm_recall": float(sums[8]) / n, "similarity": similarity, "tokens": float(sums[6]), "lr": lr,
            "cm_weight": cm_w, "grad_norm": grad_norm, "event": event}


# --------------------------------------------------------------------------- logging (rank 0)

class RunLog:
    """metrics.csv, TensorBoard (tb/), controller_events.jsonl and the progress bar of rank 0. A
    resumed run keeps the CSV rows up to its step and appends from there."""

    def __init__(self, run: Run) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.run = run
        t, start_step = run.recipe.train, run.start_step
        self.writer = SummaryWriter(str(run.run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        csv_path = run.run_dir / "metrics.csv"
        keep = []
        if start_step and csv_path.is_file():
            with open(csv_path, newline="") as f:
                keep = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        self.csv_file = open(csv_path, "w", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=CSV_FIELDS)
        self.csv.writeheader()
        self.csv.writerows(keep)
        self.bar = tqdm(total=int(t.steps), initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, mininterval=2.0)
        self.tokens_window, self.time_window = 0.0, time.perf_counter()
        log.info("%s: %d parameters, device %s, %d rank(s), precision %s, optimizer %s, "
                 "global batch %d × %d accumulation", run.run_dir, run.model.num_parameters(), run.device,
                 run.d.world, run.precision, type(run.optimizer).__name__, int(t.batch_size), t.grad_accum)

    def step(self, step: int, s: dict, elapsed_s: float) -> None:
        """Count the step; every train.log_every steps (and at the first, the last and a controller
        event) write a metrics row, validation losses every train.eval_every."""
        run, t = self.run, self.run.recipe.train
        steps = int(t.steps)
        self.bar.update(1)
        self.tokens_window += s["tokens"]
        event = s["event"]
        if event is not None:
            with open(run.run_dir / "controller_events.jsonl", "a") as f:
                f.write(json.dumps(event) + "\n")
            self.writer.add_text("controller", json.dumps(event), step)
        if not (step % int(t.log_every) == 0 or step == steps or step == run.start_step + 1 or event):
            return
        now = time.perf_counter()
        tok_s = self.tokens_window / max(now - self.time_window, 1e-9)
        self.tokens_window, self.time_window = 0.0, now
        zf = zero_weight_fraction(run.model)
        run.zero_steps.append(step)
        run.zero_fractions.append(zf)
        controller = run.controller
        row = {"step": step, **{k: s[k] for k in ("loss", "lm", "cm", "mem", "lm_scene", "lm_recall")},
               "similarity": "" if s["similarity"] is None else s["similarity"],
               "similarity_ema": "" if controller.ema is None else controller.ema,
               "lr": s["lr"], "cm_weight": s["cm_weight"], "grad_norm": s["grad_norm"], "zero_fraction": zf,
               "tokens_per_s": tok_s, "elapsed_s": elapsed_s, "controller": (controller.active or {}).get("action", "")}
        if run.val_batches and (step % int(t.eval_every) == 0 or step == steps):
            v = evaluate(run.model, run.val_batches, run.device, run.precision, run.seed)
            row.update(val_loss=v["loss"], val_lm=v["lm"], val_cm=v["cm"], val_lm_scene=v["lm_scene"],
                       val_lm_recall=v["lm_recall"])
            self.writer.add_scalars("val", v, step)
        for k in ("loss", "lm", "cm", "mem", "lr", "cm_weight", "grad_norm", "zero_fraction", "tokens_per_s"):
            self.writer.add_scalar(f"train/{k}", row[k], step)
        if s["similarity"] is not None:
            self.writer.add_scalar("train/similarity", s["similarity"], step)
            self.writer.add_scalar("train/similarity_ema", controller.ema, step)
        self.csv.writerow(row)
        self.csv_file.flush()
        self.bar.set_postfix(loss=f"{s['loss']:.3f}", scene=f"{s['lm_scene']:.3f}", recall=f"{s['lm_recall']:.3f}",
                             cm=f"{s['cm']:.3f}", tok_s=f"{tok_s:.0f}")
        if run.probe is not None and run.probe_first is None:
            run.probe_first = (step, memory_read_weights(run.model, run.probe))

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
        self.csv_file.close()


# --------------------------------------------------------------------------- the end of a run

def finish(run: Run, step: int, wall: float, first_loss: float | None) -> dict:
    """Rank 0: the packed model (and its copy at output.packed_checkpoint), the figures and
    summary.json; under torchrun every rank writes its parameter checksum (equal across ranks)."""
    model, d, summary = run.model, run.d, {}
    if d.main:
        run_dir, out_cfg = run.run_dir, run.recipe.output
        packed = save_checkpoint(model, run_dir / "model_packed.safetensors", packed=True)
        if out_cfg.packed_checkpoint:
            dest = Path(out_cfg.packed_checkpoint)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(packed, dest)
        with open(run_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        if rows:
            plot_losses(rows, run_dir / "losses.png")
        if run.zero_steps:
            plot_zero_fraction(run.zero_steps, run.zero_fractions, run_dir / "zero_fraction.png")
        if run.probe is not None and run.probe_first is not None:
            plot_memory_activations(run.probe_first[1], memory_read_weights(model, run.probe),
                                    (run.probe_first[0], step), run_dir / "memory_activations.png")
        last = rows[-1] if rows else {}
        vals = [r for r in rows if r.get("val_loss")]
        summary = {"steps": step, "wall_time_s": wall, "first_loss": float(rows[0]["loss"]) if rows else first_loss,
                   "final": {k: float(last[k]) for k in ("loss", "lm", "cm", "mem") if k in last},
                   "final_val": {k: float(vals[-1][k]) for k in ("val_loss", "val_lm", "val_cm")} if vals else None,
                   "zero_fraction": zero_weight_fraction(model),
                   "packed_bytes": packed.stat().st_size, "parameters": model.num_parameters(),
                   "controller_events": run.controller.events, "world": d.world, "device": str(run.device),
                   "optimizer": type(run.optimizer).__name__, "precision": run.precision}
        if rows:
            tok = [float(r["tokens_per_s"]) for r in rows[1:]] or [float(rows[0]["tokens_per_s"])]
            summary["tokens_per_s_mean"] = float(np.mean(tok))
            summary["steps_per_s"] = (step - run.start_step) / max(wall - run.elapsed_before, 1e-9)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("done: %s", json.dumps({k: v for k, v in summary.items() if k != "controller_events"}))
    if d.enabled:
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
        (run.run_dir / f"checksum_rank{d.rank}.json").parent.mkdir(parents=True, exist_ok=True)
        (run.run_dir / f"checksum_rank{d.rank}.json").write_text(
            json.dumps({"rank": d.rank, "checksum": checksum, "loss": summary.get("final")}))
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
    run_dir = args.run_dir or Path(recipe.output.run_dir)
    recipe.output.run_dir = str(run_dir)
    train(recipe, run_dir, args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
