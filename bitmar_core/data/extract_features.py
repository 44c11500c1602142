"""Precompute frozen-backbone patch grids for image–caption training (the paper trains on
precomputed DINOv2 features). Writes `features.npy` (N, D, h, w) float16 + `captions.jsonl`
(+ `scenes.jsonl` for generated scenes) in the format `ImageCaptionDataset` reads.

    python -m bitmar_core.data.extract_features --images DIR --captions captions.jsonl --out OUT
    python -m bitmar_core.data.extract_features --generate-scenes 10000 --split train --seed 0 --out OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..inference.backbones import VisionBackbone, build_backbone
from .datasets import load_rgb, read_jsonl
from .scenes import generate_split


def write_features(images: Iterable[np.ndarray], n: int, backbone: VisionBackbone, out_path: Path,
                   batch_size: int = 32, desc: str = "features") -> np.memmap:
    """Encode `n` uint8 RGB images in batches into a float16 `.npy` (n, D, h, w), written through
    a memory map so the whole array never sits in RAM."""
    D, (h, w) = backbone.feature_dim, backbone.grid_size
    out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float16, shape=(n, D, h, w))
    device = next(backbone.parameters()).device
    written = 0
    with tqdm(total=n, desc=desc, unit="img") as bar:
        for batch in _batched(images, batch_size):
            if written + len(batch) > n:
                raise ValueError(f"more than the announced {n} images")
            with torch.no_grad():
                feats = backbone(backbone.preprocess(batch).to(device))
            out[written: written + len(batch)] = feats.cpu().numpy().astype(np.float16)
            written += len(batch)
            bar.update(len(batch))
    if written != n:
        raise ValueError(f"expected {n} images, got {written}")
    out.flush()
    return out


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def extract_generated(out_dir: Path, n: int, split: str, start: int, backbone: VisionBackbone,
                      image_size: int = 224, batch_size: int = 32) -> None:
    """Scenes `start..start+n-1` of `split` → features.npy, captions.jsonl, scenes.jsonl."""
    scenes = []

    def images():
        for image, scene in generate_split(split, n, size=image_size, start=start):
            scenes.append(scene)
            yield image

    write_features(images(), n, backbone, out_dir / "features.npy", batch_size, desc=f"scenes/{split}")
    _write_jsonl(out_dir / "captions.jsonl", ({"caption": s.caption, "feature_index": i, "scene_seed": s.seed}
                                              for i, s in enumerate(scenes)))
    _write_jsonl(out_dir / "scenes.jsonl", (s.to_dict() for s in scenes))


def extract_folder(out_dir: Path, images_dir: Path, captions_path: Path, backbone: VisionBackbone,
                   batch_size: int = 32) -> None:
    """Images named by `captions.jsonl` rows `{"image": path relative to images_dir, "caption"}`
    → features.npy (one row per distinct image) and captions.jsonl with `feature_index`."""
    rows = read_jsonl(captions_path)
    order: dict[str, int] = {}
    for lineno, row in enumerate(rows, 1):
        if not isinstance(row.get("image"), str) or not isinstance(row.get("caption"), str):
            raise ValueError(f"{captions_path} row {lineno}: expected string 'image' and 'caption'")
        order.setdefault(row["image"], len(order))
    missing = [p for p in order if not (images_dir / p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images named in {captions_path} are not in {images_dir}, "
                                f"e.g. {missing[0]}")
    write_features((load_rgb(images_dir / p) for p in order), len(order), backbone,
                   out_dir / "features.npy", batch_size, desc="images")
    _write_jsonl(out_dir / "captions.jsonl",
                 ({**row, "feature_index": order[row["image"]]} for row in rows))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bitmar_core.data.extract_features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of images named by --captions")
    src.add_argument("--generate-scenes", type=int, metavar="N", help="render N procedural scenes")
    p.add_argument("--captions", type=Path, help='JSONL rows {"image": relative path, "caption": ...}')
    p.add_argument("--split", default="train", choices=["train", "validation", "test"])
    p.add_argument("--seed", type=int, default=0, help="first scene index within the split")
    p.add_argument("--image-size", type=int, default=224, help="rendered scene side in pixels")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   choices=["efficientnet_lite0", "dinov2_vitb14", "dinov2_vits14"])
    p.add_argument("--weights-dir", type=Path, help="local DINOv2 weights (from_pretrained folder)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    args = p.parse_args(argv)
    if args.images is not None and args.captions is None:
        p.error("--images needs --captions")
    if args.generate_scenes is not None and args.generate_scenes < 1:
        p.error("--generate-scenes must be ≥ 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {"weights_dir": args.weights_dir} if args.backbone.startswith("dinov2") else {}
    backbone = build_backbone(args.backbone, **kwargs).to(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.generate_scenes is not None:
        extract_generated(args.out, args.generate_scenes, args.split, args.seed, backbone,
                          args.image_size, args.batch_size)
        source = {"generated_scenes": args.generate_scenes, "split": args.split, "start": args.seed,
                  "image_size": args.image_size}
    else:
        extract_folder(args.out, args.images, args.captions, backbone, args.batch_size)
        source = {"images": str(args.images), "captions": str(args.captions)}
    meta = {"backbone": args.backbone, "feature_dim": backbone.feature_dim,
            "grid_size": list(backbone.grid_size), "dtype": "float16", **source}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out / 'features.npy'} and captions.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
