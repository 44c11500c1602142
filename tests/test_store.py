"""EpisodeStore: persistence, ranking against a numpy reference, validation, corruption, crashes."""

import hashlib
import importlib.util
import os
import random
import select
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from bitmar_core.episodes import store as store_mod
from bitmar_core.episodes.store import EpisodeStore
from bitmar_core.episodes.store_api import (MAX_CAPTION_BYTES, MAX_K, MAX_THUMBNAIL_BYTES, StoreClosedError,
                                            StoreCorruptError, StoreInputError, StoreMismatchError,
                                            StoreNotFoundError, StoreVersionError, StoreWriteError, make_thumbnail)

DIM = 16
IDENTITY = "bitmar-test/v1 C=16"
REPO = Path(__file__).resolve().parents[1]
WRITER = Path(__file__).resolve().parent / "helpers" / "store_writer.py"


def _writer_module():
    spec = importlib.util.spec_from_file_location("store_writer", WRITER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _emb(rng, dim=DIM):
    return rng.standard_normal(dim).astype(np.float32)


def _state(k=8, c=DIM, n=1):
    rng = np.random.default_rng(n)
    return {"M": rng.standard_normal((k, c)).astype(np.float32),
            "usage": rng.random(k).astype(np.float32),
            "n_writes": np.int64(n)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """The same tests on both backends: SQLite in a temp dir, and a fresh database of a real
    PostgreSQL + pgvector server (tests/conftest.py: pg_cluster) opened by a least-privilege role."""
    if request.param == "sqlite":
        s = EpisodeStore.open(tmp_path / "mem", DIM, IDENTITY)
    else:
        from bitmar_core.episodes.store_pg import PgEpisodeStore
        s = PgEpisodeStore.open(request.getfixturevalue("pg_cluster").new_database(), DIM, IDENTITY, "robot_a")
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path):
    """Tests of SQLite internals (its file, its FTS5 index, its connection)."""
    s = EpisodeStore.open(tmp_path / "mem", DIM, IDENTITY)
    yield s
    s.close()


def _fill(s, n, seed=0, stamps=None):
    rng = np.random.default_rng(seed)
    added = []
    for i in range(n):
        stamp = int(stamps[i]) if stamps is not None else 1_000 + i
        emb = _emb(rng)
        eid = s.add_episode(stamp, f"caption {i}", "caption", emb)
        added.append((eid, stamp, emb))
    return added


# ---------------------------------------------------------------------- round trip
def test_round_trip_all_fields_byte_exact(tmp_path):
    rng = np.random.default_rng(1)
    directory = tmp_path / "mem"
    written = []
    with EpisodeStore.open(directory, DIM, IDENTITY) as s:
        for i in range(20):
            rgb = rng.integers(0, 256, (40 + i, 60, 3), dtype=np.uint8)
            emb = _emb(rng)
            caption = f"épisode {i} — a cup 🍵" if i % 2 else ""
            source = "caption" if i % 3 else "description"
            state = _state(n=i + 1)
            eid = s.add_episode(10**18 + i, caption, source, emb, make_thumbnail(rgb), state)
            written.append((eid, 10**18 + i, caption, source, emb.tobytes(), make_thumbnail(rgb)))
        last_state = state
    with EpisodeStore.open(directory, DIM, IDENTITY, create=False) as s:
        assert s.count() == 20
        got = s.all_episodes()
        assert [(e.id, e.stamp_ns, e.caption, e.source, e.embedding.tobytes(), e.thumbnail_jpeg)
                for e in got] == written
        assert all(e.embedding.dtype == np.float32 and e.embedding.shape == (DIM,) for e in got)
        assert s.episode(written[3][0]).caption == written[3][2]
        state = s.memory_state()
        assert state.keys() == last_state.keys()
        for name, value in last_state.items():
            assert state[name].dtype == np.asarray(value).dtype
            assert state[name].shape == np.asarray(value).shape
            assert state[name].tobytes() == np.asarray(value).tobytes()
        assert s.integrity_check() == []


def test_memory_state_dtypes_and_put(store):
    assert store.memory_state() is None
    state = {"M": np.arange(12, dtype=np.float64).reshape(3, 4), "flags": np.array([True, False]),
             "be": np.arange(3, dtype=">u2"), "count": 7, "empty": np.zeros((0, 5), np.float32)}
    store.put_memory_state(state)
    got = store.memory_state()
    assert got["M"].dtype == np.float64 and np.array_equal(got["M"], state["M"])
    assert got["flags"].tolist() == [True, False]
    assert got["be"].dtype == np.uint16 and got["be"].tolist() == [0, 1, 2]
    assert got["count"].dtype == np.int64 and got["count"].shape == () and int(got["count"]) == 7
    assert got["empty"].shape == (0, 5)
    got["M"][0, 0] = 99  # fresh writable arrays, not views of the database
    store.put_memory_state({"M": np.ones(2, np.float32)})  # replaces the whole state
    assert list(store.memory_state()) == ["M"]
    assert store.count() == 0  # memory state alone adds no episode


def test_episode_missing_raises_keyerror(store):
    with pytest.raises(KeyError):
        store.episode(12345)


def test_ids_never_reused_after_clear(tmp_path):
    with EpisodeStore.open(tmp_path, DIM, IDENTITY) as s:
        ids = [e[0] for e in _fill(s, 3)]
        s.add_episode(5, "x", "caption", _emb(np.random.default_rng(0)), b"", _state())
        s.clear()
        assert s.count() == 0 and s.memory_state() is None and s.all_episodes() == []
        assert s.query(_emb(np.random.default_rng(1)), 5) == []
        new = _fill(s, 1)[0][0]
        assert new > max(ids) + 1
    with EpisodeStore.open(tmp_path, DIM, IDENTITY) as s:
        assert [e.id for e in s.all_episodes()] == [new] and s.memory_state() is None


# ---------------------------------------------------------------------- query
def _reference(embs, stamps, ids, q, k, start=None, end=None):
    embs = np.asarray(embs, np.float64)
    cos = embs @ q.astype(np.float64) / (np.linalg.norm(embs, axis=1) * np.linalg.norm(q.astype(np.float64)))
    rows = [(cos[i], stamps[i], ids[i]) for i in range(len(ids))
            if (start is None or stamps[i] >= start) and (end is None or stamps[i] <= end)]
    rows.sort(key=lambda r: (-r[0], -r[1], -r[2]))
    return rows[:k]


@pytest.mark.parametrize("reopen", [False, True])
def test_query_matches_numpy_reference(tmp_path, reopen):
    rng = np.random.default_rng(7)
    stamps = rng.integers(0, 10_000, 300)
    s = EpisodeStore.open(tmp_path, DIM, IDENTITY)
    added = _fill(s, 300, seed=3, stamps=stamps)
    if reopen:
        s.close()
        s = EpisodeStore.open(tmp_path, DIM, IDENTITY)
    ids = [a[0] for a in added]
    embs = [a[2] for a in added]
    for trial in range(30):
        q = _emb(rng)
        k = int(rng.integers(1, 40))
        start = int(rng.integers(0, 5_000)) if trial % 3 else None
        end = int(rng.integers(5_000, 10_000)) if trial % 2 else None
        expected = _reference(embs, stamps, ids, q, k, start, end)
        got = s.query(q, k, start, end)
        assert [e.id for e, _ in got] == [r[2] for r in expected]
        np.testing.assert_allclose([sc for _, sc in got], [r[0] for r in expected], atol=1e-5)
        for episode, _ in got:
            assert episode.caption == f"caption {ids.index(episode.id)}"
    # a window holding nothing, and k larger than the store
    assert s.query(embs[0], 5, start_ns=20_000) == []
    assert len(s.query(embs[0], MAX_K)) == 300
    s.close()


def test_query_ties_rank_newest_first(store):
    # One-hot embeddings: their cosines with q are exact, so ties are exact.
    def one_hot(i, scale=1.0):
        e = np.zeros(DIM, np.float32)
        e[i] = scale
        return e

    a = store.add_episode(100, "a", "caption", one_hot(0))
    b = store.add_episode(300, "b", "caption", one_hot(0, 2.0))  # same direction, newer
    c = store.add_episode(200, "c", "caption", one_hot(0, 0.5))
    d = store.add_episode(300, "d", "caption", one_hot(0, 3.0))  # same stamp as b, larger id
    store.add_episode(400, "e", "caption", one_hot(1))
    q = np.zeros(DIM, np.float32)
    q[0], q[1] = 1.0, 0.5
    got = store.query(q, 4)
    assert [e.id for e, _ in got] == [d, b, c, a]
    assert len({score for _, score in got}) == 1
    # ties straddling the cut are decided by recency too
    assert [e.id for e, _ in store.query(q, 2)] == [d, b]


# ---------------------------------------------------------------------- validation
GOOD = dict(stamp_ns=1, caption="c", source="caption", embedding=np.ones(DIM, np.float32), thumbnail_jpeg=b"")


@pytest.mark.parametrize("field, value, fragment", [
    ("embedding", np.ones(DIM + 1, np.float32), "embedding"),
    ("embedding", np.ones((1, DIM), np.float32), "embedding"),
    ("embedding", np.ones(DIM, np.float64), "float32"),
    ("embedding", [1.0] * DIM, "embedding"),
    ("embedding", np.full(DIM, np.nan, np.float32), "finite"),
    ("embedding", np.array([np.inf] + [0] * (DIM - 1), np.float32), "finite"),
    ("embedding", np.zeros(DIM, np.float32), "non-zero"),
    ("caption", b"bytes", "caption"),
    ("caption", None, "caption"),
    ("caption", "x" * (MAX_CAPTION_BYTES + 1), "caption"),
    ("caption", "\ud800", "caption"),
    ("source", "Caption!", "source"),
    ("source", "", "source"),
    ("stamp_ns", -1, "stamp_ns"),
    ("stamp_ns", 1.5, "stamp_ns"),
    ("stamp_ns", True, "stamp_ns"),
    ("stamp_ns", 2**63, "stamp_ns"),
    ("thumbnail_jpeg", b"\xff\xd8" + b"0" * MAX_THUMBNAIL_BYTES, "thumbnail_jpeg"),
    ("thumbnail_jpeg", b"\x89PNG....", "thumbnail_jpeg"),
    ("thumbnail_jpeg", "not bytes", "thumbnail_jpeg"),
])
def test_add_episode_validation_names_input(store, field, value, fragment):
    with pytest.raises(StoreInputError, match=fragment):
        store.add_episode(**{**GOOD, field: value})
    assert store.count() == 0


@pytest.mark.parametrize("state, fragment", [
    ({}, "memory_state"),
    ({"M": np.array(["a"])}, "memory_state\\['M'\\]"),
    ({"M": np.array([object()], dtype=object)}, "dtype"),
    ({"bad name": np.ones(2)}, "name"),
    ({3: np.ones(2)}, "name"),
    ("M", "memory_state"),
])
def test_memory_state_validation(store, state, fragment):
    with pytest.raises(StoreInputError, match=fragment):
        store.put_memory_state(state)
    with pytest.raises(StoreInputError, match=fragment):
        store.add_episode(**GOOD, memory_state=state)
    assert store.count() == 0 and store.memory_state() is None


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(k=0), "k:"), (dict(k=MAX_K + 1), "k:"), (dict(k=2.0), "k:"),
    (dict(k=1, start_ns=10, end_ns=5), "start_ns"), (dict(k=1, start_ns=-1), "start_ns"),
    (dict(k=1, end_ns="5"), "end_ns"),
    (dict(k=1, embedding=np.ones(3, np.float32)), "embedding"),
])
def test_query_validation(store, kwargs, fragment):
    kwargs = {"embedding": np.ones(DIM, np.float32), **kwargs}
    with pytest.raises(StoreInputError, match=fragment):
        store.query(**kwargs)


@pytest.mark.parametrize("dim, identity, fragment", [
    (0, IDENTITY, "embedding_dim"), (True, IDENTITY, "embedding_dim"), (16, "", "identity"), (16, 3, "identity"),
])
def test_open_validation(tmp_path, dim, identity, fragment):
    with pytest.raises(StoreInputError, match=fragment):
        EpisodeStore.open(tmp_path / "x", dim, identity)
    assert not (tmp_path / "x").exists()


def test_closed_store_raises(tmp_path):
    s = EpisodeStore.open(tmp_path, DIM, IDENTITY)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreClosedError):
        s.count()
    with pytest.raises(StoreClosedError):
        s.add_episode(**GOOD)


# ---------------------------------------------------------------------- corruption at open
def _make_store(directory, n=5):
    with EpisodeStore.open(directory, DIM, IDENTITY) as s:
        _fill(s, n)
        s.put_memory_state(_state())
    return directory / store_mod.DB_FILENAME


def _garble(db: Path):
    data = bytearray(db.read_bytes())
    data[:100] = os.urandom(100)  # the SQLite header
    db.write_bytes(bytes(data))


def _set_meta(key, value):
    def corrupt(db: Path):
        conn = sqlite3.connect(db)
        conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
        conn.commit()
        conn.close()
    return corrupt


def _foreign(db: Path):
    db.unlink()
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE photos (x)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("corrupt, error, fragment", [
    (_garble, StoreCorruptError, "not a readable SQLite"),
    (lambda db: db.write_bytes(b"hello, I am not a database" * 200), StoreCorruptError, "not a readable"),
    (_foreign, StoreCorruptError, "not an episode store"),
    (_set_meta("schema_version", "99"), StoreVersionError, "schema_version"),
    (_set_meta("embedding_dim", "32"), StoreMismatchError, "embedding_dim"),
    (_set_meta("identity", "someone else"), StoreMismatchError, "identity"),
])
def test_corrupt_store_raises_and_is_left_untouched(tmp_path, corrupt, error, fragment):
    db = _make_store(tmp_path / "mem")
    corrupt(db)
    before = {p.name: _sha256(p) for p in db.parent.iterdir()}
    with pytest.raises(error, match=fragment):
        EpisodeStore.open(db.parent, DIM, IDENTITY)
    with pytest.raises(error):  # and again: nothing was "repaired" the first time
        EpisodeStore.open(db.parent, DIM, IDENTITY, create=False)
    after = {p.name: _sha256(p) for p in db.parent.iterdir() if p.name in before}
    assert after == before


def test_bad_embedding_blob_in_store_is_reported(tmp_path):
    db = _make_store(tmp_path)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE episodes SET embedding = x'00112233' WHERE id = 2")
    conn.commit()
    conn.close()
    digest = _sha256(db)
    with pytest.raises(StoreCorruptError, match="episode 2 embedding is 4 bytes"):
        EpisodeStore.open(tmp_path, DIM, IDENTITY)
    assert _sha256(db) == digest


def test_integrity_check_reports_problems(sqlite_store):
    store = sqlite_store
    _fill(store, 3)
    store.put_memory_state(_state())
    assert store.integrity_check() == []
    store._conn.execute("UPDATE episodes SET embedding = x'00' WHERE id = 1")
    store._conn.execute("UPDATE memory_state SET data = x'00' WHERE name = 'M'")
    store._conn.execute("UPDATE meta SET value = '7' WHERE key = 'embedding_dim'")
    problems = store.integrity_check()
    assert any("episode 1: embedding is 1 bytes" in p for p in problems)
    assert any("memory_state['M']" in p for p in problems)
    assert any("meta: embedding_dim" in p for p in problems)


def test_open_missing_without_create(tmp_path):
    with pytest.raises(StoreNotFoundError, match="create=True"):
        EpisodeStore.open(tmp_path / "none", DIM, IDENTITY, create=False)
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------- permissions
@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_permissions_are_owner_only_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        directory = tmp_path / "a" / "mem"
        with EpisodeStore.open(directory, DIM, IDENTITY) as s:
            _fill(s, 2)
            files = sorted(p.name for p in directory.iterdir())
            assert files == ["episodes.sqlite3", "episodes.sqlite3-shm", "episodes.sqlite3-wal"]
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
            for p in directory.iterdir():
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name
    finally:
        os.umask(old)


# ---------------------------------------------------------------------- failed writes
def test_disk_full_raises_store_write_error_and_keeps_committed(tmp_path):
    s = EpisodeStore.open(tmp_path, DIM, IDENTITY)
    added = _fill(s, 5)
    s.put_memory_state(_state(n=5))
    pages = s._conn.execute("PRAGMA page_count").fetchone()[0]
    s._conn.execute(f"PRAGMA max_page_count = {pages}")  # the file may not grow: "disk" is full
    big = b"\xff\xd8" + os.urandom(MAX_THUMBNAIL_BYTES - 2)
    q = added[0][2]
    for _ in range(3):
        with pytest.raises(StoreWriteError, match="full") as info:
            s.add_episode(9_999, "too big", "caption", q, big, _state(n=6))
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert s.count() == 5
    assert [e.id for e in s.all_episodes()] == [a[0] for a in added]
    assert int(s.memory_state()["n_writes"]) == 5
    assert s.query(q, 1)[0][0].id == added[0][0]  # the RAM index never saw the failed episode
    assert s.integrity_check() == []
    s._conn.execute("PRAGMA max_page_count = 1073741823")  # space again: writes resume
    new = s.add_episode(10_000, "fits", "caption", q, b"", _state(n=6))
    assert s.count() == 6 and s.integrity_check() == []
    s.close()
    with EpisodeStore.open(tmp_path, DIM, IDENTITY) as s:
        assert [e.caption for e in s.all_episodes()][-1] == "fits" and s.episode(new).stamp_ns == 10_000
        assert int(s.memory_state()["n_writes"]) == 6 and s.integrity_check() == []


class _FailingConnection:
    """Proxies a sqlite3.Connection and fails the first statement containing ``trigger``."""

    def __init__(self, conn, trigger):
        self._conn, self._trigger, self.fired = conn, trigger, False

    def _maybe_fail(self, sql):
        if self._trigger in sql and not self.fired:
            self.fired = True
            raise sqlite3.OperationalError("disk I/O error (injected)")

    def execute(self, sql, *args):
        self._maybe_fail(sql)
        return self._conn.execute(sql, *args)

    def executemany(self, sql, *args):
        self._maybe_fail(sql)
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


@pytest.mark.parametrize("trigger", ["INSERT INTO memory_state", "DELETE FROM memory_state", "COMMIT"])
def test_injected_failure_rolls_back_episode_and_memory_together(tmp_path, trigger):
    s = EpisodeStore.open(tmp_path, DIM, IDENTITY)
    _fill(s, 3)
    s.put_memory_state(_state(n=3))
    real = s._conn
    s._conn = _FailingConnection(real, trigger)
    with pytest.raises(StoreWriteError, match="disk I/O error \\(injected\\)"):
        s.add_episode(50, "lost", "caption", np.ones(DIM, np.float32), b"", _state(n=4))
    assert s._conn.fired and not real.in_transaction
    s._conn = real
    assert s.count() == 3 and int(s.memory_state()["n_writes"]) == 3
    assert "lost" not in [e.caption for e in s.all_episodes()]
    assert s.integrity_check() == []
    s.close()
    with EpisodeStore.open(tmp_path, DIM, IDENTITY) as s:
        assert s.count() == 3 and int(s.memory_state()["n_writes"]) == 3


def test_injected_failure_in_clear_keeps_everything(sqlite_store):
    store = sqlite_store
    _fill(store, 3)
    store.put_memory_state(_state())
    real = store._conn
    store._conn = _FailingConnection(real, "DELETE FROM memory_state")
    with pytest.raises(StoreWriteError, match="clear"):
        store.clear()
    store._conn = real
    assert store.count() == 3 and store.memory_state() is not None and store.integrity_check() == []


# ---------------------------------------------------------------------- threads
def test_one_writer_many_readers(store):
    errors, done = [], threading.Event()
    rng = np.random.default_rng(0)

    def write():
        try:
            for i in range(200):
                store.add_episode(i, f"c{i}", "caption", _emb(rng), b"", _state(n=i + 1))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            done.set()

    def read():
        r = np.random.default_rng(threading.get_ident() % 1000)
        try:
            while not done.is_set():
                got = store.query(_emb(r), 5)
                assert len(got) == min(5, len(got)) and all(e.caption == f"c{e.stamp_ns}" for e, _ in got)
                state = store.memory_state()
                assert state is None or state["M"].shape == (8, DIM)
                store.count()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert store.count() == 200 and store.integrity_check() == []


# ---------------------------------------------------------------------- thumbnails
def test_make_thumbnail_shrinks_and_encodes_jpeg():
    rgb = np.zeros((300, 150, 3), np.uint8)
    rgb[:, :, 0] = 200  # pure red
    jpeg = make_thumbnail(rgb, max_side=96, quality=90)
    assert jpeg[:2] == b"\xff\xd8"
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert bgr.shape == (96, 48, 3)
    assert np.abs(bgr.astype(int) - [0, 0, 200]).max() <= 3  # red stays red: RGB was swapped to BGR
    small = make_thumbnail(np.zeros((10, 20, 3), np.uint8))
    assert cv2.imdecode(np.frombuffer(small, np.uint8), cv2.IMREAD_COLOR).shape == (10, 20, 3)  # no upscale
    with pytest.raises(StoreInputError, match="rgb"):
        make_thumbnail(np.zeros((10, 10), np.uint8))
    with pytest.raises(StoreInputError, match="quality"):
        make_thumbnail(rgb, quality=0)


# ---------------------------------------------------------------------- crash safety
def _crash_cycles(directory: Path, kills: int, seed: int = 0) -> None:
    """SIGKILL the writer at random moments; after each, every acked episode must be intact."""
    writer = _writer_module()
    rnd = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    acked: dict[int, int] = {}
    for cycle in range(kills):
        proc = subprocess.Popen([sys.executable, str(WRITER), str(directory), str(DIM), IDENTITY],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        first = b""
        if cycle % 4 == 0:  # kill anywhere in start-up: import, creation, first writes
            time.sleep(rnd.uniform(0.0, 1.0))
        else:  # kill mid-writes: after the first ack, at a random moment
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, "writer printed nothing within 30 s"
            first = proc.stdout.readline()
            time.sleep(rnd.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err.decode()
        for line in (first + out).decode().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "ack":  # a line cut by the kill is not an ack
                acked[int(parts[1])] = int(parts[2])
        if not (directory / store_mod.DB_FILENAME).exists():  # killed before it created the store
            assert not acked
            continue
        with EpisodeStore.open(directory, DIM, IDENTITY) as s:
            assert s.integrity_check() == []
            for episode_id, n in acked.items():
                episode = s.episode(episode_id)
                assert episode.caption == writer.caption_for(n) and episode.stamp_ns == n
                assert episode.embedding.tobytes() == writer.embedding_for(n, DIM).tobytes()
            count = s.count()
            assert count >= len(acked)
            state = s.memory_state()
            if count:  # memory and episodes agree: the state is the one written with the last episode
                assert int(state["n_writes"]) == count
                assert np.all(state["M"] == count) and np.all(state["usage"] == count)
    assert len(acked) > 0


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_acked_episode(tmp_path):
    _crash_cycles(tmp_path / "mem", kills=5)


def test_store_killed_while_being_created_is_initialised_on_open(tmp_path):
    # What a kill between "file created" and "schema committed" leaves: an empty file, or a
    # database in WAL mode without tables. Neither holds data, so open() initialises it.
    tmp_path.chmod(0o700)
    db = tmp_path / store_mod.DB_FILENAME
    db.touch(mode=0o600)
    with pytest.raises(StoreNotFoundError):
        EpisodeStore.open(tmp_path, DIM, IDENTITY, create=False)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    assert db.stat().st_size > 0
    with pytest.raises(StoreNotFoundError):
        EpisodeStore.open(tmp_path, DIM, IDENTITY, create=False)
    with EpisodeStore.open(tmp_path, DIM, IDENTITY) as s:
        assert s.count() == 0 and s.integrity_check() == []
        _fill(s, 1)
    with EpisodeStore.open(tmp_path, DIM, IDENTITY, create=False) as s:
        assert s.count() == 1


def test_directory_name_with_uri_special_characters(tmp_path):
    directory = tmp_path / "my store #1 ?x=%20&"
    with EpisodeStore.open(directory, DIM, IDENTITY) as s:
        _fill(s, 2)
    with EpisodeStore.open(directory, DIM, IDENTITY, create=False) as s:
        assert s.count() == 2
    with pytest.raises(StoreMismatchError):
        EpisodeStore.open(directory, DIM + 1, IDENTITY)


def test_checkpoint_empties_the_wal(tmp_path):
    with EpisodeStore.open(tmp_path, DIM, IDENTITY) as s:
        _fill(s, 10)
        wal = tmp_path / (store_mod.DB_FILENAME + "-wal")
        assert wal.stat().st_size > 0
        s.checkpoint()
        assert wal.stat().st_size == 0 and s.count() == 10
    with EpisodeStore.open(tmp_path, DIM, IDENTITY) as s:
        assert s.count() == 10


# ---------------------------------------------------------------------- full-text index and hybrid search
V1_FIXTURE = REPO / "tests" / "fixtures" / "store_v1" / "episodes.sqlite3"
V1_CAPTIONS = ["A ginger tabby cat asleep on a sofa.", "Two red circles at the top.",
               "A cup of coffee on the kitchen table.", "The red stop sign at the corner.",
               "A little violet disk in the lower left.", "Rockets launching at dawn.", "", "Le café est chaud."]


def _v1_copy(tmp_path) -> Path:
    directory = tmp_path / "old"
    directory.mkdir(mode=0o700)
    db = directory / store_mod.DB_FILENAME
    db.write_bytes(V1_FIXTURE.read_bytes())
    db.chmod(0o600)
    return directory


def test_store_written_by_schema_1_code_is_migrated_on_open(tmp_path):
    """tests/fixtures/store_v1 was written by the store of commit 3032d34 (schema 1, no full-text
    index); the new code indexes the old rows on open, keeps everything else, and reads it again."""
    directory = _v1_copy(tmp_path)
    conn = sqlite3.connect(directory / store_mod.DB_FILENAME)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("1",)
    old_rows = conn.execute("SELECT * FROM episodes ORDER BY id").fetchall()
    old_state = conn.execute("SELECT * FROM memory_state ORDER BY name").fetchall()
    conn.close()
    with EpisodeStore.open(directory, DIM, IDENTITY, create=False) as s:
        assert [e.caption for e in s.all_episodes()] == V1_CAPTIONS
        assert all(e.pose is None for e in s.all_episodes())
        assert s.integrity_check() == []
        for word, expected in [("cats", 1), ("CIRCLE", 2), ("coffee", 3), ("stop", 4), ("disks", 5),
                               ("launch", 6), ("café", 8)]:
            assert [i for i, _ in s.lexical_search(word, 10)] == [expected], word
        assert {i for i, _ in s.lexical_search("red", 10)} == {2, 4}
        new = s.add_episode(2_000, "a purple cat", "caption", np.ones(DIM, np.float32))
        assert {i for i, _ in s.lexical_search("cat", 10)} == {1, new}
    conn = sqlite3.connect(directory / store_mod.DB_FILENAME)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("3",)
    assert conn.execute("SELECT id, stamp_ns, caption, source, embedding, thumbnail FROM episodes WHERE id <= 8"
                        " ORDER BY id").fetchall() == old_rows
    assert conn.execute("SELECT count(*) FROM episodes WHERE pose_frame IS NOT NULL").fetchone() == (0,)
    assert conn.execute("SELECT * FROM memory_state ORDER BY name").fetchall() == old_state
    conn.close()
    with EpisodeStore.open(directory, DIM, IDENTITY) as s:  # migrated once; opens as version 3
        assert s.count() == 9 and s.integrity_check() == []


def test_failed_migration_leaves_a_readable_schema_1_store(tmp_path, monkeypatch):
    directory = _v1_copy(tmp_path)
    monkeypatch.setattr(store_mod, "_FTS_SCHEMA", store_mod._FTS_SCHEMA + ("CREATE TABLE broken (",))
    with pytest.raises(StoreWriteError, match="migrate schema 1"):
        EpisodeStore.open(directory, DIM, IDENTITY)
    conn = sqlite3.connect(directory / store_mod.DB_FILENAME)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("1",)
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name LIKE 'episodes_fts%'").fetchone() == (0,)
    conn.close()
    monkeypatch.undo()
    with EpisodeStore.open(directory, DIM, IDENTITY) as s:
        assert s.count() == 8 and [i for i, _ in s.lexical_search("cat", 5)] == [1]


def test_schema_2_store_without_its_index_is_refused_untouched(tmp_path):
    db = _make_store(tmp_path / "mem")
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE episodes_fts")
    conn.commit()
    conn.close()
    digest = _sha256(db)
    with pytest.raises(StoreCorruptError, match="full-text index"):
        EpisodeStore.open(db.parent, DIM, IDENTITY)
    assert _sha256(db) == digest


def test_lexical_search_matches_case_and_plurals(store):
    ids = [store.add_episode(i, c, "caption", np.ones(DIM, np.float32)) for i, c in enumerate(
        ["A Cat on the mat", "two cats and one dog", "a red circle", "Circles everywhere", "a boxes shop"])]
    assert {i for i, _ in store.lexical_search("cats", 10)} == {ids[0], ids[1]}
    assert {i for i, _ in store.lexical_search("CAT", 10)} == {ids[0], ids[1]}
    assert {i for i, _ in store.lexical_search("circle", 10)} == {ids[2], ids[3]}
    assert [i for i, _ in store.lexical_search("box", 10)] == [ids[4]]
    assert store.lexical_search("giraffe", 10) == []


@pytest.mark.parametrize("text", [
    '"', '""', "'", "*", "cat*", "-cat", "cat -dog", "NEAR", "NEAR(cat dog)", "NEAR(cat dog, 2)", "(", ")",
    "(cat", "AND", "OR", "NOT", "cat AND", "AND cat", "cat OR OR dog", "cat NOT", "^cat", "caption:cat",
    "caption : cat", "{caption}: cat", "cat + dog", "c'a't", '"cat" "', "\x00", "🐈 cat", "𝒸𝒶𝓉", "_", "a_b",
    "--", "---cat", "cat;DROP TABLE episodes;", "     ", "", "and or not near", "ß", "İ",
])
def test_query_syntax_characters_never_raise(store, text):
    store.add_episode(1, "the cat and the dog near a table", "caption", np.ones(DIM, np.float32))
    got = store.lexical_search(text, 5)
    assert all(isinstance(i, int) and isinstance(sc, float) for i, sc in got)
    if "cat" in text:
        assert got, text  # the word is found whatever surrounds it
    store.search(text or " ", np.ones(DIM, np.float32), 3)
    assert store.count() == 1 and store.integrity_check() == []


def test_random_text_queries_never_raise(store):
    rng = random.Random(5)
    alphabet = 'abcAND OR NOT NEAR"*-+^:(){}[],.;\'\\/_~`!@#$%&=<>?|éß🐈\t\n\x00'
    store.add_episode(1, "a cat", "caption", np.ones(DIM, np.float32))
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        store.lexical_search(text, 5)


def test_synonym_groups_match_as_one_word(tmp_path):
    groups = [("purple", "violet"), ("circle", "disk"), ("oval", "ellipse"), ("large", "big")]
    s = EpisodeStore.open(tmp_path / "syn", DIM, IDENTITY, synonyms=groups)
    a = s.add_episode(1, "a small purple circle", "caption", np.ones(DIM, np.float32))
    b = s.add_episode(2, "a big orange oval; the orange ellipse is large", "caption", np.ones(DIM, np.float32))
    c = s.add_episode(3, "two large orange ovals", "caption", np.ones(DIM, np.float32))
    assert [i for i, _ in s.lexical_search("violet disk", 5)] == [a]
    assert [i for i, _ in s.lexical_search("Violet DISKS", 5)] == [a]
    assert {i for i, _ in s.lexical_search("large ellipses", 5)} == {b, c}
    # A group is one word for BM25, plus a second score for the very word of the query: the caption
    # saying "oval" and "ellipse" scores for "ellipse" as one saying "ellipse" twice would score in
    # the normalised column, and it holds "ellipse" once as written.
    plain = EpisodeStore.open(tmp_path / "plain", DIM, IDENTITY)
    b2 = plain.add_episode(2, "a big orange ellipse; the orange ellipse is big", "caption", np.ones(DIM, np.float32))
    plain.add_episode(1, "a small purple circle", "caption", np.ones(DIM, np.float32))
    plain.add_episode(3, "two big orange ovals", "caption", np.ones(DIM, np.float32))
    assert dict(s.lexical_search("ellipse", 5))[b] < dict(plain.lexical_search("ellipse", 5))[b2]
    # The query's own wording ranks first among captions that hold its group.
    d = s.add_episode(4, "one orange ellipse", "caption", np.ones(DIM, np.float32))
    e = s.add_episode(5, "one orange oval", "caption", np.ones(DIM, np.float32))
    got = [i for i, _ in s.lexical_search("orange ellipse", 5)]
    assert got.index(d) < got.index(e) and [i for i, _ in s.lexical_search("orange oval", 5)].index(e) < \
        [i for i, _ in s.lexical_search("orange oval", 5)].index(d)
    assert s.integrity_check() == [] and s.synonym_groups == tuple(groups)
    s.close()
    with EpisodeStore.open(tmp_path / "syn", DIM, IDENTITY) as s:  # None: the store keeps its groups
        assert [i for i, _ in s.lexical_search("violet", 5)] == [a]
    with EpisodeStore.open(tmp_path / "syn", DIM, IDENTITY, synonyms=[]) as s:  # other groups: re-indexed
        assert s.lexical_search("violet", 5) == [] and [i for i, _ in s.lexical_search("purple", 5)] == [a]
        assert s.integrity_check() == []


@pytest.mark.parametrize("groups, fragment", [
    ("purple violet", "sequence of word groups"), ([("purple",)], "≥ 2 words"), ([("Purple", "violet")], "lowercase"),
    ([("a b", "c")], "lowercase words"), ([("x", "y"), ("y", "z")], "two groups"), ([("x", 3)], "lowercase"),
])
def test_synonym_validation(tmp_path, groups, fragment):
    with pytest.raises(StoreInputError, match=fragment):
        EpisodeStore.open(tmp_path, DIM, IDENTITY, synonyms=groups)


def test_lexical_search_relaxes_only_when_no_caption_holds_every_word(store):
    filler = [store.add_episode(10 + i, f"filler {i}", "caption", np.ones(DIM, np.float32)) for i in range(20)]
    one = store.add_episode(1, "red red red red circle circle", "caption", np.ones(DIM, np.float32))
    both = store.add_episode(2, "a long caption that mentions a red square and then a star far away", "caption",
                             np.ones(DIM, np.float32))
    assert [i for i, _ in store.lexical_search("red star", 5)] == [both]  # every word held: only those
    assert [i for i, _ in store.lexical_search("red giraffe", 5)] == [one, both]  # no caption knows "giraffe"
    # No caption holds both: those holding either; "filler" (held by over half) is left out of that pass.
    assert {i for i, _ in store.lexical_search("filler circle star", 5)} == {one, both}
    assert [i for i, _ in store.lexical_search("filler", 30)] == filler[::-1]  # alone, it is searched


def test_full_text_index_follows_rollback_and_clear(tmp_path):
    s = EpisodeStore.open(tmp_path, DIM, IDENTITY)
    kept = s.add_episode(1, "kept giraffe", "caption", np.ones(DIM, np.float32), b"", _state(n=1))
    real = s._conn
    s._conn = _FailingConnection(real, "COMMIT")
    with pytest.raises(StoreWriteError):
        s.add_episode(2, "lost giraffe", "caption", np.ones(DIM, np.float32), b"", _state(n=2))
    s._conn = real
    assert [i for i, _ in s.lexical_search("giraffe", 5)] == [kept] and s.integrity_check() == []
    s._conn = _FailingConnection(real, "DELETE FROM memory_state")
    with pytest.raises(StoreWriteError):
        s.clear()
    s._conn = real
    assert [i for i, _ in s.lexical_search("giraffe", 5)] == [kept]
    s.clear()
    assert s.lexical_search("giraffe", 5) == [] and s.integrity_check() == []
    new = s.add_episode(3, "new giraffe", "caption", np.ones(DIM, np.float32))
    assert [i for i, _ in s.lexical_search("giraffe", 5)] == [new] and s.integrity_check() == []
    s.close()


def test_integrity_check_reports_a_stale_full_text_index(sqlite_store):
    store = sqlite_store
    ids = [e[0] for e in _fill(store, 3)]
    store._conn.execute("DELETE FROM episodes_fts WHERE rowid = ?", (ids[0],))
    store._conn.execute("UPDATE episodes_fts SET canon = 'something else' WHERE rowid = ?", (ids[1],))
    store._conn.execute("INSERT INTO episodes_fts (rowid, caption, canon) VALUES (999, 'orphan', 'orphan')")
    problems = store.integrity_check()
    assert any(f"episode {ids[0]} is not indexed" in p for p in problems)
    assert any(f"episode {ids[1]} is not indexed" in p for p in problems)
    assert any("1 entries without an episode" in p for p in problems)


def _unit(i, j=None, w=0.0):
    e = np.zeros(DIM, np.float32)
    e[i] = 1.0
    if j is not None:
        e[j] = w
    return e


def _fusion_world(store):
    """Three episodes whose lexical and embedding ranks are known by construction, plus filler that
    shares no word with the query and points away from it."""
    for i in range(40):
        store.add_episode(10_000 + i, f"filler number {i}", "caption", -_unit(0))
    a = store.add_episode(1_000, "a zebra eating a mango", "caption", _unit(0, 1, 3.0))          # lexical 1, cosine 3rd
    b = store.add_episode(2_000, "a zebra eating on the long dusty road", "caption", _unit(0, 1, 1.0))  # 2nd, 2nd
    c = store.add_episode(3_000, "a horse in a field", "caption", _unit(0))                      # no word, cosine 1st
    return a, b, c


def test_reciprocal_rank_fusion_by_hand(store):
    a, b, c = _fusion_world(store)
    got = store.search("zebra eating", _unit(0), k=3)
    expected = {a: 1 / 61 + 1 / 63, b: 1 / 62 + 1 / 62, c: 0 + 1 / 61}
    assert [h.episode.id for h in got] == [a, b, c]  # 0.032266 > 0.032258 > 0.016393
    for h in got:
        assert h.score == pytest.approx(expected[h.episode.id], abs=1e-12)
    assert [(h.lexical_rank, h.embedding_rank) for h in got] == [(1, 3), (2, 2), (0, 1)]
    assert [h.matched_by for h in got] == ["lexical+embedding", "lexical+embedding", "embedding"]
    np.testing.assert_allclose([h.embedding_score for h in got], [1 / np.sqrt(10), 1 / np.sqrt(2), 1.0], atol=1e-6)
    assert got[0].lexical_score > got[1].lexical_score > 0 and got[2].lexical_score == 0
    # One input alone: its own ranking.
    assert [h.episode.id for h in store.search("zebra eating", None, k=3)] == [a, b]
    assert [h.matched_by for h in store.search("zebra", None, k=3)] == ["lexical", "lexical"]
    assert [h.episode.id for h in store.search(None, _unit(0), k=3)] == [c, b, a]
    assert np.isnan(store.search("zebra", None, k=1)[0].embedding_score)


def test_time_window_applies_to_both_rankings(store):
    a, b, c = _fusion_world(store)
    got = store.search("zebra eating", _unit(0), k=5, start_ns=1_500, end_ns=9_000)
    assert [h.episode.id for h in got] == [b, c]  # a (best lexical) and the filler lie outside
    assert [(h.lexical_rank, h.embedding_rank) for h in got] == [(1, 2), (0, 1)]  # ranks within the window
    assert store.lexical_search("zebra", 5, start_ns=0, end_ns=1_500) == store.lexical_search("zebra", 5)[:1]  # a
    assert store.lexical_search("zebra", 5, start_ns=1_500) == store.lexical_search("zebra", 5)[1:]  # b
    assert store.search("zebra", _unit(0), k=5, start_ns=50_000) == []
    assert store.search("giraffe", None, k=5) == []


def test_equal_captions_share_a_lexical_rank_and_the_embedding_decides(store):
    old = store.add_episode(1, "a blue star", "caption", _unit(1))
    new = store.add_episode(2, "a blue star", "caption", _unit(2))
    got = store.search("blue star", _unit(1), k=2)
    assert [h.lexical_rank for h in got] == [1, 1]
    assert [h.episode.id for h in got] == [old, new]
    assert [h.episode.id for h in store.search("blue star", _unit(2), k=2)] == [new, old]


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(text=None, embedding=None), "text, an embedding, or both"),
    (dict(text="  ", embedding=None), "text, an embedding, or both"),
    (dict(text=b"cat"), "text"),
    (dict(text="cat", k=0), "k:"),
    (dict(text="cat", start_ns=5, end_ns=1), "start_ns"),
    (dict(text="cat", embedding=np.zeros(DIM, np.float32)), "non-zero"),
])
def test_search_validation(store, kwargs, fragment):
    with pytest.raises(StoreInputError, match=fragment):
        store.search(**kwargs)


def test_captions_with_every_word_outrank_a_better_fused_score(store):
    """The fusion rule's first key: a caption holding every word of the text comes before one
    that does not, even when the latter's fused score is higher."""
    for i in range(80):  # close to the query embedding: they push the zebras out of its top 2k + 60
        store.add_episode(10_000 + i, f"filler {i}", "caption", _unit(0, 1, 0.3))
    horse = store.add_episode(1, "a horse", "caption", _unit(0))                              # cosine first
    z1 = store.add_episode(2, "a zebra", "caption", -_unit(0))
    z2 = store.add_episode(3, "a zebra eating grass", "caption", -_unit(0))
    got = store.search("zebra", _unit(0), k=2)
    assert [h.episode.id for h in got] == [z1, z2]
    assert [h.embedding_rank for h in got] == [0, 0]  # below the depth that is fused
    # The horse's fused score, 1/61 + 0, is above the second zebra's 1/62 + 0.
    assert got[1].score == pytest.approx(1 / 62)
    horse_hit = store.search("zebra", _unit(0), k=3)[2]
    assert horse_hit.episode.id == horse and horse_hit.score == pytest.approx(1 / 61)


# ---------------------------------------------------------------------- poses (schema 3), forget, retention
V2_FIXTURE = REPO / "tests" / "fixtures" / "store_v2" / "episodes.sqlite3"
V2_CAPTIONS = ["A ginger tabby cat asleep on a sofa.", "Two red circles at the top.",
               "A cup of coffee on the kitchen table."]


def test_store_written_by_schema_2_code_migrates_to_poses_keeping_every_row(tmp_path):
    """tests/fixtures/store_v2 was written by the store of commit ddbf824 (no pose columns)."""
    from bitmar_core.episodes.pose import Pose

    directory = tmp_path / "old"
    directory.mkdir(mode=0o700)
    db = directory / store_mod.DB_FILENAME
    db.write_bytes(V2_FIXTURE.read_bytes())
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    old_rows = conn.execute("SELECT * FROM episodes ORDER BY id").fetchall()
    old_fts = conn.execute("SELECT rowid, caption, canon FROM episodes_fts ORDER BY rowid").fetchall()
    conn.close()
    with EpisodeStore.open(directory, DIM, IDENTITY, create=False) as s:
        episodes = s.all_episodes()
        assert [e.caption for e in episodes] == V2_CAPTIONS and all(e.pose is None for e in episodes)
        assert [e.thumbnail_jpeg for e in episodes] == [b"\xff\xd8jpeg" + bytes([i]) for i in range(3)]
        assert int(s.memory_state()["n_writes"]) == 3
        assert [i for i, _ in s.lexical_search("coffee", 5)] == [3]
        new = s.add_episode(2_000, "a cat in the hall", "caption", np.ones(DIM, np.float32),
                            pose=Pose("map", (1.0, 2.0, 0.0), (0.0, 0.0, 1.0, 0.0)))
        assert s.episode(new).pose == Pose("map", (1.0, 2.0, 0.0), (0.0, 0.0, 1.0, 0.0))
        assert s.integrity_check() == []
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("3",)
    assert conn.execute("SELECT id, stamp_ns, caption, source, embedding, thumbnail FROM episodes WHERE id <= 3"
                        " ORDER BY id").fetchall() == old_rows
    assert conn.execute("SELECT rowid, caption, canon FROM episodes_fts WHERE rowid <= 3 ORDER BY rowid").fetchall() == old_fts
    conn.close()


def test_pose_round_trips_and_spatial_filter_matches_a_reference(store):
    """Episodes on a line x = 0..19 in 'map' (odd ones without a pose, every fifth in 'odom'): a query
    within 3.5 m of (10, 1) finds exactly those whose planar distance, computed here, is ≤ 3.5."""
    from bitmar_core.episodes.pose import Pose
    from bitmar_core.episodes.store_api import SpatialFilter

    rng = np.random.default_rng(5)
    poses, ids = {}, []
    for i in range(20):
        pose = None if i % 2 else Pose("odom" if i % 5 == 0 else "map", (float(i), 0.0, 1.2), (0, 0, np.sin(i / 4), np.cos(i / 4)))
        eid = store.add_episode(1_000 + i, f"a red cube number {i}", "caption", _emb(rng), pose=pose)
        poses[eid] = pose
        ids.append(eid)
    for eid, pose in poses.items():
        got = store.episode(eid).pose
        if pose is None:
            assert got is None
        else:
            assert got.frame_id == pose.frame_id
            assert np.allclose(got.position, pose.position) and np.allclose(got.orientation, pose.orientation)
    expected = {eid for eid, p in poses.items()
                if p is not None and p.frame_id == "map" and np.hypot(p.position[0] - 10, p.position[1] - 1) <= 3.5}
    assert expected == {ids[8], ids[12]}  # x = 8 and 12 ((10, 14) lie in 'odom'; odd ones have no pose)
    near = SpatialFilter("map", 10.0, 1.0, 3.5)
    for kwargs in ({"text": "red cube"}, {"embedding": _emb(rng)}, {"text": "red cube", "embedding": _emb(rng)}):
        hits = store.search(k=20, near=near, **kwargs)
        assert {h.episode.id for h in hits} == expected, kwargs
        assert all(h.episode.pose is not None for h in hits)
    assert store.search("red cube", k=20, near=SpatialFilter("base_link", 10.0, 1.0, 3.5)) == []
    # time and place together
    assert {h.episode.id for h in store.search("red cube", k=20, near=near, end_ns=1_010)} == {ids[8]}
    with pytest.raises(StoreInputError, match="radius_m"):
        SpatialFilter("map", 0.0, 0.0, 0.0)
    with pytest.raises(StoreInputError, match="pose"):
        store.add_episode(1, "x", "caption", _emb(rng), pose=(1, 2, 3))


def test_forget_by_ids_time_and_caption_keeps_the_rest(store):
    rng = np.random.default_rng(6)
    ids = [store.add_episode(1_000 + i, c, "caption", _emb(rng)) for i, c in enumerate(
        ["a red cube", "a Blue ball", "a red ball", "a green cube", "a blue cube", "a red cone"])]
    with pytest.raises(StoreInputError, match="forget"):
        store.forget()
    assert store.forget(caption_contains="BLUE") == [ids[1], ids[4]]
    assert store.forget(ids=[ids[0], ids[3], 999_999], start_ns=1_003) == [ids[3]]
    assert store.forget(start_ns=1_004, end_ns=1_005, caption_contains="red") == [ids[5]]
    assert [e.id for e in store.all_episodes()] == [ids[0], ids[2]]
    assert {h.episode.id for h in store.search("red", k=10)} == {ids[0], ids[2]}
    assert store.search("blue", k=10) == []
    assert store.integrity_check() == []


def test_retention_by_count_age_and_thinning(store):
    from bitmar_core.episodes.store_api import RetentionPolicy

    rng = np.random.default_rng(7)
    same = _emb(rng)
    ids = []
    # 10 s apart; the 20 first episodes show one scene (the same embedding), the next 20 each another.
    for i in range(40):
        ids.append(store.add_episode(i * 10**10, f"episode {i}", "caption", same if i < 20 else _emb(rng)))
    report = store.enforce_retention(RetentionPolicy(max_age_s=350.0))  # newest at 390 s: < 40 s goes
    assert report.deleted == 4 and [e.id for e in store.all_episodes()] == ids[4:]
    # thinning: one episode per 30 s of the unchanged scene; 36 left, limit 30 → to 27 (low water 0.9)
    report = store.enforce_retention(RetentionPolicy(max_count=30, thin_interval_s=30.0))
    assert report.thinned == 9 and report.deleted == 9 and report.count == 27
    kept = [e.id for e in store.all_episodes()]
    # ids[4] (40 s) kept; ids[5], ids[6] less than 30 s after it go; ids[7] (70 s) kept; ... ids[17] is the
    # 9th thinned, so ids[18] stays; the changing scene (ids[20:]) is untouched.
    assert kept == [ids[i] for i in (4, 7, 10, 13, 16, 18, 19)] + ids[20:]
    report = store.enforce_retention(RetentionPolicy(max_count=10))
    assert [e.id for e in store.all_episodes()] == ids[31:]  # oldest first, down to 9
    assert store.integrity_check() == []


def _synthetic(n0: int, n: int, dim: int = DIM, thumb: int = 200):
    """Episodes n0 .. n0+n-1: stamp = 1 s apart, caption naming the number, a seeded embedding."""
    from bitmar_core.episodes.store_api import NewEpisode

    rng = np.random.default_rng(n0)
    embs = rng.standard_normal((n, dim)).astype(np.float32)
    return [NewEpisode((n0 + i) * 10**9, f"a robot sees object {n0 + i} on shelf {(n0 + i) % 97}", "caption",
                       embs[i], b"\xff\xd8" + bytes([(n0 + i) % 256]) * thumb) for i in range(n)]


def test_add_episodes_is_one_transaction(store):
    from bitmar_core.episodes.store_api import NewEpisode

    ids = store.add_episodes(_synthetic(0, 5), memory_state=_state(n=5))
    assert [store.episode(i).caption for i in ids] == [e.caption for e in _synthetic(0, 5)]
    assert int(store.memory_state()["n_writes"]) == 5
    bad = _synthetic(5, 3) + [NewEpisode(1, "x", "Not A Source", _emb(np.random.default_rng(0)))]
    with pytest.raises(StoreInputError, match=r"episodes\[3\].source"):
        store.add_episodes(bad)
    assert store.count() == 5


@pytest.mark.slow
def test_retention_keeps_100k_synthetic_episodes_under_a_byte_budget(tmp_path):
    """100,000 episodes arrive in batches of 2,000 into a store with a 2 MiB budget (room for a few
    thousand): after every pass the database (file and used pages) is within the budget, and at the
    end the integrity check is clean and the newest episodes are all there, in a row up to the last."""
    from bitmar_core.episodes.store_api import RetentionPolicy

    budget = 2 * 1024 * 1024
    policy = RetentionPolicy(max_bytes=budget)
    db = tmp_path / "mem" / store_mod.DB_FILENAME
    added: list[int] = []
    with EpisodeStore.open(tmp_path / "mem", DIM, IDENTITY) as s:
        for n0 in range(0, 100_000, 2_000):
            added += s.add_episodes(_synthetic(n0, 2_000))
            report = s.enforce_retention(policy)
            assert report.bytes_used <= budget and s.bytes_used() <= budget
            assert db.stat().st_size <= budget, f"file of {db.stat().st_size} bytes after {len(added)} episodes"
        kept = [e.id for e in s.episodes_by_time(limit=MAX_K, newest_first=False)]
        count = s.count()
        assert 1_000 < count < 100_000
        assert s.integrity_check() == []
    with EpisodeStore.open(tmp_path / "mem", DIM, IDENTITY) as s:
        ids = [e.id for e in s.all_episodes()]
        assert ids == added[-count:]  # exactly the newest, none missing in between
        assert ids[: len(kept)] == kept
        assert s.integrity_check() == []
        assert [h.episode.id for h in s.search("object 99999", k=1)] == [added[-1]]


@pytest.mark.slow
def test_kill_during_retention_loses_nothing_it_should_keep(tmp_path):
    """SIGKILL a retention pass (batches of 50 deletions) at random moments: after each kill the store
    opens clean, holds every episode the policy keeps, and what is gone is only ever the oldest."""
    directory = tmp_path / "mem"
    with EpisodeStore.open(directory, DIM, IDENTITY) as s:
        added = s.add_episodes(_synthetic(0, 6_000, thumb=2_000))
    keep = 500
    runner = REPO / "tests" / "helpers" / "retention_runner.py"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rnd = random.Random(3)
    counts = []
    for cycle in range(6):
        proc = subprocess.Popen([sys.executable, str(runner), str(directory), str(DIM), IDENTITY, str(keep)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.readline().strip() == b"ready"
        for _ in range(rnd.randint(1, 15)):  # ≤ 15 of the ~100 batches left: always inside the pass
            assert proc.stdout.readline().strip() == b"committed"
        time.sleep(rnd.uniform(0.0, 0.005))  # then anywhere in the next transaction(s)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        with EpisodeStore.open(directory, DIM, IDENTITY) as s:
            assert s.integrity_check() == []
            ids = [e.id for e in s.all_episodes()]
            assert ids == added[-len(ids):] and len(ids) >= keep  # a suffix: only the oldest went
            counts.append(len(ids))
    assert any(keep < c < len(added) for c in counts), counts  # some kill landed inside the pass
    with EpisodeStore.open(directory, DIM, IDENTITY) as s:
        from bitmar_core.episodes.store_api import RetentionPolicy
        s.enforce_retention(RetentionPolicy(max_count=keep, low_water=1.0))
        assert [e.id for e in s.all_episodes()] == added[-keep:] and s.integrity_check() == []


def test_retention_by_bytes_keeps_the_newest_within_the_budget(store):
    from bitmar_core.episodes.store_api import RetentionPolicy

    ids = store.add_episodes(_synthetic(0, 400, thumb=2_000))
    budget = store.bytes_used() // 2
    report = store.enforce_retention(RetentionPolicy(max_bytes=budget))
    assert report.bytes_used <= budget and store.bytes_used() <= budget
    kept = [e.id for e in store.all_episodes()]
    assert 100 < len(kept) <= 200 and kept == ids[-len(kept):]
    assert store.integrity_check() == []
