"""Episode store backends side by side: SQLite (brute-force cosine over the RAM index, FTS5) and
PostgreSQL + pgvector (HNSW cosine, tsvector full text), in one run on one machine.

For each size N: commit throughput of ``add_episode`` (one transaction per episode, as the node
commits), then the store filled to N, then query latency p50/p95 of the embedding query (k=10) and of
the hybrid search (text + embedding, k=10), and recall@10 of the HNSW index against exact search.
Embeddings: 128-D (C of the paper), a mixture of 1,000 Gaussian clusters (what scenes look like to an
encoder: near-duplicates around places and objects), captions from a 40-word vocabulary.

    .venv/bin/python -m bench.store_pg                 # N = 10,000 and 100,000; results → bench/RESULTS_store_pg.md
    .venv/bin/python -m bench.store_pg --sizes 10000 --queries 100
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bitmar_core.episodes.store import EpisodeStore
from bitmar_core.episodes.store_pg import HNSW_EF_SEARCH, PgEpisodeStore, _vector_text

DIM = 128
IDENTITY = "bench-store-pg C=128"
WORDS = ("red green blue yellow purple orange white black small large round square cube ball cup box "
         "table floor chair door left right top bottom near far robot person dog cat bottle book shelf "
         "window kitchen hall lab desk lamp plant").split()
RESULTS = Path(__file__).resolve().parent / "RESULTS_store_pg.md"


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, DIM)).astype(np.float32)
    which = rng.integers(0, len(centres), n)
    emb = centres[which] + 0.35 * rng.standard_normal((n, DIM)).astype(np.float32)
    captions = [" ".join(rng.choice(WORDS, 6)) for _ in range(n)]
    return emb.astype(np.float32), captions


def _queries(m: int, seed: int = 1):
    emb, captions = _data(m, seed)
    return emb, [" ".join(c.split()[:2]) for c in captions]


EF_SWEEP = (40, 100, 400)  # hnsw.ef_search values whose recall and latency are also measured


def _with_ef(store: PgEpisodeStore, ef: int, fn):
    saved, store.hnsw_ef_search = store.hnsw_ef_search, ef
    try:
        return fn()
    finally:
        store.hnsw_ef_search = saved


def _pct(xs, p) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, p))


def _bulk_sqlite(store: EpisodeStore, emb, captions, start: int) -> None:
    """Fill past the measured inserts in one transaction (the bench's shortcut, not an API)."""
    from bitmar_core.episodes.store_api import _normalise
    conn = store._conn

    def body():
        rows = [(start + i, c, "caption", e.astype("<f4").tobytes(), b"") for i, (e, c) in enumerate(zip(emb, captions))]
        conn.executemany("INSERT INTO episodes (stamp_ns, caption, source, embedding, thumbnail) VALUES (?,?,?,?,?)", rows)
        conn.execute("INSERT INTO episodes_fts (rowid, caption, canon) SELECT id, caption, caption FROM episodes "
                     "WHERE id NOT IN (SELECT rowid FROM episodes_fts)")

    store._transaction("bulk", body)
    store._load_index()
    del _normalise


def _bulk_pg(store: PgEpisodeStore, emb, captions, start: int) -> float:
    """COPY the rows in, the HNSW index dropped and rebuilt around it; returns the build seconds."""
    units = emb / np.linalg.norm(emb, axis=1, keepdims=True)

    def load(conn):
        conn.execute("DROP INDEX IF EXISTS bitmar_episodes_vec")
        with conn.cursor().copy("COPY bitmar_episodes (robot_id, stamp_ns, caption, canon, source, embedding, vec,"
                                " thumbnail) FROM STDIN") as cp:
            for i, (e, u, c) in enumerate(zip(emb, units, captions)):
                cp.write_row((store.robot_id, start + i, c, c, "caption", e.astype("<f4").tobytes(), _vector_text(u), b""))

    store._transaction("bulk", load)
    t0 = time.perf_counter()

    def index(conn):
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("CREATE INDEX bitmar_episodes_vec ON bitmar_episodes USING hnsw (vec vector_cosine_ops)"
                      " WITH (m = 16, ef_construction = 64)")

    store._transaction("index", index)
    build_s = time.perf_counter() - t0
    store._transaction("analyze", lambda conn: conn.execute("ANALYZE bitmar_episodes"))
    return build_s


def run(sizes: list[int], n_queries: int, n_inserts: int) -> list[dict]:
    import psycopg
    import pgserver

    root = tempfile.mkdtemp(prefix="bitmar-bench-pg-")
    os.chmod(root, 0o755)
    server = pgserver.get_server(os.path.join(root, "data"), cleanup_mode="stop")
    sock = str(server.get_postmaster_info().socket_dir)
    rows = []
    try:
        for n in sizes:
            db = f"bench_{n}"
            with psycopg.connect(f"host={sock} user=postgres dbname=postgres", autocommit=True) as c:
                c.execute(f"CREATE DATABASE {db}")
            with psycopg.connect(f"host={sock} user=postgres dbname={db}", autocommit=True) as c:
                c.execute("CREATE EXTENSION vector")
            emb, captions = _data(n)
            qemb, qtext = _queries(n_queries)
            sq_dir = Path(root) / f"sqlite_{n}"
            sq = EpisodeStore.open(sq_dir, DIM, IDENTITY)
            pg = PgEpisodeStore.open(f"host={sock} user=postgres dbname={db}", DIM, IDENTITY, "bench_robot")
            row = {"n": n}
            m = min(n_inserts, n)
            for name, store in (("sqlite", sq), ("pg", pg)):
                t0 = time.perf_counter()
                for i in range(m):
                    store.add_episode(i, captions[i], "caption", emb[i])
                row[f"{name}_insert_per_s"] = m / (time.perf_counter() - t0)
            _bulk_sqlite(sq, emb[m:], captions[m:], m)
            row["pg_index_build_s"] = _bulk_pg(pg, emb[m:], captions[m:], m)
            assert sq.count() == n and pg.count() == n
            # exact top 10 by numpy, for recall
            units = emb / np.linalg.norm(emb, axis=1, keepdims=True)
            qunits = qemb / np.linalg.norm(qemb, axis=1, keepdims=True)
            exact = np.argsort(-(qunits @ units.T), axis=1)[:, :10] + 1  # ids are 1-based, in data order
            variants = [("sqlite_query", lambda i: sq.query(qemb[i], 10)),
                        ("pg_hnsw_query", lambda i: pg.query(qemb[i], 10, exact=False))]
            for ef in EF_SWEEP:
                variants.append((f"pg_hnsw_ef{ef}_query", lambda i, ef=ef: _with_ef(pg, ef, lambda: pg.query(
                    qemb[i], 10, exact=False))))
            for name, fn in (*variants,
                             ("pg_exact_query", lambda i: pg.query(qemb[i], 10, exact=True)),
                             ("sqlite_hybrid", lambda i: sq.search(qtext[i], qemb[i], k=10)),
                             ("pg_hybrid", lambda i: pg.search(qtext[i], qemb[i], k=10, exact=False))):
                fn(0)  # warm
                times, got = [], []
                for i in range(n_queries):
                    t0 = time.perf_counter()
                    out = fn(i)
                    times.append(time.perf_counter() - t0)
                    got.append(out)
                row[f"{name}_p50_ms"], row[f"{name}_p95_ms"] = _pct(times, 50), _pct(times, 95)
                if name.endswith("_query"):
                    row[f"{name}_recall10"] = float(np.mean([len({e.id for e, _ in g} & set(exact[i].tolist())) / 10
                                                             for i, g in enumerate(got)]))
            rows.append(row)
            print(row, flush=True)
            sq.close()
            pg.close()
            shutil.rmtree(sq_dir, ignore_errors=True)
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| episodes | insert/s SQLite | insert/s PG | HNSW build s | embedding query p50 / p95 ms: SQLite brute force "
            "| PG HNSW | PG exact | recall@10 HNSW | hybrid p50 / p95 ms: SQLite | PG |\n"
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    return head + "".join(
        f"| {r['n']:,} | {r['sqlite_insert_per_s']:.0f} | {r['pg_insert_per_s']:.0f} | {r['pg_index_build_s']:.1f} | "
        f"{r['sqlite_query_p50_ms']:.1f} / {r['sqlite_query_p95_ms']:.1f} | "
        f"{r['pg_hnsw_query_p50_ms']:.1f} / {r['pg_hnsw_query_p95_ms']:.1f} | "
        f"{r['pg_exact_query_p50_ms']:.1f} / {r['pg_exact_query_p95_ms']:.1f} | {r['pg_hnsw_query_recall10']:.3f} | "
        f"{r['sqlite_hybrid_p50_ms']:.1f} / {r['sqlite_hybrid_p95_ms']:.1f} | "
        f"{r['pg_hybrid_p50_ms']:.1f} / {r['pg_hybrid_p95_ms']:.1f} |\n" for r in rows) + (
        "\nHNSW recall@10 and query p50 / p95 ms by `hnsw.ef_search` (the store's default: "
        f"{HNSW_EF_SEARCH}):\n\n| episodes | " + " | ".join(f"ef_search {ef}" for ef in EF_SWEEP) + " |\n"
        "| ---: |" + " ---: |" * len(EF_SWEEP) + "\n" + "".join(
            f"| {r['n']:,} | " + " | ".join(
                f"{r[f'pg_hnsw_ef{ef}_query_recall10']:.3f} ({r[f'pg_hnsw_ef{ef}_query_p50_ms']:.1f} / "
                f"{r[f'pg_hnsw_ef{ef}_query_p95_ms']:.1f})" for ef in EF_SWEEP) + " |\n" for r in rows))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--inserts", type=int, default=1000, help="episodes committed one by one for the throughput")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = run(args.sizes, args.queries, args.inserts)
    text = (f"# Episode store: SQLite brute force vs PostgreSQL + pgvector HNSW (issue 14)\n\n"
            f"`python -m bench.store_pg --sizes {' '.join(map(str, args.sizes))} --queries {args.queries}` on "
            f"{platform.node() and 'this'} {os.cpu_count()}-core CPU VM (shared with a training run), "
            f"{time.strftime('%Y-%m-%d')}, {time.time() - t0:.0f} s in all. PostgreSQL 16.2 + pgvector 0.6.2 from the "
            "`pgserver` wheel on a Unix socket; HNSW m=16, ef_construction=64, ef_search=max(200, 2·depth); "
            "128-D embeddings in 1,000 clusters; k=10; one connection; both stores in one process.\n\n"
            "Insert = `add_episode` committed one at a time (the node's path: SQLite WAL synchronous=FULL; "
            "PostgreSQL fsync on commit), the first "
            f"{args.inserts} episodes; the rest bulk-loaded (the HNSW index built after the COPY). Recall@10 "
            "against exact cosine computed with numpy. PG exact = the same query with the index bypassed.\n\n"
            + table(rows))
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
