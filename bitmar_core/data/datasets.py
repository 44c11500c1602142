"""The paper's training data formats (paper §3.6): image–caption rows and text corpora.

Image–caption rows live in JSONL (`{"caption": ..., "feature_index": i}` against a memory-mapped
features `.npy`, or `{"caption": ..., "image": path}`); text corpora are plain `.txt` files
(BabyLM style). `bitmar_core.data.streams.EpisodeBatches` turns them into training batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..inference.backbones import PrecomputedFeatures, VisionBackbone



# --------------------------------------------------------------------------- image–caption

def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a bad line raises an error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


class ImageCaptionDataset:
    """Captions with their vision patch grids: `ds[i] -> {"caption": str, "vision": (D,h,w)}`.

    Rows with `feature_index` read from `features_path` (default: `features.npy` beside the JSONL).
    Rows with only `image` (relative to the JSONL's folder) are encoded on access by `backbone`;
    that is slow, so precompute with `python -m bitmar_core.data.extract_features` for training.
    """

    def __init__(self, captions_path: str | Path, features_path: str | Path | None = None,
                 backbone: VisionBackbone | None = None):
        self.captions_path = Path(captions_path)
        if not self.captions_path.is_file():
            raise FileNotFoundError(f"captions file {self.captions_path} does not exist")
        self.rows = read_jsonl(self.captions_path)
        if not self.rows:
            raise ValueError(f"captions file {self.captions_path} has no rows")
        self.backbone = backbone
        self.features: PrecomputedFeatures | None = None
        if any("feature_index" in r for r in self.rows):
            features_path = features_path or self.captions_path.with_name("features.npy")
            self.features = PrecomputedFeatures(features_path)
        for lineno, row in enumerate(self.rows, 1):
            where = f"{self.captions_path} row {lineno}"
            if not isinstance(row.get("caption"), str):
                raise ValueError(f"{where}: expected a string 'caption'")
            if "feature_index" in row:
                i = row["feature_index"]
                if not isinstance(i, int) or not 0 <= i < len(self.features):
                    raise ValueError(f"{where}: feature_index {i!r} outside the {len(self.features)} "
                                     f"rows of {self.features.path}")
            elif "image" in row:
                if backbone is None:
                    raise ValueError(f"{where}: has an 'image' but no 'feature_index'; pass a backbone "
                                     "or precompute features with bitmar_core.data.extract_features")
            else:
                raise ValueError(f"{where}: expected 'feature_index' or 'image'")

    @property
    def vision_shape(self) -> tuple[int, int, int]:
        source = self.features if self.features is not None else self.backbone
        return (int(source.feature_dim), *map(int, source.grid_size))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        if "feature_index" in row:
            vision = self.features[row["feature_index"]]
        else:
            vision = self.backbone.encode(load_rgb(self.captions_path.parent / row["image"]))[0]
        return {"caption": row["caption"], "vision": vision}


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB (H,W,3)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"image {path} does not exist or cannot be decoded")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------- text

class TextCorpus:
    """Plain-text documents: `corpus[i] -> str`."""

    def __init__(self, texts: Sequence[str]):
        self.texts = [t for t in texts if t.strip()]
        if not self.texts:
            raise ValueError("text corpus is empty")

    @classmethod
    def from_files(cls, paths: str | Path | Sequence[str | Path], chunk_chars: int = 1000) -> "TextCorpus":
        """Read `.txt` files (or every `.txt` in a folder). Paragraphs (blank-line separated) are
        documents; their lines are packed into chunks of ≤ `chunk_chars` characters so that
        one-utterance-per-line corpora (BabyLM) do not become thousands of tiny sequences."""
        if isinstance(paths, (str, Path)):
            paths = [paths]
        files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                files += sorted(p.glob("*.txt"))
            elif p.is_file():
                files.append(p)
            else:
                raise FileNotFoundError(f"text corpus path {p} does not exist")
        if not files:
            raise FileNotFoundError(f"no .txt files in {[str(p) for p in paths]}")
        texts = []
        for path in files:
            for paragraph in path.read_text(encoding="utf-8").split("\n\n"):
                chunk: list[str] = []
                for line in filter(None, (s.strip() for s in paragraph.splitlines())):
                    if chunk and sum(len(s) + 1 for s in chunk) + len(line) > chunk_chars:
                        texts.append("\n".join(chunk))
                        chunk = []
                    chunk.append(line)
                if chunk:
                    texts.append("\n".join(chunk))
        return cls(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> str:
        return self.texts[i]
