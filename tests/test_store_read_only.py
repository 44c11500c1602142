"""EpisodeStore.open_read_only, refresh, snapshot and episodes_by_time: a reader beside a live writer
(another connection, as the memory browser beside the node) sees what the writer committed, never
writes, and never blocks the writer."""

from pathlib import Path

import numpy as np
import pytest

from bitmar_core.episodes.store import DB_FILENAME, EpisodeStore

from bitmar_core.episodes.store_api import StoreInputError, StoreMismatchError, StoreNotFoundError, StoreWriteError

DIM = 8
IDENTITY = "bitmar-test/read-only C=8"


def _emb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def _add(store: EpisodeStore, stamp_ns: int, caption: str, seed: int) -> int:
    state = {"M": np.full((4, DIM), seed, np.float32), "usage": np.zeros(4, np.float32), "n_writes": np.int64(seed)}
    return store.add_episode(stamp_ns=stamp_ns, caption=caption, source="caption", embedding=_emb(seed),
                             memory_state=state)


@pytest.fixture
def writer(tmp_path):
    store = EpisodeStore.open(tmp_path / "store", DIM, IDENTITY)
    yield store
    store.close()


def test_open_read_only_creates_nothing(tmp_path):
    with pytest.raises(StoreNotFoundError, match="creates none"):
        EpisodeStore.open_read_only(tmp_path / "none", DIM, IDENTITY)
    assert not (tmp_path / "none").exists()


def test_open_read_only_refuses_another_model(writer):
    _add(writer, 1, "a red circle", 1)
    with pytest.raises(StoreMismatchError):
        EpisodeStore.open_read_only(writer.path.parent, DIM, "another model")


def test_reader_sees_the_writers_commits_after_refresh(writer):
    for i, caption in enumerate(["a red circle", "a blue square", "a green star"]):
        _add(writer, 10 + i, caption, i + 1)
    reader = EpisodeStore.open_read_only(writer.path.parent, DIM, IDENTITY)
    try:
        assert reader.read_only and not writer.read_only
        assert reader.count() == 3
        new_id = _add(writer, 20, "a purple triangle", 7)
        assert reader.count() == 3                  # the index is what was committed at open
        assert reader.refresh() == 4
        with reader.snapshot():
            hits = reader.search("purple triangle", _emb(7), k=2)
        assert hits[0].episode.id == new_id and hits[0].matched_by == "lexical+embedding"
        # The reader ranks exactly as the writer does.
        mine = [(h.episode.id, h.score) for h in reader.search("a red star", _emb(3), k=4)]
        assert mine == [(h.episode.id, h.score) for h in writer.search("a red star", _emb(3), k=4)]
        np.testing.assert_array_equal(reader.memory_state()["M"], np.full((4, DIM), 7, np.float32))
        writer.clear()
        assert reader.refresh() == 0 and reader.search("purple", None, k=3) == []
        again = _add(writer, 30, "a purple circle", 9)
        assert again > new_id and reader.refresh() == 1
        assert reader.episode(again).caption == "a purple circle"
    finally:
        reader.close()


def test_a_snapshot_is_one_state_and_the_writer_goes_on(writer):
    _add(writer, 1, "a red circle", 1)
    reader = EpisodeStore.open_read_only(writer.path.parent, DIM, IDENTITY)
    try:
        with reader.snapshot():
            assert reader.count() == 1
            late = _add(writer, 2, "a red square", 2)   # WAL: the writer commits during the read
            assert [h.episode.id for h in reader.search("red", None, k=5)] == [1]
        with reader.snapshot():
            assert reader.count() == 2
            assert {h.episode.id for h in reader.search("red", None, k=5)} == {1, late}
        writer.checkpoint()  # no read transaction is left open: the writer's TRUNCATE checkpoint passes
    finally:
        reader.close()


def test_reader_never_writes(writer):
    _add(writer, 1, "a red circle", 1)
    writer.checkpoint()
    db = writer.path
    before = db.read_bytes()
    reader = EpisodeStore.open_read_only(db.parent, DIM, IDENTITY)
    try:
        with pytest.raises(StoreWriteError):
            _add(reader, 2, "a blue square", 2)
        with pytest.raises(StoreWriteError):
            reader.clear()
        assert reader.refresh() == 1 and writer.count() == 1
    finally:
        reader.close()
    assert db.read_bytes() == before


def test_read_only_open_of_a_closed_store(tmp_path):
    store = EpisodeStore.open(tmp_path / "s", DIM, IDENTITY)
    _add(store, 5, "a red circle", 1)
    store.close()  # the last connection: SQLite folds the WAL in and removes -wal and -shm
    db = tmp_path / "s" / DB_FILENAME
    wal = Path(f"{db}-wal")
    assert not wal.exists()
    before = db.read_bytes()
    reader = EpisodeStore.open_read_only(tmp_path / "s", DIM, IDENTITY)
    try:
        assert reader.count() == 1 and reader.episode(1).stamp_ns == 5
    finally:
        reader.close()
    # A read-only connection cannot delete the -wal/-shm files it needed; the WAL stays empty.
    assert db.read_bytes() == before and wal.stat().st_size == 0


def test_episodes_by_time(writer):
    # (stamp, caption): ids 1..5 in this order, stamps not in id order, one tie.
    for seed, stamp in enumerate([30, 10, 50, 30, 20], start=1):
        _add(writer, stamp, f"episode {seed}", seed)
    ids = lambda eps: [e.id for e in eps]  # noqa: E731
    # Newest first: stamp descending, equal stamps larger id first.
    assert ids(writer.episodes_by_time(10)) == [3, 4, 1, 5, 2]
    assert ids(writer.episodes_by_time(10, newest_first=False)) == [2, 5, 1, 4, 3]
    assert ids(writer.episodes_by_time(2, offset=1)) == [4, 1]
    assert ids(writer.episodes_by_time(10, offset=5)) == []
    assert ids(writer.episodes_by_time(10, start_ns=20, end_ns=30)) == [4, 1, 5]
    first = writer.episodes_by_time(1)[0]
    assert (first.caption, first.stamp_ns, first.source) == ("episode 3", 50, "caption")
    np.testing.assert_array_equal(first.embedding, _emb(3))
    for bad in (dict(limit=0), dict(limit=10**6), dict(limit=5, offset=-1), dict(limit=5, start_ns=9, end_ns=1)):
        with pytest.raises(StoreInputError):
            writer.episodes_by_time(**bad)
