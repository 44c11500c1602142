"""What every episode store is, whichever database holds it (``store.EpisodeStore``: SQLite, one
robot; ``store_pg.PgEpisodeStore``: PostgreSQL + pgvector, a fleet): the episode records and the
limits and checks of their inputs, the retention policy, the interface ``EpisodeStoreAPI``, and the
one rule that fuses the lexical and embedding rankings of a search (``fuse_rankings``). Pure
Python/numpy: no database here, so both backends share these and cannot drift apart.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .pose import Pose

SCHEMA_VERSION = 3  # of both stores' tables; 3 added the pose columns

MAX_EMBEDDING_DIM = 8192
MAX_IDENTITY_BYTES = 4096
MAX_CAPTION_BYTES = 8192
MAX_SOURCE_CHARS = 32
MAX_THUMBNAIL_BYTES = 512 * 1024
MAX_K = 1000
MAX_STAMP_NS = 2**63 - 1
MAX_STATE_TENSORS = 64
MAX_STATE_NAME_CHARS = 64
MAX_STATE_BYTES = 256 * 1024 * 1024
MAX_QUERY_TERMS = 32  # words of a text query that are searched; the rest are ignored

# Reciprocal rank fusion: an episode's fused score is the sum of 1 / (RRF_K + rank) over the rankings
# it appears in (Cormack, Clarke & Büttcher, SIGIR 2009). Ranks, not scores, are fused because BM25
# (unbounded, grows with the query's length) and cosine similarity (in [-1, 1]) share no scale, and
# no labelled queries exist here to learn one. k = 60 is the paper's value: it damps the head of each
# ranking so that an episode near the top of both outranks one that tops a single ranking only
# (1/61 + 1/62 > 1/61 + 0), while the first few ranks of a single list still stay ahead of the tail
# of the other. Each ranking contributes its top D = 2k + RRF_K episodes (``fusion_depth``): an
# episode below rank D in both would score under 2 / (RRF_K + D + 1) < 1 / (RRF_K + k), the least
# that each of the k best of either ranking alone gets, so it could never enter the top k.
RRF_K = 60

# Words left out of a text query's lexical part (unless the query holds nothing else): they occur in
# nearly every caption, so BM25 gives them almost no weight, while matching them costs a pass over
# almost every row of the index.
STOPWORDS = frozenset("""
a an the and or of in on at to for from by with without into onto over under is are was were be been
being am do does did has have had it its this that these those there here what which who whom whose
where when why how i me my we our you your he him his she her they them their as than then so not no
can could will would shall should may might must some any all
""".split())

_SOURCE_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_STATE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
# Tensor dtypes the memory state may hold; stored little-endian under these names.
_STATE_DTYPES = {
    np.dtype(t).name: np.dtype(t).newbyteorder("<")
    for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
              np.uint64, np.float16, np.float32, np.float64)
}
_F32_LE = np.dtype("<f4")
_POSE_SELECT = "pose_frame, px, py, pz, qx, qy, qz, qw"  # the pose columns, named alike in both schemas


class StoreError(Exception):
    """Base class of every error the store raises."""


class StoreInputError(StoreError, ValueError):
    """An argument is invalid; the message names it and what was expected."""


class StoreNotFoundError(StoreError):
    """``open(..., create=False)`` found no store."""


class StoreCorruptError(StoreError):
    """The file is not a readable EpisodeStore (garbled, foreign schema, bad blobs)."""


class StoreVersionError(StoreError):
    """The store was written with another schema version."""


class StoreMismatchError(StoreError):
    """The store belongs to another embedding dimension or model identity."""


class StoreWriteError(StoreError):
    """A write failed (disk full, I/O error); nothing of that call was stored."""


class StoreClosedError(StoreError):
    """The store was used after ``close()``."""


@dataclass(frozen=True)
class Episode:
    """One stored episode; ``embedding`` is float32 ``(dim,)`` exactly as written."""

    id: int
    stamp_ns: int
    caption: str
    source: str
    embedding: np.ndarray
    thumbnail_jpeg: bytes
    robot_id: str = ""  # the robot that recorded it (fleet store); "" in a one-robot SQLite store
    pose: Pose | None = None  # where the camera was at stamp_ns; None when no pose source gave one


@dataclass(frozen=True)
class NewEpisode:
    """An episode to store with ``add_episodes`` (the arguments of ``add_episode``)."""

    stamp_ns: int
    caption: str
    source: str
    embedding: np.ndarray
    thumbnail_jpeg: bytes = b""
    pose: Pose | None = None


def check_episode(where: str, stamp_ns, caption, source, embedding, thumbnail_jpeg, pose,
                  check_embedding) -> tuple:
    """Validate one episode's fields (both stores, one or many at a time) → (embedding, unit,
    thumbnail, pose row). ``where`` prefixes each field's name in an error ("" or "episodes[3].");
    check_embedding(name, value) → (embedding, unit) is the store's own dimension check."""
    _check_stamp(f"{where}stamp_ns", stamp_ns)
    _check_text(f"{where}caption", caption, MAX_CAPTION_BYTES, allow_empty=True)
    if not isinstance(source, str) or len(source) > MAX_SOURCE_CHARS or not _SOURCE_RE.match(source):
        raise StoreInputError(f"{where}source: expected a lowercase identifier of ≤ {MAX_SOURCE_CHARS} chars "
                              f"such as 'caption' or 'description', got {source!r}")
    emb, unit = check_embedding(f"{where}embedding", embedding)
    return emb, unit, _check_thumbnail(thumbnail_jpeg), _pose_row(pose)


def check_new_episode(n: int, e: "NewEpisode", check_embedding) -> tuple:
    """Validate episodes[n] of a bulk add → (e, embedding, unit, thumbnail, pose row)."""
    if not isinstance(e, NewEpisode):
        raise StoreInputError(f"episodes[{n}]: expected a NewEpisode, got {type(e).__name__}")
    return (e, *check_episode(f"episodes[{n}].", e.stamp_ns, e.caption, e.source, e.embedding, e.thumbnail_jpeg,
                              e.pose, check_embedding))


@dataclass(frozen=True)
class SpatialFilter:
    """Episodes recorded within ``radius_m`` of (x, y) in ``frame_id``, measured in the frame's x-y
    plane (``Pose.planar_distance`` says why). Episodes without a pose or in another frame never match:
    the store has no transforms between frames."""

    frame_id: str
    x: float
    y: float
    radius_m: float

    def __post_init__(self) -> None:
        if not isinstance(self.frame_id, str) or not self.frame_id:
            raise StoreInputError(f"near frame_id: expected a non-empty frame name, got {self.frame_id!r}")
        for name in ("x", "y", "radius_m"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not np.isfinite(v):
                raise StoreInputError(f"near {name}: expected a finite number, got {v!r}")
        if self.radius_m <= 0:
            raise StoreInputError(f"near radius_m: expected > 0 metres, got {self.radius_m!r}")


@dataclass(frozen=True)
class RetentionPolicy:
    """Limits that ``enforce_retention`` keeps the store within, oldest episodes (by stamp) going
    first. 0 = no limit. ``max_bytes`` counts the database's used pages (the file shrinks to them with
    incremental vacuum; the WAL adds at most ``WAL_SIZE_LIMIT`` past a checkpoint). Passes run when a
    limit is exceeded and delete down to ``low_water`` of it, so that a store at its budget does not
    pay a deletion with every episode. ``thin_interval_s`` > 0: before deleting the oldest, drop
    episodes recorded within that many seconds of the episode kept before them while the scene did not
    change (embedding cosine ≥ ``thin_min_cosine``), oldest first: a robot parked for an hour keeps one
    episode per interval instead of losing its oldest days."""

    max_bytes: int = 0
    max_count: int = 0
    max_age_s: float = 0.0
    thin_interval_s: float = 0.0
    thin_min_cosine: float = 0.98
    low_water: float = 0.9

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_count"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise StoreInputError(f"retention {name}: expected an int ≥ 0 (0 = no limit), got {v!r}")
        for name in ("max_age_s", "thin_interval_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise StoreInputError(f"retention {name}: expected a number ≥ 0 (0 = off), got {v!r}")
        if not -1.0 <= self.thin_min_cosine <= 1.0:
            raise StoreInputError(f"retention thin_min_cosine: expected a cosine in [-1, 1], got {self.thin_min_cosine!r}")
        if not 0.0 < self.low_water <= 1.0:
            raise StoreInputError(f"retention low_water: expected a fraction in (0, 1], got {self.low_water!r}")

    @property
    def active(self) -> bool:
        return bool(self.max_bytes or self.max_count or self.max_age_s)


@dataclass(frozen=True)
class RetentionReport:
    deleted: int        # episodes deleted by this pass
    thinned: int        # of which by thinning
    bytes_used: int     # the database's used bytes after the pass
    count: int          # episodes left


@dataclass(frozen=True)
class Hit:
    """One episode found by ``search``, and how it was found."""

    episode: Episode
    score: float            # fused: sum of 1 / (RRF_K + rank) over the rankings it is in; the order
    lexical_score: float    # BM25 of its caption against the query's words (higher = better); 0 = none matched
    lexical_rank: int       # 1-based among the lexical matches (equal BM25, equal rank); 0 = not among them
    embedding_score: float  # cosine similarity to the query embedding; NaN without one
    embedding_rank: int     # 1-based by cosine; 0 = not ranked (no query embedding, or below the depth used)

    @property
    def matched_by(self) -> str:
        """Which rankings found it: "lexical", "embedding" or "lexical+embedding"."""
        return "+".join(name for name, rank in (("lexical", self.lexical_rank), ("embedding", self.embedding_rank))
                        if rank)


class EpisodeStoreAPI(Protocol):
    """What ``EpisodicMemoryService``, the node and the browser use of a store: ``EpisodeStore`` (SQLite, one
    robot) and ``store_pg.PgEpisodeStore`` (PostgreSQL + pgvector, a fleet) both provide it.
    ``robot_scope``: None or '' this robot, '*' the fleet, else one robot's name."""

    embedding_dim: int
    identity: str
    robot_id: str
    read_only: bool

    @property
    def where(self) -> str: ...
    def add_episode(self, stamp_ns: int, caption: str, source: str, embedding: np.ndarray,
                    thumbnail_jpeg: bytes = b"", memory_state: dict[str, np.ndarray] | None = None,
                    pose: Pose | None = None) -> int | None: ...
    def add_episodes(self, episodes: Sequence[NewEpisode],
                     memory_state: dict[str, np.ndarray] | None = None) -> list[int]: ...
    def put_memory_state(self, state: dict[str, np.ndarray]) -> None: ...
    def memory_state(self) -> dict[str, np.ndarray] | None: ...
    def clear(self) -> None: ...
    def checkpoint(self) -> None: ...
    def close(self) -> None: ...
    def count(self) -> int: ...
    def episode(self, episode_id: int) -> Episode: ...
    def all_episodes(self) -> list[Episode]: ...
    def episodes_by_time(self, limit: int, offset: int = 0, newest_first: bool = True,
                         start_ns: int | None = None, end_ns: int | None = None) -> list[Episode]: ...
    def query(self, embedding: np.ndarray, k: int, start_ns: int | None = None,
              end_ns: int | None = None) -> list[tuple[Episode, float]]: ...
    def lexical_search(self, text: str, limit: int, start_ns: int | None = None,
                       end_ns: int | None = None) -> list[tuple[int, float]]: ...
    def search(self, text: str | None = None, embedding: np.ndarray | None = None, k: int = 5,
               start_ns: int | None = None, end_ns: int | None = None, robot_scope: str | None = None,
               near: SpatialFilter | None = None) -> list[Hit]: ...
    def integrity_check(self) -> list[str]: ...
    def forget(self, ids: Sequence[int] | None = None, start_ns: int | None = None, end_ns: int | None = None,
               caption_contains: str | None = None) -> list[int]: ...
    def bytes_used(self) -> int: ...
    def enforce_retention(self, policy: RetentionPolicy, now_ns: int | None = None) -> RetentionReport: ...
    def compact(self) -> None: ...


def make_thumbnail(rgb: np.ndarray, max_side: int = 96, quality: int = 80) -> bytes:
    """JPEG bytes of an ``(H, W, 3)`` uint8 RGB image shrunk so that its longer side ≤ max_side."""
    import cv2  # only this helper needs OpenCV

    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise StoreInputError(f"rgb: expected a (H, W, 3) uint8 array, got {_describe(rgb)}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise StoreInputError(f"rgb: expected a non-empty image, got shape {rgb.shape}")
    if not _is_int(max_side) or not 1 <= max_side <= 4096:
        raise StoreInputError(f"max_side: expected an int in [1, 4096], got {max_side!r}")
    if not _is_int(quality) or not 1 <= quality <= 100:
        raise StoreInputError(f"quality: expected an int in [1, 100], got {quality!r}")
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))  # never upscale
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    if size != (w, h):
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise StoreError("make_thumbnail: OpenCV failed to encode the JPEG")
    return buf.tobytes()


# ---------------------------------------------------------------------- validation helpers
def _pose_row(pose) -> tuple:
    """The pose columns of an episode (all NULL without a pose)."""
    if pose is None:
        return (None,) * 8
    if not isinstance(pose, Pose):
        raise StoreInputError(f"pose: expected a bitmar_core.episodes.pose.Pose or None, got {type(pose).__name__}")
    return (pose.frame_id, *pose.position, *pose.orientation)


def _pose_from_columns(columns: Sequence) -> Pose | None:
    frame, *numbers = columns
    if frame is None:
        return None
    return Pose(frame, tuple(numbers[:3]), tuple(numbers[3:]))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"ndarray dtype={x.dtype} shape={x.shape}"
    return type(x).__name__


def _check_embedding_array(name: str, embedding, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(little-endian float32 copy, unit-normalised float32) or StoreInputError."""
    if not isinstance(embedding, np.ndarray) or embedding.dtype != np.float32:
        raise StoreInputError(f"{name}: expected a float32 array of shape ({dim},), got {_describe(embedding)}")
    if embedding.shape != (dim,):
        raise StoreInputError(f"{name}: expected shape ({dim},), got {embedding.shape}")
    if not np.isfinite(embedding).all():
        raise StoreInputError(f"{name}: expected finite values, got NaN or inf")
    norm = float(np.linalg.norm(embedding.astype(np.float64)))
    if norm == 0.0:
        raise StoreInputError(f"{name}: expected a non-zero vector (cosine similarity is undefined for 0)")
    emb = embedding.astype(_F32_LE, copy=True)
    return emb, (embedding.astype(np.float64) / norm).astype(np.float32)


def fusion_depth(k: int) -> int:
    """How many of each ranking ``search`` fuses for a top-k (see ``RRF_K``)."""
    return 2 * int(k) + RRF_K


@dataclass(frozen=True)
class FusedRank:
    """One episode's place in a fused ranking (the fields of ``Hit`` without the episode)."""

    id: int
    score: float
    lexical_score: float
    lexical_rank: int
    embedding_score: float
    embedding_rank: int


def fuse_rankings(lexical: Sequence[tuple[int, float]], every: int, embedding_ids: Sequence[int], k: int,
                  details) -> list[FusedRank]:
    """The rule of ``search``, shared by every store backend: the first ``every`` lexical rows (captions
    holding every word) first, then reciprocal rank fusion (``RRF_K``); ties: higher cosine, higher
    BM25, newer stamp, larger id. ``lexical``: (id, score) best first; ``embedding_ids``: best first;
    ``details(ids)`` → (stamps, cosines) of those ids (cosine NaN without a query embedding)."""
    fused: dict[int, float] = {}
    lex_rank: dict[int, int] = {}
    lex_score: dict[int, float] = {}
    for position, (episode_id, score) in enumerate(lexical):
        # Equal BM25 (e.g. the same caption stored twice) share a rank: the embedding decides.
        same = position > 0 and score == lexical[position - 1][1]
        lex_rank[episode_id] = lex_rank[lexical[position - 1][0]] if same else position + 1
        lex_score[episode_id] = score
        fused[episode_id] = 1.0 / (RRF_K + lex_rank[episode_id])
    emb_rank = {int(i): r + 1 for r, i in enumerate(embedding_ids)}
    for episode_id, rank in emb_rank.items():
        fused[episode_id] = fused.get(episode_id, 0.0) + 1.0 / (RRF_K + rank)
    if not fused:
        return []
    every_word = {episode_id for episode_id, _ in lexical[:every]}
    ids = np.fromiter(fused, np.int64, len(fused))
    stamps, cosine = details(ids)
    order = np.lexsort((-ids, -np.asarray(stamps, np.int64),
                        -np.array([lex_score.get(int(i), 0.0) for i in ids]),
                        -np.nan_to_num(np.asarray(cosine, np.float64), nan=-2.0),
                        -np.array([fused[int(i)] for i in ids]),
                        -np.array([int(i) in every_word for i in ids], np.int8)))[:k]
    return [FusedRank(int(ids[j]), fused[int(ids[j])], lex_score.get(int(ids[j]), 0.0), lex_rank.get(int(ids[j]), 0),
                      float(cosine[j]), emb_rank.get(int(ids[j]), 0)) for j in order]


def _check_search(text, embedding, k, start_ns, end_ns, near, check_embedding) -> np.ndarray | None:
    """The arguments of ``search`` (both stores) checked → the unit query embedding, or None."""
    if text is not None and not isinstance(text, str):
        raise StoreInputError(f"text: expected a str or None, got {type(text).__name__}")
    q = check_embedding("embedding", embedding)[1] if embedding is not None else None
    if q is None and not (text or "").strip():
        raise StoreInputError("search: expected text, an embedding, or both")
    _check_k(k)
    _check_window(start_ns, end_ns)
    if near is not None and not isinstance(near, SpatialFilter):
        raise StoreInputError(f"near: expected a SpatialFilter or None, got {type(near).__name__}")
    return q


def _check_k(k) -> None:
    if not _is_int(k) or not 1 <= k <= MAX_K:
        raise StoreInputError(f"k: expected an int in [1, {MAX_K}], got {k!r}")


def _check_window(start_ns, end_ns) -> None:
    if start_ns is not None:
        _check_stamp("start_ns", start_ns)
    if end_ns is not None:
        _check_stamp("end_ns", end_ns)
    if start_ns is not None and end_ns is not None and start_ns > end_ns:
        raise StoreInputError(f"start_ns: expected ≤ end_ns ({end_ns}), got {start_ns}")


_WORD_RE = re.compile(r"\w+")


def _check_synonyms(groups) -> tuple[tuple[str, ...], ...]:
    """Validated synonym groups: each a sequence of ≥ 2 distinct lowercase words, no word twice."""
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise StoreInputError(f"synonyms: expected a sequence of word groups, got {type(groups).__name__}")
    out, seen = [], set()
    for g in groups:
        if isinstance(g, (str, bytes)) or not isinstance(g, Sequence) or len(g) < 2:
            raise StoreInputError(f"synonyms: expected each group to be a sequence of ≥ 2 words, got {g!r:.80}")
        for w in g:
            if not isinstance(w, str) or not _WORD_RE.fullmatch(w) or w != w.lower() or w in seen:
                raise StoreInputError(f"synonyms: expected distinct lowercase words, {w!r:.40} is not one "
                                      "(or is in two groups)")
            seen.add(w)
        out.append(tuple(g))
    return tuple(out)


def _base_word(word: str, canonical: Mapping[str, str]) -> tuple[str, str] | None:
    """(group word, plural ending) if ``word`` or its plural-less form is in a synonym group."""
    if word in canonical:
        return canonical[word], ""
    for ending in ("es", "s"):  # "ellipses", "disks": the porter stemmer would join them anyway
        if len(word) > len(ending) + 2 and word.endswith(ending) and word[: -len(ending)] in canonical:
            head = canonical[word[: -len(ending)]]
            return head, "es" if head.endswith("s") else "s"
    return None


def _normalise(text: str, canonical: Mapping[str, str]) -> str:
    """``text`` with each word of a synonym group replaced by the group's first word."""
    if not canonical:
        return text

    def swap(m: re.Match) -> str:
        found = _base_word(m.group(0).lower(), canonical)
        return found[0] + found[1] if found else m.group(0)

    return _WORD_RE.sub(swap, text)


def _query_words(text: str, canonical: Mapping[str, str]) -> list[tuple[str, str]]:
    """The words of a text query that are searched, as (written, normalised): stop words out,
    each synonym group once."""
    words = [w for w in _WORD_RE.findall(text.lower()) if w.strip("_")]
    content = [w for w in words if w not in STOPWORDS] or words
    once = {_normalise(w, canonical): w for w in reversed(content)}  # the first wording of a group
    return [(w, n) for n, w in reversed(once.items())][:MAX_QUERY_TERMS]


def _check_stamp(name: str, value) -> None:
    if not _is_int(value) or not 0 <= value <= MAX_STAMP_NS:
        raise StoreInputError(f"{name}: expected an int of nanoseconds in [0, 2**63), got {value!r}")


def _check_text(name: str, value, max_bytes: int, allow_empty: bool) -> None:
    if not isinstance(value, str):
        raise StoreInputError(f"{name}: expected a str, got {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise StoreInputError(f"{name}: expected valid Unicode text, got unencodable characters ({e})") from e
    if size > max_bytes:
        raise StoreInputError(f"{name}: expected at most {max_bytes} UTF-8 bytes, got {size}")
    if not allow_empty and size == 0:
        raise StoreInputError(f"{name}: expected a non-empty string")


def _check_thumbnail(thumb) -> bytes:
    if not isinstance(thumb, (bytes, bytearray, memoryview)):
        raise StoreInputError(f"thumbnail_jpeg: expected JPEG bytes (or b''), got {type(thumb).__name__}")
    thumb = bytes(thumb)
    if len(thumb) > MAX_THUMBNAIL_BYTES:
        raise StoreInputError(f"thumbnail_jpeg: expected at most {MAX_THUMBNAIL_BYTES} bytes, got {len(thumb)}")
    if thumb and not thumb.startswith(b"\xff\xd8"):
        raise StoreInputError("thumbnail_jpeg: expected JPEG bytes (starting FF D8), got something else")
    return thumb


def _encode_state(state) -> list[tuple]:
    """Rows (name, dtype, shape json, little-endian bytes) of a memory state, validated."""
    if not isinstance(state, dict) or not state:
        raise StoreInputError(f"memory_state: expected a non-empty dict of name -> ndarray, got {state!r:.80}")
    if len(state) > MAX_STATE_TENSORS:
        raise StoreInputError(f"memory_state: expected at most {MAX_STATE_TENSORS} tensors, got {len(state)}")
    rows, total = [], 0
    for name, value in state.items():
        if not isinstance(name, str) or len(name) > MAX_STATE_NAME_CHARS or not _STATE_NAME_RE.match(name):
            raise StoreInputError(f"memory_state: tensor name {name!r} is not an identifier of "
                                  f"≤ {MAX_STATE_NAME_CHARS} chars")
        arr = np.asarray(value)
        if arr.dtype.name not in _STATE_DTYPES:
            raise StoreInputError(f"memory_state[{name!r}]: expected a numeric or bool array, got dtype {arr.dtype}")
        total += arr.nbytes
        if total > MAX_STATE_BYTES:
            raise StoreInputError(f"memory_state: expected at most {MAX_STATE_BYTES} bytes in all")
        le = np.ascontiguousarray(arr, dtype=_STATE_DTYPES[arr.dtype.name])
        rows.append((name, arr.dtype.name, json.dumps(list(arr.shape)), le.tobytes()))
    return rows


def _decode_state(rows, where: str) -> dict[str, np.ndarray] | None:
    """The memory state of ``_encode_state``'s rows read back as fresh native-order arrays; None
    without rows. A row that does not decode is a ``StoreCorruptError`` naming ``where``."""
    if not rows:
        return None
    state = {}
    for name, dtype_name, shape_json, data in rows:
        data = bytes(data)  # PostgreSQL returns a memoryview
        problem = _state_row_problem(name, dtype_name, shape_json, data)
        if problem:
            raise StoreCorruptError(f"{where}: {problem}")
        dtype = _STATE_DTYPES[dtype_name]
        arr = np.frombuffer(data, dtype=dtype).reshape(json.loads(shape_json))
        state[name] = arr.astype(dtype.newbyteorder("="), copy=True)
    return state


def _episode_by_id(episode_id, fetch) -> Episode:
    """``episode(id)`` of every store: the id checked, then ``fetch([id])`` → {id: Episode};
    ``KeyError`` if there is none."""
    if not _is_int(episode_id):
        raise StoreInputError(f"episode_id: expected an int, got {episode_id!r}")
    found = fetch([int(episode_id)])
    if not found:
        raise KeyError(f"episode_id {episode_id} not in the store")
    return found[int(episode_id)]


def _state_row_problem(name, dtype_name, shape_json, data) -> str | None:
    if dtype_name not in _STATE_DTYPES:
        return f"memory_state[{name!r}]: unknown dtype {dtype_name!r}"
    try:
        shape = json.loads(shape_json)
        ok = isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        return f"memory_state[{name!r}]: bad shape {shape_json!r}"
    expected = int(np.prod(shape, dtype=np.int64)) * _STATE_DTYPES[dtype_name].itemsize
    if not isinstance(data, bytes) or len(data) != expected:
        return f"memory_state[{name!r}]: {len(data) if isinstance(data, bytes) else type(data).__name__} bytes, " \
               f"expected {expected} for {dtype_name}{tuple(shape)}"
    return None
