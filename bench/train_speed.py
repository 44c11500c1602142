"""Benchmark 8: training throughput — real (target) tokens per second of an optimizer step of the
default recipe (config/train_default.yaml: a head over the corpus's tokens, three scenes per stream,
vision prefix, memory recall) next to the previous recipe (a 50,257-row head, one caption per
sequence, no prefix, no recall), timed in the same interleaved rounds on the same scene features.

A "real token" is a position with a loss: caption tokens and their closing eos, recall answers —
never padding, sinks or vision slots. The features are those of `runs/cache` when the default run
has built them, else a few hundred scenes extracted here once (slow the first time).
"""
from __future__ import annotations

import torch

from .common import REPO, Table, interleaved, median, spread, threads

STEPS_PER_ROUND = 3


def _setup(previous: bool, n_scenes: int):
    from bitmar_core.model.config import BitMarConfig
    from bitmar_core.data.datasets import ImageCaptionDataset
    from bitmar_core.data.streams import IGNORE
    from bitmar_core.model.bitmar import BitMar
    from bitmar_core.inference.tokenizer import tokenizer_for
    from bitmar_core.training.data import episode_batches, scene_cache, scene_ground_truth, training_vocabulary
    from bitmar_core.training.recipe import load_recipe
    from bitmar_core.training.state import build_optimizer

    overrides = [f"data.scenes.n={n_scenes}", "data.vocab_extra_scenes=2000", f"data.cache_dir={REPO / 'runs' / 'cache'}"]
    if previous:
        overrides += ["model.vocab_subset=false", "model.vision_prefix=false", "data.scenes_per_stream=1",
                      "data.recall_items=0"]
    recipe = load_recipe(REPO / "config" / "train_default.yaml", overrides)
    data, t = recipe.data, recipe.train
    spec = data.scene_spec("train")
    folder = scene_cache(data.cache_dir, spec["n"], "train", 0, 224, data.backbone)
    image = ImageCaptionDataset(folder / "captions.jsonl")
    fields = dict(recipe.model)
    torch.manual_seed(0)
    if fields.get("vocab_subset"):
        ids = training_vocabulary(data, image)
        fields.update(vocab_size=len(ids), eos_id=0)
    model = BitMar(BitMarConfig.from_dict(fields)).train()
    if fields.get("vocab_subset"):
        model.token_ids.copy_(torch.tensor(ids))
    scenes = scene_ground_truth(data, "train") if data.recall_items else None
    batches = episode_batches(data, t, image, scenes, tokenizer_for(model), model.config, seed=0)
    opt = build_optimizer(model, t, torch.device("cpu"))

    def run() -> float:
        """Real tokens per second over STEPS_PER_ROUND full optimizer steps (batching included)."""
        import time

        t0, tokens = time.perf_counter(), 0
        for _ in range(STEPS_PER_ROUND):
            batch = next(batches)
            loss = model(batch)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += int((batch["stream_targets"] != IGNORE).sum())
            if "answer_targets" in batch:
                tokens += int((batch["answer_targets"] != IGNORE).sum())
        return tokens / (time.perf_counter() - t0)

    return run, model.config.vocab_size


def train_speed(quick: bool) -> Table:
    rounds = 3 if quick else 5
    n_scenes = 12000 if (REPO / "runs" / "cache" / "scenes_train_0_12000_efficientnet_lite0_224px").is_dir() else 300
    new, v_new = _setup(False, n_scenes)
    old, v_old = _setup(True, n_scenes)
    with threads(1):
        new(), old()  # warm-up
        res = interleaved({"new": new, "old": old}, rounds)
    t = Table("8. Training throughput, real tokens/s of an optimizer step, 1 thread",
              ["recipe", "head rows", "tokens/s", "vs previous"])
    a, b = median(res["new"]), median(res["old"])
    t.add("previous: 50,257-row head, 1 caption per sequence (baseline)", f"{v_old:,}", f"{b:,.0f} {spread(res['old'])}", "1.0×")
    t.add("default: corpus vocabulary, 3-scene streams, vision prefix, recall", f"{v_new:,}",
          f"{a:,.0f} {spread(res['new'])}", f"{a / b:.1f}×")
    t.metrics.update(train_tok_s_new=a, train_tok_s_old=b, train_speedup=a / b)
    t.notes.append(f"median of {rounds} interleaved rounds of {STEPS_PER_ROUND} steps each (forward, backward, "
                   f"clipping, AdamW), batch 16 streams, {n_scenes:,} training scenes' EfficientNet-Lite0 features")
    t.notes.append("the previous recipe is emulated with today's code (rotary positions instead of a learned table: "
                   "the same cost); the bundled run before this change logged ~260 real tokens/s")
    return t
