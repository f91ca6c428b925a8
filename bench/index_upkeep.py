"""Vector index upkeep under churn: ``python -m bench.index_upkeep [--rows N]``.

On a throw-away database (``bench_index_upkeep`` on the configured server, the embedded one
unless DATABASE_URL is set), in one run:

1. binary-COPY ``--rows`` clustered 384-d vectors (numpy, normalised) with the model's index
   dropped, over tenants of skewed sizes;
2. build IVFFlat (lists from the row count) and HNSW (m=16, ef_construction=64), timing each,
   and measure recall@10 and median latency against exact search (index scans off);
   ground truth is computed with numpy over the live vectors;
3. run index upkeep once (baseline), then churn 30% (delete 30% of rows, insert as many new
   ones through the live HNSW index), measure recall again, run upkeep (which decides from its
   own measurements) and measure once more.

Prints each figure and the ratios the issue asks for: recall@10 after upkeep (target >= 0.95)
and approximate search speed-up over exact (target >= 20x). JSON lands in bench/out/.
The default of 20,000 rows is a quick check; ``--rows 100000`` is the real run (minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from numpy.typing import NDArray
from pgvector.psycopg import register_vector
from sqlalchemy import Engine, text

from bench._db import drop_database, fresh_database

DB_NAME = "bench_index_upkeep"
DIMS = 384
K = 10
MODEL_FALLBACK = "all-MiniLM-L6-v2"
OUT = Path(__file__).resolve().parent / "out"


# --- database ------------------------------------------------------------------------------


def raw_connection() -> psycopg.Connection[Any]:
    from worker.config import get_settings

    conn = psycopg.connect(get_settings().psycopg_dsn, autocommit=True)
    register_vector(conn)
    return conn


# --- synthetic data ------------------------------------------------------------------------


@dataclass
class Data:
    """Every vector ever loaded (row ``key`` = index here = ``embedding.content``), which
    are live, and each key's embedding id."""

    centers: NDArray[np.float32]
    sigma: float
    vectors: list[NDArray[np.float32]] = field(default_factory=list)
    live: list[bool] = field(default_factory=list)
    ids: dict[int, int] = field(default_factory=dict)

    def matrix(self) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        keys = np.flatnonzero(np.array(self.live))
        return np.vstack([self.vectors[k] for k in keys]), keys


def clustered(rng: np.random.Generator, data: Data, n: int) -> NDArray[np.float32]:
    assign = rng.integers(0, len(data.centers), n)
    noise = rng.standard_normal((n, DIMS)).astype(np.float32) * np.float32(data.sigma)
    points = data.centers[assign] + noise
    out: NDArray[np.float32] = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(
        np.float32
    )
    return out


def user_sizes(rows: int, users: int) -> list[int]:
    """Zipf-like tenant sizes: one big tenant, many small ones (at least 2 rows each)."""
    weights = 1.0 / np.arange(1, users + 1)
    sizes = np.maximum(2, np.floor(rows * weights / weights.sum())).astype(int)
    sizes[0] += rows - int(sizes.sum())
    return [int(s) for s in sizes]


def copy_rows(
    conn: psycopg.Connection[Any],
    data: Data,
    rng: np.random.Generator,
    rows: int,
    users: int,
    model: str,
) -> float:
    """COPY ``rows`` new vectors spread over ``users`` tenants; returns seconds of the
    embedding COPY itself (items are written first, outside the timing)."""
    vectors = clustered(rng, data, rows)
    first_key = len(data.vectors)
    data.vectors.extend(vectors)
    data.live.extend([True] * rows)
    plan: list[tuple[int, str, int]] = []  # (item id, user, chunk index) per new row
    with conn.transaction(), conn.cursor() as cur:
        for n, size in enumerate(user_sizes(rows, users)):
            user = f"bench-u{n:03d}"
            n_items = max(1, math.ceil(size / 50))
            ids = [
                r[0]
                for r in cur.execute(
                    "INSERT INTO item (user_id, kind, status) SELECT %s, 'upload', 'done' "
                    "FROM generate_series(1, %s) RETURNING id",
                    (user, n_items),
                ).fetchall()
            ]
            plan.extend((ids[j % n_items], user, j // n_items) for j in range(size))
    started = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur:
        sql = (
            "COPY embedding (item_id, user_id, chunk_index, content, embedding, model, "
            "dimensions) FROM STDIN WITH (FORMAT BINARY)"
        )
        with cur.copy(sql) as copy:
            copy.set_types(["int8", "text", "int4", "text", "vector", "text", "int4"])
            for i, (item, user, chunk) in enumerate(plan):
                copy.write_row((item, user, chunk, str(first_key + i), vectors[i], model, DIMS))
    seconds = time.perf_counter() - started
    for row_id, key in conn.execute(
        "SELECT id, content::int FROM embedding WHERE content::int >= %s", (first_key,)
    ):
        data.ids[key] = row_id
    return seconds


def delete_share(
    conn: psycopg.Connection[Any], data: Data, rng: np.random.Generator, share: float
) -> int:
    live = np.flatnonzero(np.array(data.live))
    doomed = rng.choice(live, size=int(len(live) * share), replace=False)
    with conn.transaction():
        conn.execute(
            "DELETE FROM embedding WHERE id = ANY(%s)", ([data.ids[int(k)] for k in doomed],)
        )
    for k in doomed:
        data.live[int(k)] = False
    return len(doomed)


# --- measuring -------------------------------------------------------------------------------


def ground_truth(data: Data, queries: NDArray[np.float32]) -> list[set[int]]:
    """Exact top-k by cosine (dot product of normalised vectors) over the live rows."""
    matrix, keys = data.matrix()
    scores = queries @ matrix.T
    top = np.argpartition(-scores, K, axis=1)[:, :K]
    return [set(int(keys[j]) for j in row) for row in top]


def knn_sql(model: str) -> str:
    return (
        f"SELECT content::int FROM embedding WHERE model = '{model}' "
        f"ORDER BY (embedding::vector({DIMS})) <=> %s::vector({DIMS}) LIMIT {K}"
    )


EXACT = {"enable_indexscan": "off", "enable_bitmapscan": "off", "enable_indexonlyscan": "off"}
TIMED_QUERIES = 50


@dataclass
class Searchers:
    """Two connections: one that can only scan exactly, one for the index. Latency is timed
    alternating the two query by query, so the speed-up is a ratio of like with like even
    when other work shares the machine."""

    approx: psycopg.Connection[Any]
    exact: psycopg.Connection[Any]
    model: str

    def close(self) -> None:
        self.approx.close()
        self.exact.close()


def searchers(model: str) -> Searchers:
    exact = raw_connection()
    for name, value in EXACT.items():
        exact.execute("SELECT set_config(%s, %s, false)", (name, value))
    return Searchers(raw_connection(), exact, model)


def _timed_ids(
    conn: psycopg.Connection[Any], sql: str, q: NDArray[np.float32]
) -> tuple[set[int], float]:
    started = time.perf_counter()
    got = {r[0] for r in conn.execute(sql, (q,), prepare=True)}
    return got, (time.perf_counter() - started) * 1000


def measure(
    s: Searchers, queries: NDArray[np.float32], truth: list[set[int]], settings: dict[str, str]
) -> dict[str, Any]:
    """Recall@k over every query through the index under ``settings``; median latency of
    exact and approximate search over the first TIMED_QUERIES, alternating."""
    for name, value in settings.items():
        s.approx.execute("SELECT set_config(%s, %s, false)", (name, value))
    sql = knn_sql(s.model)
    plan = "\n".join(r[0] for r in s.approx.execute("EXPLAIN " + sql, (queries[0],)))
    scores, approx_ms, exact_ms = [], [], []
    for i, (q, expected) in enumerate(zip(queries, truth, strict=True)):
        got, ms = _timed_ids(s.approx, sql, q)
        scores.append(len(got & expected) / K)
        if i < TIMED_QUERIES:
            approx_ms.append(ms)
            exact_ms.append(_timed_ids(s.exact, sql, q)[1])
    s.approx.execute("RESET ALL")
    p50, exact_p50 = statistics.median(approx_ms), statistics.median(exact_ms)
    return {
        **settings,
        "recall": round(statistics.fmean(scores), 4),
        "p50_ms": round(p50, 3),
        "exact_p50_ms": round(exact_p50, 3),
        "speedup": round(exact_p50 / p50, 1),
        "index_used": "Index Scan" in plan,
    }


def index_size(conn: psycopg.Connection[Any], name: str) -> int:
    return int(
        conn.execute("SELECT coalesce(pg_relation_size(to_regclass(%s)), 0)", (name,)).fetchone()[0]  # type: ignore[index]
    )


def wait_for_dead_tuples(conn: psycopg.Connection[Any], at_least: int, timeout: float = 15) -> None:
    """pg_stat is updated asynchronously (each backend flushes its counters when idle)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'embedding_main'"
        ).fetchone()
        if row and row[0] >= at_least:
            return
        time.sleep(0.2)


# --- the run ---------------------------------------------------------------------------------


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def run(
    rows: int, n_queries: int, churn: float, seed: int, keep: bool, sigma: float
) -> dict[str, Any]:
    from worker.config import get_settings
    from worker.db.indexes import IndexSpec, drop_model_index
    from worker.maintenance import indexes as upkeep

    engine = fresh_database(DB_NAME)
    settings = get_settings()
    model = settings.model_name or MODEL_FALLBACK
    spec_hnsw = IndexSpec(model, DIMS)
    spec_ivf = IndexSpec(model, DIMS, kind="ivfflat", params={"lists": upkeep.ivfflat_lists(rows)})
    drop_model_index(engine, spec_hnsw.name)  # bulk load first, index in bulk after
    with engine.begin() as c:
        # Only on this throw-away database: the figures show what upkeep does, not a race
        # with autovacuum (which, on a churned HNSW index, is the slow path of pgvector #450).
        c.execute(text("ALTER TABLE embedding_main SET (autovacuum_enabled = false)"))
    rng = np.random.default_rng(seed)
    clusters = max(20, rows // 1000)
    centers = rng.standard_normal((clusters, DIMS)).astype(np.float32)
    data = Data(centers / np.linalg.norm(centers, axis=1, keepdims=True), sigma=sigma)
    users = 50
    out: dict[str, Any] = {"rows": rows, "queries": n_queries, "clusters": clusters}
    out["sigma"] = sigma
    conn = raw_connection()
    search = searchers(model)
    try:
        out["copy_seconds"] = round(copy_rows(conn, data, rng, rows, users, model), 3)
        conn.execute("VACUUM ANALYZE embedding")
        queries = clustered(rng, data, n_queries)
        truth = ground_truth(data, queries)
        print(f"loaded {rows} rows in {out['copy_seconds']} s")

        _, seconds = timed(upkeep.build_index, engine, spec_ivf, spec_ivf.name)
        lists = spec_ivf.build_params()["lists"]
        out["ivfflat"] = {"lists": lists, "build_seconds": round(seconds, 2)}
        out["ivfflat"]["bytes"] = index_size(conn, spec_ivf.name)
        for probes in sorted({1, round(math.sqrt(lists)), 2 * round(math.sqrt(lists))}):
            out["ivfflat"][f"probes={probes}"] = measure(
                search, queries, truth, {"ivfflat.probes": str(probes)}
            )
        drop_model_index(engine, spec_ivf.name)
        print(f"ivfflat: {json.dumps(out['ivfflat'])}")

        _, seconds = timed(upkeep.build_index, engine, spec_hnsw, spec_hnsw.name)
        out["hnsw"] = {
            "build_seconds": round(seconds, 2),
            "bytes": index_size(conn, spec_hnsw.name),
        }
        for ef in (40, 100):
            out["hnsw"][f"ef_search={ef}"] = measure(
                search, queries, truth, {"hnsw.ef_search": str(ef)}
            )
        print(f"hnsw: {json.dumps(out['hnsw'])}")

        baseline, seconds = timed(upkeep.run_index_upkeep, engine, settings, models=[model])
        out["upkeep_baseline"] = _upkeep_summary(baseline, model, seconds)
        print(f"upkeep (baseline): {out['upkeep_baseline']}")

        deleted = delete_share(conn, data, rng, churn)
        inserted = copy_rows(conn, data, rng, deleted, users, model)
        out["churn"] = {
            "deleted": deleted,
            "inserted": deleted,
            "insert_seconds": round(inserted, 2),
        }
        out["churn"]["insert_rows_per_s"] = round(deleted / inserted, 1)
        conn.execute("SELECT pg_stat_force_next_flush()")
        truth = ground_truth(data, queries)
        ef_now = str(_ef_search(engine, model))
        out["after_churn"] = measure(search, queries, truth, {"hnsw.ef_search": ef_now})
        out["after_churn"]["bytes"] = index_size(conn, spec_hnsw.name)
        print(f"after {churn:.0%} churn: {out['after_churn']}")

        wait_for_dead_tuples(conn, deleted)  # upkeep decides from pg_stat's dead tuples
        result, seconds = timed(upkeep.run_index_upkeep, engine, settings, models=[model])
        out["upkeep"] = _upkeep_summary(result, model, seconds)
        print(f"upkeep: {out['upkeep']}")
        ef_now = str(_ef_search(engine, model))
        out["after_upkeep"] = measure(search, queries, truth, {"hnsw.ef_search": ef_now})
        out["after_upkeep"]["bytes"] = index_size(conn, spec_hnsw.name)
        print(f"after upkeep: {out['after_upkeep']}")
    finally:
        conn.close()
        search.close()
        if not keep:
            drop_database(DB_NAME)
    return out


def _ef_search(engine: Engine, model: str) -> int:
    with engine.connect() as conn:
        params = conn.execute(
            text("SELECT index_params FROM embedding_model WHERE name = :n"), {"n": model}
        ).scalar_one()
    return int((params or {}).get("ef_search") or 40)


def _upkeep_summary(result: dict[str, Any], model: str, seconds: float) -> dict[str, Any]:
    seen = result["models"][model]
    return {
        "seconds": round(seconds, 2),
        "decision": seen.get("decision"),
        "reasons": seen.get("reasons"),
        "recall_before": (seen.get("recall_before") or {}).get("recall"),
        "recall_after": (seen.get("recall_after") or {}).get("recall"),
        "build_seconds": seen.get("build_seconds"),
        "vacuum_seconds": (seen.get("vacuum") or {}).get("seconds"),
        "dead_share": seen["drift"]["dead_share"],
    }


def report(out: dict[str, Any]) -> list[str]:
    hnsw40 = out["hnsw"]["ef_search=40"]
    after = out["after_upkeep"]
    return [
        f"rows {out['rows']}, {out['queries']} queries, {out['clusters']} clusters, "
        f"sigma {out['sigma']}",
        f"COPY {out['copy_seconds']} s; exact p50 {hnsw40['exact_p50_ms']} ms",
        f"HNSW build {out['hnsw']['build_seconds']} s ({out['hnsw']['bytes'] / 1e6:.0f} MB): "
        f"recall@10 {hnsw40['recall']} at ef_search 40, {hnsw40['speedup']}x faster than exact",
        f"IVFFlat build {out['ivfflat']['build_seconds']} s (lists {out['ivfflat']['lists']})",
        f"churn {out['churn']['deleted']} deleted + inserted "
        f"({out['churn']['insert_rows_per_s']} rows/s through the live HNSW index)",
        f"recall after churn {out['after_churn']['recall']} -> after upkeep {after['recall']} "
        f"(decision: {out['upkeep']['decision']}, {out['upkeep']['seconds']} s)",
        f"after upkeep: ef_search {after['hnsw.ef_search']}, {after['p50_ms']} ms vs exact "
        f"{after['exact_p50_ms']} ms = {after['speedup']}x",
        f"targets: recall >= 0.95: {'met' if after['recall'] >= 0.95 else 'MISSED'}; "
        f"speed-up >= 20x: {'met' if after['speedup'] >= 20 else 'MISSED'}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.index_upkeep", description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--churn", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--sigma", type=float, default=0.06, help="Noise around centres.")
    parser.add_argument("--keep", action="store_true", help="Keep the bench database.")
    args = parser.parse_args(argv)
    out = run(args.rows, args.queries, args.churn, args.seed, args.keep, args.sigma)
    OUT.mkdir(exist_ok=True)
    path = OUT / f"index_upkeep_{args.rows}.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print("\n".join(["", "== index upkeep ==", *report(out), f"(details: {path})"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
