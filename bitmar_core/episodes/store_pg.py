"""PgEpisodeStore: the episodic store of a robot fleet on PostgreSQL + pgvector.

The same interface and semantics as the SQLite ``EpisodeStore`` (``bitmar_core/episodes/store.py``): each
episode and the memory state its write produced commit in one transaction, the model identity is
checked on connect, the hybrid query fuses a lexical and an embedding ranking by the same rule
(``store_api.fuse_rankings``). What a fleet adds: every episode names its robot, each robot keeps its
own memory-state rows, queries read one robot (default) or the fleet (``robot_scope='*'``), and a
database that is unreachable or restarting does not stop the robot (see ``add_episode``).

Tables (created on first connect by the role the DSN names; the ``vector`` extension must exist or
be creatable by it):

- ``bitmar_meta(key, value)``: ``schema_version``, ``embedding_dim``, ``identity``, ``search_synonyms``.
- ``bitmar_episodes(id, robot_id, stamp_ns, caption, canon, source, embedding, vec, thumbnail, tsv)``:
  ``embedding`` the exact float32 bytes, ``vec`` it unit-normalised as ``vector(dim)`` under an HNSW
  cosine index, ``canon`` the caption with synonym groups normalised (as the SQLite index), ``tsv`` the
  generated ``to_tsvector('english', caption || ' ' || canon)`` under a GIN index: a query word
  matches its group through ``canon`` and scores again where written as such.
- ``bitmar_memory_state(robot_id, name, dtype, shape, data)``: one robot's named tensors.
- Schema version 3 adds the pose columns of the SQLite store (``pose_frame`` NULL = no pose, ``px`` ...
  ``qw``); a version-2 database gains them on connect, its episodes without a pose. ``forget`` and
  ``enforce_retention`` delete this robot's episodes only.

Credentials come from the DSN or libpq's environment (``PGPASSWORD``, ``PGPASSFILE``); every message
names the database by ``mask_dsn`` (password shown as ``***``), and no credential is stored.
"""
from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .pose import Pose
from .store_api import (_F32_LE, MAX_EMBEDDING_DIM, MAX_IDENTITY_BYTES, MAX_STAMP_NS, MAX_THUMBNAIL_BYTES,
                        _POSE_SELECT, SCHEMA_VERSION, Episode, Hit, RetentionPolicy, RetentionReport, SpatialFilter,
                        StoreClosedError, StoreCorruptError, StoreError, StoreInputError, StoreMismatchError,
                        StoreNotFoundError, StoreVersionError, StoreWriteError, _check_embedding_array, check_episode,
                        _check_k, check_new_episode, _check_search, _check_synonyms, _check_text, _check_window,
                        _decode_state, _encode_state, _episode_by_id, fuse_rankings, fusion_depth, _is_int,
                        _normalise, _pose_from_columns, _query_words, _state_row_problem)

FLEET = "*"                      # robot_scope: every robot's episodes
MAX_ROBOT_ID_CHARS = 256
ANN_MIN_EPISODES = 20_000        # below this many rows an exact scan is fast (< 20 ms) and exact; above, HNSW
HNSW_M, HNSW_EF_CONSTRUCTION = 16, 64   # pgvector's defaults
HNSW_EF_SEARCH = 200             # candidates an HNSW scan keeps (at least 2 × the rows wanted): recall
                                 # vs latency, measured in bench/RESULTS_store_pg.md (pgvector's default 40
                                 # found 26% of the exact top 10 at 100,000 clustered episodes)
BACKOFF_S = (0.1, 5.0)           # reconnect backoff: first wait, longest wait (doubling)
BATCH_MAX = 256                  # buffered episodes written per transaction when the database is back


class StoreUnavailableError(StoreError):
    """The database cannot be reached now (a read, or a write that could not be buffered)."""


def mask_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***`` (URI or key=value form), for messages."""
    masked = re.sub(r"(://[^:/@?#]*:)[^@/?#]*@", r"\1***@", dsn)                     # URI user:pass@
    masked = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", masked, flags=re.I)
    return masked


@dataclass
class _Pending:
    stamp_ns: int
    caption: str
    source: str
    embedding: np.ndarray   # little-endian float32, as given
    unit: np.ndarray        # unit-normalised (the vector column: equal directions give equal cosines)
    thumbnail: bytes
    nbytes: int
    token: object           # the caller's, handed back to ``on_commit``
    pose: tuple = (None,) * 8  # the pose columns (store_api._pose_row)


class PgEpisodeStore:
    """Persistent episodes + one robot's episodic memory state in a PostgreSQL database shared by a
    fleet; the same methods as ``EpisodeStore`` (see the module docstring)."""

    read_only = False

    def __init__(self, dsn: str, embedding_dim: int, identity: str, robot_id: str, *,
                 buffer_max_episodes: int, buffer_max_bytes: int, connect_timeout_s: float) -> None:
        """Use ``PgEpisodeStore.open``."""
        self._dsn = dsn
        self.where = mask_dsn(dsn)
        self.embedding_dim = embedding_dim
        self.identity = identity
        self.robot_id = robot_id
        self.synonym_groups: tuple[tuple[str, ...], ...] = ()
        self._canonical: dict[str, str] = {}
        self._lock = threading.RLock()
        self._conn = None
        self._closed = False
        self._connect_timeout_s = connect_timeout_s
        self.ann_min_episodes = ANN_MIN_EPISODES
        self.hnsw_ef_search = HNSW_EF_SEARCH
        # The write buffer (database unreachable): episodes in order, the latest memory state.
        self.buffer_max_episodes = buffer_max_episodes
        self.buffer_max_bytes = buffer_max_bytes
        self._pending: collections.deque[_Pending] = collections.deque()
        self._pending_state: list[tuple] | None = None
        self._pending_bytes = 0
        self.dropped_episodes = 0
        self.reconnects = 0
        self.last_error = ""
        self.on_commit: Callable[[int, object], None] | None = None  # called for each buffered episode once committed
        self._flusher: threading.Thread | None = None
        self._wake = threading.Event()
        self._count_cache = 0

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, dsn: str, embedding_dim: int, identity: str, robot_id: str, create: bool = True,
             synonyms: Sequence[Sequence[str]] | None = None, *, buffer_max_episodes: int = 1000,
             buffer_max_bytes: int = 64 * 1024 * 1024, connect_timeout_s: float = 5.0) -> "PgEpisodeStore":
        """Connect, create the tables if allowed (and absent), check schema version, dimension and
        identity (a mismatch raises ``StoreMismatchError`` and changes nothing), re-index the
        captions if ``synonyms`` differ from the database's. The database must be reachable here."""
        if not isinstance(dsn, str) or not dsn.strip():
            raise StoreInputError("dsn: expected a PostgreSQL connection string, got an empty one")
        groups = _check_synonyms(synonyms) if synonyms is not None else None
        if not _is_int(embedding_dim) or not 1 <= embedding_dim <= MAX_EMBEDDING_DIM:
            raise StoreInputError(
                f"embedding_dim: expected an int in [1, {MAX_EMBEDDING_DIM}], got {embedding_dim!r}")
        _check_text("identity", identity, MAX_IDENTITY_BYTES, allow_empty=False)
        _check_robot_id("robot_id", robot_id)
        if not _is_int(buffer_max_episodes) or buffer_max_episodes < 1:
            raise StoreInputError(f"buffer_max_episodes: expected an int ≥ 1, got {buffer_max_episodes!r}")
        store = cls(dsn, int(embedding_dim), identity, robot_id, buffer_max_episodes=int(buffer_max_episodes),
                    buffer_max_bytes=int(buffer_max_bytes), connect_timeout_s=float(connect_timeout_s))
        try:
            store._prepare(create, groups)
            store._count_cache = store.count()
        except BaseException:
            store.close(flush=False)
            raise
        return store

    def _connect(self):
        import psycopg  # only the fleet store needs it
        try:
            conn = psycopg.connect(self._dsn, connect_timeout=max(1, round(self._connect_timeout_s)),
                                   application_name="bitmar")
        except psycopg.Error as e:
            raise StoreUnavailableError(f"cannot connect to {self.where}: {self._scrub(e)}") from None
        return conn

    def _scrub(self, e: BaseException) -> str:
        """An error's text with the DSN's password (if any) masked."""
        text = f"{type(e).__name__}: {e}".strip()
        from psycopg.conninfo import conninfo_to_dict
        try:
            password = conninfo_to_dict(self._dsn).get("password")
        except Exception:
            password = None
        if password:
            text = text.replace(str(password), "***")
        return text

    def _prepare(self, create: bool, groups) -> None:
        dim = self.embedding_dim

        def body(conn) -> None:
            conn.execute("SELECT pg_advisory_xact_lock(7311902711)")  # creators in a fleet take turns
            exists = conn.execute("SELECT to_regclass('bitmar_meta') IS NOT NULL").fetchone()[0]
            if not exists:
                if not create:
                    raise StoreNotFoundError(f"no episode store in {self.where} (open with create=True to make one)")
                if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone():
                    try:
                        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                    except Exception as e:
                        raise StoreError(f"{self.where}: the pgvector extension is not installed in this database "
                                         f"and this role cannot create it (ask the admin for CREATE EXTENSION "
                                         f"vector): {self._scrub(e)}") from None
                for sql in (
                    "CREATE TABLE bitmar_meta (key text PRIMARY KEY, value text NOT NULL)",
                    "CREATE TABLE bitmar_episodes ("
                    " id bigserial PRIMARY KEY, robot_id text NOT NULL, stamp_ns bigint NOT NULL CHECK (stamp_ns >= 0),"
                    " caption text NOT NULL, canon text NOT NULL, source text NOT NULL, embedding bytea NOT NULL,"
                    f" vec vector({dim}) NOT NULL, thumbnail bytea NOT NULL,"
                    " pose_frame text, px double precision, py double precision, pz double precision,"
                    " qx double precision, qy double precision, qz double precision, qw double precision,"
                    " tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', caption || ' ' || canon)) STORED)",
                    "CREATE INDEX bitmar_episodes_robot_stamp ON bitmar_episodes (robot_id, stamp_ns)",
                    "CREATE INDEX bitmar_episodes_stamp ON bitmar_episodes (stamp_ns)",
                    "CREATE INDEX bitmar_episodes_tsv ON bitmar_episodes USING gin (tsv)",
                    f"CREATE INDEX bitmar_episodes_vec ON bitmar_episodes USING hnsw (vec vector_cosine_ops)"
                    f" WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})",
                    "CREATE TABLE bitmar_memory_state (robot_id text NOT NULL, name text NOT NULL, dtype text NOT NULL,"
                    " shape text NOT NULL, data bytea NOT NULL, PRIMARY KEY (robot_id, name))",
                ):
                    conn.execute(sql)
                with conn.cursor() as cur:
                    cur.executemany("INSERT INTO bitmar_meta (key, value) VALUES (%s, %s)", [
                        ("schema_version", str(SCHEMA_VERSION)), ("embedding_dim", str(dim)),
                        ("identity", self.identity), ("search_synonyms", json.dumps([list(g) for g in groups or ()]))])
            meta = dict(conn.execute("SELECT key, value FROM bitmar_meta").fetchall())
            if meta.get("schema_version") == "2":  # version 3 adds where each episode was recorded
                for column in ("pose_frame text", *(f"{c} double precision" for c in ("px", "py", "pz", "qx", "qy",
                                                                                      "qz", "qw"))):
                    conn.execute(f"ALTER TABLE bitmar_episodes ADD COLUMN IF NOT EXISTS {column}")
                conn.execute("UPDATE bitmar_meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                meta["schema_version"] = str(SCHEMA_VERSION)
            if meta.get("schema_version") != str(SCHEMA_VERSION):
                raise StoreVersionError(f"{self.where}: schema_version is {meta.get('schema_version')!r}, this code "
                                        f"reads {SCHEMA_VERSION}; left untouched")
            if meta.get("embedding_dim") != str(dim):
                raise StoreMismatchError(f"{self.where}: stores embedding_dim {meta.get('embedding_dim')!r}, "
                                         f"opened with {dim}; left untouched")
            if meta.get("identity") != self.identity:
                raise StoreMismatchError(f"{self.where}: written by model identity {meta.get('identity')!r}, opened "
                                         f"with {self.identity!r}; left untouched (use another database or the "
                                         "matching model)")
            try:
                stored = _check_synonyms(json.loads(meta.get("search_synonyms", "[]")))
            except (ValueError, TypeError, StoreInputError) as e:
                raise StoreCorruptError(f"{self.where}: meta search_synonyms is unreadable ({e})") from None
            wanted = stored if groups is None else groups
            if wanted != stored:  # re-index every caption (every robot's) for the new groups
                canonical = {w: g[0] for g in wanted for w in g}
                rows = conn.execute("SELECT id, caption FROM bitmar_episodes").fetchall()
                with conn.cursor() as cur:
                    cur.executemany("UPDATE bitmar_episodes SET canon = %s WHERE id = %s",
                                    [(_normalise(c, canonical), i) for i, c in rows])
                conn.execute("UPDATE bitmar_meta SET value = %s WHERE key = 'search_synonyms'",
                             (json.dumps([list(g) for g in wanted]),))
            self._use_synonyms(wanted)

        self._transaction("open", body, wrap_errors=False)

    def _use_synonyms(self, groups) -> None:
        self.synonym_groups = groups
        self._canonical = {w: g[0] for g in groups for w in g}

    # ------------------------------------------------------------------ connection and transactions
    def _connection(self):
        if self._closed:
            raise StoreClosedError(f"episode store {self.where} is closed")
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
            self.reconnects += 1
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None

    def _transaction(self, what: str, body, wrap_errors: bool = True):
        """Run ``body(conn)`` in one transaction. A lost connection raises ``StoreUnavailableError``
        (nothing of the call committed, unless the COMMIT itself was cut: see ``_commit_unknown``);
        another database error ``StoreWriteError``."""
        import psycopg
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction():
                    return body(conn)
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                self._drop_connection()
                self.last_error = self._scrub(e)
                raise StoreUnavailableError(f"{what}: {self.where} unreachable: {self.last_error}") from None
            except psycopg.Error as e:
                if not wrap_errors and not isinstance(e, psycopg.DatabaseError):
                    raise
                raise StoreWriteError(f"{what}: {self.where} failed, nothing from this call was stored: "
                                      f"{self._scrub(e)}") from None

    def _read(self, what: str, body):
        try:
            return self._transaction(what, body)
        except StoreUnavailableError:
            return self._transaction(what, body)  # one reconnect: a restarted server drops idle connections

    # ------------------------------------------------------------------ writing
    def add_episode(self, stamp_ns: int, caption: str, source: str, embedding: np.ndarray,
                    thumbnail_jpeg: bytes = b"", memory_state: dict[str, np.ndarray] | None = None,
                    token: object = None, pose: Pose | None = None) -> int | None:
        """Store one episode of this robot, and the memory state its write produced, in one
        transaction; returns the new id once committed.

        When the database is unreachable (or episodes wait already), the episode is buffered and
        None returned: a background thread reconnects with backoff and writes the buffer in order,
        in one transaction with the latest memory state, then calls ``on_commit(id, token)`` for
        each. Past ``buffer_max_episodes`` or ``buffer_max_bytes`` the oldest buffered episode is
        dropped and counted (``dropped_episodes``). A buffered episode is not acknowledged: only a
        returned id or an ``on_commit`` call is."""
        emb, unit, thumb, pose_row = check_episode("", stamp_ns, caption, source, embedding, thumbnail_jpeg, pose,
                                                    self._check_embedding)
        state_rows = _encode_state(memory_state) if memory_state is not None else None
        item = _Pending(int(stamp_ns), caption, source, emb, unit, thumb,
                        len(caption.encode()) + len(thumb) + 2 * emb.nbytes + 64, token, pose_row)
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"episode store {self.where} is closed")
            if not self._pending:
                try:
                    return self._write([item], state_rows)[0]
                except StoreUnavailableError:
                    pass
            self._buffer(item, state_rows)
            return None

    def add_episodes(self, episodes, memory_state: dict[str, np.ndarray] | None = None) -> list[int]:
        """Store many episodes of this robot (``store_api.NewEpisode``) and a memory state in one
        transaction: all or none; never buffered (an unreachable database raises)."""
        items = []
        for n, episode in enumerate(episodes):
            e, emb, unit, thumb, pose_row = check_new_episode(n, episode, self._check_embedding)
            items.append(_Pending(int(e.stamp_ns), e.caption, e.source, emb, unit, thumb, 0, None, pose_row))
        state_rows = _encode_state(memory_state) if memory_state is not None else None
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"episode store {self.where} is closed")
            return self._write(items, state_rows) if items or state_rows else []

    def _write(self, items: list[_Pending], state_rows: list[tuple] | None) -> list[int]:
        def body(conn) -> list[int]:
            ids = []
            for it in items:
                ids.append(conn.execute(
                    "INSERT INTO bitmar_episodes (robot_id, stamp_ns, caption, canon, source, embedding, vec, thumbnail,"
                    f" {_POSE_SELECT}) VALUES (%s, %s, %s, %s, %s, %s, %s::vector, %s,"
                    " %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    (self.robot_id, it.stamp_ns, it.caption, _normalise(it.caption, self._canonical), it.source,
                     it.embedding.tobytes(), _vector_text(it.unit), it.thumbnail, *it.pose)).fetchone()[0])
            if state_rows is not None:
                self._replace_state(conn, state_rows)
            return ids

        ids = self._transaction("add_episode", body)
        self._count_cache += len(ids)
        return [int(i) for i in ids]

    def _buffer(self, item: _Pending, state_rows: list[tuple] | None) -> None:
        self._pending.append(item)
        self._pending_bytes += item.nbytes
        if state_rows is not None:  # only the latest state is written, with the whole buffer
            self._pending_state = state_rows
        state_bytes = sum(len(r[3]) for r in self._pending_state) if self._pending_state else 0
        while self._pending and (len(self._pending) > self.buffer_max_episodes
                                 or self._pending_bytes + state_bytes > self.buffer_max_bytes):
            self._pending_bytes -= self._pending.popleft().nbytes
            self.dropped_episodes += 1
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(target=self._flush_loop, name="pg-store-flush", daemon=True)
            self._flusher.start()
        self._wake.set()

    def flush(self) -> bool:
        """Try once to write the buffer (in order, in batches); True when it is empty."""
        with self._lock:
            while self._pending:
                batch = list(self._pending)[:BATCH_MAX]
                last = len(batch) == len(self._pending)
                try:
                    ids = self._write(batch, self._pending_state if last else None)
                except StoreUnavailableError:
                    return False
                except StoreWriteError as e:  # the database refuses the oldest: drop it, counted, not forever retried
                    self.last_error = str(e)
                    self._pending_bytes -= self._pending.popleft().nbytes
                    self.dropped_episodes += 1
                    continue
                for _ in batch:
                    self._pending_bytes -= self._pending.popleft().nbytes
                if last:
                    self._pending_state = None
                for episode_id, it in zip(ids, batch):
                    if self.on_commit is not None:
                        try:
                            self.on_commit(episode_id, it.token)
                        except Exception as e:  # a listener's failure must not lose the buffer's order
                            self.last_error = f"on_commit: {type(e).__name__}: {e}"
            return True

    def _flush_loop(self) -> None:
        wait = BACKOFF_S[0]
        while not self._closed:
            self._wake.wait(wait)
            self._wake.clear()
            if self._closed:
                return
            try:
                done = self.flush()
            except StoreClosedError:
                return
            if done:
                with self._lock:
                    if not self._pending:
                        self._flusher = None
                        return
            wait = BACKOFF_S[0] if done else min(2 * wait, BACKOFF_S[1])

    def buffer_status(self) -> dict[str, float]:
        """For diagnostics: episodes and bytes waiting for the database, dropped, reconnects."""
        with self._lock:
            state_bytes = sum(len(r[3]) for r in self._pending_state) if self._pending_state else 0
            return {"store_buffered_episodes": float(len(self._pending)),
                    "store_buffered_bytes": float(self._pending_bytes + state_bytes),
                    "store_dropped_episodes": float(self.dropped_episodes),
                    "store_reconnects": float(max(0, self.reconnects - 1))}

    def _replace_state(self, conn, rows: list[tuple]) -> None:
        conn.execute("DELETE FROM bitmar_memory_state WHERE robot_id = %s", (self.robot_id,))
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO bitmar_memory_state (robot_id, name, dtype, shape, data)"
                            " VALUES (%s, %s, %s, %s, %s)", [(self.robot_id, *r) for r in rows])

    def put_memory_state(self, state: dict[str, np.ndarray]) -> None:
        """Replace this robot's stored memory state (one transaction; buffered while unreachable)."""
        rows = _encode_state(state)
        with self._lock:
            if self._pending:
                self._pending_state = rows
                return
            self._transaction("put_memory_state", lambda conn: self._replace_state(conn, rows))

    def clear(self) -> None:
        """Delete this robot's episodes, buffered episodes and memory state (other robots keep theirs)."""
        def body(conn) -> None:
            conn.execute("DELETE FROM bitmar_episodes WHERE robot_id = %s", (self.robot_id,))
            conn.execute("DELETE FROM bitmar_memory_state WHERE robot_id = %s", (self.robot_id,))

        with self._lock:
            self._transaction("clear", body)
            self._pending.clear()
            self._pending_bytes, self._pending_state, self._count_cache = 0, None, 0

    def forget(self, ids=None, start_ns: int | None = None, end_ns: int | None = None,
               caption_contains: str | None = None) -> list[int]:
        """Delete this robot's episodes that meet every criterion given (as ``EpisodeStore.forget``),
        in one transaction; returns the deleted ids. Other robots' episodes are never deleted."""
        if ids is not None:
            ids = [int(i) for i in ids] if all(_is_int(i) and i >= 0 for i in ids) else None
            if ids is None:
                raise StoreInputError("ids: expected non-negative episode ids")
        if caption_contains is not None and (not isinstance(caption_contains, str) or not caption_contains):
            raise StoreInputError(f"caption_contains: expected a non-empty str or None, got {caption_contains!r}")
        _check_window(start_ns, end_ns)
        if ids is None and start_ns is None and end_ns is None and caption_contains is None:
            raise StoreInputError("forget: expected ids, a time range or a caption match (clear() forgets everything)")
        cond, params = "robot_id = %s AND stamp_ns BETWEEN %s AND %s", [self.robot_id, *_bounds(start_ns, end_ns)]
        if ids is not None:
            cond, params = cond + " AND id = ANY(%s)", [*params, ids]
        if caption_contains is not None:
            cond, params = cond + " AND strpos(lower(caption), %s) > 0", [*params, caption_contains.lower()]
        with self._lock:
            gone = self._transaction("forget", lambda c: c.execute(
                f"DELETE FROM bitmar_episodes WHERE {cond} RETURNING id", params).fetchall())
            self._count_cache = max(0, self._count_cache - len(gone))
        return sorted(int(r[0]) for r in gone)

    def bytes_used(self) -> int:
        """Bytes of this robot's episode rows (their columns' stored sizes; the table's indexes and
        PostgreSQL's free space are the database's, shared by the fleet)."""
        return int(self._read("bytes_used", lambda c: c.execute(
            "SELECT coalesce(sum(pg_column_size(e.*)), 0) FROM bitmar_episodes e WHERE robot_id = %s",
            (self.robot_id,)).fetchone()[0]))

    def enforce_retention(self, policy: RetentionPolicy, now_ns: int | None = None) -> RetentionReport:
        """Keep this robot's episodes within ``policy`` (``EpisodeStore.enforce_retention``'s rule:
        age, then thinning, then oldest first, to the low water; the newest is kept), one transaction
        per pass. ``max_bytes`` counts this robot's rows (``bytes_used``); PostgreSQL's autovacuum
        reclaims the space."""
        if not isinstance(policy, RetentionPolicy):
            raise StoreInputError(f"policy: expected a RetentionPolicy, got {type(policy).__name__}")
        if not policy.active:
            return RetentionReport(0, 0, 0, self.count())

        def body(conn) -> tuple[int, int]:
            rows = conn.execute("SELECT id, stamp_ns, vec::text FROM bitmar_episodes WHERE robot_id = %s"
                                " ORDER BY stamp_ns, id", (self.robot_id,)).fetchall()
            if not rows:
                return 0, 0
            ids = [int(r[0]) for r in rows]
            stamps = np.array([r[1] for r in rows], np.int64)
            doomed: list[int] = []
            keep_from = 0
            if policy.max_age_s:
                now = int(now_ns) if now_ns is not None else int(stamps.max())
                keep_from = min(int(np.searchsorted(stamps, now - int(policy.max_age_s * 1e9))), len(ids) - 1)
                doomed += ids[:keep_from]
            n = len(ids) - keep_from
            need = n - int(policy.max_count * policy.low_water) if policy.max_count and n > policy.max_count else 0
            if policy.max_bytes:
                used = conn.execute("SELECT coalesce(sum(pg_column_size(e.*)), 0) FROM bitmar_episodes e"
                                    " WHERE robot_id = %s AND id <> ALL(%s)", (self.robot_id, doomed)).fetchone()[0]
                if used > policy.max_bytes and n:
                    need = max(need, int(np.ceil((used - policy.low_water * policy.max_bytes) / (used / n))))
            need = min(need, n - 1)
            thinned = 0
            if need > 0 and policy.thin_interval_s > 0:
                unit = np.array([np.array(r[2].strip("[]").split(","), np.float32) for r in rows[keep_from:]])
                interval, kept = int(policy.thin_interval_s * 1e9), 0
                for j in range(1, n - 1):
                    if stamps[keep_from + j] - stamps[keep_from + kept] < interval and \
                            float(unit[j] @ unit[kept]) >= policy.thin_min_cosine:
                        doomed.append(ids[keep_from + j])
                        thinned += 1
                        if thinned >= need:
                            break
                    else:
                        kept = j
                need -= thinned
            if need > 0:
                gone = set(doomed)
                doomed += [i for i in ids[keep_from:-1] if i not in gone][:need]
            if doomed:
                conn.execute("DELETE FROM bitmar_episodes WHERE robot_id = %s AND id = ANY(%s)", (self.robot_id, doomed))
            return len(doomed), thinned

        with self._lock:
            deleted, thinned = self._transaction("retention", body)
            self._count_cache = max(0, self._count_cache - deleted)
        return RetentionReport(deleted, thinned, self.bytes_used() if policy.max_bytes else 0, self.count())

    def compact(self) -> None:
        """Nothing to do by hand: PostgreSQL's autovacuum reclaims deleted rows."""

    def checkpoint(self) -> None:
        """Nothing to fold: a committed PostgreSQL transaction is durable. Writes the buffer if any."""
        with self._lock:
            if self._pending and not self.flush():
                raise StoreUnavailableError(f"save: {self.where} unreachable, {len(self._pending)} episodes buffered")

    def close(self, flush: bool = True) -> None:
        """Write the buffer (one try, unless ``flush`` is False) and disconnect (idempotent). Buffered
        episodes that could not be written are lost and counted in ``dropped_episodes``."""
        with self._lock:
            if self._closed:
                return
            if flush and self._pending:
                try:
                    self.flush()
                except StoreError:
                    pass
            self.dropped_episodes += len(self._pending)
            self._pending.clear()
            self._closed = True
            self._wake.set()
            self._drop_connection()

    def __enter__(self) -> "PgEpisodeStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def _scope(self, robot_scope: str | None) -> tuple[str, list]:
        """SQL condition and parameters for a scope: None/'' this robot, '*' the fleet, else one robot."""
        if robot_scope is None or robot_scope == "":
            return "robot_id = %s", [self.robot_id]
        if robot_scope == FLEET:
            return "TRUE", []
        _check_robot_id("robot_scope", robot_scope)
        return "robot_id = %s", [robot_scope]

    def count(self, robot_scope: str | None = None) -> int:
        """Committed episodes in the scope (this robot by default). While the database is unreachable,
        this robot's last known count."""
        where, params = self._scope(robot_scope)
        try:
            n = int(self._read("count", lambda c: c.execute(
                f"SELECT count(*) FROM bitmar_episodes WHERE {where}", params).fetchone()[0]))
        except StoreUnavailableError:
            if robot_scope:
                raise
            return self._count_cache
        if not robot_scope:
            self._count_cache = n
        return n

    def robots(self) -> list[str]:
        """The robots with episodes in the database."""
        return [r[0] for r in self._read("robots", lambda c: c.execute(
            "SELECT DISTINCT robot_id FROM bitmar_episodes ORDER BY 1").fetchall())]

    _COLUMNS = f"id, stamp_ns, caption, source, embedding, thumbnail, robot_id, {_POSE_SELECT}"

    def _row_to_episode(self, row) -> Episode:
        episode_id, stamp_ns, caption, source, blob, thumb, robot, *pose = row
        blob = bytes(blob)
        if len(blob) != 4 * self.embedding_dim:
            raise StoreCorruptError(f"{self.where}: episode {episode_id} embedding is {len(blob)} bytes, "
                                    f"expected {4 * self.embedding_dim}")
        emb = np.frombuffer(blob, dtype=_F32_LE).astype(np.float32)
        try:
            where = _pose_from_columns(pose)
        except (ValueError, TypeError) as e:
            raise StoreCorruptError(f"{self.where}: episode {episode_id} has an unreadable pose: {e}") from None
        return Episode(int(episode_id), int(stamp_ns), caption, source, emb, bytes(thumb), robot, where)

    def _check_embedding(self, name: str, embedding) -> tuple[np.ndarray, np.ndarray]:
        return _check_embedding_array(name, embedding, self.embedding_dim)

    def _fetch(self, ids: list[int]) -> dict[int, Episode]:
        if not ids:
            return {}
        rows = self._read("fetch", lambda c: c.execute(
            f"SELECT {self._COLUMNS} FROM bitmar_episodes WHERE id = ANY(%s)", (ids,)).fetchall())
        return {int(r[0]): self._row_to_episode(r) for r in rows}

    def episode(self, episode_id: int) -> Episode:
        """The episode with this id (any robot's); ``KeyError`` if there is none."""
        return _episode_by_id(episode_id, self._fetch)

    def all_episodes(self, robot_scope: str | None = None) -> list[Episode]:
        """Every episode in the scope (this robot by default), oldest id first."""
        where, params = self._scope(robot_scope)
        rows = self._read("all_episodes", lambda c: c.execute(
            f"SELECT {self._COLUMNS} FROM bitmar_episodes WHERE {where} ORDER BY id", params).fetchall())
        return [self._row_to_episode(r) for r in rows]

    def memory_state(self) -> dict[str, np.ndarray] | None:
        """This robot's last stored memory state (fresh writable arrays), or None."""
        rows = self._read("memory_state", lambda c: c.execute(
            "SELECT name, dtype, shape, data FROM bitmar_memory_state WHERE robot_id = %s ORDER BY name",
            (self.robot_id,)).fetchall())
        return _decode_state(rows, self.where)

    def episodes_by_time(self, limit: int, offset: int = 0, newest_first: bool = True, start_ns: int | None = None,
                         end_ns: int | None = None, robot_scope: str | None = None) -> list[Episode]:
        """A page of episodes in time order (as ``EpisodeStore.episodes_by_time``), in the scope."""
        _check_k(limit)
        if not _is_int(offset) or offset < 0:
            raise StoreInputError(f"offset: expected an int ≥ 0, got {offset!r}")
        _check_window(start_ns, end_ns)
        where, params = self._scope(robot_scope)
        order = "DESC" if newest_first else "ASC"
        rows = self._read("episodes_by_time", lambda c: c.execute(
            f"SELECT {self._COLUMNS} FROM bitmar_episodes WHERE {where} AND stamp_ns BETWEEN %s AND %s"
            f" ORDER BY stamp_ns {order}, id {order} LIMIT %s OFFSET %s",
            [*params, *_bounds(start_ns, end_ns), int(limit), int(offset)]).fetchall())
        return [self._row_to_episode(r) for r in rows]

    def _embedding_ranking(self, q: np.ndarray, limit: int, start_ns, end_ns, robot_scope,
                           exact: bool | None, near: SpatialFilter | None = None) -> list[tuple[int, float]]:
        """(id, cosine) of the ``limit`` best episodes in window and scope: an exact scan (ties: newer
        first), or pgvector's HNSW index when the table is large (``ann_min_episodes``) or ``exact`` is
        False. A filtered HNSW scan that finds fewer than ``limit`` falls back to the exact scan."""
        where, params = self._scope(robot_scope)
        vec = _vector_text(q)
        near_sql, near_params = _near(near)
        cond = f"{where} AND stamp_ns BETWEEN %s AND %s{near_sql}"
        params = [*params, *_bounds(start_ns, end_ns), *near_params]

        def run(conn) -> list[tuple[int, float]]:
            use_ann = not exact if exact is not None else conn.execute(
                "SELECT reltuples FROM pg_class WHERE oid = 'bitmar_episodes'::regclass").fetchone()[0] \
                >= self.ann_min_episodes
            if use_ann:
                conn.execute(f"SET LOCAL hnsw.ef_search = {min(1000, max(int(self.hnsw_ef_search), 2 * limit))}")
                rows = conn.execute(
                    f"SELECT id, stamp_ns, 1 - (vec <=> %s::vector) FROM bitmar_episodes WHERE {cond}"
                    " ORDER BY vec <=> %s::vector LIMIT %s", [vec, *params, vec, limit]).fetchall()
                if len(rows) == limit or exact is False:
                    rows.sort(key=lambda r: (-r[2], -r[1], -r[0]))
                    return [(int(i), float(s)) for i, _, s in rows]
            rows = conn.execute(
                f"SELECT id, 1 - (vec <=> %s::vector) AS s FROM bitmar_episodes WHERE {cond}"
                " ORDER BY s DESC, stamp_ns DESC, id DESC LIMIT %s", [vec, *params, limit]).fetchall()
            return [(int(i), float(s)) for i, s in rows]

        return self._read("query", run)

    def query(self, embedding: np.ndarray, k: int, start_ns: int | None = None, end_ns: int | None = None,
              robot_scope: str | None = None, exact: bool | None = None) -> list[tuple[Episode, float]]:
        """The k episodes most cosine-similar to ``embedding`` in window and scope, best first."""
        _, q = self._check_embedding("embedding", embedding)
        _check_k(k)
        _check_window(start_ns, end_ns)
        ranked = self._embedding_ranking(q, int(k), start_ns, end_ns, robot_scope, exact)
        episodes = self._fetch([i for i, _ in ranked])
        return [(episodes[i], s) for i, s in ranked]

    def lexical_search(self, text: str, limit: int, start_ns: int | None = None, end_ns: int | None = None,
                       robot_scope: str | None = None) -> list[tuple[int, float]]:
        """(episode id, ts_rank) of the captions sharing words with ``text``, best first (ts_rank with
        normalisation 1, ÷ (1 + log length), so that as with BM25 a shorter caption ranks higher): every word
        first, then the words some caption holds, then any selective word (as the SQLite store)."""
        if not isinstance(text, str):
            raise StoreInputError(f"text: expected a str, got {type(text).__name__}")
        if not _is_int(limit) or limit < 1:
            raise StoreInputError(f"limit: expected an int ≥ 1, got {limit!r}")
        _check_window(start_ns, end_ns)
        return self._lexical(text, int(limit), start_ns, end_ns, robot_scope)[0]

    def _lexical(self, text, limit, start_ns, end_ns, robot_scope,
                 near: SpatialFilter | None = None) -> tuple[list[tuple[int, float]], int]:
        words = _query_words(text, self._canonical)
        if not words:
            return [], 0
        where, scope_params = self._scope(robot_scope)
        near_sql, near_params = _near(near)

        def term(w: tuple[str, str]) -> tuple[str, list]:
            # A word matches its synonym group (canon) and, as written, scores a second time.
            if w[0] == w[1]:
                return "plainto_tsquery('english', %s)", [w[0]]
            return "(plainto_tsquery('english', %s) || plainto_tsquery('english', %s))", [w[0], w[1]]

        def combine(ws, op: str) -> tuple[str, list]:
            parts = [term(w) for w in ws]
            return f" {op} ".join(p for p, _ in parts), [x for _, a in parts for x in a]

        def run(conn, ws, op) -> list[tuple[int, float]]:
            expr, args = combine(ws, op)
            rows = conn.execute(
                f"SELECT id, ts_rank(tsv, q, 1) AS r FROM bitmar_episodes, ({'SELECT ' + expr}) AS t(q)"
                f" WHERE tsv @@ q AND {where} AND stamp_ns BETWEEN %s AND %s{near_sql} ORDER BY r DESC, id DESC LIMIT %s",
                [*args, *scope_params, *_bounds(start_ns, end_ns), *near_params, limit]).fetchall()
            return [(int(i), float(r)) for i, r in rows]

        def holders(conn, w, n: int) -> int:
            expr, args = term(w)
            return conn.execute(f"SELECT count(*) FROM (SELECT 1 FROM bitmar_episodes WHERE tsv @@ ({expr})"
                                f" AND {where} LIMIT %s) s", [*args, *scope_params, n]).fetchone()[0]

        def body(conn):
            found = run(conn, words, "&&")
            if found or len(words) == 1:
                return found, len(found)
            known = [w for w in words if holders(conn, w, 1) >= 1]
            if 0 < len(known) < len(words):
                found = run(conn, known, "&&")
                if found or len(known) == 1:
                    return found, len(found)
            total = conn.execute(f"SELECT count(*) FROM bitmar_episodes WHERE {where}", scope_params).fetchone()[0]
            selective = [w for w in known if holders(conn, w, total // 2 + 1) < total // 2 + 1]
            return (run(conn, selective, "||") if selective else []), 0

        return self._read("lexical_search", body)

    def search(self, text: str | None = None, embedding: np.ndarray | None = None, k: int = 5,
               start_ns: int | None = None, end_ns: int | None = None, robot_scope: str | None = None,
               exact: bool | None = None, near: SpatialFilter | None = None) -> list[Hit]:
        """Hybrid retrieval, fused as ``EpisodeStore.search`` (``fuse_rankings``): full-text (ts_rank)
        and pgvector cosine, each cut at ``fusion_depth(k)``, within window, scope and ``near``."""
        q = _check_search(text, embedding, k, start_ns, end_ns, near, self._check_embedding)
        self._scope(robot_scope)
        depth = fusion_depth(k)
        lexical, every = self._lexical(text, depth, start_ns, end_ns, robot_scope, near) if text else ([], 0)
        emb = self._embedding_ranking(q, depth, start_ns, end_ns, robot_scope, exact, near) if q is not None else []

        def details(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            rows = self._read("search", lambda c: c.execute(
                "SELECT id, stamp_ns, " + ("1 - (vec <=> %s::vector)" if q is not None else "NULL") +
                " FROM bitmar_episodes WHERE id = ANY(%s)",
                ([_vector_text(q)] if q is not None else []) + [[int(i) for i in ids]]).fetchall())
            by_id = {int(r[0]): r for r in rows}
            stamps = np.array([by_id[int(i)][1] for i in ids], np.int64)
            cosine = np.array([np.nan if by_id[int(i)][2] is None else by_id[int(i)][2] for i in ids], np.float64)
            return stamps, cosine

        ranked = fuse_rankings(lexical, every, [i for i, _ in emb], int(k), details)
        episodes = self._fetch([r.id for r in ranked])
        return [Hit(episodes[r.id], r.score, r.lexical_score, r.lexical_rank, r.embedding_score, r.embedding_rank)
                for r in ranked if r.id in episodes]

    def integrity_check(self) -> list[str]:
        """Problems found (empty = healthy): meta, this robot's episodes (embedding bytes = vector,
        normalised caption, sizes), its memory-state rows."""
        problems: list[str] = []

        def body(conn) -> None:
            meta = dict(conn.execute("SELECT key, value FROM bitmar_meta").fetchall())
            for key, value in {"schema_version": str(SCHEMA_VERSION), "embedding_dim": str(self.embedding_dim),
                               "identity": self.identity}.items():
                if meta.get(key) != value:
                    problems.append(f"meta: {key} is {meta.get(key)!r}, expected {value!r}")
            for episode_id, stamp_ns, caption, canon, blob, vec, thumb_len in conn.execute(
                    "SELECT id, stamp_ns, caption, canon, embedding, vec::text, length(thumbnail) FROM bitmar_episodes"
                    " WHERE robot_id = %s ORDER BY id", (self.robot_id,)):
                blob = bytes(blob)
                if len(blob) != 4 * self.embedding_dim:
                    problems.append(f"episode {episode_id}: embedding is {len(blob)} bytes, "
                                    f"expected {4 * self.embedding_dim}")
                elif not np.array_equal(_check_embedding_array("embedding", np.frombuffer(blob, _F32_LE).astype(
                        np.float32), self.embedding_dim)[1], np.array(vec.strip("[]").split(","), np.float32)):
                    problems.append(f"episode {episode_id}: vector index column differs from its embedding")
                if canon != _normalise(caption, self._canonical):
                    problems.append(f"full-text index: episode {episode_id} is not indexed as its caption")
                if thumb_len > MAX_THUMBNAIL_BYTES:
                    problems.append(f"episode {episode_id}: thumbnail of {thumb_len} bytes > {MAX_THUMBNAIL_BYTES}")
                if stamp_ns < 0:
                    problems.append(f"episode {episode_id}: stamp_ns {stamp_ns} is negative")
            for name, dtype_name, shape_json, data in conn.execute(
                    "SELECT name, dtype, shape, data FROM bitmar_memory_state WHERE robot_id = %s", (self.robot_id,)):
                problem = _state_row_problem(name, dtype_name, shape_json, bytes(data))
                if problem:
                    problems.append(problem)

        self._read("integrity_check", body)
        return problems


def _near(near: SpatialFilter | None) -> tuple[str, list]:
    """SQL condition of a spatial filter (the SQLite store's rule: planar distance in one frame)."""
    if near is None:
        return "", []
    return (" AND pose_frame = %s AND (px - %s) * (px - %s) + (py - %s) * (py - %s) <= %s",
            [near.frame_id, float(near.x), float(near.x), float(near.y), float(near.y), float(near.radius_m) ** 2])


def _bounds(start_ns, end_ns) -> tuple[int, int]:
    return (int(start_ns) if start_ns is not None else 0, int(end_ns) if end_ns is not None else MAX_STAMP_NS)


def _vector_text(v: np.ndarray) -> str:
    # repr of each float32 as a Python float is exact; pgvector parses it back to the same float32.
    return "[" + ",".join(repr(float(x)) for x in v) + "]"


def _check_robot_id(name: str, value) -> None:
    if not isinstance(value, str) or not value or value == FLEET or len(value) > MAX_ROBOT_ID_CHARS \
            or not value.isprintable():
        raise StoreInputError(f"{name}: expected a printable robot name of 1..{MAX_ROBOT_ID_CHARS} chars "
                              f"(not '{FLEET}'), got {value!r:.80}")
