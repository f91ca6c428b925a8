"""Per-model partial expression indexes over the shared ``embedding`` table.

Vectors of every model share one untyped ``vector`` column. Each model gets its own index on
``(embedding::vector(N))`` restricted to ``WHERE model = '<name>'``, as pgvector's README
recommends for mixed dimensions; queries must use the same expression and predicate
(``vector_expr`` / ``model_predicate``) or the planner cannot use the index.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, text

OPERATORS = {"cosine": "<=>", "l2": "<->", "ip": "<#>"}
_OPS_SUFFIX = {"cosine": "cosine_ops", "l2": "l2_ops", "ip": "ip_ops"}
DEFAULT_PARAMS: dict[str, dict[str, int]] = {
    "hnsw": {"m": 16, "ef_construction": 64},
    "ivfflat": {"lists": 100},
}
# ``embedding`` is partitioned by segment (migration 0004); vector indexes live on each
# partition, not on the parent: the main one, and a bulk import's own once it is done.
MAIN_PARTITION = "embedding_main"
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/@+-]{0,127}$")
INDEX_PREFIX = "embedding_vec_"


def check_model_name(name: str) -> str:
    """Model names end up as SQL literals in index predicates: allow a safe alphabet only."""
    if not MODEL_NAME_RE.match(name):
        raise ValueError(
            f"invalid model name {name!r}: use letters, digits and . _ / @ + - (max 128)"
        )
    return name


def sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class IndexSpec:
    model: str
    dimensions: int
    distance: str = "cosine"
    kind: str = "hnsw"
    precision: str = "vector"  # or "halfvec": half the index size, same recall here
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Any) -> IndexSpec:
        return cls(
            model=row.name,
            dimensions=row.dimensions,
            distance=row.distance,
            kind=row.index_kind,
            precision=row.index_precision,
            params=dict(row.index_params or {}),
        )

    @property
    def name(self) -> str:
        return index_name(self.model, self.kind)

    @property
    def opclass(self) -> str:
        return f"{self.precision}_{_OPS_SUFFIX[self.distance]}"

    @property
    def operator(self) -> str:
        return OPERATORS[self.distance]

    def build_params(self) -> dict[str, Any]:
        allowed = DEFAULT_PARAMS[self.kind]
        merged = {**allowed, **{k: v for k, v in self.params.items() if k in allowed}}
        return {k: int(v) for k, v in merged.items()}


def index_name(model: str, kind: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", model.lower()).strip("_")[:24]
    digest = hashlib.sha1(model.encode()).hexdigest()[:6]
    return f"{INDEX_PREFIX}{slug}_{digest}_{kind}"


def vector_expr(spec: IndexSpec, column: str = "embedding") -> str:
    return f"({column}::{spec.precision}({int(spec.dimensions)}))"


def model_predicate(model: str, column: str = "model") -> str:
    return f"{column} = {sql_literal(check_model_name(model))}"


def segment_table(segment: int) -> str:
    return MAIN_PARTITION if segment == 0 else f"embedding_s{int(segment)}"


def segment_index_name(spec: IndexSpec, segment: int) -> str:
    """The model's index on a segment's partition (the main one keeps ``spec.name``)."""
    return spec.name if segment == 0 else f"{spec.name}_s{int(segment)}"


def create_index_sql(
    spec: IndexSpec,
    *,
    name: str | None = None,
    concurrently: bool = True,
    table: str = MAIN_PARTITION,
) -> str:
    params = ", ".join(f"{k} = {v}" for k, v in spec.build_params().items())
    return (
        f"CREATE INDEX {'CONCURRENTLY ' if concurrently else ''}IF NOT EXISTS "
        f"{name or spec.name} ON {table} USING {spec.kind} "
        f"({vector_expr(spec)} {spec.opclass}) WITH ({params}) "
        f"WHERE {model_predicate(spec.model)}"
    )


def drop_index_sql(name: str, *, concurrently: bool = True) -> str:
    return f"DROP INDEX {'CONCURRENTLY ' if concurrently else ''}IF EXISTS {name}"


def create_model_index(
    engine: Engine,
    spec: IndexSpec,
    *,
    name: str | None = None,
    maintenance_work_mem: str = "512MB",
    parallel_workers: int = 2,
    table: str = MAIN_PARTITION,
) -> str:
    """Build the model's index with ``CREATE INDEX CONCURRENTLY`` (inserts keep working),
    with more memory and no statement timeout for this session only (a timeout half-way
    leaves an INVALID index). An INVALID leftover of the same name is dropped first: IF NOT
    EXISTS would keep it. Returns the index name."""
    from worker.db.engine import autocommit_session

    index = name or spec.name
    with autocommit_session(
        engine,
        maintenance_work_mem=maintenance_work_mem,
        max_parallel_maintenance_workers=parallel_workers,
        statement_timeout=0,
    ) as conn:
        if index_state(conn, index) == "invalid":
            conn.execute(text(drop_index_sql(index)))
        conn.execute(text(create_index_sql(spec, name=index, table=table)))
    return index


def drop_model_index(engine: Engine, name: str) -> None:
    from worker.db.engine import autocommit_session

    with autocommit_session(engine, statement_timeout=0) as conn:
        conn.execute(text(drop_index_sql(name)))


def index_state(conn: Connection, name: str) -> str:
    """'missing', 'invalid' (a failed CONCURRENTLY build) or 'valid'."""
    row = conn.execute(
        text(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname = :name AND c.relnamespace = 'public'::regnamespace"
        ),
        {"name": name},
    ).first()
    if row is None:
        return "missing"
    return "valid" if row[0] else "invalid"
