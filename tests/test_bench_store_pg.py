"""bench/store_pg.py on a small table: both stores hold every episode, exact search has recall 1,
HNSW nearly so, and the results table has a row per size with every column filled."""
import pytest

from bench import store_pg

pytestmark = pytest.mark.slow


def test_small_run_and_table():
    rows = store_pg.run([600], n_queries=10, n_inserts=50)
    (row,) = rows
    assert row["n"] == 600
    assert row["sqlite_query_recall10"] == 1.0 and row["pg_exact_query_recall10"] == 1.0
    assert row["pg_hnsw_query_recall10"] >= 0.9
    assert row["sqlite_insert_per_s"] > 0 and row["pg_insert_per_s"] > 0
    for key, value in row.items():
        if key.endswith("_ms"):
            assert 0 < value < 10_000, key
    main, sweep = store_pg.table(rows).split("\n\n", 1)
    main = main.splitlines()
    assert len(main) == 3 and main[2].startswith("| 600 |") and main[2].count("|") == main[0].count("|")
    assert sweep.splitlines()[-1].startswith("| 600 |")
    for ef in store_pg.EF_SWEEP:
        assert row[f"pg_hnsw_ef{ef}_query_recall10"] >= 0.9
