"""What the memory browser shows, read from a robot's episodic memory without ROS: timeline pages,
an episode with its neighbours in time, the hybrid query the node's service runs, and statistics
with pictures of the memory M and its slot usage. Opens the store read-only beside a live node.
"""
from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# The one place the episodic-memory class is named (another name may follow; change it here only).
from bitmar_core.episodes.service import EpisodicMemoryService
from bitmar_core.inference.runtime import BitMarRuntime
from bitmar_core.episodes.store import EpisodeStore
from bitmar_core.episodes.store_api import MAX_STAMP_NS, Episode, StoreError

MAX_PAGE_SIZE = 100          # episodes on one timeline page
MAX_QUERY_K = 50             # the node's default `max_query_k`
MAX_QUERY_CHARS = 2000       # the node's default `max_query_chars`
MAX_UPLOAD_BYTES = 8 << 20   # an uploaded query image, as sent
MAX_UPLOAD_PIXELS = 4096 * 4096  # checked from the image header, before the pixels are decoded
NEIGHBOURS = 4               # episodes shown before and after one, in time
SIMILAR = 4                  # episodes shown as nearest by the model's embedding


class ViewError(ValueError):
    """A request the view cannot serve; the message names the input and what was expected."""


@dataclass(frozen=True)
class TimelinePage:
    episodes: list[Episode]  # newest first
    page: int                # 1-based
    per_page: int
    total: int               # episodes in the store

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


@dataclass(frozen=True)
class EpisodeDetail:
    episode: Episode
    older: list[Episode]     # nearest first
    newer: list[Episode]     # nearest first
    similar: list[tuple[Episode, float]]  # by the model's embedding, best first, itself excluded


@dataclass(frozen=True)
class MemoryPicture:
    """The model's memory as the store holds it (the state the latest episode's write produced)."""
    memory: np.ndarray | None  # (K, C) float32
    usage: np.ndarray | None   # (K,) float32
    writes: int | None


class MemoryView:
    """Reads (and, only if ``allow_clear``, clears) the episodic memory stored under ``store_dir``.

    Every read runs in one ``EpisodeStore.snapshot()``: a short read transaction that sees one
    committed state of the store and brings the embedding index up to the episodes a live node
    has committed since the last request. The node is never blocked; its WAL checkpoint waits for
    at most one request's reads.
    """

    def __init__(self, memory: EpisodicMemoryService, store_dir: Path, allow_clear: bool = False) -> None:
        self.memory = memory
        self.store: EpisodeStore = memory.store
        self.store_dir = Path(store_dir)
        self.allow_clear = allow_clear
        self._clear_lock = threading.Lock()

    @classmethod
    def open(cls, checkpoint: str | Path, store_dir: str | Path, *, allow_clear: bool = False,
             num_threads: int = 1) -> "MemoryView":
        """Load the model (for embedding text and image queries) and open its store read-only.
        Raises ``RuntimeLoadError`` (checkpoint) or ``StoreError`` (store: missing, another model's)."""
        runtime = BitMarRuntime.from_checkpoint(checkpoint, num_threads=num_threads)
        store = EpisodeStore.open_read_only(store_dir, runtime.embedding_dim, runtime.identity)
        return cls(EpisodicMemoryService(runtime, store), Path(store_dir), allow_clear=allow_clear)

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ pages
    def timeline(self, page: int = 1, per_page: int = 24) -> TimelinePage:
        _check_int("page", page, 1, MAX_STAMP_NS // MAX_PAGE_SIZE)
        _check_int("per_page", per_page, 1, MAX_PAGE_SIZE)
        with self.store.snapshot():
            episodes = self.store.episodes_by_time(per_page, offset=(page - 1) * per_page)
            return TimelinePage(episodes, page, per_page, self.store.count())

    def episode(self, episode_id: int) -> EpisodeDetail:
        """The episode, its neighbours in time, and its nearest episodes by embedding; KeyError if none."""
        _check_int("episode id", episode_id, 0, MAX_STAMP_NS)
        with self.store.snapshot():
            ep = self.store.episode(episode_id)
            key = (ep.stamp_ns, ep.id)
            # Episodes stamped the same nanosecond are ordered by id, as on the timeline.
            older = [e for e in self.store.episodes_by_time(NEIGHBOURS + 16, end_ns=ep.stamp_ns)
                     if (e.stamp_ns, e.id) < key][:NEIGHBOURS]
            newer = [e for e in self.store.episodes_by_time(NEIGHBOURS + 16, newest_first=False, start_ns=ep.stamp_ns)
                     if (e.stamp_ns, e.id) > key][:NEIGHBOURS]
            similar = [(e, s) for e, s in self.store.query(ep.embedding, k=SIMILAR + 1) if e.id != ep.id][:SIMILAR]
        return EpisodeDetail(ep, older, newer, similar)

    def thumbnail(self, episode_id: int) -> bytes:
        """The stored JPEG thumbnail (b'' if the episode has none); KeyError if no such episode."""
        _check_int("episode id", episode_id, 0, MAX_STAMP_NS)
        return self.store.episode(episode_id).thumbnail_jpeg

    # ------------------------------------------------------------------ search
    def search(self, text: str | None, image: bytes | None = None, *, k: int = 10,
               start_ns: int | None = None, end_ns: int | None = None):
        """The node's query service's retrieval (``EpisodicMemoryService.query``: BM25 over the captions
        fused with the model's embeddings) for a text and/or an encoded image (JPEG, PNG, ...)."""
        text = (text or "").strip() or None
        if text is not None and len(text) > MAX_QUERY_CHARS:
            raise ViewError(f"q: expected at most {MAX_QUERY_CHARS} characters, got {len(text)}")
        _check_int("k", k, 1, MAX_QUERY_K)
        for name, value in (("start", start_ns), ("end", end_ns)):
            if value is not None:
                _check_int(name, value, 0, MAX_STAMP_NS)
        if start_ns is not None and end_ns is not None and start_ns > end_ns:
            raise ViewError(f"start: expected a time before end, got {start_ns} ns > {end_ns} ns")
        if text is None and not image:
            raise ViewError("search: expected words (q), an image, or both")
        code = self.memory.runtime.embed_frame(decode_image(image)) if image else None  # outside the snapshot
        with self.store.snapshot():
            return self.memory.query(text, code=code, k=k, start_ns=start_ns, end_ns=end_ns)

    # ------------------------------------------------------------------ statistics
    def memory_picture(self) -> MemoryPicture:
        with self.store.snapshot():
            state = self.store.memory_state() or {}
        return _picture_of(state)

    def stats(self) -> dict:
        with self.store.snapshot():
            count = self.store.count()
            newest = self.store.episodes_by_time(1)
            oldest = self.store.episodes_by_time(1, newest_first=False)
            state = self.store.memory_state() or {}
        pic = _picture_of(state)
        slots = dims = used = effective = None
        if pic.memory is not None:
            slots, dims = pic.memory.shape
        if pic.usage is not None:
            slots = slots or len(pic.usage)
            used = int((pic.usage > USED_SLOT_USAGE).sum())
            effective = effective_slots(pic.usage)
        return {
            "episodes": count,
            "memory_writes": pic.writes,
            "slots": slots,
            "slot_dim": dims,
            "slots_used": used,
            "used_slot_usage": USED_SLOT_USAGE,
            "effective_slots": effective,
            "usage_max": float(pic.usage.max()) if pic.usage is not None and len(pic.usage) else None,
            "newest_stamp_ns": newest[0].stamp_ns if newest else None,
            "oldest_stamp_ns": oldest[0].stamp_ns if oldest else None,
            "writable": self.allow_clear,
            # Changes whenever the memory or the episodes do: the page reloads its pictures on it.
            "version": f"{count}-{newest[0].id if newest else 0}-{pic.writes}",
        }

    # ------------------------------------------------------------------ clearing
    def clear(self) -> int:
        """Forget every episode and the memory state (``EpisodicMemoryService.clear`` on a read-write
        open of the store, closed again at once). Only with ``allow_clear``. Returns how many
        episodes were forgotten."""
        if not self.allow_clear:
            raise PermissionError("the browser was started read-only (start it with --allow-clear to clear)")
        with self._clear_lock:
            runtime = self.memory.runtime
            writable = EpisodeStore.open(self.store_dir, runtime.embedding_dim, runtime.identity, create=False)
            try:
                forgotten = writable.count()
                EpisodicMemoryService(runtime, writable).clear()
            finally:
                writable.close()
        self.store.refresh()
        return forgotten


# A slot counts as used once its usage (a decaying sum of read and write weights) passes this.
USED_SLOT_USAGE = 0.01


def effective_slots(usage: np.ndarray) -> float | None:
    """How many slots the usage is spread over: exp of the entropy of usage / sum(usage) (K if
    even, 1 if one slot holds it all). Soft writes touch every slot a little, so a threshold
    alone counts them all; this says how concentrated the memory is."""
    u = np.clip(np.asarray(usage, np.float64), 0, None)
    total = u.sum()
    if not np.isfinite(total) or total <= 0:
        return None
    p = u[u > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def _picture_of(state: dict[str, np.ndarray]) -> MemoryPicture:
    """M, its usage and the write count from a stored memory state, by the names the model's
    memory gives them; a state of another form shows whatever of them it holds."""
    memory = state.get("memory", state.get("M"))
    if memory is None:  # another layout: its largest 2-D float tensor
        cands = [v for v in state.values() if v.ndim == 2 and v.dtype.kind == "f"]
        memory = max(cands, key=lambda v: v.size) if cands else None
    usage = state.get("usage")
    if usage is not None and (usage.ndim != 1 or (memory is not None and len(usage) != memory.shape[0])):
        usage = None
    writes = state.get("n_writes")
    return MemoryPicture(None if memory is None else np.asarray(memory, np.float32),
                         None if usage is None else np.asarray(usage, np.float32),
                         None if writes is None else int(np.asarray(writes).reshape(-1)[0]))


def decode_image(data: bytes) -> np.ndarray:
    """RGB uint8 pixels of an encoded image; its size is checked from the header before decoding."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_UPLOAD_BYTES:
        raise ViewError(f"image: expected at most {MAX_UPLOAD_BYTES} bytes, got {len(data)}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > MAX_UPLOAD_PIXELS or w < 1 or h < 1:
                raise ViewError(f"image: expected at most {MAX_UPLOAD_PIXELS} pixels, got {w}x{h}")
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ViewError(f"image: expected a JPEG, PNG or other image file ({exc})") from None
    return np.ascontiguousarray(rgb)


# ---------------------------------------------------------------------- pictures
def _diverging(x: np.ndarray) -> np.ndarray:
    """(H, W) in [-1, 1] → (H, W, 3) uint8 RGB: blue (−1), white (0), red (+1)."""
    x = np.clip(x, -1.0, 1.0)[..., None]
    white, blue, red = np.array([255, 255, 255.0]), np.array([33, 102, 172.0]), np.array([178, 24, 43.0])
    rgb = np.where(x < 0, white + (blue - white) * -x, white + (red - white) * x)
    return rgb.round().astype(np.uint8)


def _png(rgb: np.ndarray, row_px: int, min_width: int = 512) -> bytes:
    """PNG of ``rgb`` with each row ``row_px`` pixels tall and each column as wide as it takes
    (a whole number of pixels) to make the picture at least ``min_width`` wide."""
    h, w = rgb.shape[:2]
    col_px = max(1, -(-min_width // w))
    big = cv2.resize(rgb, (w * col_px, h * row_px), interpolation=cv2.INTER_NEAREST)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
    if not ok:
        raise StoreError("OpenCV failed to encode a PNG")
    return buf.tobytes()


def memory_png(pic: MemoryPicture) -> bytes | None:
    """M as a heat map: one column per slot (K across), one row per channel (C down), values
    divided by the largest magnitude (blue negative, white 0, red positive)."""
    if pic.memory is None or pic.memory.size == 0:
        return None
    m = pic.memory.T
    scale = float(np.abs(m).max()) if np.isfinite(m).all() else 0.0
    return _png(_diverging(m / scale if scale > 0 else np.zeros_like(m)), row_px=2)


def usage_png(pic: MemoryPicture) -> bytes | None:
    """Slot usage as a strip, one column per slot (K across): white unused, red the most used."""
    if pic.usage is None or pic.usage.size == 0:
        return None
    u = pic.usage
    top = float(u.max()) if np.isfinite(u).all() and u.max() > 0 else 1.0
    level = np.clip(u / top, 0, 1)[None, :]
    return _png(_diverging(level), row_px=24)


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ViewError(f"{name}: expected an integer in [{lo}, {hi}], got {value!r}")
