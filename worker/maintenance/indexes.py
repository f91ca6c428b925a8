"""Vector index upkeep: measure, decide, rebuild concurrently, record.

Per embedding model (state active or backfilling), each run:

1. makes sure the model's partial expression index exists (IVFFlat waits for enough rows to
   train its lists on: centroids from a near-empty table are useless);
2. measures recall@10 of the index against exact search, on queries made from a sample of
   the model's own vectors (moved off the stored points: see ``sample_queries``), overall
   and for a few tenants (filtered HNSW can return too few rows, pgvector #479, hence
   iterative scans and a count of rows returned);
3. measures drift: rows now against rows at build, rows deleted or updated since the build,
   and the dead share of ``embedding``;
4. rebuilds when drift or recall say so: HNSW with ``REINDEX INDEX CONCURRENTLY``; IVFFlat
   (new ``lists``) or a changed definition by building a new index concurrently and swapping
   names. A healthy index gets the smallest ``ef_search`` / ``probes`` that meets the recall
   target instead (free to apply); only if none does is it rebuilt;
5. records before/after figures on the ``maintenance_run`` row and the ``embedding_model`` row
   (``index_params`` carries the chosen ``ef_search`` / ``probes`` for the search path).

It also drops INVALID indexes left by failed concurrent builds, and offers
``rebuild_churned_hnsw`` to the VACUUM run: vacuuming an HNSW index full of dead tuples is
far slower than rebuilding it first (pgvector #450; on these machines 92-169 s against 22 s
for REINDEX CONCURRENTLY plus 0.7 s of VACUUM, at 100,000 rows and 30% churn).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pgvector import Vector
from sqlalchemy import Connection, Engine, text

from worker.bookmarks.segments import index_pending_segments
from worker.config import Settings
from worker.db.engine import autocommit_session
from worker.db.indexes import (
    DEFAULT_PARAMS,
    MAIN_PARTITION,
    IndexSpec,
    create_index_sql,
    create_model_index,
    drop_index_sql,
    index_name,
    index_state,
    model_predicate,
    vector_expr,
)
from worker.errors import describe
from worker.maintenance.runs import advisory_lock, maintenance_run, table_stats

log = logging.getLogger(__name__)

K = 10
# Queries read the partitioned parent (every segment, as searches do); statistics, VACUUM
# and the vector indexes that upkeep manages belong to the main partition.
TABLE = "embedding"
STATS_TABLE = MAIN_PARTITION
DEFAULT_EF_SEARCH = 40  # pgvector's default
# Query-time settings tried, smallest first, when recall falls short on a healthy index.
EF_SEARCH_LADDER = (40, 64, 100, 160, 250, 400)
MIN_IVFFLAT_TRAIN_ROWS = 1000
REBUILD_MEMORY = "512MB"
STATES = ("active", "backfilling")
# How far a sampled vector is moved to make a query, in units of its nearest-neighbour
# distance. Calibrated on bench/index_upkeep's clustered data against fresh queries (recall@10
# at ef_search 40/64/100): fresh 0.94/0.98/0.99; scale 0.5 0.97/0.99/0.99 (optimistic);
# 0.75 0.90-0.93/0.94-0.97/0.96-0.98 (a little pessimistic); 1.0 0.87-0.91 at 40. A slightly
# pessimistic estimate costs a larger ef_search; an optimistic one costs recall.
PERTURB_SCALE = 0.75
# Kept in embedding_model.index_params (no column for it): the table's delete/update counter
# when the index was built, so churn since the build can be told apart from growth.
WRITES_KEY = "writes_at_build"


# --- model rows ----------------------------------------------------------------------------


@dataclass
class ModelRow:
    id: int
    spec: IndexSpec
    state: str
    rows_at_build: int | None
    index_params: dict[str, Any]
    built_at: datetime | None = None

    @property
    def writes_at_build(self) -> int | None:
        value = self.index_params.get(WRITES_KEY)
        return None if value is None else int(value)


def load_models(engine: Engine, names: Sequence[str] | None = None) -> list[ModelRow]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, name, dimensions, distance, state, index_kind, index_precision, "
                "index_params, rows_at_build, built_at FROM embedding_model "
                "WHERE state = ANY(:states) ORDER BY id"
            ),
            {"states": list(STATES)},
        ).all()
    models = [
        ModelRow(
            id=r.id,
            spec=IndexSpec.from_row(r),
            state=r.state,
            rows_at_build=r.rows_at_build,
            index_params=dict(r.index_params or {}),
            built_at=r.built_at,
        )
        for r in rows
    ]
    return [m for m in models if names is None or m.spec.model in names]


def _still_loading(engine: Engine) -> set[str]:
    from worker.backfill import loading_models

    with engine.connect() as conn:
        return loading_models(conn)


# --- sizes and settings ----------------------------------------------------------------------


def ivfflat_lists(rows: int) -> int:
    """pgvector's advice: rows/1000 lists up to 1M rows, sqrt(rows) beyond (min 10)."""
    if rows <= 1_000_000:
        return max(10, rows // 1000)
    return max(10, int(math.sqrt(rows)))


def ivfflat_min_rows(lists: int) -> int:
    return max(MIN_IVFFLAT_TRAIN_ROWS, 10 * lists)


def query_setting_name(kind: str) -> str:
    return "hnsw.ef_search" if kind == "hnsw" else "ivfflat.probes"


def current_query_value(spec: IndexSpec, params: dict[str, Any]) -> int:
    if spec.kind == "hnsw":
        return int(params.get("ef_search") or DEFAULT_EF_SEARCH)
    lists = int(spec.build_params()["lists"])
    # sqrt(lists) is pgvector's suggested start; 1 (its default) is poor on most data.
    return int(params.get("probes") or max(1, round(math.sqrt(lists))))


def ladder(spec: IndexSpec, start: int) -> list[int]:
    """Query settings to try, from ``start`` upwards."""
    if spec.kind == "hnsw":
        return [start, *(v for v in EF_SEARCH_LADDER if v > start)]
    lists = int(spec.build_params()["lists"])
    values, v = [start], start
    while v < lists:
        v = min(lists, v * 2)
        values.append(v)
    return values


# --- recall ----------------------------------------------------------------------------------


@dataclass
class Sample:
    """Query vectors (pgvector text form, so no connection adapter is needed), of one
    tenant when ``user_id`` is set."""

    vectors: list[str]
    user_id: str | None = None


@dataclass
class Recall:
    recall: float | None
    queries: int
    setting: str
    value: int
    low: float | None = None
    index_used: bool | None = None
    returned_mean: float | None = None
    short_queries: int = 0

    def meets(self, target: float) -> bool:
        """No queries: nothing to fix. Otherwise the lower bound of the mean must reach the
        target (see ``lower_bound``)."""
        return self.low is None or self.low >= target

    def as_dict(self) -> dict[str, Any]:
        return {
            "recall": None if self.recall is None else round(self.recall, 4),
            "recall_low": None if self.low is None else round(self.low, 4),
            "queries": self.queries,
            self.setting: self.value,
            "index_used": self.index_used,
            "returned_mean": self.returned_mean,
            "short_queries": self.short_queries,
        }


def _sample_ids(
    conn: Connection, spec: IndexSpec, n: int, rows: int, user_id: str | None
) -> list[int]:
    """Up to ``n`` random row ids of the model (of one user when given). A Bernoulli table
    sample keeps this cheap on big tables; it falls back to a full shuffle when small."""
    pred = model_predicate(spec.model)
    params: dict[str, Any] = {"n": n, "u": user_id}
    user = "AND user_id = :u" if user_id is not None else ""
    pct = min(100.0, 100.0 * 3 * n / max(rows, 1))
    ids: list[int] = []
    if user_id is None and pct < 100.0:
        ids = list(
            conn.execute(
                text(
                    f"SELECT id FROM {TABLE} TABLESAMPLE BERNOULLI ({pct:.6f}) WHERE {pred} "
                    "ORDER BY random() LIMIT :n"
                ),
                params,
            ).scalars()
        )
    if len(ids) < n:
        ids = list(
            conn.execute(
                text(f"SELECT id FROM {TABLE} WHERE {pred} {user} ORDER BY random() LIMIT :n"),
                params,
            ).scalars()
        )
    return ids


def _vectors_of(conn: Connection, ids: list[int]) -> dict[int, str]:
    # Fetched by id, apart from any ORDER BY: PostgreSQL may compute a select list for
    # every row before a top-N sort, and 384 floats to text per row made one exact
    # nearest-neighbour query 15 times slower.
    rows = conn.execute(
        text(f"SELECT id, embedding::text FROM {TABLE} WHERE id = ANY(:ids)"), {"ids": ids}
    )
    return {int(r[0]): str(r[1]) for r in rows}


def _parse(value: str) -> NDArray[np.float64]:
    return np.asarray(Vector.from_text(value).to_numpy(), dtype=np.float64)


def sample_queries(
    conn: Connection,
    spec: IndexSpec,
    n: int,
    rows: int,
    user_id: str | None = None,
    *,
    rng: np.random.Generator | None = None,
) -> Sample:
    """``n`` query vectors that behave like new data, not like stored rows.

    A stored vector used as its own query is an easy case for a graph index (it was inserted
    with that very search) and overstates recall: bench/index_upkeep at 20,000 rows measured
    0.996 on stored vectors against 0.93 on fresh ones from the same distribution. So each
    sampled vector ``v`` is moved, in a random direction orthogonal to it, by 0.75 of the
    distance to its own nearest neighbour: a point as new to the index as a fresh one from
    the same neighbourhood (see PERTURB_SCALE)."""
    rng = rng or np.random.default_rng()
    ids = _sample_ids(conn, spec, n, rows, user_id)
    stored = _vectors_of(conn, ids)
    nn_sql = text(_knn_sql(spec, "nearest", user_id is not None, exclude=True))
    nearest: dict[int, int | None] = {}
    with _local(conn, EXACT_SETTINGS):
        for row_id in ids:
            params = {"q": stored[row_id], "qid": row_id, "k": 1, "u": user_id}
            nearest[row_id] = conn.execute(nn_sql, params).scalar()
    neighbours = _vectors_of(conn, [i for i in nearest.values() if i is not None])
    queries = [
        _perturb(stored[i], neighbours.get(nearest[i] or 0), rng) for i in ids if i in stored
    ]
    return Sample(queries, user_id)


def _perturb(stored: str, nearest: str | None, rng: np.random.Generator) -> str:
    if nearest is None:
        return stored  # a model with one row: nothing to move by
    v = _parse(stored)
    step = PERTURB_SCALE * float(np.linalg.norm(v - _parse(nearest)))
    u: NDArray[np.float64] = rng.standard_normal(len(v))
    u = u - float(u @ v) / max(float(v @ v), 1e-12) * v  # orthogonal to v
    u = u / max(float(np.linalg.norm(u)), 1e-12)
    return str(Vector((v + step * u).astype(np.float32)).to_text())


def _knn_sql(spec: IndexSpec, mode: str, user: bool, *, exclude: bool = False) -> str:
    # The comment makes the text differ per mode: psycopg prepares repeated statements and
    # PostgreSQL does not re-plan a cached plan when enable_* settings change.
    rhs = f"CAST(:q AS {spec.precision}({int(spec.dimensions)}))"
    return (
        f"/* recall {mode} */ SELECT id FROM {TABLE} "
        f"WHERE {model_predicate(spec.model)} {'AND id <> :qid ' if exclude else ''}"
        f"{'AND user_id = :u ' if user else ''}"
        f"ORDER BY {vector_expr(spec)} {spec.operator} {rhs} LIMIT :k"
    )


EXACT_SETTINGS = {
    "enable_indexscan": "off",
    "enable_bitmapscan": "off",
    "enable_indexonlyscan": "off",
}
# Approximate: only the vector index may provide the order (no seq scan + sort, no btree on
# user_id + sort), so what is measured is the index even on a small table.
APPROX_SETTINGS = {"enable_seqscan": "off", "enable_bitmapscan": "off", "enable_sort": "off"}


@contextmanager
def _local(conn: Connection, settings: dict[str, str]) -> Iterator[None]:
    """A transaction with ``SET LOCAL`` settings (they end with it)."""
    if conn.in_transaction():
        conn.commit()  # close the autobegun read transaction of earlier statements
    with conn.begin():
        for name, value in settings.items():
            conn.execute(text("SELECT set_config(:n, :v, true)"), {"n": name, "v": value})
        yield


def _neighbours(conn: Connection, sql: str, sample: Sample) -> list[list[int]]:
    out = []
    for vec in sample.vectors:
        params = {"q": vec, "k": K, "u": sample.user_id}
        out.append([int(r[0]) for r in conn.execute(text(sql), params)])
    return out


def exact_neighbours(conn: Connection, spec: IndexSpec, sample: Sample) -> list[list[int]]:
    with _local(conn, EXACT_SETTINGS):
        return _neighbours(conn, _knn_sql(spec, "exact", sample.user_id is not None), sample)


def approx_neighbours(
    conn: Connection, spec: IndexSpec, sample: Sample, value: int
) -> tuple[list[list[int]], bool | None]:
    """Neighbours through the index at ``ef_search`` / ``probes`` = value, and whether the
    plan really used the model's index (EXPLAIN of the first query)."""
    settings = {**APPROX_SETTINGS, query_setting_name(spec.kind): str(value)}
    if sample.user_id is not None:
        # Without iterative scans a filtered HNSW search stops after ef_search candidates and
        # returns fewer rows than asked for (pgvector #479).
        settings[f"{spec.kind}.iterative_scan"] = "relaxed_order"
    sql = _knn_sql(spec, "approx", sample.user_id is not None)
    with _local(conn, settings):
        used = None
        if sample.vectors:
            params = {"q": sample.vectors[0], "k": K, "u": sample.user_id}
            plan = "\n".join(str(r[0]) for r in conn.execute(text("EXPLAIN " + sql), params))
            used = spec.name in plan  # also matches the _new / _ccnew names of a rebuild
        return _neighbours(conn, sql, sample), used


def recall_scores(exact: list[list[int]], approx: list[list[int]]) -> list[float]:
    """Per query: the share of the exact neighbours the index found."""
    return [len(set(a) & set(e)) / len(e) for e, a in zip(exact, approx, strict=True) if e]


def lower_bound(scores: list[float]) -> float | None:
    """One-sided 95% lower bound of the mean recall. Tuning goes by it, not by the mean:
    per-query recall is lumpy (a few queries at 0.5), so 50 queries measure the mean to
    about ±0.03, and settings chosen where the mean (or the mean less one standard error)
    first touched the target fell short on fresh queries in bench/index_upkeep (0.96
    measured, 0.92-0.94 fresh). Erring high is cheap: there ef_search 100 cost 15% more
    time than 40 for 0.99 recall instead of 0.93."""
    if not scores:
        return None
    if len(scores) < 2:
        return scores[0]
    return statistics.fmean(scores) - 1.645 * statistics.stdev(scores) / math.sqrt(len(scores))


def measure(
    conn: Connection, spec: IndexSpec, sample: Sample, exact: list[list[int]], value: int
) -> Recall:
    approx, used = approx_neighbours(conn, spec, sample, value)
    expected = [len(e) for e in exact]
    returned = [len(a) for a in approx]
    scores = recall_scores(exact, approx)
    return Recall(
        recall=statistics.fmean(scores) if scores else None,
        low=lower_bound(scores),
        queries=len(sample.vectors),
        setting=query_setting_name(spec.kind),
        value=value,
        index_used=used,
        returned_mean=round(sum(returned) / len(returned), 2) if returned else None,
        short_queries=sum(1 for r, e in zip(returned, expected, strict=True) if r < e),
    )


def tune(
    conn: Connection,
    spec: IndexSpec,
    sample: Sample,
    exact: list[list[int]],
    start: int,
    target: float,
    known: Recall | None = None,
) -> list[Recall]:
    """Recall at each rung of the ladder from ``start`` until the target is met (``known``:
    a measurement already made at one of the rungs, reused)."""
    tried = []
    for value in ladder(spec, start):
        if known is not None and known.value == value:
            result = known
        else:
            result = measure(conn, spec, sample, exact, value)
        tried.append(result)
        if result.meets(target):
            break
    return tried


def tenant_recall(
    conn: Connection,
    spec: IndexSpec,
    value: int,
    *,
    queries_per_user: int = 10,
    small_users: int = 3,
    exact_below: int = 0,
) -> list[dict[str, Any]]:
    """Recall and rows returned for the largest tenant and a few small ones, filtered by
    ``user_id`` with iterative scans on."""
    users = conn.execute(
        text(
            f"SELECT user_id, count(*) AS n FROM {TABLE} WHERE {model_predicate(spec.model)} "
            "GROUP BY user_id HAVING count(*) > 1 ORDER BY n DESC, user_id"
        )
    ).all()
    if not users:
        return []
    chosen = [users[0], *users[1:][-small_users:]] if len(users) > 1 else [users[0]]
    out = []
    for user_id, n in chosen:
        sample = sample_queries(conn, spec, queries_per_user, int(n), user_id=user_id)
        exact = exact_neighbours(conn, spec, sample)
        result = measure(conn, spec, sample, exact, value)
        out.append(
            {
                "user_id": user_id,
                "rows": int(n),
                # The search path scans these tenants exactly; their index recall is context.
                "searched_exactly": int(n) < exact_below,
                **result.as_dict(),
            }
        )
    return out


# --- drift -------------------------------------------------------------------------------------


def count_rows(conn: Connection, model: str) -> int:
    return int(
        conn.execute(text(f"SELECT count(*) FROM {TABLE} WHERE {model_predicate(model)}")).scalar()
        or 0
    )


def definition_matches(conn: Connection, spec: IndexSpec, name: str) -> bool:
    """Does the existing index have the expression, opclass and build parameters the model
    row asks for? (REINDEX keeps the old ones; a change needs a new build.)"""
    row = conn.execute(
        text(
            "SELECT pg_get_indexdef(c.oid) AS definition, c.reloptions AS opts FROM pg_class c "
            "WHERE c.relname = :n AND c.relnamespace = 'public'::regnamespace"
        ),
        {"n": name},
    ).first()
    if row is None:
        return False
    expr = f"USING {spec.kind} (((embedding)::{spec.precision}({spec.dimensions})) {spec.opclass})"
    opts = dict(o.split("=", 1) for o in (row.opts or []))
    wanted = {k: str(v) for k, v in spec.build_params().items()}
    return expr in row.definition and all(opts.get(k) == v for k, v in wanted.items())


@dataclass
class Thresholds:
    recall_target: float = 0.95
    max_growth: float = 0.5
    max_dead_share: float = 0.2
    # Rows deleted or updated since the build, as a share of the rows it was built on. Each
    # left a dead entry in the graph, and n_dead_tup undercounts them: page pruning lowers
    # it while the index entries stay (bench/index_upkeep: 30% churn read as 13% dead).
    max_churn: float = 0.25


def decide(
    recall: float | None,
    growth: float | None,
    dead_share: float,
    matches: bool,
    limits: Thresholds,
    *,
    churn: float | None = None,
    force: bool = False,
) -> list[str]:
    """Reasons to rebuild (empty: keep the index)."""
    reasons = []
    if force:
        reasons.append("forced")
    if not matches:
        reasons.append("definition changed")
    if recall is not None and recall < limits.recall_target:
        reasons.append(f"recall {recall:.3f} < {limits.recall_target}")
    if growth is not None and growth > limits.max_growth:
        reasons.append(f"rows grew {growth:.0%} since build")
    if dead_share > limits.max_dead_share:
        reasons.append(f"dead tuples {dead_share:.0%} of {STATS_TABLE}")
    if churn is not None and churn > limits.max_churn:
        reasons.append(f"{churn:.0%} of rows deleted or updated since build")
    return reasons


# --- building ------------------------------------------------------------------------------


def _maintenance_session(engine: Engine, workers: int) -> AbstractContextManager[Connection]:
    # statement_timeout 0: a worker-wide timeout must not kill a long concurrent build
    # half-way (that leaves an INVALID index behind).
    return autocommit_session(
        engine,
        maintenance_work_mem=REBUILD_MEMORY,
        max_parallel_maintenance_workers=workers,
        statement_timeout=0,
    )


def build_index(engine: Engine, spec: IndexSpec, name: str, *, workers: int = 2) -> None:
    create_model_index(
        engine, spec, name=name, maintenance_work_mem=REBUILD_MEMORY, parallel_workers=workers
    )


def reindex(engine: Engine, name: str, *, workers: int = 2) -> None:
    with _maintenance_session(engine, workers) as conn:
        conn.execute(text(f"REINDEX INDEX CONCURRENTLY {name}"))


def swap_rebuild(engine: Engine, spec: IndexSpec, *, workers: int = 2) -> None:
    """Build the new definition under a temporary name, drop the old index, rename: queries
    always have one of the two (the planner does not care about names)."""
    new = f"{spec.name}_new"
    with _maintenance_session(engine, workers) as conn:
        conn.execute(text(drop_index_sql(new)))  # a leftover of an interrupted swap
        conn.execute(text(create_index_sql(spec, name=new)))
        conn.execute(text(drop_index_sql(spec.name)))
        conn.execute(text(f"ALTER INDEX {new} RENAME TO {spec.name}"))


def drop_other_kinds(engine: Engine, spec: IndexSpec) -> list[str]:
    """After a cut-over (hnsw ↔ ivfflat) the old kind's index is only a write cost."""
    dropped = []
    with autocommit_session(engine, statement_timeout=0) as conn:
        for kind in (k for k in DEFAULT_PARAMS if k != spec.kind):
            other = index_name(spec.model, kind)
            if index_state(conn, other) != "missing":
                conn.execute(text(drop_index_sql(other)))
                dropped.append(other)
    return dropped


def rebuild(engine: Engine, spec: IndexSpec, matches: bool, *, workers: int = 2) -> str:
    """Rebuild the model's index under its per-index lock; returns how."""
    with advisory_lock(engine, f"reindex:{spec.name}") as taken:
        if not taken:
            return "skipped: index being rebuilt by another run"
        if spec.kind == "hnsw" and matches:
            reindex(engine, spec.name, workers=workers)
            return "reindex concurrently"
        swap_rebuild(engine, spec, workers=workers)
        return "build concurrently + swap"


def record_model(
    engine: Engine,
    model: ModelRow,
    params: dict[str, Any],
    recall: float | None,
    *,
    rows_at_build: int | None = None,
    built: bool = False,
) -> None:
    if built or WRITES_KEY not in params:
        params = {**params, WRITES_KEY: current_writes(engine)}
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE embedding_model SET index_params = CAST(:params AS jsonb), "
                "last_recall = coalesce(:recall, last_recall), "
                "last_recall_at = CASE WHEN :recall IS NULL THEN last_recall_at ELSE now() END, "
                "rows_at_build = coalesce(:rows, rows_at_build), "
                "built_at = CASE WHEN :built THEN now() ELSE built_at END, "
                "updated_at = now() WHERE id = :id"
            ),
            {
                "params": _json(params),
                # The figure the run reports (4 places), so the row and the report agree.
                "recall": None if recall is None else round(recall, 4),
                "rows": rows_at_build,
                "built": built,
                "id": model.id,
            },
        )


def _json(value: Any) -> str:
    return json.dumps(value, default=str)


def current_writes(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(table_stats(conn, [STATS_TABLE]).get(STATS_TABLE, {}).get("index_writes") or 0)


def churn_since_build(model: ModelRow, writes_now: int) -> float | None:
    """Deletes and updates since the build over the rows it was built on; None when
    unknown (no baseline yet, or the statistics were reset since)."""
    at = model.writes_at_build
    if at is None or writes_now < at:
        return None
    return round((writes_now - at) / max(model.rows_at_build or 0, 1), 4)


def dead_in_index(stats: dict[str, Any], model: ModelRow | None) -> int:
    """Dead entries an index on the table holds: n_dead_tup, or, when no VACUUM ran since
    the build, the deletes/updates since the build if more (pruning hides those from
    n_dead_tup but not from the index)."""
    dead = int(stats["dead"])
    if model is None or model.built_at is None or model.writes_at_build is None:
        return dead
    vacuums = [t for t in (stats["last_vacuum"], stats["last_autovacuum"]) if t is not None]
    if vacuums and max(vacuums) > model.built_at:
        return dead
    return max(dead, int(stats["index_writes"]) - model.writes_at_build)


# --- invalid indexes ---------------------------------------------------------------------------


def find_invalid_indexes(conn: Connection) -> list[dict[str, str]]:
    """INVALID indexes on public tables, except those whose table has an index build in
    progress right now: that build's own index is INVALID until it ends, and dropping it
    would wait for the build and then throw the result away."""
    rows = conn.execute(
        text(
            "SELECT c.relname AS index, t.relname AS table, "
            "format('%I.%I', n.nspname, c.relname) AS qualified "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE NOT i.indisvalid AND n.nspname = 'public' AND NOT EXISTS ("
            "  SELECT 1 FROM pg_stat_progress_create_index p WHERE p.relid = i.indrelid) "
            "ORDER BY 1"
        )
    )
    return [dict(r._mapping) for r in rows]


def drop_invalid_indexes(engine: Engine, *, dry_run: bool = False) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        invalid = find_invalid_indexes(conn)
    if dry_run or not invalid:
        return [{**i, "dropped": False} for i in invalid]
    out = []
    # lock_timeout: a DROP … CONCURRENTLY that queues behind a long VACUUM would hold up the
    # whole run; next run tries again.
    with autocommit_session(engine, lock_timeout="10s", statement_timeout=0) as conn:
        for item in invalid:
            try:
                conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {item['qualified']}"))
                out.append({**item, "dropped": True})
            except Exception as exc:  # reported in the run's details, retried next run
                log.warning("could not drop invalid index %s: %s", item["index"], exc)
                out.append({**item, "dropped": False, "error": str(exc).splitlines()[0]})
    return out


# --- HNSW before VACUUM (pgvector #450) -------------------------------------------------------


def hnsw_indexes(conn: Connection, table: str) -> list[str]:
    rows = conn.execute(
        text(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_am a ON a.oid = c.relam JOIN pg_class t ON t.oid = i.indrelid "
            "WHERE t.relname = :t AND t.relnamespace = 'public'::regnamespace "
            "AND a.amname = 'hnsw' AND i.indisvalid ORDER BY 1"
        ),
        {"t": table},
    )
    return [str(r[0]) for r in rows]


def rebuild_churned_hnsw(
    engine: Engine,
    table: str,
    *,
    min_dead_share: float = 0.1,
    min_dead_tuples: int = 1000,
    dry_run: bool = False,
) -> list[dict[str, Any]]:
    """Before VACUUM of ``table``: rebuild each of its HNSW indexes concurrently when it
    carries many dead entries. VACUUM then finds nothing to repair in them and takes a
    second instead of minutes. Returns one entry per index rebuilt (or that would be)."""
    with engine.connect() as conn:
        stats = table_stats(conn, [table]).get(table)
        names = hnsw_indexes(conn, table) if stats else []
    if not stats or not names:
        return []
    models = {m.spec.name: m for m in load_models(engine)}
    out = []
    for name in names:
        dead = dead_in_index(stats, models.get(name))
        if dead < min_dead_tuples or dead / max(int(stats["live"]) + dead, 1) < min_dead_share:
            continue
        entry: dict[str, Any] = {"index": name, "dead_entries": dead}
        if dry_run:
            entry["action"] = "would reindex concurrently"
        else:
            started = time.monotonic()
            with advisory_lock(engine, f"reindex:{name}") as taken:
                if taken:
                    reindex(engine, name)
                    entry["action"] = "reindex concurrently"
                    if name in models:
                        _mark_rebuilt(engine, models[name])
                else:
                    entry["action"] = "skipped: index being rebuilt by another run"
            entry["seconds"] = round(time.monotonic() - started, 3)
        out.append(entry)
    return out


def _mark_rebuilt(engine: Engine, model: ModelRow) -> None:
    """Keep the model row's build facts true when the VACUUM run rebuilt its index."""
    with engine.connect() as conn:
        rows = count_rows(conn, model.spec.model)
    record_model(engine, model, model.index_params, None, rows_at_build=rows, built=True)


# --- per model ---------------------------------------------------------------------------------


@dataclass
class UpkeepOptions:
    limits: Thresholds
    sample_size: int = 50
    force: bool = False
    dry_run: bool = False
    workers: int = 2
    exact_below: int = 0
    tenant_queries: int = 10


def _create_if_missing(
    engine: Engine, model: ModelRow, rows: int, state: str, opts: UpkeepOptions
) -> dict[str, Any] | None:
    """Build a missing (or INVALID) index; None when there is one already."""
    if state == "valid":
        return None
    spec = model.spec
    params = dict(model.index_params)
    if spec.kind == "ivfflat":
        lists = ivfflat_lists(rows)
        if rows < ivfflat_min_rows(lists):
            return {
                "decision": f"wait: {rows} rows, IVFFlat trains on >= {ivfflat_min_rows(lists)}"
            }
        params["lists"] = lists
        spec = replace(spec, params=params)
    if opts.dry_run:
        return {"decision": f"would create ({state})"}
    started = time.monotonic()
    with advisory_lock(engine, f"reindex:{spec.name}") as taken:
        if not taken:
            return {"decision": "skipped: index being built by another run"}
        build_index(engine, spec, spec.name, workers=opts.workers)
    out: dict[str, Any] = {
        "decision": f"created ({state})",
        "build_seconds": round(time.monotonic() - started, 3),
    }
    model.spec, model.index_params = spec, params
    out.update(_after_build(engine, model, rows, opts))
    return out


def _after_build(
    engine: Engine, model: ModelRow, rows: int, opts: UpkeepOptions, sample: Sample | None = None
) -> dict[str, Any]:
    """Measure a fresh index from the default query setting upwards and record it. With
    ``sample``, the queries of the 'before' measurement, so before/after compare alike (the
    exact answers are computed again: rows may have changed during the rebuild)."""
    spec = model.spec
    start = current_query_value(spec, {})
    with engine.connect() as conn:
        sample = sample or sample_queries(conn, spec, opts.sample_size, rows)
        exact = exact_neighbours(conn, spec, sample)
        tried = tune(conn, spec, sample, exact, start, opts.limits.recall_target)
    final = tried[-1]
    params = {**model.index_params, **spec.build_params(), _param_key(spec): final.value}
    record_model(engine, model, params, final.recall, rows_at_build=rows, built=True)
    model.index_params = params
    return {"recall_after": final.as_dict(), "tuning": [t.as_dict() for t in tried]}


def _param_key(spec: IndexSpec) -> str:
    return "ef_search" if spec.kind == "hnsw" else "probes"


def upkeep_model(engine: Engine, model: ModelRow, opts: UpkeepOptions) -> dict[str, Any]:
    """Everything one run does for one model; returns what it saw and did."""
    started = time.monotonic()
    spec = model.spec
    with engine.connect() as conn:
        rows = count_rows(conn, spec.model)
        state = index_state(conn, spec.name)
        matches = state == "valid" and definition_matches(conn, spec, spec.name)
        stats = table_stats(conn, [STATS_TABLE])[STATS_TABLE]
    out: dict[str, Any] = {"model": spec.model, "index": spec.name, "kind": spec.kind}
    out["drift"] = {
        "rows": rows,
        "rows_at_build": model.rows_at_build,
        "growth": _growth(rows, model.rows_at_build),
        "churn": churn_since_build(model, int(stats["index_writes"])),
        "dead_tuples": stats["dead"],
        "live_tuples": stats["live"],
        "dead_share": stats["dead_share"],
    }
    created = _create_if_missing(engine, model, rows, state, opts)
    if created is not None:
        out.update(created)
    elif rows < 2:
        out["decision"] = "keep: too few rows to measure"
    else:
        out.update(_measure_and_decide(engine, model, rows, matches, out["drift"], opts))
    not_ready = ("wait", "would create", "skipped", "keep: too few")
    if rows > 1 and not out["decision"].startswith(not_ready):
        value = current_query_value(model.spec, model.index_params)
        with engine.connect() as conn:
            out["tenants"] = tenant_recall(
                conn,
                model.spec,
                value,
                queries_per_user=opts.tenant_queries,
                exact_below=opts.exact_below,
            )
        if not opts.dry_run:
            out["dropped_other_kinds"] = drop_other_kinds(engine, model.spec)
    out["seconds"] = round(time.monotonic() - started, 3)
    return out


def _growth(rows: int, at_build: int | None) -> float | None:
    if at_build is None:
        return None  # unknown until the first run records a baseline
    return round((rows - at_build) / max(at_build, 1), 4)


def _measure_and_decide(
    engine: Engine,
    model: ModelRow,
    rows: int,
    matches: bool,
    drift: dict[str, Any],
    opts: UpkeepOptions,
) -> dict[str, Any]:
    spec = model.spec
    limits = opts.limits
    out: dict[str, Any] = {}
    value = current_query_value(spec, model.index_params)
    with engine.connect() as conn:
        sample = sample_queries(conn, spec, opts.sample_size, rows)
        exact = exact_neighbours(conn, spec, sample)
        before = measure(conn, spec, sample, exact, value)
        out["recall_before"] = before.as_dict()
        structural = decide(
            None,
            drift["growth"],
            drift["dead_share"],
            matches,
            limits,
            churn=drift["churn"],
            force=opts.force,
        )
        tried: list[Recall] = [before]
        if not structural:
            # A healthy index: pick the smallest ef_search/probes that meets the target, from
            # the default up each time. Only ever raising it would ratchet it up run after
            # run on sampling noise alone (50 queries measure recall to about ±0.03).
            start = current_query_value(spec, {})
            tried = tune(conn, spec, sample, exact, start, limits.recall_target, known=before)
            out["tuning"] = [t.as_dict() for t in tried]
    best = tried[-1]
    reasons = structural + decide(best.recall, None, 0.0, True, limits)
    out["reasons"] = reasons
    if reasons and not structural and _fresh(model, drift):
        # Short even at the largest ef_search/probes, on an index built on today's data: a
        # rebuild with the same parameters would change nothing, and rebuilding every run
        # would cost a build per run. Say so instead; larger m / ef_construction (or lists)
        # in index_params is a person's decision.
        out["decision"] = "keep: recall short on a fresh index; raise its build parameters"
        out["reasons"] = []
        if not opts.dry_run:
            params = {**model.index_params, _param_key(spec): best.value}
            record_model(engine, model, params, best.recall)
            model.index_params = params
        return out
    if not reasons:
        params = {**model.index_params, _param_key(spec): best.value}
        out["decision"] = "keep" if best.value == value else f"tuned {best.setting}={best.value}"
        if opts.dry_run:
            out["decision"] = "would " + out["decision"]
            return out
        baseline = rows if model.rows_at_build is None else None
        record_model(engine, model, params, best.recall, rows_at_build=baseline)
        model.index_params = params
        out["recall_after"] = best.as_dict()
        return out
    if opts.dry_run:
        out["decision"] = "would rebuild"
        return out
    return {**out, **_rebuild_and_record(engine, model, rows, matches, drift, opts, sample)}


def _fresh(model: ModelRow, drift: dict[str, Any]) -> bool:
    """Built by upkeep on (nearly) the data it holds now."""
    small = 0.05
    return (
        model.built_at is not None
        and drift["growth"] is not None
        and abs(drift["growth"]) < small
        and (drift["churn"] or 0.0) < small
    )


def _rebuild_and_record(
    engine: Engine,
    model: ModelRow,
    rows: int,
    matches: bool,
    drift: dict[str, Any],
    opts: UpkeepOptions,
    sample: Sample,
) -> dict[str, Any]:
    spec = model.spec
    if spec.kind == "ivfflat":
        # New lists for today's row count; a swap because REINDEX would keep the old lists.
        lists = ivfflat_lists(rows)
        matches = matches and lists == spec.build_params()["lists"]
        spec = replace(spec, params={**spec.params, "lists": lists})
    started = time.monotonic()
    how = rebuild(engine, spec, matches, workers=opts.workers)
    out: dict[str, Any] = {"decision": f"rebuilt: {how}"}
    if how.startswith("skipped"):
        return {"decision": how}
    out["build_seconds"] = round(time.monotonic() - started, 3)
    model.spec = spec
    churned = (drift["churn"] or 0.0) > opts.limits.max_churn
    if drift["dead_share"] > opts.limits.max_dead_share or churned:
        # The rebuilt index holds no dead tuples but the heap still does: VACUUM now (fast
        # with a fresh index), or the next run would see the same dead share and rebuild again.
        out["vacuum"] = _vacuum_table(engine, STATS_TABLE)
    out.update(_after_build(engine, model, rows, opts, sample))
    return out


def _vacuum_table(engine: Engine, table: str) -> dict[str, Any]:
    started = time.monotonic()
    with autocommit_session(engine, statement_timeout=0) as conn:
        conn.execute(text(f"VACUUM (ANALYZE) {table}"))
    with engine.connect() as conn:
        after = table_stats(conn, [table]).get(table, {})
    return {"seconds": round(time.monotonic() - started, 3), "dead_after": after.get("dead")}


# --- the run -----------------------------------------------------------------------------------


def run_index_upkeep(
    engine: Engine,
    settings: Settings,
    *,
    dry_run: bool = False,
    sample_size: int = 50,
    max_growth: float = 0.5,
    max_dead_share: float = 0.2,
    max_churn: float = 0.25,
    force: bool = False,
    models: Sequence[str] | None = None,
    parallel_workers: int = 2,
) -> dict[str, Any]:
    """One upkeep pass over every active/backfilling model (or ``models``); see the module
    docstring. Returns what it saw and did, per model; ``skipped`` when another run holds
    the lock."""
    with maintenance_run(engine, "indexes", TABLE, dry_run=dry_run) as run:
        if run.skipped:
            return {"skipped": True, "run_id": run.id, **run.details}
        opts = UpkeepOptions(
            limits=Thresholds(settings.recall_target, max_growth, max_dead_share, max_churn),
            sample_size=sample_size,
            force=force,
            dry_run=dry_run,
            workers=parallel_workers,
            exact_below=settings.exact_search_max_rows,
        )
        run.details["invalid_indexes"] = drop_invalid_indexes(engine, dry_run=dry_run)
        run.details["segments"] = index_pending_segments(engine, dry_run=dry_run)
        run.details["models"] = {}
        loading = set() if models is not None else _still_loading(engine)
        for name in sorted(loading):
            # Its backfill's finish step builds the index in bulk once every row is in.
            run.details["models"][name] = {"decision": "wait: backfill still loading"}
        for model in load_models(engine, models):
            if model.spec.model in loading:
                continue
            try:
                run.details["models"][model.spec.model] = upkeep_model(engine, model, opts)
            except Exception as exc:  # one broken model must not stop the others' upkeep
                log.exception("index upkeep of %s failed", model.spec.model)
                run.details["models"][model.spec.model] = {"error": describe(exc)}
                run.fail(f"{model.spec.model}: {exc}")
        return {"skipped": False, "run_id": run.id, "dry_run": dry_run, **run.details}
