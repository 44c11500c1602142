"""PgEpisodeStore beyond the shared suite (tests/test_store.py runs that on both backends): the
fleet shape, identity on connect, credentials never shown, integrity, HNSW against exact search,
and the database stopped and restarted while a store writes. A real PostgreSQL 16 + pgvector
server (tests/conftest.py: pg_cluster), opened by a role without superuser rights."""

import threading
import time

import numpy as np
import psycopg
import pytest

from bitmar_core.episodes.store_api import StoreMismatchError, StoreNotFoundError
from bitmar_core.episodes.store_pg import FLEET, PgEpisodeStore, StoreUnavailableError, mask_dsn

DIM = 16
IDENTITY = "bitmar-test/v1 C=16"


def _emb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def _state(n: int) -> dict:
    return {"M": np.full((4, DIM), n, np.float32), "n_writes": np.int64(n)}


@pytest.fixture
def dsn(pg_cluster):
    return pg_cluster.new_database()


def test_role_is_least_privilege(dsn):
    with psycopg.connect(dsn) as conn:
        superuser, createdb, createrole = conn.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user").fetchone()
    assert (superuser, createdb, createrole) == (False, False, False)
    with PgEpisodeStore.open(dsn, DIM, IDENTITY, "r1") as s:  # creates its tables as that role
        assert s.add_episode(1, "a red cup", "caption", _emb(1)) == 1


def test_fleet_scope_and_per_robot_memory_state(dsn):
    a = PgEpisodeStore.open(dsn, DIM, IDENTITY, "/fleet/robot_a")
    b = PgEpisodeStore.open(dsn, DIM, IDENTITY, "/fleet/robot_b")
    ia = a.add_episode(10, "a red cup on the table", "caption", _emb(1), memory_state=_state(1))
    ib = b.add_episode(20, "a red ball on the floor", "caption", _emb(2), memory_state=_state(2))
    assert a.count() == 1 and b.count() == 1 and a.count(FLEET) == 2
    assert a.memory_state()["n_writes"] == 1 and b.memory_state()["n_writes"] == 2
    assert [h.episode.id for h in a.search("red", k=5)] == [ia]                       # this robot
    assert {h.episode.id for h in a.search("red", k=5, robot_scope=FLEET)} == {ia, ib}  # the fleet
    assert [h.episode.id for h in a.search("red", k=5, robot_scope="/fleet/robot_b")] == [ib]
    assert {h.episode.robot_id for h in a.search(None, _emb(2), k=5, robot_scope=FLEET)} == {
        "/fleet/robot_a", "/fleet/robot_b"}
    assert a.robots() == ["/fleet/robot_a", "/fleet/robot_b"]
    a.clear()  # one robot forgets; the other keeps its episodes and state
    assert a.count() == 0 and a.memory_state() is None
    assert b.count() == 1 and b.memory_state()["n_writes"] == 2 and b.integrity_check() == []
    a.close()
    b.close()


def test_identity_checked_on_connect_and_mismatch_refused(dsn):
    PgEpisodeStore.open(dsn, DIM, IDENTITY, "r1").close()
    with pytest.raises(StoreMismatchError, match="identity"):
        PgEpisodeStore.open(dsn, DIM, "another model", "r1")
    with pytest.raises(StoreMismatchError, match="embedding_dim"):
        PgEpisodeStore.open(dsn, DIM + 1, IDENTITY, "r1")


def test_open_without_create_finds_no_store(dsn):
    with pytest.raises(StoreNotFoundError):
        PgEpisodeStore.open(dsn, DIM, IDENTITY, "r1", create=False)


@pytest.mark.parametrize("dsn_in, shown", [
    ("postgresql://robot:hunter2@db.example:5432/fleet", "postgresql://robot:***@db.example:5432/fleet"),
    ("host=db.example user=robot password=hunter2 dbname=fleet", "host=db.example user=robot password=*** dbname=fleet"),
    ("host=db user=r password='hun ter2' dbname=f", "host=db user=r password=*** dbname=f"),
    ("postgresql:///fleet?host=/run/pg", "postgresql:///fleet?host=/run/pg"),
])
def test_mask_dsn(dsn_in, shown):
    assert mask_dsn(dsn_in) == shown


def test_password_never_in_messages_or_tables(pg_cluster, dsn):
    secret = pg_cluster.PASSWORD
    bad = dsn.replace("/bitmar_t", "/no_such_db_")
    with pytest.raises(StoreUnavailableError) as err:
        PgEpisodeStore.open(bad, DIM, IDENTITY, "r1")
    assert secret not in str(err.value) and "***" in str(err.value)
    with PgEpisodeStore.open(dsn, DIM, IDENTITY, "r1") as s:
        s.add_episode(1, "a cup", "caption", _emb(1), memory_state=_state(1))
        assert secret not in s.where
        with psycopg.connect(dsn) as conn:
            dump = " ".join(str(r) for t in ("bitmar_meta", "bitmar_episodes", "bitmar_memory_state")
                            for r in conn.execute(f"SELECT * FROM {t}").fetchall())
        assert secret not in dump


def test_integrity_check_reports_tampering(dsn):
    s = PgEpisodeStore.open(dsn, DIM, IDENTITY, "r1", synonyms=[("purple", "violet")])
    ids = [s.add_episode(i, f"a violet cube {i}", "caption", _emb(i), memory_state=_state(i)) for i in range(3)]
    assert s.integrity_check() == []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE bitmar_episodes SET embedding = '\\x00' WHERE id = %s", (ids[0],))
        conn.execute("UPDATE bitmar_episodes SET canon = 'something else' WHERE id = %s", (ids[1],))
        conn.execute("UPDATE bitmar_memory_state SET data = '\\x00' WHERE name = 'M'")
        conn.execute("UPDATE bitmar_meta SET value = '7' WHERE key = 'embedding_dim'")
    problems = s.integrity_check()
    assert any(f"episode {ids[0]}: embedding is 1 bytes" in p for p in problems)
    assert any(f"episode {ids[1]} is not indexed" in p for p in problems)
    assert any("memory_state['M']" in p for p in problems)
    assert any("meta: embedding_dim" in p for p in problems)
    s.close()


def test_synonyms_match_through_the_normalised_caption(dsn):
    with PgEpisodeStore.open(dsn, DIM, IDENTITY, "r1", synonyms=[("purple", "violet")]) as s:
        v = s.add_episode(1, "a violet cube", "caption", _emb(1))
        p = s.add_episode(2, "a purple cube", "caption", _emb(2))
        s.add_episode(3, "a green cube", "caption", _emb(3))
        found = s.lexical_search("violet", 5)
        assert [i for i, _ in found] == [v, p]  # both match; the very word scores higher
        assert found[0][1] > found[1][1]


def test_hnsw_matches_exact_search_on_a_small_table(dsn):
    with PgEpisodeStore.open(dsn, DIM, IDENTITY, "r1") as s:
        embs = [_emb(i) for i in range(300)]
        for i, e in enumerate(embs):
            s.add_episode(i, f"episode {i}", "caption", e)
        q = _emb(10_000)
        units = np.stack([e / np.linalg.norm(e) for e in embs])
        exact_ids = list(np.argsort(-(units @ (q / np.linalg.norm(q))))[:10] + 1)
        assert [e.id for e, _ in s.query(q, 10, exact=True)] == exact_ids
        ann = [e.id for e, _ in s.query(q, 10, exact=False)]
        assert len(set(ann) & set(exact_ids)) >= 9  # recall@10 of the HNSW index


def test_database_restart_while_writing_loses_no_acknowledged_episode(pg_cluster, dsn):
    """A writer adds an episode every 10 ms while the server is stopped for ~2 s and started again:
    every acknowledged episode (an id returned, or reported by on_commit) is in the database once, in
    write order, and the stored memory state is the last episode's."""
    s = PgEpisodeStore.open(dsn, DIM, IDENTITY, "r1", buffer_max_episodes=10_000)
    acked: dict[int, int] = {}  # n → id
    lock = threading.Lock()

    def committed(episode_id, n):
        with lock:
            acked[n] = episode_id

    s.on_commit = committed
    stop = threading.Event()
    written = []

    def writer():
        n = 0
        while not stop.is_set():
            n += 1
            episode_id = s.add_episode(n, f"episode {n}", "caption", _emb(n), memory_state=_state(n), token=n)
            written.append(n)
            if episode_id is not None:
                committed(episode_id, n)
            time.sleep(0.01)

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.5)
    pg_cluster.stop()
    time.sleep(2.0)
    assert s.buffer_status()["store_buffered_episodes"] > 0
    pg_cluster.start()
    time.sleep(1.0)
    stop.set()
    t.join()
    deadline = time.monotonic() + 30
    while s.buffer_status()["store_buffered_episodes"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert s.buffer_status()["store_buffered_episodes"] == 0 and s.dropped_episodes == 0
    rows = s.all_episodes()
    assert [e.stamp_ns for e in rows] == written          # every episode, once, in write order
    assert {n: i for n, i in acked.items()} == {e.stamp_ns: e.id for e in rows}
    assert s.memory_state()["n_writes"] == written[-1]
    assert s.integrity_check() == []
    print(f"restart: {len(written)} episodes written, {s.reconnects - 1} reconnects, 0 lost, 0 duplicated")
    s.close()


def test_buffer_is_bounded_and_drops_the_oldest(pg_cluster, dsn):
    s = PgEpisodeStore.open(dsn, DIM, IDENTITY, "r1", buffer_max_episodes=5)
    s.add_episode(0, "before", "caption", _emb(0), memory_state=_state(0))
    pg_cluster.stop()
    try:
        got = [s.add_episode(n, f"episode {n}", "caption", _emb(n), memory_state=_state(n)) for n in range(1, 9)]
        assert got == [None] * 8
        status = s.buffer_status()
        assert status["store_buffered_episodes"] == 5 and status["store_dropped_episodes"] == 3
        assert status["store_buffered_bytes"] > 5 * 4 * DIM
        assert s.count() == 1  # the last count the database gave
        with pytest.raises(StoreUnavailableError):
            s.search("episode", k=3)
    finally:
        pg_cluster.start()
    assert s.flush()
    assert [e.stamp_ns for e in s.all_episodes()] == [0, 4, 5, 6, 7, 8]  # 1..3 dropped, the rest in order
    assert s.memory_state()["n_writes"] == 8
    s.close()


def test_schema_2_database_gains_pose_columns_on_connect(dsn):
    """A fleet database of schema 2 (before poses): written here, then its pose columns dropped and its
    version set back, as the previous code left it; opening migrates it, old episodes without a pose."""
    from bitmar_core.episodes.pose import Pose

    s = PgEpisodeStore.open(dsn, DIM, IDENTITY, "r1")
    old = [s.add_episode(i, f"a red cube {i}", "caption", _emb(i)) for i in range(3)]
    s.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for c in ("pose_frame", "px", "py", "pz", "qx", "qy", "qz", "qw"):
            conn.execute(f"ALTER TABLE bitmar_episodes DROP COLUMN {c}")
        conn.execute("UPDATE bitmar_meta SET value = '2' WHERE key = 'schema_version'")
    s = PgEpisodeStore.open(dsn, DIM, IDENTITY, "r1")
    try:
        assert [s.episode(i).pose for i in old] == [None] * 3
        new = s.add_episode(9, "a red cube in the lab", "caption", _emb(9), pose=Pose("map", (1.0, 2.0, 0.0)))
        assert s.episode(new).pose == Pose("map", (1.0, 2.0, 0.0))
        assert s.integrity_check() == []
    finally:
        s.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT value FROM bitmar_meta WHERE key = 'schema_version'").fetchone() == ("3",)
