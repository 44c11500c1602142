"""Training entry point (`bitmar-train`, `python -m bitmar_core.training.train`): the paper's objective
L = L_lm + 1.5·L_cm + 0.1·L_mem on scene streams, memory recall and text (bitmar_core/data/streams.py),
AdamW (8-bit on CUDA when bitsandbytes is there), cosine warm restarts, gradient accumulation, AMP,
the adaptive controller, exact resume, DDP under torchrun.

    bitmar-train --config config/train_default.yaml [--run-dir runs/x] [--steps N] [--resume DIR]
                 [--set train.lr=1e-3 --set data.scenes.n=64 --set model.window=60 ...]

The pieces live in `bitmar_core.training`: the recipe (`recipe.py`), the data (`data.py`), the
optimizer and resumable state (`state.py`), torchrun (`distributed.py`) and the figures (`plots.py`).
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

# --------------------------------------------------------------------------- the loop

CSV_FIELDS = ["step", "loss", "lm", "cm", "mem", "lm_scene", "lm_recall", "similarity", "similarity_ema", "lr", "cm_weight", "grad_norm",
              "zero_fraction", "tokens_per_s", "elapsed_s", "val_loss", "val_lm", "val_cm", "val_lm_scene", "val_lm_recall",
              "controller"]


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


def train(recipe: Recipe, run_dir: Path, resume: Path | None = None) -> dict:
    t, data, out_cfg = recipe.train, recipe.data, recipe.output
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

    # --- model (identical init on every rank: seeded before construction) ---
    seed = int(t.seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    state = state_tensors = None
    image_train = image_dataset(data, "train", d)
    if image_train is None:
        raise ValueError("train config: data.scenes or data.captions must name image–caption training data")
    text_train = text_corpus(data, "train")
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
    model.to(device)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    # --- data ---
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
    val_batches, probe = [], None
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
    probe = to_device(probe, device)

    # --- optimisation ---
    optimizer = build_optimizer(model, t, device)
    schedule = CosineWarmRestarts(float(t.lr), int(t.t0), int(t.t_mult), float(t.min_lr_ratio),
                                  int(t.warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16") if device.type == "cuda" else None
    controller = AdaptiveController(ControllerConfig(**recipe.controller), model)
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
        bar = tqdm(total=int(t.steps), initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr, mininterval=2.0)
        log.info("%s: %d parameters, device %s, %d rank(s), precision %s, optimizer %s, "
                 "global batch %d × %d accumulation", run_dir, model.num_parameters(), device, d.world,
                 precision, type(optimizer).__name__, int(t.batch_size), t.grad_accum)

    steps, accum = int(t.steps), int(t.grad_accum)
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
            sums = torch.zeros(9, dtype=torch.float64)  # loss lm cm mem sim·n_vis n_vis tokens lm_scene lm_recall
            for micro in range(accum):
                batch = to_device(next(batches), device)
                sync = nullcontext() if (micro == accum - 1 or not d.enabled) else ddp_model.no_sync()
                with sync:
                    with autocast_for(precision, device):
                        out = ddp_model(batch, cm_weight=cm_w)
                    loss = out["loss"] / accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                n_vis = float(batch["caption_ids"].shape[0])
                n_tok = float((batch["stream_targets"] != IGNORE).sum())
                if "answer_targets" in batch:
                    n_tok += float((batch["answer_targets"] != IGNORE).sum())
                sums += torch.tensor([float(out[k].detach()) for k in ("loss", "lm", "cm", "mem")] +
                                     [float(out["similarity"]) * n_vis, n_vis, n_tok,
                                      float(out["lm_scene"]), float(out["lm_recall"])], dtype=torch.float64)
            for p in controller.frozen_parameters():
                p.grad = None
            if scaler is not None:
                scaler.unscale_(optimizer)
            params = [p for p in model.parameters() if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, float(t.grad_clip))) \
                if t.grad_clip else float("nan")
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            sums = d.all_reduce_sum(sums)
            n = accum * d.world
            loss_v, lm_v, cm_v, mem_v = (float(x) / n for x in sums[:4])
            lm_scene_v, lm_recall_v = float(sums[7]) / n, float(sums[8]) / n
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
                if step % int(t.log_every) == 0 or step == steps or step == start_step + 1 or event:
                    now = time.perf_counter()
                    tok_s = tokens_window / max(now - time_window, 1e-9)
                    tokens_window, time_window = 0.0, now
                    zf = zero_weight_fraction(model)
                    zero_log[0].append(step)
                    zero_log[1].append(zf)
                    row = {"step": step, "loss": loss_v, "lm": lm_v, "cm": cm_v, "mem": mem_v,
                           "lm_scene": lm_scene_v, "lm_recall": lm_recall_v,
                           "similarity": "" if similarity is None else similarity,
                           "similarity_ema": "" if controller.ema is None else controller.ema,
                           "lr": lr, "cm_weight": cm_w, "grad_norm": grad_norm, "zero_fraction": zf,
                           "tokens_per_s": tok_s, "elapsed_s": elapsed_before + now - t_start,
                           "controller": (controller.active or {}).get("action", "")}
                    if val_batches and (step % int(t.eval_every) == 0 or step == steps):
                        v = evaluate(model, val_batches, device, precision, seed)
                        row.update(val_loss=v["loss"], val_lm=v["lm"], val_cm=v["cm"], val_lm_scene=v["lm_scene"],
                                   val_lm_recall=v["lm_recall"])
                        writer.add_scalars("val", v, step)
                    for k in ("loss", "lm", "cm", "mem", "lr", "cm_weight", "grad_norm", "zero_fraction",
                              "tokens_per_s"):
                        writer.add_scalar(f"train/{k}", row[k], step)
                    if similarity is not None:
                        writer.add_scalar("train/similarity", similarity, step)
                        writer.add_scalar("train/similarity_ema", controller.ema, step)
                    csv_writer.writerow(row)
                    csv_file.flush()
                    bar.set_postfix(loss=f"{loss_v:.3f}", scene=f"{lm_scene_v:.3f}", recall=f"{lm_recall_v:.3f}",
                                    cm=f"{cm_v:.3f}", tok_s=f"{tok_s:.0f}")
                    if probe is not None and probe_first is None:
                        probe_first = (step, memory_read_weights(model, probe))
            out_of_time = t.max_time_s is not None and elapsed_before + time.perf_counter() - t_start > float(t.max_time_s)
            if d.enabled:  # every rank must stop at the same step
                out_of_time = bool(d.all_reduce_sum(torch.tensor([float(out_of_time)]))[0] > 0)
            if step % int(t.save_every) == 0 or step == steps or out_of_time:
                save_all(run_dir, model, optimizer, scaler, controller, batches, step, recipe.to_dict(), d,
                         {"elapsed_s": elapsed_before + time.perf_counter() - t_start,
                          "zero_steps": zero_log[0], "zero_fractions": zero_log[1],
                          "probe_first_step": probe_first[0] if probe_first else None,
                          "probe_first": probe_first[1].tolist() if probe_first else None})
            if out_of_time:
                log.warning("train.max_time_s = %s reached at step %d; stopping", t.max_time_s, step)
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
        if out_cfg.packed_checkpoint:
            dest = Path(out_cfg.packed_checkpoint)
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
    run_dir = args.run_dir or Path(recipe.output.run_dir)
    recipe.output.run_dir = str(run_dir)
    train(recipe, run_dir, args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
