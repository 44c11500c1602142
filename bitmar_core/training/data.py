"""What a training run reads: the scene feature cache, the image–caption datasets, their ground truth,
the vocabulary of the corpus, the text corpus, and the `EpisodeBatches` over them."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from ..data.datasets import ImageCaptionDataset, TextCorpus
from ..data.streams import EpisodeBatches, load_scenes, vocabulary_texts
from ..inference.tokenizer import build_vocabulary
from ..model.config import BitMarConfig
from .distributed import Dist
from .recipe import DataConfig, TrainConfig

log = logging.getLogger("bitmar.train")


def scene_cache(cache_dir: str | Path, n: int, split: str = "train", start: int = 0, image_size: int = 224,
                backbone: str = "efficientnet_lite0") -> Path:
    """Folder of precomputed features for scenes start..start+n−1 of `split`; built (with
    bitmar_core.data.extract_features) when missing. Scenes and features are deterministic."""
    out = Path(cache_dir) / f"scenes_{split}_{start}_{n}_{backbone}_{image_size}px"
    meta_path = out / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (meta.get("generated_scenes"), meta.get("split"), meta.get("start"), meta.get("backbone")) == \
                (n, split, start, backbone):
            return out
    from ..inference.backbones import build_backbone
    from ..data.extract_features import extract_generated

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


def image_dataset(data: DataConfig, which: str, d: Dist) -> ImageCaptionDataset | None:
    """'train' or 'val' image–caption data from the recipe (scenes built by rank 0 first)."""
    spec = data.scene_spec(which)
    if spec:
        if d.main:
            scene_cache(data.cache_dir, spec["n"], spec["split"], spec["start"], spec["image_size"], data.backbone)
        d.barrier()
        folder = scene_cache(data.cache_dir, spec["n"], spec["split"], spec["start"], spec["image_size"], data.backbone)
        return ImageCaptionDataset(folder / "captions.jsonl")
    captions, features = (data.captions, data.features) if which == "train" else (data.val_captions, data.val_features)
    if captions:
        return ImageCaptionDataset(captions, features)
    return None


def scene_ground_truth(data: DataConfig, which: str) -> list | None:
    """The generated scenes behind 'train' or 'val' rows (None for a captions.jsonl corpus)."""
    spec = data.scene_spec(which)
    if not spec:
        return None
    return load_scenes(scene_cache(data.cache_dir, spec["n"], spec["split"], spec["start"], spec["image_size"],
                                   data.backbone))


def text_corpus(data: DataConfig, split: str) -> TextCorpus | None:
    """The text-only documents: 'wiki' (offline Wikipedia summaries, train/validation split), or .txt
    files (training only)."""
    if data.text is None or not data.text_items:
        return None
    if data.text == "wiki":
        from ..data.text import wiki_text_split

        return TextCorpus(wiki_text_split(split))
    return TextCorpus.from_files(data.text) if split == "train" else None


def training_vocabulary(data: DataConfig, image_train: ImageCaptionDataset, text: TextCorpus | None = None) -> list[int]:
    """GPT-2 ids of every text the recipe can train on: the training captions, the captions of
    `vocab_extra_scenes` further train-split scenes (the grammar's rarer words), the recall task's
    cues and answers and the text corpus. Validation and test text are not looked at."""
    from ..data.scenes import generate_scene, split_seed

    texts = [r["caption"] for r in image_train.rows] + vocabulary_texts()
    spec = data.scene_spec("train") or {"n": 0, "start": 0}
    start = spec["start"] + spec["n"]
    texts += [generate_scene(split_seed("train", start + i)).caption for i in range(data.vocab_extra_scenes)]
    if text is not None:
        texts += list(text.texts)
    return build_vocabulary(texts)


def episode_batches(data: DataConfig, t: TrainConfig, image: ImageCaptionDataset, scenes, tokenizer,
                    config: BitMarConfig, seed: int, rank: int = 0, world: int = 1,
                    text: TextCorpus | None = None) -> EpisodeBatches:
    """The recipe's training (or validation) batches."""
    D, h, w = image.vision_shape
    n_vision = -(-h // 2) * -(-w // 2)
    return EpisodeBatches(image, tokenizer, streams=t.batch_size, scenes_per_stream=data.scenes_per_stream,
                          n_vision=n_vision, sink=config.sink_tokens, seed=seed,
                          caption_max_tokens=data.caption_max_tokens, scenes=scenes,
                          recall_items=data.recall_items if scenes is not None else 0,
                          recall_episodes=tuple(data.recall_episodes), offset_prob=config.position_offset_prob,
                          offset_max=data.stream_offset_max, texts=text.texts if text is not None else None,
                          text_items=data.text_items if text is not None else 0,
                          text_max_tokens=data.text_max_tokens, rank=rank, world=world)
