"""The paper's training data formats and the mixed image–caption / text stream (paper §3.6).

Image–caption rows live in JSONL (`{"caption": ..., "feature_index": i}` against a memory-mapped
features `.npy`, or `{"caption": ..., "image": path}`); text corpora are plain `.txt` files
(BabyLM style). `MixedBatches` draws items 50:50 (configurable) from both, tokenises with any
object that has `encode(str) -> list[int]`, and collates the batch dict the model expects. It is
deterministic by seed and resumable from `state_dict()`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import cv2
import numpy as np
import torch

from bitmar_core.backbones import PrecomputedFeatures, VisionBackbone

EOS_ID = 50256  # GPT-2 <|endoftext|>: ends every sequence and pads the batch
MAX_TOKENS = 256  # paper: max sequence length
IMAGE, TEXT = "image", "text"


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


def tokenize(tokenizer: Tokenizer, text: str, max_tokens: int = MAX_TOKENS,
             eos_id: int = EOS_ID, append_eos: bool = True) -> list[int]:
    """Token ids of `text`, truncated so that with the closing eos it is at most `max_tokens`."""
    ids = list(tokenizer.encode(text))
    if append_eos:
        return ids[: max_tokens - 1] + [eos_id]
    return ids[:max_tokens]


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
    that is slow, so precompute with `python -m bitmar_core.extract_features` for training.
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
                                     "or precompute features with bitmar_core.extract_features")
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


# --------------------------------------------------------------------------- mixing

class MixedSampler:
    """An endless stream of (source, index): source is 'image' with probability
    `image_fraction`, else 'text'; each source is walked in a fresh permutation every epoch.

    `state_dict()` holds the position, the source RNG state and each source's (epoch, cursor),
    so `load_state_dict` continues exactly where it stopped. The mixing ratio is configuration, not
    state: a resumed run keeps the `image_fraction` it was built with (a resume that changes it, say
    for a text-heavier second phase, mixes at the new ratio from the next draw on).
    """

    def __init__(self, n_image: int, n_text: int, image_fraction: float = 0.5, seed: int = 0):
        if not 0.0 <= image_fraction <= 1.0:
            raise ValueError(f"image_fraction must be in [0, 1], got {image_fraction}")
        if image_fraction > 0 and n_image <= 0:
            raise ValueError(f"image_fraction {image_fraction} > 0 but there are no image–caption items")
        if image_fraction < 1 and n_text <= 0:
            raise ValueError(f"image_fraction {image_fraction} < 1 but there are no text items")
        self.sizes = {IMAGE: n_image, TEXT: n_text}
        self.image_fraction = image_fraction
        self.seed = seed
        self.position = 0
        self._rng = np.random.default_rng([seed, 0])
        self._cursor = {IMAGE: [0, 0], TEXT: [0, 0]}  # [epoch, index within the permutation]
        self._perm: dict[str, tuple[int, np.ndarray]] = {}  # source → (epoch, order)

    def _permutation(self, source: str, epoch: int) -> np.ndarray:
        cached = self._perm.get(source)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, 1 + (source == TEXT), epoch])
            cached = self._perm[source] = (epoch, rng.permutation(self.sizes[source]))
        return cached[1]

    def __iter__(self) -> "MixedSampler":
        return self

    def __next__(self) -> tuple[str, int]:
        source = IMAGE if self._rng.random() < self.image_fraction else TEXT
        cursor = self._cursor[source]
        if cursor[1] == self.sizes[source]:
            cursor[0], cursor[1] = cursor[0] + 1, 0
        index = int(self._permutation(source, cursor[0])[cursor[1]])
        cursor[1] += 1
        self.position += 1
        return source, index

    def state_dict(self) -> dict:
        return {"seed": self.seed, "image_fraction": self.image_fraction, "sizes": dict(self.sizes),
                "position": self.position, "rng": self._rng.bit_generator.state,
                "cursor": {k: list(v) for k, v in self._cursor.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["sizes"] != self.sizes:
            raise ValueError(f"sampler state is for data sizes {state['sizes']}, this data has {self.sizes}")
        self.seed = state["seed"]
        self.position = state["position"]
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state["rng"]
        self._cursor = {k: list(v) for k, v in state["cursor"].items()}
        self._perm = {}


def collate(items: Sequence[dict], vision_shape: tuple[int, int, int], pad_id: int = EOS_ID) -> dict:
    """items `{"input_ids": list[int], "vision": (D,h,w) tensor or None}` → the model's batch:
    input_ids (B,T) long right-padded with `pad_id`, attention_mask (B,T) long (1 = real token),
    vision (B,D,h,w) float32 (zeros for text-only items), has_vision (B,) bool.

    For image–caption items `input_ids` is both the language-model target and the caption that
    InfoNCE pairs with `vision`."""
    if not items:
        raise ValueError("collate got an empty batch")
    T = max(len(it["input_ids"]) for it in items)
    B = len(items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    vision = torch.zeros((B, *vision_shape), dtype=torch.float32)
    has_vision = torch.zeros(B, dtype=torch.bool)
    for b, it in enumerate(items):
        ids = it["input_ids"]
        if not ids:
            raise ValueError(f"batch item {b} has no tokens")
        input_ids[b, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[b, : len(ids)] = 1
        if it.get("vision") is not None:
            if tuple(it["vision"].shape) != tuple(vision_shape):
                raise ValueError(f"batch item {b}: vision shape {tuple(it['vision'].shape)}, "
                                 f"expected {tuple(vision_shape)}")
            vision[b] = it["vision"]
            has_vision[b] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "vision": vision, "has_vision": has_vision}


class MixedBatches:
    """Endless batches mixing image–caption and text items (`image_fraction` of items carry
    vision). Deterministic by `seed`; `state_dict()`/`load_state_dict()` resume exactly."""

    def __init__(self, image_data: ImageCaptionDataset | None, text_data: TextCorpus | None,
                 tokenizer: Tokenizer, batch_size: int, image_fraction: float = 0.5, seed: int = 0,
                 max_tokens: int = MAX_TOKENS, eos_id: int = EOS_ID,
                 vision_shape: tuple[int, int, int] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.image_data, self.text_data = image_data, text_data
        self.tokenizer = tokenizer
        self.batch_size, self.max_tokens, self.eos_id = batch_size, max_tokens, eos_id
        if vision_shape is None:
            if image_data is None:
                raise ValueError("text-only batches need vision_shape (D, h, w) for their zero vision")
            vision_shape = image_data.vision_shape
        self.vision_shape = tuple(vision_shape)
        self.sampler = MixedSampler(len(image_data) if image_data is not None else 0,
                                    len(text_data) if text_data is not None else 0,
                                    image_fraction=image_fraction, seed=seed)

    def item(self, source: str, index: int) -> dict:
        if source == IMAGE:
            row = self.image_data[index]
            text, vision = row["caption"], row["vision"]
        else:
            text, vision = self.text_data[index], None
        # No eos: BitMar.forward frames every decoder sequence as [eos] + ids + [eos] itself, and
        # the text encoder sees the caption as the runtime encodes it (without one).
        ids = tokenize(self.tokenizer, text, self.max_tokens, self.eos_id, append_eos=False)
        return {"input_ids": ids, "vision": vision}

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        items = [self.item(*next(self.sampler)) for _ in range(self.batch_size)]
        return collate(items, self.vision_shape, pad_id=self.eos_id)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
