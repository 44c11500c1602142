"""EpisodeStore: the perception node's persistent episodic store.

One SQLite database (WAL, synchronous=FULL) holds the episodes and the episodic memory state
that their writes produced, committed together, so a SIGKILL at any moment leaves a readable
store in which memory and episodes agree. Pure Python/numpy/sqlite3: no ROS, no torch.

Layout of ``<directory>/episodes.sqlite3`` (schema version 3):

- ``meta(key, value)``: ``schema_version``, ``embedding_dim``, ``identity`` (the model/config
  identity string of the writer; opening with another one is refused).
- ``episodes(id, stamp_ns, caption, source, embedding, thumbnail, pose_frame, px, py, pz, qx, qy, qz, qw)``:
  ``pose_frame`` NULL when the episode has no pose (version-2 stores migrate to that), else the
  frame of the pose (``bitmar_core.episodes.pose.Pose``) where the camera was. ``embedding`` is ``dim``
  little-endian float32, ``thumbnail`` JPEG bytes (or empty). Ids come from AUTOINCREMENT, so they
  grow monotonically and are never reused, not even after ``clear()``. Generated descriptions are
  episodes too (``source='description'``), so they are searched like captions.
- ``episodes_fts(caption, canon)``: an FTS5 full-text index of every caption, rowid = episode id,
  written in the same transaction as its episode and deleted with it. Tokenized ``porter
  unicode61`` so that case and plurals match ("Cats" finds "cat"). ``canon`` is the caption with
  each word of a synonym group replaced by the group's first word (``meta.search_synonyms``, e.g.
  "violet" → "purple"), so that a synonym matches, and counts as one word; ``caption`` is the
  caption as written, so that the very words of a query score higher than their synonyms.
  Version-1 stores (no index) are migrated on open; a store opened with other synonym groups is
  re-indexed.
- ``memory_state(name, dtype, shape, data)``: named tensors (``M``, ``usage``, ``n_writes``, ...)
  as raw little-endian bytes. It is replaced as a whole, in the same transaction as the episode
  whose write produced it.

Retention (``enforce_retention``, ``RetentionPolicy``) and ``forget`` delete episodes with their
index entries in one transaction per batch; a new store uses ``auto_vacuum = INCREMENTAL`` so that
freed pages go back to the file system, and the WAL is truncated to ``WAL_SIZE_LIMIT`` after each
pass, so the store's disk stays within a budget.

Retrieval (``search``) fuses two rankings by reciprocal rank: BM25 of the query's words against the
captions (``lexical_search``) and cosine similarity of the model's embeddings (``query``), both
restricted to the same time window (``store_api.fuse_rankings``, shared with the PostgreSQL store;
why that rule is in ``store_api.RRF_K``'s comment).

Concurrency: one ``sqlite3`` connection guarded by one re-entrant lock; every public method takes
it, so one writer thread and any number of reader threads (e.g. a ROS service thread) may share an
``EpisodeStore``. Embedding queries are brute force over an in-RAM float32 matrix of unit-normalised
embeddings that is appended to only after a commit returns, so it never holds an uncommitted
episode and a failed write leaves it untouched. Only one process should write a store at a time.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Sequence

import numpy as np

from .pose import Pose, PoseError
from .store_api import (_F32_LE, MAX_EMBEDDING_DIM, MAX_IDENTITY_BYTES, MAX_STAMP_NS, MAX_THUMBNAIL_BYTES,
                        _POSE_SELECT, SCHEMA_VERSION, Episode, Hit, NewEpisode, RetentionPolicy, RetentionReport,
                        SpatialFilter, StoreClosedError, StoreCorruptError, StoreError, StoreInputError,
                        StoreMismatchError, StoreNotFoundError, StoreVersionError, StoreWriteError,
                        _check_embedding_array, check_episode, _check_k, check_new_episode, _check_search,
                        _check_synonyms, _check_text, _check_window, _decode_state, _encode_state, _episode_by_id,
                        fuse_rankings, fusion_depth, _is_int, _normalise, _pose_from_columns, _query_words,
                        _state_row_problem)

MIGRATABLE_VERSIONS = ("1", "2")  # older schemas that open() upgrades in place
DB_FILENAME = "episodes.sqlite3"
BUSY_TIMEOUT_MS = 5000
WAL_SIZE_LIMIT = 4 * 1024 * 1024  # journal_size_limit: the WAL file is cut back to this after a checkpoint
RETENTION_BATCH = 2000  # episodes deleted per transaction: one batch holds the write lock ~10 ms

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE episodes ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " stamp_ns INTEGER NOT NULL CHECK (stamp_ns >= 0),"
    " caption TEXT NOT NULL,"
    " source TEXT NOT NULL,"
    " embedding BLOB NOT NULL,"  # before the thumbnail: loading the index skips overflow pages
    " thumbnail BLOB NOT NULL,"
    " pose_frame TEXT, px REAL, py REAL, pz REAL, qx REAL, qy REAL, qz REAL, qw REAL)",
    "CREATE INDEX episodes_stamp ON episodes (stamp_ns)",
    "CREATE TABLE memory_state ("
    " name TEXT PRIMARY KEY, dtype TEXT NOT NULL, shape TEXT NOT NULL, data BLOB NOT NULL)",
)
# Schema version 2: the full-text index. It holds its own copy of the text: the normalised column is
# not a column of ``episodes``, so FTS5's external-content form cannot be used.
_FTS_SCHEMA = ("CREATE VIRTUAL TABLE episodes_fts USING fts5(caption, canon, tokenize='porter unicode61')",)
# Schema version 3: where each episode was recorded (NULL pose_frame: no pose).
_POSE_COLUMNS = ("pose_frame TEXT", "px REAL", "py REAL", "pz REAL", "qx REAL", "qy REAL", "qz REAL", "qw REAL")
_EPISODE_COLUMNS = "id, stamp_ns, caption, source, embedding, thumbnail, pose_frame, px, py, pz, qx, qy, qz, qw"
_TABLES = {"meta", "episodes", "memory_state"}
_TABLES_V2 = _TABLES | {"episodes_fts"}


class _EmbeddingIndex:
    """Unit-normalised embeddings, ids, stamps and planar positions (NaN without a pose; ``frames``
    indexes ``frame_names``, -1 without a pose) of every committed episode, in id order."""

    _ARRAYS = ("unit", "ids", "stamps", "xy", "frames")

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.n = 0
        self.unit = np.zeros((0, dim), np.float32)
        self.ids = np.zeros(0, np.int64)
        self.stamps = np.zeros(0, np.int64)
        self.xy = np.zeros((0, 2), np.float64)
        self.frames = np.zeros(0, np.int32)
        self.frame_names: dict[str, int] = {}

    def reserve(self, extra: int) -> None:
        # Grown before a transaction so that recording a committed episode cannot fail.
        need = self.n + extra
        if need <= len(self.ids):
            return
        cap = max(need, 2 * len(self.ids), 64)
        for name in self._ARRAYS:
            old = getattr(self, name)
            new = np.zeros((cap,) + old.shape[1:], old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)

    def append(self, episode_id: int, stamp_ns: int, unit: np.ndarray, pose: "Pose | None" = None) -> None:
        self.unit[self.n], self.ids[self.n], self.stamps[self.n] = unit, episode_id, stamp_ns
        if pose is None:
            self.xy[self.n], self.frames[self.n] = np.nan, -1
        else:
            self.xy[self.n] = pose.position[:2]
            self.frames[self.n] = self.frame_names.setdefault(pose.frame_id, len(self.frame_names))
        self.n += 1

    def remove(self, ids: Sequence[int]) -> None:
        """Drop these episodes (after the transaction that deleted them committed)."""
        keep = ~np.isin(self.ids[: self.n], np.asarray(list(ids), np.int64))
        for name in self._ARRAYS:
            setattr(self, name, np.ascontiguousarray(getattr(self, name)[: self.n][keep]))
        self.n = int(keep.sum())

    def near(self, spatial: "SpatialFilter") -> np.ndarray:
        """Mask over the first n rows: recorded within the filter's radius in its frame."""
        f = self.frame_names.get(spatial.frame_id)
        if f is None:
            return np.zeros(self.n, bool)
        d2 = (self.xy[: self.n, 0] - spatial.x) ** 2 + (self.xy[: self.n, 1] - spatial.y) ** 2
        return (self.frames[: self.n] == f) & (d2 <= spatial.radius_m ** 2)

    def reset(self) -> None:
        self.__init__(self.dim)


class EpisodeStore:
    """Persistent episodes + episodic memory state; see the module docstring for the layout."""

    read_only = False  # True when opened by ``open_read_only``
    robot_id = ""      # one robot per SQLite store; the fleet store (store_pg) names each episode's robot

    def __init__(self, conn: sqlite3.Connection, path: Path, embedding_dim: int, identity: str) -> None:
        """Use ``EpisodeStore.open``."""
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.RLock()
        self.path = path
        self.embedding_dim = embedding_dim
        self.identity = identity
        self._index = _EmbeddingIndex(embedding_dim)
        self.synonym_groups: tuple[tuple[str, ...], ...] = ()
        self._canonical: dict[str, str] = {}  # word → its synonym group's first word

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, directory: str | os.PathLike, embedding_dim: int, identity: str,
             create: bool = True, synonyms: Sequence[Sequence[str]] | None = None) -> "EpisodeStore":
        """Open the store under ``directory``, creating it (dir 0o700, files 0o600) if allowed.

        An existing file that is not a valid store of this schema version, embedding dimension
        and identity raises a ``StoreError`` subclass and is left byte-for-byte untouched. A valid
        schema-1 store is migrated. ``synonyms``: groups of words that the full-text search treats
        as one word (None: keep the store's own; other groups than the store's re-index it).
        """
        groups = _check_synonyms(synonyms) if synonyms is not None else None
        if not _is_int(embedding_dim) or not 1 <= embedding_dim <= MAX_EMBEDDING_DIM:
            raise StoreInputError(
                f"embedding_dim: expected an int in [1, {MAX_EMBEDDING_DIM}], got {embedding_dim!r}")
        _check_text("identity", identity, MAX_IDENTITY_BYTES, allow_empty=False)
        directory = Path(directory)
        path = directory / DB_FILENAME
        # An empty file or a database without tables holds nothing to lose: a process killed
        # while creating the store leaves one of those, and it is initialised like a new store.
        if not path.exists() or path.stat().st_size == 0 or \
                not cls._validate_existing(path, int(embedding_dim), identity):
            if not create:
                raise StoreNotFoundError(f"no episode store at {path} (open with create=True to make one)")
            return cls._create(directory, path, int(embedding_dim), identity, groups or ())
        conn = cls._connect(path)
        store = cls(conn, path, int(embedding_dim), identity)
        try:
            store._prepare_text_index(groups)
            store._load_index()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def _create(cls, directory: Path, path: Path, dim: int, identity: str,
                groups: tuple[tuple[str, ...], ...]) -> "EpisodeStore":
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True)
            os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        elif not directory.is_dir():
            raise StoreInputError(f"directory: expected a directory, {directory} is not one")
        try:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        except OSError as e:
            raise StoreWriteError(f"cannot create {path}: {e}") from e
        try:
            os.fchmod(fd, 0o600)  # SQLite gives -wal/-shm the database file's mode
        finally:
            os.close(fd)
        conn = cls._connect(path)
        try:
            # Before the first table: freed pages (retention, forget) can then go back to the disk.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] != 0:
                # Another process initialised it between our check and now: validate instead.
                conn.execute("ROLLBACK")
                conn.close()
                if not cls._validate_existing(path, dim, identity):
                    raise StoreCorruptError(f"{path}: has tables, yet shows none to a reader")
                conn = cls._connect(path)
                store = cls(conn, path, dim, identity)
                store._prepare_text_index(groups)
                store._load_index()
                return store
            else:
                for sql in _SCHEMA + _FTS_SCHEMA:
                    conn.execute(sql)
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("embedding_dim", str(dim)),
                    ("identity", identity),
                    ("search_synonyms", json.dumps([list(g) for g in groups])),
                ])
                conn.execute("COMMIT")
                if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                    conn.execute("VACUUM")  # WAL mode wrote the header first: the new mode needs a rebuild (empty: instant)
        except sqlite3.Error as e:
            conn.close()
            raise StoreWriteError(f"cannot initialise the episode store at {path}: {e}") from e
        store = cls(conn, path, dim, identity)
        store._use_synonyms(groups)
        store._load_index()
        return store

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open {path} read-write: {e}") from e
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{path}: SQLite refused WAL mode (journal_mode is {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")  # a returned COMMIT survives power loss
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        except BaseException as e:
            conn.close()
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"cannot open {path} read-write (is it writable?): {e}") from e
            raise
        return conn

    @staticmethod
    def _validate_existing(path: Path, dim: int, identity: str) -> bool:
        """True if ``path`` is a valid store for (dim, identity), False if it has no tables yet."""
        # Read-only connection: nothing here can write, checkpoint or "repair" the file.
        uri = f"file:{urllib.parse.quote(path.resolve().as_posix())}?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreCorruptError(f"{path}: cannot open as SQLite database: {e}") from e
        try:
            objects = conn.execute("SELECT type, name FROM sqlite_master").fetchall()
            if not objects:
                return False
            tables = {name for kind, name in objects if kind == "table"}
            if not _TABLES <= tables:
                raise StoreCorruptError(
                    f"{path}: not an episode store (expected tables {sorted(_TABLES)}, found {sorted(tables)})")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise StoreCorruptError(f"{path}: not a readable SQLite database ({e}); left untouched") from e
        finally:
            conn.close()
        version = meta.get("schema_version")
        if version in ("2", str(SCHEMA_VERSION)) and not _TABLES_V2 <= tables:
            raise StoreCorruptError(f"{path}: schema version {version} without its full-text index "
                                    f"(expected tables {sorted(_TABLES_V2)}, found {sorted(tables)})")
        if version != str(SCHEMA_VERSION) and version not in MIGRATABLE_VERSIONS:
            raise StoreVersionError(
                f"{path}: schema_version is {version!r}, this code reads {SCHEMA_VERSION} "
                f"(and migrates {', '.join(MIGRATABLE_VERSIONS)}); left untouched (choose another directory)")
        if meta.get("embedding_dim") != str(dim):
            raise StoreMismatchError(
                f"{path}: stores embedding_dim {meta.get('embedding_dim')!r}, opened with {dim}; left untouched")
        if meta.get("identity") != identity:
            raise StoreMismatchError(
                f"{path}: written by model identity {meta.get('identity')!r}, opened with {identity!r}; "
                "left untouched (use another directory or the matching model)")
        return True

    def _use_synonyms(self, groups: tuple[tuple[str, ...], ...]) -> None:
        self.synonym_groups = groups
        self._canonical = {w: g[0] for g in groups for w in g}

    def _prepare_text_index(self, groups: tuple[tuple[str, ...], ...] | None) -> None:
        """Migrate an older store (schema 1: index every caption already stored; 1 and 2: add the
        pose columns, every old episode without a pose), or re-index a store whose synonym groups
        differ from ``groups``; one transaction either way, so a failure leaves the store as it was.
        ``groups`` None keeps the store's own."""
        conn = self._require_open()

        def state() -> tuple[str, tuple[tuple[str, ...], ...]]:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            try:
                stored = _check_synonyms(json.loads(meta.get("search_synonyms", "[]")))
            except (ValueError, TypeError, StoreInputError) as e:
                raise StoreCorruptError(f"{self.path}: meta search_synonyms is unreadable ({e})") from e
            return meta["schema_version"], stored

        version, stored = self._read(state)
        wanted = stored if groups is None else groups
        if version == str(SCHEMA_VERSION) and stored == wanted:
            self._use_synonyms(stored)
            return

        def reindex() -> None:
            # Read again inside the write lock: another process may have done it meanwhile.
            version, stored = state()
            if version == str(SCHEMA_VERSION) and stored == wanted:
                return
            if version in ("1", "2"):
                for column in _POSE_COLUMNS:
                    conn.execute(f"ALTER TABLE episodes ADD COLUMN {column}")
            if version != "1" and stored == wanted:
                pass  # the index is right as it is
            elif version != "1":
                conn.execute("DELETE FROM episodes_fts")
            else:
                for sql in _FTS_SCHEMA:
                    conn.execute(sql)
            if version == "1" or stored != wanted:
                canonical = {w: g[0] for g in wanted for w in g}
                rows = conn.execute("SELECT id, caption FROM episodes").fetchall()
                conn.executemany("INSERT INTO episodes_fts (rowid, caption, canon) VALUES (?, ?, ?)",
                                 [(i, c, _normalise(c, canonical)) for i, c in rows])
            conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [
                ("schema_version", str(SCHEMA_VERSION)), ("search_synonyms", json.dumps([list(g) for g in wanted]))])

        what = (f"migrate schema {version} → {SCHEMA_VERSION}" if version != str(SCHEMA_VERSION)
                else "re-index the captions for new synonym groups")
        with self._lock:
            self._transaction(what, reindex)
        self._use_synonyms(wanted)

    def _load_index(self) -> None:
        with self._lock:
            conn = self._require_open()
            index = _EmbeddingIndex(self.embedding_dim)
            try:
                rows = conn.execute(f"SELECT id, stamp_ns, embedding, {_POSE_SELECT} FROM episodes ORDER BY id").fetchall()
            except sqlite3.DatabaseError as e:
                raise StoreCorruptError(f"{self.path}: episodes unreadable: {e}") from e
            index.reserve(len(rows))
            for episode_id, stamp_ns, blob, *pose in rows:
                emb = self._decode_embedding(episode_id, blob)
                norm = float(np.linalg.norm(emb))
                if not np.isfinite(emb).all() or norm == 0.0:
                    raise StoreCorruptError(f"{self.path}: episode {episode_id} has a non-finite or zero embedding")
                index.append(episode_id, stamp_ns, emb / norm, self._decode_pose(episode_id, pose))
            self._index = index

    @classmethod
    def describe(cls, directory: str | os.PathLike) -> tuple[int, str]:
        """(embedding_dim, identity) of the store under ``directory``, read without writing anything:
        what a tool needs to open a store it did not create (export, inspection)."""
        path = Path(directory) / DB_FILENAME
        if not path.is_file():
            raise StoreNotFoundError(f"no episode store at {path}")
        uri = f"file:{urllib.parse.quote(path.resolve().as_posix())}?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None)
            try:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            finally:
                conn.close()
            return int(meta["embedding_dim"]), meta["identity"]
        except (sqlite3.Error, KeyError, ValueError) as e:
            raise StoreCorruptError(f"{path}: not an episode store with readable meta ({e}); left untouched") from e

    # ------------------------------------------------------------------ reading beside a writer
    @classmethod
    def open_read_only(cls, directory: str | os.PathLike, embedding_dim: int, identity: str) -> "EpisodeStore":
        """Open an existing store for reading only, e.g. beside the node that writes it: in WAL mode
        readers and the writer do not block each other. Nothing is created, migrated or written
        (a write raises ``StoreWriteError``). The embedding index holds what was committed at open;
        ``refresh()`` or ``snapshot()`` take in what the writer committed since."""
        if not _is_int(embedding_dim) or not 1 <= embedding_dim <= MAX_EMBEDDING_DIM:
            raise StoreInputError(
                f"embedding_dim: expected an int in [1, {MAX_EMBEDDING_DIM}], got {embedding_dim!r}")
        _check_text("identity", identity, MAX_IDENTITY_BYTES, allow_empty=False)
        path = Path(directory) / DB_FILENAME
        if not path.is_file() or path.stat().st_size == 0 or \
                not cls._validate_existing(path, int(embedding_dim), identity):
            raise StoreNotFoundError(f"no episode store at {path} (a read-only open creates none)")
        uri = f"file:{urllib.parse.quote(path.resolve().as_posix())}?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open {path} read-only: {e}") from e
        store = cls(conn, path, int(embedding_dim), identity)
        store.read_only = True
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA query_only = ON")
            store._prepare_text_index(None)  # the store's own synonym groups
            store._load_index()
        except BaseException as e:
            store.close()
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"cannot open {path} read-only: {e}") from e
            raise
        return store

    def refresh(self) -> int:
        """Take in the episodes that another connection committed since the open or the last
        refresh (the whole index again after a ``clear()`` there). Returns the episode count."""
        with self._lock:
            conn = self._require_open()
            n = self._index.n
            last = int(self._index.ids[n - 1]) if n else 0
            rows = self._read(lambda: conn.execute(
                f"SELECT id, stamp_ns, embedding, {_POSE_SELECT} FROM episodes WHERE id > ? ORDER BY id",
                (last,)).fetchall())
            total = self._read(lambda: conn.execute("SELECT count(*) FROM episodes").fetchone()[0])
            if total != n + len(rows):  # episodes went (a clear), or more came between the two reads
                self._load_index()
                return self._index.n
            units = []
            for episode_id, stamp_ns, blob, *pose in rows:
                emb = self._decode_embedding(episode_id, blob)
                norm = float(np.linalg.norm(emb))
                if not np.isfinite(emb).all() or norm == 0.0:
                    raise StoreCorruptError(f"{self.path}: episode {episode_id} has a non-finite or zero embedding")
                units.append((episode_id, stamp_ns, emb / norm, self._decode_pose(episode_id, pose)))
            self._index.reserve(len(units))
            for episode_id, stamp_ns, unit, pose in units:
                self._index.append(episode_id, stamp_ns, unit, pose)
            return self._index.n

    @contextmanager
    def snapshot(self):
        """A block whose reads all see one committed state of the database (one read transaction),
        with the index refreshed to it, so that a full-text match is never an episode the index
        has not taken in. For a reader beside a live writer; keep it short, since the writer's
        WAL checkpoint (``checkpoint()``) waits for it."""
        with self._lock:
            conn = self._require_open()
            conn.execute("BEGIN")
            try:
                self.refresh()
                yield self
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    # ------------------------------------------------------------------ writing
    def add_episode(self, stamp_ns: int, caption: str, source: str, embedding: np.ndarray,
                    thumbnail_jpeg: bytes = b"",
                    memory_state: dict[str, np.ndarray] | None = None, pose: Pose | None = None) -> int:
        """Store one episode (with the ``pose`` it was recorded at, if known), and the memory state
        its write produced, in one transaction.

        Returns the new episode id. Raises ``StoreInputError`` for bad arguments and
        ``StoreWriteError`` if the write fails (then nothing of this call is stored).
        """
        emb, unit, thumb, pose_row = check_episode("", stamp_ns, caption, source, embedding, thumbnail_jpeg, pose,
                                                    self._check_embedding)
        state_rows = _encode_state(memory_state) if memory_state is not None else None

        with self._lock:
            conn = self._require_open()
            self._index.reserve(1)

            def write() -> int:
                cur = conn.execute(
                    f"INSERT INTO episodes (stamp_ns, caption, source, embedding, thumbnail, {_POSE_SELECT}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (int(stamp_ns), caption, source, emb.tobytes(), thumb, *pose_row))
                conn.execute("INSERT INTO episodes_fts (rowid, caption, canon) VALUES (?, ?, ?)",
                             (cur.lastrowid, caption, _normalise(caption, self._canonical)))
                if state_rows is not None:
                    self._replace_state(conn, state_rows)
                return int(cur.lastrowid)

            episode_id = self._transaction("add_episode", write)
            self._index.append(episode_id, int(stamp_ns), unit, pose)
            return episode_id

    def add_episodes(self, episodes: Sequence[NewEpisode],
                     memory_state: dict[str, np.ndarray] | None = None) -> list[int]:
        """Store many episodes (and a memory state) in one transaction: all or none. For imports and
        bulk loads, where one fsync per episode would dominate; the node records one at a time."""
        rows = [check_new_episode(n, e, self._check_embedding) for n, e in enumerate(episodes)]
        state_rows = _encode_state(memory_state) if memory_state is not None else None
        with self._lock:
            conn = self._require_open()
            self._index.reserve(len(rows))

            def write() -> list[int]:
                ids = []
                for e, emb, _, thumb, pose_row in rows:
                    cur = conn.execute(
                        f"INSERT INTO episodes (stamp_ns, caption, source, embedding, thumbnail, {_POSE_SELECT}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (int(e.stamp_ns), e.caption, e.source, emb.tobytes(), thumb, *pose_row))
                    conn.execute("INSERT INTO episodes_fts (rowid, caption, canon) VALUES (?, ?, ?)",
                                 (cur.lastrowid, e.caption, _normalise(e.caption, self._canonical)))
                    ids.append(int(cur.lastrowid))
                if state_rows is not None:
                    self._replace_state(conn, state_rows)
                return ids

            ids = self._transaction("add_episodes", write)
            for episode_id, (e, _, unit, _, _) in zip(ids, rows):
                self._index.append(episode_id, int(e.stamp_ns), unit, e.pose)
            return ids

    def put_memory_state(self, state: dict[str, np.ndarray]) -> None:
        """Replace the whole stored memory state (one transaction)."""
        rows = _encode_state(state)
        with self._lock:
            conn = self._require_open()
            self._transaction("put_memory_state", lambda: self._replace_state(conn, rows))

    def clear(self) -> None:
        """Delete every episode and the memory state in one transaction (ids are not reused)."""
        with self._lock:
            conn = self._require_open()

            def write() -> None:
                conn.execute("DELETE FROM episodes")
                conn.execute("DELETE FROM episodes_fts")
                conn.execute("DELETE FROM memory_state")

            self._transaction("clear", write)
            self._index.reset()

    def forget(self, ids: Sequence[int] | None = None, start_ns: int | None = None, end_ns: int | None = None,
               caption_contains: str | None = None) -> list[int]:
        """Delete the episodes that meet every criterion given (ids among ``ids``; stamp within
        [start_ns, end_ns]; caption containing ``caption_contains``, case-insensitive), with their
        full-text entries, in one transaction per batch; returns the deleted ids. At least one
        criterion is required (``clear`` forgets everything). The memory state is left as it is:
        the model's memory matrix holds a superposition of every write, which no row deletion undoes."""
        if ids is not None:
            ids = list(ids)
            bad = [i for i in ids if not _is_int(i) or i < 0]
            if bad:
                raise StoreInputError(f"ids: expected non-negative episode ids, got {bad[:5]!r}")
        if caption_contains is not None and (not isinstance(caption_contains, str) or not caption_contains):
            raise StoreInputError(f"caption_contains: expected a non-empty str or None, got {caption_contains!r}")
        _check_window(start_ns, end_ns)
        if ids is None and start_ns is None and end_ns is None and caption_contains is None:
            raise StoreInputError("forget: expected ids, a time range or a caption match (clear() forgets everything)")
        with self._lock:
            self._require_open()
            n = self._index.n
            keep = np.ones(n, bool)
            if ids is not None:
                keep &= np.isin(self._index.ids[:n], np.asarray(ids, np.int64))
            if start_ns is not None:
                keep &= self._index.stamps[:n] >= int(start_ns)
            if end_ns is not None:
                keep &= self._index.stamps[:n] <= int(end_ns)
            chosen = self._index.ids[:n][keep].tolist()
            if caption_contains is not None and chosen:
                conn = self._require_open()
                needle = caption_contains.lower()
                matching = []
                for start in range(0, len(chosen), 500):
                    chunk = chosen[start:start + 500]
                    marks = ",".join("?" * len(chunk))
                    matching += [r[0] for r in self._read(lambda: conn.execute(
                        f"SELECT id FROM episodes WHERE id IN ({marks}) AND instr(lower(caption), ?) > 0",
                        [*chunk, needle]).fetchall())]
                chosen = sorted(matching)
            self._delete(chosen, "forget")
            self.compact()
            return [int(i) for i in chosen]

    def bytes_used(self) -> int:
        """Bytes of the database's pages in use (the file less its free pages)."""
        with self._lock:
            conn = self._require_open()
            page_size, pages, free = self._read(lambda: (
                conn.execute("PRAGMA page_size").fetchone()[0], conn.execute("PRAGMA page_count").fetchone()[0],
                conn.execute("PRAGMA freelist_count").fetchone()[0]))
            return int(page_size) * (int(pages) - int(free))

    def enforce_retention(self, policy: RetentionPolicy, now_ns: int | None = None) -> RetentionReport:
        """Delete episodes until the store is within ``policy`` (see ``RetentionPolicy``): first those
        older than ``max_age_s`` before ``now_ns`` (default: the newest stamp), then, if a count or
        byte limit is exceeded, thinned episodes and the oldest down to the limit's low water. Each
        batch of ``RETENTION_BATCH`` deletions is one transaction with the full-text index, so a kill
        at any moment leaves a consistent store that lost only episodes this pass chose. Ends with
        ``compact()`` when anything was deleted. The newest episode is never deleted."""
        if not isinstance(policy, RetentionPolicy):
            raise StoreInputError(f"policy: expected a RetentionPolicy, got {type(policy).__name__}")
        deleted = thinned = 0
        with self._lock:
            self._require_open()
            n = self._index.n
            if n == 0 or not policy.active:
                return RetentionReport(0, 0, self.bytes_used() if policy.max_bytes else 0, n)
            order = np.lexsort((self._index.ids[:n], self._index.stamps[:n]))  # oldest first
            doomed: list[int] = []
            if policy.max_age_s:
                now = int(now_ns) if now_ns is not None else int(self._index.stamps[:n].max())
                cutoff = now - int(policy.max_age_s * 1e9)
                old = order[self._index.stamps[:n][order] < cutoff][: n - 1]
                doomed = self._index.ids[:n][old].tolist()
                if doomed:
                    self._delete(doomed, "retention (age)")
                    deleted += len(doomed)
            excess = self._excess(policy)
            if excess > 0 and policy.thin_interval_s > 0:
                victims = self._thinnable(policy, excess)
                self._delete(victims, "retention (thinning)")
                deleted += len(victims)
                thinned += len(victims)
                excess = self._excess(policy)
            while excess > 0 and self._index.n > 1:
                n = self._index.n
                order = np.lexsort((self._index.ids[:n], self._index.stamps[:n]))
                victims = self._index.ids[:n][order[: min(excess, n - 1)]].tolist()
                self._delete(victims, "retention (oldest)")
                deleted += len(victims)
                excess = self._excess(policy)
            if deleted:
                self.compact()
            return RetentionReport(deleted, thinned, self.bytes_used(), self._index.n)

    def _excess(self, policy: RetentionPolicy) -> int:
        """How many more episodes to delete for ``policy``'s count and byte limits (0: within them).
        Over a limit, the target is its low water; bytes are estimated from the mean episode size,
        and the caller's loop measures again after each deletion."""
        n = self._index.n
        need = 0
        if policy.max_count and n > policy.max_count:
            need = n - int(policy.max_count * policy.low_water)
        if policy.max_bytes and n:
            used = self.bytes_used()
            if used > policy.max_bytes:
                per_episode = used / n
                need = max(need, int(np.ceil((used - policy.low_water * policy.max_bytes) / per_episode)), 1)
        return min(need, max(n - 1, 0))

    def _thinnable(self, policy: RetentionPolicy, limit: int) -> list[int]:
        """Oldest first, up to ``limit`` episodes recorded within ``thin_interval_s`` of the episode
        kept before them with a cosine ≥ ``thin_min_cosine`` to it (the scene did not change)."""
        n = self._index.n
        order = np.lexsort((self._index.ids[:n], self._index.stamps[:n]))
        interval = int(policy.thin_interval_s * 1e9)
        stamps, unit, ids = self._index.stamps[:n], self._index.unit[:n], self._index.ids[:n]
        victims: list[int] = []
        kept = order[0]
        for row in order[1:-1]:  # the newest stays
            if stamps[row] - stamps[kept] < interval and float(unit[row] @ unit[kept]) >= policy.thin_min_cosine:
                victims.append(int(ids[row]))
                if len(victims) >= limit:
                    break
            else:
                kept = row
        return victims

    def _delete(self, ids: list[int], what: str) -> None:
        """Delete episodes and their index entries, ``RETENTION_BATCH`` per transaction; the RAM
        index follows each commit."""
        conn = self._require_open()
        for start in range(0, len(ids), RETENTION_BATCH):
            batch = ids[start:start + RETENTION_BATCH]

            def write() -> None:
                for i in range(0, len(batch), 500):
                    chunk = batch[i:i + 500]
                    marks = ",".join("?" * len(chunk))
                    conn.execute(f"DELETE FROM episodes WHERE id IN ({marks})", chunk)
                    conn.execute(f"DELETE FROM episodes_fts WHERE rowid IN ({marks})", chunk)

            self._transaction(what, write)
            self._index.remove(batch)

    def compact(self) -> None:
        """Give freed pages back to the file system (incremental vacuum, where the store has it) and
        fold the WAL into the database, cut back to ``WAL_SIZE_LIMIT``. A checkpoint that a reader
        holds up is left for the next pass; nothing here can lose a committed episode."""
        with self._lock:
            conn = self._require_open()
            try:
                if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
                    # executescript steps the pragma to its end: execute() steps it once, one page
                    conn.executescript("PRAGMA incremental_vacuum;")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error as e:
                raise StoreWriteError(f"compacting {self.path} failed: {e}") from e

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate it (the "save memory" service)."""
        with self._lock:
            conn = self._require_open()
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error as e:
                raise StoreWriteError(f"checkpoint of {self.path} failed: {e}") from e
            if busy:
                raise StoreWriteError(f"checkpoint of {self.path} incomplete: another connection is reading")

    def close(self) -> None:
        """Close the database (idempotent); later calls raise ``StoreClosedError``."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "EpisodeStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def count(self) -> int:
        """Number of stored episodes."""
        with self._lock:
            self._require_open()
            return self._index.n

    def episode(self, episode_id: int) -> Episode:
        """The episode with this id; ``KeyError`` if there is none."""
        return _episode_by_id(episode_id, self._fetch)

    def all_episodes(self) -> list[Episode]:
        """Every episode, oldest id first."""
        with self._lock:
            conn = self._require_open()
            rows = self._read(lambda: conn.execute(
                f"SELECT {_EPISODE_COLUMNS} FROM episodes ORDER BY id").fetchall())
            return [self._row_to_episode(r) for r in rows]

    def memory_state(self) -> dict[str, np.ndarray] | None:
        """The last stored memory state (fresh writable arrays), or None if none was stored."""
        with self._lock:
            conn = self._require_open()
            rows = self._read(lambda: conn.execute(
                "SELECT name, dtype, shape, data FROM memory_state ORDER BY name").fetchall())
        return _decode_state(rows, str(self.path))

    def episodes_by_time(self, limit: int, offset: int = 0, newest_first: bool = True,
                         start_ns: int | None = None, end_ns: int | None = None) -> list[Episode]:
        """A page of episodes in time order (stamp, then id; newest first unless ``newest_first``
        is False), skipping ``offset``, each with ``start_ns <= stamp_ns <= end_ns`` (bounds
        optional): what a timeline shows."""
        _check_k(limit)
        if not _is_int(offset) or offset < 0:
            raise StoreInputError(f"offset: expected an int ≥ 0, got {offset!r}")
        _check_window(start_ns, end_ns)
        order = "DESC" if newest_first else "ASC"
        bounds = (int(start_ns) if start_ns is not None else 0, int(end_ns) if end_ns is not None else MAX_STAMP_NS)
        with self._lock:
            conn = self._require_open()
            rows = self._read(lambda: conn.execute(
                f"SELECT {_EPISODE_COLUMNS} FROM episodes"
                f" WHERE stamp_ns BETWEEN ? AND ? ORDER BY stamp_ns {order}, id {order} LIMIT ? OFFSET ?",
                (*bounds, int(limit), int(offset))).fetchall())
            return [self._row_to_episode(r) for r in rows]

    def query(self, embedding: np.ndarray, k: int, start_ns: int | None = None,
              end_ns: int | None = None) -> list[tuple[Episode, float]]:
        """The k episodes most cosine-similar to ``embedding``, best first, with their scores.

        Only episodes with ``start_ns <= stamp_ns <= end_ns`` (each bound optional) compete.
        Equal scores rank the newer episode (larger stamp_ns, then larger id) first.
        """
        _, q = self._check_embedding("embedding", embedding)
        _check_k(k)
        _check_window(start_ns, end_ns)
        with self._lock:
            ids, scores = self._embedding_ranking(q, k, start_ns, end_ns)
            episodes = self._fetch([int(i) for i in ids])
            return [(episodes[int(i)], float(sc)) for i, sc in zip(ids, scores)]

    def lexical_search(self, text: str, limit: int, start_ns: int | None = None,
                       end_ns: int | None = None) -> list[tuple[int, float]]:
        """(episode id, BM25 score) of the captions that share words with ``text``, best first.

        ``text`` is free text: its words (letters and digits) are searched one by one, each as a
        quoted FTS5 string, so quotes, ``*``, ``-``, ``NEAR``, parentheses or a lone ``AND`` are
        plain words, never query syntax. Stop words are skipped unless nothing else is left; a
        word of a synonym group stands for the whole group, and scores higher as written.

        The captions that hold every word, by BM25 (FTS5's ``bm25``, negated so that higher is
        better; equal scores: newer id first). When none does, words that no caption holds are
        dropped and the rest must all be held; when still none, the captions that hold some of
        the words (those held by at most half the captions), by BM25. Only episodes with
        ``start_ns <= stamp_ns <= end_ns`` compete. No word: an empty list.
        """
        if not isinstance(text, str):
            raise StoreInputError(f"text: expected a str, got {type(text).__name__}")
        if not _is_int(limit) or limit < 1:
            raise StoreInputError(f"limit: expected an int ≥ 1, got {limit!r}")
        _check_window(start_ns, end_ns)
        return self._lexical(text, int(limit), start_ns, end_ns)[0]

    def _lexical(self, text: str, limit: int, start_ns: int | None,
                 end_ns: int | None, near: SpatialFilter | None = None) -> tuple[list[tuple[int, float]], int]:
        """``lexical_search``, and how many of its first rows hold every word (see there)."""
        words = _query_words(text, self._canonical)
        if not words:
            return [], 0
        source, window, params = "episodes_fts", "", []
        if start_ns is not None or end_ns is not None or near is not None:
            # The time window is the condition the embedding ranking applies. CROSS JOIN keeps the
            # index scan outside: probing FTS5 row by row from the stamp index is ~1000× slower.
            source = "episodes_fts CROSS JOIN episodes ON episodes.id = episodes_fts.rowid"
            window = " AND episodes.stamp_ns BETWEEN ? AND ?"
            params = [int(start_ns) if start_ns is not None else 0,
                      int(end_ns) if end_ns is not None else MAX_STAMP_NS]
            if near is not None:  # the same condition as _EmbeddingIndex.near
                window += (" AND episodes.pose_frame = ?"
                           " AND (episodes.px - ?) * (episodes.px - ?) + (episodes.py - ?) * (episodes.py - ?) <= ?")
                params += [near.frame_id, float(near.x), float(near.x), float(near.y), float(near.y),
                           float(near.radius_m) ** 2]
        sql = (f"SELECT episodes_fts.rowid, -bm25(episodes_fts) FROM {source} WHERE episodes_fts MATCH ?{window}"
               " ORDER BY bm25(episodes_fts), episodes_fts.rowid DESC LIMIT ?")
        # Each word matches its synonym group (canon); as written (caption) it scores a second time.
        # A word that is its group's first word, or in no group, is the same string in both columns:
        # one phrase then does both, and FTS5's bm25 reads each phrase's postings once per query.
        quoted = {w: _fts_string(w[0]) if w[0] == w[1] else f"(caption : {_fts_string(w[0])} OR canon : {_fts_string(w[1])})"
                  for w in words}
        with self._lock:
            conn = self._require_open()

            def run(expression: str) -> list[tuple[int, float]]:
                return self._read(lambda: conn.execute(sql, [expression, *params, limit]).fetchall())

            def holders_at_least(w: tuple[str, str], n: int) -> bool:
                return self._read(lambda: conn.execute(
                    "SELECT count(*) FROM (SELECT 1 FROM episodes_fts WHERE episodes_fts MATCH ? LIMIT ?)",
                    (f"canon : {_fts_string(w[1])}", n)).fetchone()[0]) >= n

            found = run(" AND ".join(quoted.values()))
            if found or len(words) == 1:
                return [(int(i), float(sc)) for i, sc in found], len(found)
            # No caption holds every word. A word that no caption holds cannot tell captions apart:
            # "every word" means every word the memory knows ("ginger tabby cat" finds the tabby cat).
            known = [w for w in words if holders_at_least(w, 1)]
            if 0 < len(known) < len(words):
                found = run(" AND ".join(quoted[w] for w in known))
                if found or len(known) == 1:
                    return [(int(i), float(sc)) for i, sc in found], len(found)
            # Then captions holding some of the words. Words held by over half the captions are
            # left out: FTS5's BM25 gives them an IDF of ~0, so they could only make every caption a
            # match, and reading their postings is what makes this pass slow (100+ ms at 100,000).
            selective = [w for w in known if not holders_at_least(w, self._index.n // 2 + 1)]
            found = run(" OR ".join(quoted[w] for w in selective)) if selective else []
        return [(int(i), float(sc)) for i, sc in found], 0

    def search(self, text: str | None = None, embedding: np.ndarray | None = None, k: int = 5,
               start_ns: int | None = None, end_ns: int | None = None, robot_scope: str | None = None,
               near: SpatialFilter | None = None) -> list[Hit]:
        """Hybrid retrieval: the k best episodes for a text and/or a query embedding, best first.
        ``near``: only episodes recorded within a radius of a point (``SpatialFilter``) compete, in
        both rankings, as the time window does.

        Two rankings within the same time window: ``lexical_search(text)`` and cosine similarity
        to ``embedding`` (as ``query``), each cut at ``fusion_depth(k)``. The fusion rule:
        episodes whose caption holds every word of the text come first; within that group and
        among the rest, the reciprocal-rank-fusion score decides (see ``RRF_K``); equal scores:
        higher cosine, then higher BM25, then newer. Either input may be missing (then its ranking
        is empty). An empty list means that no episode lies in the window or, without an
        embedding, that no caption shares a word with the text. ``robot_scope`` is the fleet
        stores' (``store_pg``); a SQLite store holds one robot, so every scope searches it.
        """
        q = _check_search(text, embedding, k, start_ns, end_ns, near, self._check_embedding)
        depth = fusion_depth(k)
        with self._lock:
            lexical, every = self._lexical(text, depth, start_ns, end_ns, near) if text else ([], 0)
            emb_ids = self._embedding_ranking(q, depth, start_ns, end_ns, near)[0] if q is not None else []

            def details(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                rows = np.searchsorted(self._index.ids[: self._index.n], ids)
                cosine = self._index.unit[rows] @ q if q is not None else np.full(len(ids), np.nan, np.float32)
                return self._index.stamps[rows], cosine

            ranked = fuse_rankings(lexical, every, [int(i) for i in emb_ids], k, details)
            episodes = self._fetch([r.id for r in ranked])
            return [Hit(episodes[r.id], r.score, r.lexical_score, r.lexical_rank, r.embedding_score, r.embedding_rank)
                    for r in ranked]

    def integrity_check(self) -> list[str]:
        """Problems found (empty list = healthy): SQLite integrity, schema, blobs, RAM index."""
        problems: list[str] = []
        with self._lock:
            conn = self._require_open()
            try:
                rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
                if rows != ["ok"]:
                    problems += [f"sqlite: {r}" for r in rows]
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not _TABLES_V2 <= tables:
                    problems.append(f"schema: missing tables {sorted(_TABLES_V2 - tables)}")
                    return problems
                try:  # FTS5's own structure check
                    conn.execute("INSERT INTO episodes_fts (episodes_fts, rank) VALUES ('integrity-check', 1)")
                except sqlite3.DatabaseError as e:
                    problems.append(f"full-text index: {e}")
                indexed = {i: (c, n) for i, c, n in conn.execute("SELECT rowid, caption, canon FROM episodes_fts")}
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                expected = {"schema_version": str(SCHEMA_VERSION), "embedding_dim": str(self.embedding_dim),
                            "identity": self.identity}
                for key, value in expected.items():
                    if meta.get(key) != value:
                        problems.append(f"meta: {key} is {meta.get(key)!r}, expected {value!r}")
                ids = []
                for episode_id, stamp_ns, caption, source, emb_len, thumb_len, text in conn.execute(
                        "SELECT id, stamp_ns, typeof(caption), typeof(source), length(embedding),"
                        " length(thumbnail), caption FROM episodes ORDER BY id"):
                    ids.append(episode_id)
                    if isinstance(text, str) and indexed.pop(episode_id, None) != (text, _normalise(text, self._canonical)):
                        problems.append(f"full-text index: episode {episode_id} is not indexed as its caption")
                    if emb_len != 4 * self.embedding_dim:
                        problems.append(f"episode {episode_id}: embedding is {emb_len} bytes, "
                                        f"expected {4 * self.embedding_dim}")
                    if thumb_len > MAX_THUMBNAIL_BYTES:
                        problems.append(f"episode {episode_id}: thumbnail of {thumb_len} bytes > {MAX_THUMBNAIL_BYTES}")
                    if caption != "text" or source != "text":
                        problems.append(f"episode {episode_id}: caption/source are {caption}/{source}, expected text")
                    if stamp_ns is None or not isinstance(stamp_ns, int) or stamp_ns < 0:
                        problems.append(f"episode {episode_id}: stamp_ns {stamp_ns!r} is not a non-negative int")
                if indexed:
                    problems.append(f"full-text index: {len(indexed)} entries without an episode "
                                    f"(ids {sorted(indexed)[:5]}...)")
                for name, dtype_name, shape_json, data in conn.execute(
                        "SELECT name, dtype, shape, data FROM memory_state"):
                    problem = _state_row_problem(name, dtype_name, shape_json, data)
                    if problem:
                        problems.append(problem)
            except sqlite3.DatabaseError as e:
                problems.append(f"sqlite: {e}")
                return problems
            if ids != self._index.ids[: self._index.n].tolist():
                problems.append(f"index: RAM index holds {self._index.n} episodes, database {len(ids)}")
        return problems

    # ------------------------------------------------------------------ internals
    def _embedding_ranking(self, q: np.ndarray, limit: int, start_ns: int | None,
                           end_ns: int | None, near: SpatialFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, cosine scores) of the ``limit`` best episodes in the window for the unit vector q."""
        with self._lock:
            self._require_open()
            n = self._index.n
            ids = self._index.ids[:n]
            stamps = self._index.stamps[:n]
            scores = self._index.unit[:n] @ q
            if start_ns is not None or end_ns is not None or near is not None:
                keep = np.ones(n, bool) if near is None else self._index.near(near)
                if start_ns is not None:
                    keep &= stamps >= start_ns
                if end_ns is not None:
                    keep &= stamps <= end_ns
                ids, stamps, scores = ids[keep], stamps[keep], scores[keep]
            if len(ids) > limit:
                # Everything tied with the limit-th best competes, so ties at the cut are fair.
                kth = np.partition(scores, len(scores) - limit)[len(scores) - limit]
                cand = scores >= kth
                ids, stamps, scores = ids[cand], stamps[cand], scores[cand]
            order = np.lexsort((-ids, -stamps, -scores))[:limit]
            return ids[order].copy(), scores[order].copy()

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreClosedError(f"episode store {self.path} is closed")
        return self._conn

    def _transaction(self, what: str, body):
        """Run ``body`` inside BEGIN IMMEDIATE ... COMMIT; roll back and raise StoreWriteError on failure."""
        conn = self._require_open()
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = body()
            conn.execute("COMMIT")
            return result
        except BaseException as e:
            rollback_error = None
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as r:
                    rollback_error = r
            if isinstance(e, (sqlite3.Error, OSError)):
                note = f" (rollback also failed: {rollback_error})" if rollback_error else ""
                raise StoreWriteError(f"{what}: write to {self.path} failed, nothing from this call was "
                                      f"stored: {type(e).__name__}: {e}{note}") from e
            raise

    def _read(self, body):
        try:
            return body()
        except sqlite3.DatabaseError as e:
            raise StoreCorruptError(f"{self.path}: read failed: {e}") from e

    @staticmethod
    def _replace_state(conn: sqlite3.Connection, rows: list[tuple]) -> None:
        conn.execute("DELETE FROM memory_state")
        conn.executemany("INSERT INTO memory_state (name, dtype, shape, data) VALUES (?, ?, ?, ?)", rows)

    def _fetch(self, ids: list[int]) -> dict[int, Episode]:
        found: dict[int, Episode] = {}
        with self._lock:
            conn = self._require_open()
            for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._read(lambda: conn.execute(
                    f"SELECT {_EPISODE_COLUMNS} FROM episodes WHERE id IN ({marks})",
                    chunk).fetchall())
                for r in rows:
                    found[r[0]] = self._row_to_episode(r)
        return found

    def _row_to_episode(self, row: tuple) -> Episode:
        episode_id, stamp_ns, caption, source, blob, thumb, *pose = row
        emb = self._decode_embedding(episode_id, blob).copy()
        return Episode(int(episode_id), int(stamp_ns), caption, source, emb, bytes(thumb),
                       pose=self._decode_pose(episode_id, pose))

    def _decode_pose(self, episode_id: int, columns: Sequence) -> Pose | None:
        try:
            return _pose_from_columns(columns)
        except (PoseError, TypeError, ValueError) as e:
            raise StoreCorruptError(f"{self.path}: episode {episode_id} has an unreadable pose: {e}") from e

    def _decode_embedding(self, episode_id: int, blob: bytes) -> np.ndarray:
        if not isinstance(blob, bytes) or len(blob) != 4 * self.embedding_dim:
            size = len(blob) if isinstance(blob, bytes) else type(blob).__name__
            raise StoreCorruptError(f"{self.path}: episode {episode_id} embedding is {size} bytes, "
                                    f"expected {4 * self.embedding_dim}")
        return np.frombuffer(blob, dtype=_F32_LE).astype(np.float32)

    def _check_embedding(self, name: str, embedding) -> tuple[np.ndarray, np.ndarray]:
        return _check_embedding_array(name, embedding, self.embedding_dim)

    @property
    def where(self) -> str:
        """The store's location, for messages."""
        return str(self.path.parent)


def _fts_string(word: str) -> str:
    # A double-quoted FTS5 string is never syntax: AND, NEAR, *, -, ( inside it are text.
    return '"' + word.replace('"', '""') + '"'