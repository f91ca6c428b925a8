"""Search latency and recall on synthetic tenants: ``python -m bench.search [--rows N --users U]``.

Builds a throw-away database (``bench_search`` on the configured server, the embedded one
unless DATABASE_URL is set), loads clustered 384-d vectors spread over users of skewed sizes
(a few big, many small), with chunk text drawn from a small per-topic vocabulary, builds the
model's HNSW index in bulk, then measures for each mode (exact, index + iterative scan, text,
hybrid) p50/p95 latency as a ratio to exact semantic search and recall@10 against it.

It also times exact and index plans per tenant size, and prints the tenant size where the
index plan starts to beat the exact one: the figure for ``EXACT_SEARCH_MAX_ROWS``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
from numpy.typing import NDArray
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from bench._db import drop_database, fresh_database

DB_NAME = "bench_search"
DIMS = 384
WORDS_PER_TOPIC = 12
COMMON_WORDS = 60
LATENT_SIGMA = 0.15  # per latent direction
ISO_SIGMA = 0.01  # per dimension, on top
HARD_SIGMA = 0.06  # per dimension, --latent 0
SIZE_BUCKETS = (250, 500, 1000, 2000, 3000, 5000, 8000, 12000, 20000, 50000)


@dataclass
class Corpus:
    """What was loaded, enough to build queries: each user's rows and each topic's words."""

    centers: NDArray[np.float32]
    basis: NDArray[np.float32]  # DIMS x latent directions the in-topic variation lives in
    topic_words: list[list[str]]
    user_rows: dict[str, int] = field(default_factory=dict)
    user_topics: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Query:
    user_id: str
    rows: int
    vector: NDArray[np.float32]
    text: str


# --- database ------------------------------------------------------------------------------


# --- synthetic data ------------------------------------------------------------------------


def user_sizes(rows: int, users: int) -> list[int]:
    """Zipf-like tenant sizes (s = 1): the biggest holds ~1/H(users) of the rows, most are
    small. Every user gets at least 2 rows."""
    weights = 1.0 / np.arange(1, users + 1)
    sizes = np.maximum(2, np.floor(rows * weights / weights.sum())).astype(int)
    return [int(s) for s in sizes]


def make_corpus(rng: np.random.Generator, topics: int, latent: int) -> Corpus:
    vocab = [f"w{n:03d}" for n in range(topics * WORDS_PER_TOPIC)]
    words = [vocab[t * WORDS_PER_TOPIC : (t + 1) * WORDS_PER_TOPIC] for t in range(topics)]
    centers = rng.standard_normal((topics, DIMS)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    basis = np.linalg.qr(rng.standard_normal((DIMS, max(latent, 1))))[0].astype(np.float32)
    return Corpus(centers=centers, basis=basis[:, :latent], topic_words=words)


def chunk_text(rng: np.random.Generator, corpus: Corpus, topic: int, n: int = 30) -> str:
    own = corpus.topic_words[topic]
    picks = [
        own[int(rng.integers(len(own)))]
        if rng.random() < 0.5
        else f"common{int(rng.integers(COMMON_WORDS))}"
        for _ in range(n)
    ]
    return " ".join(picks)


def noisy(rng: np.random.Generator, corpus: Corpus, topic: int) -> NDArray[np.float32]:
    """A unit vector near a topic's centre. Real sentence embeddings vary along far fewer
    directions than they have dimensions; variation in a ``latent``-dimensional subspace plus
    a little isotropic noise gives HNSW the recall it has on real data (the unfiltered
    recall line of the report). ``--latent 0`` is isotropic noise: a much harder case."""
    latent = corpus.basis.shape[1]
    if latent:
        z = rng.standard_normal(latent, dtype=np.float32) * np.float32(LATENT_SIGMA)
        iso = np.float32(ISO_SIGMA)
        v = corpus.centers[topic] + corpus.basis @ z
    else:
        iso = np.float32(HARD_SIGMA)
        v = corpus.centers[topic].copy()
    v = v + rng.standard_normal(DIMS, dtype=np.float32) * iso
    out: NDArray[np.float32] = (v / np.linalg.norm(v)).astype(np.float32)
    return out


def load(
    engine: Engine,
    rng: np.random.Generator,
    rows: int,
    users: int,
    topics: int,
    latent: int,
    storage: str,
) -> Corpus:
    """COPY items, analyses and embeddings (~3 chunks + a title row per item) with the
    model's vector index dropped, then build it in bulk, as the design asks for bulk loads."""
    from worker.config import get_settings
    from worker.db.indexes import IndexSpec, create_model_index, drop_model_index

    corpus = make_corpus(rng, topics, latent)
    model = get_settings().model_name
    with Session(engine) as session:
        row = session.execute(
            text(
                "SELECT name, dimensions, distance, index_kind, index_precision, index_params "
                "FROM embedding_model WHERE name = :m"
            ),
            {"m": model},
        ).one()
    spec = IndexSpec.from_row(row)
    drop_model_index(engine, spec.name)
    if storage != "external":
        # An experiment on this throw-away database only: keep vectors in the heap row and
        # let content/search_vector go to TOAST instead (see the module docstring).
        with engine.begin() as c:
            c.execute(text(f"ALTER TABLE embedding ALTER COLUMN embedding SET STORAGE {storage}"))
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        assert conn is not None
        for n, size in enumerate(user_sizes(rows, users)):
            _load_user(conn, rng, corpus, f"bench-u{n:03d}", size, model)
        conn.commit()
    finally:
        raw.close()
    create_model_index(engine, spec)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("VACUUM ANALYZE item, analysis, embedding"))
    return corpus


def _load_user(
    conn: psycopg.Connection[Any],
    rng: np.random.Generator,
    corpus: Corpus,
    user_id: str,
    size: int,
    model: str,
) -> None:
    user_topics = [int(t) for t in rng.choice(len(corpus.centers), size=3, replace=False)]
    corpus.user_topics[user_id] = user_topics
    corpus.user_rows[user_id] = size
    items: list[tuple[int, list[str], str]] = []  # (topic, chunk texts, title)
    remaining = size
    while remaining > 0:
        chunks = min(remaining - 1, int(rng.integers(1, 6))) if remaining > 1 else 0
        topic = user_topics[int(rng.integers(3))]
        texts = [chunk_text(rng, corpus, topic) for _ in range(chunks)]
        items.append((topic, texts, chunk_text(rng, corpus, topic, 6)))
        remaining -= chunks + 1
    start = datetime(2024, 1, 1, tzinfo=UTC)
    with conn.cursor() as cur:
        with cur.copy("COPY item (user_id, kind, status, title, created_at) FROM STDIN") as copy:
            for n, (_, _, title) in enumerate(items):
                kind = "bookmark" if n % 3 == 0 else "upload"
                copy.write_row((user_id, kind, "done", title, start + timedelta(hours=n)))
        ids = [
            r[0]
            for r in cur.execute(
                "SELECT id FROM item WHERE user_id = %s ORDER BY id", (user_id,)
            ).fetchall()
        ]
        with cur.copy(
            "COPY analysis (item_id, user_id, version, title, summary, category, keywords, "
            "provider, model) FROM STDIN"
        ) as copy:
            for item_id, (topic, _texts, title) in zip(ids, items, strict=True):
                summary = chunk_text(rng, corpus, topic, 20)
                words = corpus.topic_words[topic][:3]
                copy.write_row(
                    (item_id, user_id, 1, title, summary, f"topic{topic}", words, "bench", "bench")
                )
        with cur.copy(
            "COPY embedding (item_id, user_id, chunk_index, content, embedding, model, "
            "dimensions) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["bigint", "text", "integer", "text", "vector", "text", "integer"])
            for item_id, (topic, texts, title) in zip(ids, items, strict=True):
                for idx, content in [(-1, title), *enumerate(texts)]:
                    vec = noisy(rng, corpus, topic)
                    copy.write_row((item_id, user_id, idx, content, vec, model, DIMS))


# --- queries and measurement ---------------------------------------------------------------


def query_for(rng: np.random.Generator, corpus: Corpus, user: str) -> Query:
    """A query near one of the user's topics: two of its words and a vector near its centre."""
    topic = corpus.user_topics[user][int(rng.integers(3))]
    words = rng.choice(corpus.topic_words[topic], size=2, replace=False)
    vec = noisy(rng, corpus, topic)
    return Query(user, corpus.user_rows[user], vec, " ".join(str(w) for w in words))


def make_queries(rng: np.random.Generator, corpus: Corpus, n: int) -> list[Query]:
    """Queries for users drawn uniformly: most tenants are small, as in production."""
    users = sorted(corpus.user_rows)
    return [query_for(rng, corpus, users[int(rng.integers(len(users)))]) for _ in range(n)]


Runner = Callable[[Session, Query], list[int]]


def runners() -> dict[str, Runner]:
    from worker.search import SearchHit, hybrid_search, semantic_search, text_search

    def ids(hits: Sequence[SearchHit]) -> list[int]:
        return [h.item_id for h in hits]

    def semantic(threshold: int, ef: int | None = None) -> Runner:
        return lambda s, q: ids(
            semantic_search(s, q.user_id, vector=q.vector, exact_threshold=threshold, ef_search=ef)
        )

    return {
        "exact": semantic(10**9),
        "index": semantic(0),  # DEFAULT_EF_SEARCH
        "index40": semantic(0, 40),  # pgvector's default ef_search, for comparison
        "text": lambda s, q: ids(text_search(s, q.user_id, q.text)),
        "hybrid": lambda s, q: ids(hybrid_search(s, q.user_id, q.text, vector=q.vector)),
    }


def timed(session: Session, run: Runner, query: Query) -> tuple[float, list[int]]:
    start = time.perf_counter()
    result = run(session, query)
    elapsed = time.perf_counter() - start
    # End the read transaction, as a request would. Sessions here are bound to one
    # connection, so the pool's checkout ping is not part of what is measured.
    session.rollback()
    return elapsed, result


def recall(found: Sequence[int], truth: Sequence[int]) -> float:
    return len(set(found) & set(truth)) / len(truth) if truth else 1.0


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(
    engine: Engine, queries: Sequence[Query], repeats: int
) -> dict[str, dict[str, list[float]]]:
    """Latencies (s) and recall per mode and query; every mode runs on the same queries,
    interleaved, after one warm-up pass, so cache state favours none."""
    modes = runners()
    out: dict[str, dict[str, list[float]]] = {m: {"lat": [], "recall": []} for m in modes}
    with engine.connect() as conn, Session(bind=conn) as session:
        for q in queries:  # warm-up: caches, plans, the vector library
            for run in modes.values():
                timed(session, run, q)
        for _ in range(repeats):
            for q in queries:
                _, truth = timed(session, modes["exact"], q)
                for name, run in modes.items():
                    lat, found = timed(session, run, q)
                    out[name]["lat"].append(lat)
                    out[name]["recall"].append(recall(found, truth))
    return out


def plan_uses_index(engine: Engine, query: Query) -> bool:
    """Does PostgreSQL really scan the HNSW index for this tenant on the index plan?"""
    from worker.config import get_settings
    from worker.db.indexes import IndexSpec
    from worker.search import index_candidates_sql

    with Session(engine) as session:
        row = session.execute(
            text(
                "SELECT name, dimensions, distance, index_kind, index_precision, index_params "
                "FROM embedding_model WHERE name = :m"
            ),
            {"m": get_settings().model_name},
        ).one()
        spec = IndexSpec.from_row(row)
        session.execute(text("SET LOCAL hnsw.iterative_scan = relaxed_order"))
        plan = session.execute(
            text("EXPLAIN " + index_candidates_sql(spec, spec.operator, "")),
            {"user_id": query.user_id, "q": query.vector, "n": 40},
        ).scalars()
        used = any(spec.name in line for line in plan)
        session.rollback()
    return used


def unfiltered_recall(engine: Engine, corpus: Corpus, rng: np.random.Generator, ef: int) -> float:
    """Chunk recall@10 of a plain HNSW scan over every row: how hard the data is for HNSW,
    comparable with ENVIRONMENT.md's 0.964 at ef_search 40 on 100k vectors."""
    from worker.config import get_settings
    from worker.db.indexes import IndexSpec, model_predicate, vector_expr

    model = get_settings().model_name
    spec = IndexSpec(model, DIMS)
    where = f"WHERE {model_predicate(model)}"
    approx_sql = text(
        f"SELECT id FROM embedding {where} ORDER BY {vector_expr(spec)} <=> "
        f"CAST(:q AS vector({DIMS})) LIMIT 10"
    )
    exact_sql = text(f"SELECT id FROM embedding {where} ORDER BY embedding <=> :q LIMIT 10")
    found: list[float] = []
    with engine.connect() as conn:
        for _ in range(20):
            q = noisy(rng, corpus, int(rng.integers(len(corpus.centers))))
            conn.execute(text(f"SET LOCAL hnsw.ef_search = {int(ef)}"))
            approx = conn.execute(approx_sql, {"q": q}).scalars().all()
            truth = conn.execute(exact_sql, {"q": q}).scalars().all()
            conn.rollback()
            found.append(recall(approx, truth))
    return statistics.mean(found)


def crossover(
    engine: Engine, corpus: Corpus, rng: np.random.Generator, per_user: int
) -> list[tuple[int, float, float, float, bool]]:
    """Per tenant size: exact p50, index p50, index recall@10, index really used."""
    modes = runners()
    rows: list[tuple[int, float, float, float, bool]] = []
    by_size = sorted(corpus.user_rows.items(), key=lambda kv: kv[1])
    picked: dict[int, str] = {}
    for bucket in SIZE_BUCKETS:  # the user closest to each bucket size
        user, size = min(by_size, key=lambda kv: abs(kv[1] - bucket))
        if abs(size - bucket) <= bucket * 0.35:
            picked[size] = user
    with engine.connect() as conn, Session(bind=conn) as session:
        for size, user in sorted(picked.items()):
            qs = [query_for(rng, corpus, user) for _ in range(per_user)]
            exact: list[float] = []
            index: list[float] = []
            rec: list[float] = []
            for q in qs:
                timed(session, modes["exact"], q)
                timed(session, modes["index"], q)
            for q in qs:
                le, truth = timed(session, modes["exact"], q)
                li, found = timed(session, modes["index"], q)
                exact.append(le)
                index.append(li)
                rec.append(recall(found, truth))
            rows.append(
                (
                    size,
                    statistics.median(exact) * 1000,
                    statistics.median(index) * 1000,
                    statistics.mean(rec),
                    plan_uses_index(engine, qs[0]),
                )
            )
    return rows


# --- report --------------------------------------------------------------------------------


def report(results: dict[str, dict[str, list[float]]]) -> None:
    base50 = pct(results["exact"]["lat"], 0.5)
    base95 = pct(results["exact"]["lat"], 0.95)
    print(
        f"{'mode':<8} {'p50 ms':>8} {'p95 ms':>8} {'p50/exact':>10} {'p95/exact':>10} "
        f"{'recall@10':>10}"
    )
    for name, r in results.items():
        p50, p95 = pct(r["lat"], 0.5), pct(r["lat"], 0.95)
        print(
            f"{name:<8} {p50 * 1000:8.2f} {p95 * 1000:8.2f} {p50 / base50:10.2f} "
            f"{p95 / base95:10.2f} {statistics.mean(r['recall']):10.3f}"
        )


def report_crossover(rows: Sequence[tuple[int, float, float, float, bool]], target: float) -> None:
    print(
        f"\n{'tenant rows':>11} {'exact ms':>9} {'index ms':>9} {'index/exact':>11} "
        f"{'recall':>7} {'hnsw used':>9}"
    )
    for size, e, i, r, used in rows:
        print(f"{size:11d} {e:9.2f} {i:9.2f} {i / e:11.2f} {r:7.3f} {used!s:>9}")
    print(f"\nsuggested EXACT_SEARCH_MAX_ROWS: {suggest_threshold(rows, target)}")


def suggest_threshold(rows: Sequence[tuple[int, float, float, float, bool]], target: float) -> str:
    """The largest measured tenant size at which the index plan does not yet win for good:
    above it, every measured size is faster through HNSW at the recall target."""
    last_exact = 0
    for size, exact_ms, index_ms, rec, used in rows:
        if not (used and index_ms < exact_ms and rec >= target):
            last_exact = size
    if last_exact == rows[-1][0]:
        return f"> {last_exact} (exact won or tied at every measured size)"
    return f"~{last_exact} (index wins from the next measured size up)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__)
    parser.add_argument("--rows", type=int, default=20000, help="embedding rows in all")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--topics", type=int, default=40, help="vector clusters / vocabularies")
    parser.add_argument(
        "--latent", type=int, default=24, help="directions of in-topic variation (0: isotropic)"
    )
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--per-user", type=int, default=20, help="queries per tenant size")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument(
        "--storage",
        choices=("external", "main"),
        default="external",
        help="storage of embedding.embedding (the schema's is external, pgvector's default)",
    )
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    engine = fresh_database(DB_NAME)
    from worker.config import get_settings

    t0 = time.perf_counter()
    corpus = load(engine, rng, args.rows, args.users, args.topics, args.latent, args.storage)
    print(
        f"loaded {sum(corpus.user_rows.values())} rows for {args.users} users "
        f"(largest {max(corpus.user_rows.values())}, median "
        f"{int(statistics.median(corpus.user_rows.values()))}) and built the index in "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    print(
        "unfiltered HNSW chunk recall@10 (data difficulty): "
        f"ef_search 40 {unfiltered_recall(engine, corpus, rng, 40):.3f}, "
        f"100 {unfiltered_recall(engine, corpus, rng, 100):.3f}"
    )
    queries = make_queries(rng, corpus, args.queries)
    print(
        f"\n{len(queries)} queries x {args.repeats}; hybrid uses EXACT_SEARCH_MAX_ROWS="
        f"{get_settings().exact_search_max_rows}"
    )
    report(measure(engine, queries, args.repeats))
    report_crossover(crossover(engine, corpus, rng, args.per_user), get_settings().recall_target)
    if not args.keep:
        drop_database(DB_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
