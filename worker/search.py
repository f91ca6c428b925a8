"""Semantic, full-text and hybrid search over one user's items (read-only).

Every query is scoped twice: ``user_id = :user_id`` on the table searched *and* on ``item``,
with ``item.deleted_at IS NULL``; no path returns another user's rows or a deleted item. With
``ROW_LEVEL_SECURITY`` on, each search also declares its user to the database's policies.

Semantic search picks one of two plans by the tenant's row count for the model:

- **exact** (small tenants, up to ``Settings.exact_search_max_rows``): the btree on
  ``(user_id, model)`` selects the tenant's rows and PostgreSQL computes every distance on the
  raw column. The ORDER BY deliberately does not use the indexed expression, so the HNSW index
  is never chosen: for a small tenant a filtered HNSW scan is both slower and incomplete.
- **index** (large tenants): ORDER BY the *same* expression and the *same* literal model
  predicate as the model's partial index (``worker.db.indexes``), with pgvector 0.8's iterative
  scan so that the per-user filter still fills a page. ``relaxed_order`` may return rows
  slightly out of order, so candidates are re-sorted by exact distance in an outer query over
  a ``MATERIALIZED`` CTE, as pgvector's README shows.

Results are grouped per item (its best chunk); pages are item pages (``limit``/``offset``).
Only a query *string* without a vector needs the model; importing this module never imports
torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import Row, text
from sqlalchemy.orm import Session

from worker.config import get_settings
from worker.db.engine import declare_user
from worker.db.indexes import OPERATORS, IndexSpec, model_predicate, vector_expr
from worker.db.models import TS_CONFIG

if TYPE_CHECKING:
    from worker.ingest.types import Embedder

Mode = Literal["hybrid", "semantic", "text"]
# What the embedder returns (an array) or any list of floats.
VectorLike = Sequence[float] | NDArray[np.floating[Any]]
Fusion = Literal["rrf", "weighted"]

SNIPPET_CHARS = 300
# Chunk candidates fetched per wanted item: items have several chunks, and grouping by item
# needs enough of them to fill a page. Grown by CANDIDATE_GROWTH when it does not.
CANDIDATE_FACTOR = 4
MIN_CANDIDATES = 40
CANDIDATE_GROWTH = 4
MAX_CANDIDATES = 4000
# pgvector's default is 40; measured by bench/search.py, 100 keeps filtered recall high for a
# small extra cost. The embedding_model row's index_params["ef_search"] (upkeep) wins.
DEFAULT_EF_SEARCH = 100
MAX_EF_SEARCH = 1000  # hnsw.ef_search's upper bound
# An exact-phrase match doubles a text rank, and counts as one more ranked list in fusion.
PHRASE_BOOST = 2.0
HYBRID_DEPTH = 50  # candidates per list before fusion
RRF_K = 60
MAX_LIMIT = 1000
HEADLINE_OPTIONS = (
    "MaxWords=40, MinWords=15, ShortWord=3, MaxFragments=2, "
    "FragmentDelimiter=' … ', StartSel=**, StopSel=**"
)


@dataclass(frozen=True)
class SearchFilters:
    """Restrictions on the items searched (all given ones must hold).

    ``tags``: the bookmark carries every one. ``folder``: the bookmark's folder path starts
    with it (a list of names, or one string split on ``/``). ``category``: of the item's
    latest analysis. ``created_after`` is inclusive, ``created_before`` exclusive.
    """

    kind: str | None = None
    tags: Sequence[str] = ()
    folder: str | Sequence[str] | None = None
    category: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None

    def folder_parts(self) -> list[str]:
        if self.folder is None:
            return []
        if isinstance(self.folder, str):
            return [part for part in self.folder.split("/") if part]
        return list(self.folder)


@dataclass
class SearchHit:
    item_id: int
    kind: str
    title: str | None
    snippet: str
    score: float
    why: dict[str, Any] = field(default_factory=dict)
    url: str | None = None
    category: str | None = None
    created_at: datetime | None = None


@dataclass(frozen=True)
class _Match:
    """One item's best match before its metadata is loaded."""

    item_id: int
    embedding_id: int | None  # the best chunk (None: only the analysis matched)
    value: float  # distance (semantic) or rank (text)
    matched: str
    phrase: bool = False  # text: the query's words appear as an exact phrase


# --- shared SQL pieces ----------------------------------------------------------------------


def _check_page(limit: int, offset: int) -> None:
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must not be negative")
    if limit > MAX_LIMIT:
        raise ValueError(f"limit must be at most {MAX_LIMIT}")


def _filter_sql(filters: SearchFilters | None, params: dict[str, Any]) -> str:
    """`` AND …`` clauses on ``item i`` for ``filters``, adding their bind parameters.

    Bookmark and analysis conditions are correlated sub-queries rather than joins: the
    vector plan needs rows to stay in index order, and a filter evaluated per candidate
    keeps the iterative scan in charge of filling the page.
    """
    if filters is None:
        return ""
    clauses: list[str] = []
    if filters.kind is not None:
        clauses.append("i.kind = :f_kind")
        params["f_kind"] = filters.kind
    bookmark: list[str] = []
    if filters.tags:
        bookmark.append("b.tags @> CAST(:f_tags AS text[])")
        params["f_tags"] = list(filters.tags)
    folder = filters.folder_parts()
    if folder:
        bookmark.append(f"b.folder_path[1:{len(folder)}] = CAST(:f_folder AS text[])")
        params["f_folder"] = folder
    if bookmark:
        clauses.append(
            "EXISTS (SELECT 1 FROM bookmark b WHERE b.item_id = i.id "
            f"AND b.user_id = :user_id AND {' AND '.join(bookmark)})"
        )
    if filters.category is not None:
        clauses.append(
            "(SELECT a.category FROM analysis a WHERE a.item_id = i.id AND a.user_id = :user_id "
            "ORDER BY a.version DESC LIMIT 1) = :f_category"
        )
        params["f_category"] = filters.category
    if filters.created_after is not None:
        clauses.append("i.created_at >= :f_after")
        params["f_after"] = filters.created_after
    if filters.created_before is not None:
        clauses.append("i.created_at < :f_before")
        params["f_before"] = filters.created_before
    return "".join(f" AND {c}" for c in clauses)


# Live items of this user only; every search joins it.
_ITEM_SCOPE = "i.user_id = :user_id AND i.deleted_at IS NULL"


def _load_hits(
    session: Session,
    user_id: str,
    matches: Sequence[_Match],
    *,
    tsquery: str | None = None,
) -> dict[int, Row[Any]]:
    """Item metadata, latest analysis and snippet source for ``matches``, keyed by item id.

    With ``tsquery`` the snippet is ``ts_headline`` of the best chunk, computed for this page
    only (it re-parses the text, so it is the expensive part of a text search).
    """
    if not matches:
        return {}
    # A first-pass stand-in stores no text (worker.bookmarks.first_pass): the title then.
    source = "coalesce(nullif(e.content, ''), la.summary, i.title, '')"
    snippet = (
        f"ts_headline('{TS_CONFIG}', {source}, websearch_to_tsquery('{TS_CONFIG}', :q), "
        ":headline_options)"
        if tsquery is not None
        else f"left({source}, {SNIPPET_CHARS * 2})"
    )
    sql = f"""
        SELECT i.id, i.kind, coalesce(la.title, i.title) AS title, la.category, i.created_at,
               b.url, {snippet} AS snippet
        FROM unnest(CAST(:item_ids AS bigint[]), CAST(:embedding_ids AS bigint[]))
             AS p(item_id, embedding_id)
        JOIN item i ON i.id = p.item_id
        LEFT JOIN bookmark b ON b.item_id = i.id AND b.user_id = :user_id
        LEFT JOIN embedding e ON e.id = p.embedding_id AND e.user_id = :user_id
        LEFT JOIN LATERAL (
            SELECT a.title, a.summary, a.category FROM analysis a
            WHERE a.item_id = i.id AND a.user_id = :user_id ORDER BY a.version DESC LIMIT 1
        ) la ON true
        WHERE {_ITEM_SCOPE}
    """
    params: dict[str, Any] = {
        "user_id": user_id,
        "item_ids": [m.item_id for m in matches],
        "embedding_ids": [m.embedding_id for m in matches],
    }
    if tsquery is not None:
        params["q"] = tsquery
        params["headline_options"] = HEADLINE_OPTIONS
    return {row.id: row for row in session.execute(text(sql), params)}


def _trim(snippet: str | None, limit: int = SNIPPET_CHARS) -> str:
    """Collapse whitespace and cut at a word boundary near ``limit`` characters."""
    flat = " ".join((snippet or "").split())
    if len(flat) <= limit:
        return flat
    cut = flat[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut) + " …"


def _hit(row: Row[Any], score: float, why: dict[str, Any]) -> SearchHit:
    return SearchHit(
        item_id=row.id,
        kind=row.kind,
        title=row.title,
        snippet=_trim(row.snippet),
        score=score,
        why=why,
        url=row.url,
        category=row.category,
        created_at=row.created_at,
    )


# --- semantic -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ModelFiles:
    """Where the model's files are, to encode a query string with it."""

    name: str
    path: str | None
    package: str | None


def _model_and_tenant(
    session: Session, user_id: str, model: str | None, cap: int, *, first_pass: bool
) -> tuple[IndexSpec, int, _ModelFiles, str | None]:
    """The model's index facts and the tenant's vector count for it, in one round trip;
    ``model`` None means the serving model (``embedding_model.serving``). With
    ``first_pass``, also the name of the first-pass model when this tenant has rows of it (an
    import awaiting the serving model's vectors; one index probe), else None.

    The count stops at ``cap``: the plan only needs to know which side of the threshold the
    tenant is on, so a huge tenant costs no more than the threshold (an index-only scan of
    the ``(user_id, model)`` btree)."""
    which = "serving" if model is None else "name = :name"
    row = session.execute(
        text(
            "SELECT m.name, m.dimensions, m.distance, m.index_kind, m.index_precision, "
            "m.index_params, m.path, m.package, "
            "(SELECT count(*) FROM (SELECT 1 FROM embedding e WHERE e.user_id = :user_id "
            "AND e.model = m.name LIMIT :cap) t) AS tenant_rows, "
            "(SELECT fp.name FROM embedding_model fp WHERE :first_pass "
            "AND fp.state = 'first_pass' AND EXISTS (SELECT 1 FROM embedding e "
            "WHERE e.user_id = :user_id AND e.model = fp.name)) AS first_pass "
            f"FROM embedding_model m WHERE {which}"
        ),
        {"name": model, "user_id": user_id, "cap": cap, "first_pass": first_pass},
    ).first()
    if row is None:
        if model is None:
            raise ValueError("no serving embedding model: see `worker models list`")
        raise ValueError(f"unknown embedding model {model!r} (no embedding_model row)")
    files = _ModelFiles(row.name, row.path, row.package)
    return IndexSpec.from_row(row), int(row.tenant_rows), files, row.first_pass


def _query_vector(
    query: str | None, vector: VectorLike | None, spec: IndexSpec, files: _ModelFiles
) -> NDArray[np.float32]:
    if vector is not None:
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
    elif query is not None and query.strip():
        q = _encode(query, files)
    else:
        raise ValueError("give a query string or a vector")
    if q.shape[0] != spec.dimensions:
        raise ValueError(
            f"query vector has {q.shape[0]} dimensions, {spec.model} has {spec.dimensions}"
        )
    if not np.all(np.isfinite(q)):
        raise ValueError("query vector holds NaN or infinity")
    return q


def _embedder(files: _ModelFiles) -> Embedder:
    """The model's embedder (cached per process)."""
    # Imported here: loading a transformer pulls in torch (seconds, hundreds of MiB), which
    # callers that pass a vector must never pay.
    from worker.runtime import embedder_for_model

    return embedder_for_model(files.name, files.path, files.package)


def _encode(query: str, files: _ModelFiles) -> NDArray[np.float32]:
    """The query encoded by the model whose vectors are searched."""
    return np.asarray(_embedder(files).encode([query])[0], dtype=np.float32)


def _distance(v: NDArray[np.float32], q: NDArray[np.float32], metric: str) -> float:
    """pgvector's distance between two vectors, in numpy (``<=>``, ``<->``, ``<#>``)."""
    if metric == "cosine":
        norms = float(np.linalg.norm(v) * np.linalg.norm(q))
        return 1.0 - float(v @ q) / norms if norms else 1.0
    if metric == "l2":
        return float(np.linalg.norm(v - q))
    return -float(v @ q)


def similarity(distance: float, metric: str) -> float:
    """Higher is better: cosine similarity, 1/(1+d) for L2, the inner product for ``ip``
    (pgvector's ``<#>`` returns the negative inner product)."""
    if metric == "cosine":
        return 1.0 - distance
    if metric == "l2":
        return 1.0 / (1.0 + distance)
    return -distance


def _exact_matches(
    session: Session,
    user_id: str,
    spec: IndexSpec,
    q: NDArray[np.float32],
    operator: str,
    filters: SearchFilters | None,
    limit: int,
    offset: int,
) -> list[_Match]:
    """Every distance of the tenant's rows, best chunk per item, then the page: exact and
    complete. Distances use the raw column, so the planner cannot pick the HNSW index."""
    params: dict[str, Any] = {"user_id": user_id, "q": q, "limit": limit, "offset": offset}
    where = _filter_sql(filters, params)
    sql = f"""
        WITH best AS (
            SELECT DISTINCT ON (e.item_id) e.item_id, e.id, e.chunk_index,
                   e.embedding {operator} CAST(:q AS vector) AS distance
            FROM embedding e JOIN item i ON i.id = e.item_id
            WHERE e.user_id = :user_id AND {model_predicate(spec.model, "e.model")}
              AND {_ITEM_SCOPE}{where}
            ORDER BY e.item_id, distance, e.chunk_index DESC
        )
        SELECT item_id, id, chunk_index, distance FROM best
        ORDER BY distance, item_id LIMIT :limit OFFSET :offset
    """
    return [_semantic_match(r) for r in session.execute(text(sql), params)]


def _semantic_match(row: Row[Any]) -> _Match:
    matched = "title_summary" if row.chunk_index < 0 else "chunk"
    return _Match(row.item_id, row.id, float(row.distance), matched)


def index_candidates_sql(spec: IndexSpec, operator: str, where: str) -> str:
    """Chunk candidates through the model's partial index, re-sorted by exact distance.

    The inner ORDER BY must be the index's own expression and the WHERE its literal model
    predicate, or the planner cannot use the partial index. The outer query re-sorts by the
    full-precision distance (``relaxed_order`` and ``halfvec`` indexes both need it)."""
    query_cast = f"CAST(:q AS {spec.precision}({int(spec.dimensions)}))"
    return f"""
        WITH candidates AS MATERIALIZED (
            SELECT e.id, e.item_id, e.chunk_index, e.embedding
            FROM embedding e JOIN item i ON i.id = e.item_id
            WHERE {model_predicate(spec.model, "e.model")} AND e.user_id = :user_id
              AND {_ITEM_SCOPE}{where}
            ORDER BY {vector_expr(spec, "e.embedding")} {operator} {query_cast}
            LIMIT :n
        )
        SELECT c.item_id, c.id, c.chunk_index, c.embedding {operator} CAST(:q AS vector) AS distance
        FROM candidates c ORDER BY distance, c.chunk_index DESC
    """


@contextmanager
def _scan_settings(session: Session, spec: IndexSpec, ef_search: int | None) -> Iterator[None]:
    """Iterative-scan settings for the index plan, inside a savepoint that is rolled back
    afterwards: ``set_config(..., true)`` would otherwise last until the caller's transaction
    ends and change the plans of whatever else it runs."""
    # One round trip for all of them; names and values are bind parameters.
    calls: list[str] = []
    params: dict[str, str] = {}
    for i, (name, value) in enumerate(_scan_gucs(spec, ef_search).items()):
        calls.append(f"set_config(:n{i}, :v{i}, true)")
        params[f"n{i}"], params[f"v{i}"] = name, value
    nested = session.begin_nested()
    try:
        session.execute(text(f"SELECT {', '.join(calls)}"), params)
        yield
    finally:
        nested.rollback()


def _scan_gucs(spec: IndexSpec, ef_search: int | None) -> dict[str, str]:
    if spec.kind == "ivfflat":
        lists = int(spec.params.get("lists", 100))
        probes = int(spec.params.get("probes", max(1, lists // 10)))
        return {"ivfflat.iterative_scan": "relaxed_order", "ivfflat.probes": str(probes)}
    ef = ef_search or int(spec.params.get("ef_search", DEFAULT_EF_SEARCH))
    return {
        "hnsw.iterative_scan": "relaxed_order",
        "hnsw.ef_search": str(max(1, min(ef, MAX_EF_SEARCH))),
    }


def _index_matches(
    session: Session,
    user_id: str,
    spec: IndexSpec,
    q: NDArray[np.float32],
    filters: SearchFilters | None,
    limit: int,
    offset: int,
    ef_search: int | None,
) -> list[_Match]:
    """Best chunk per item from index candidates. When grouping leaves fewer items than the
    page needs and the scan may hold more, fetch a deeper candidate list.

    Deeper pages fetch deeper candidate lists, and an approximate scan may then find an item
    closer than one already shown: through the index, pages are as approximate as the scan."""
    need = offset + limit
    params: dict[str, Any] = {"user_id": user_id, "q": q}
    sql = text(index_candidates_sql(spec, spec.operator, _filter_sql(filters, params)))
    n = max(need * CANDIDATE_FACTOR, MIN_CANDIDATES)
    with _scan_settings(session, spec, ef_search):
        while True:
            rows = session.execute(sql, {**params, "n": n}).all()
            best = sorted(_best_per_item(rows), key=lambda m: (m.value, m.item_id))
            if len(best) >= need or len(rows) < n or n >= MAX_CANDIDATES:
                return best[offset:need]
            n = min(n * CANDIDATE_GROWTH, MAX_CANDIDATES)


def _best_per_item(rows: Sequence[Row[Any]]) -> list[_Match]:
    """Rows come sorted by exact distance: the first row of each item is its best."""
    seen: set[int] = set()
    best: list[_Match] = []
    for row in rows:
        if row.item_id not in seen:
            seen.add(row.item_id)
            best.append(_semantic_match(row))
    return best


def semantic_search(
    session: Session,
    user_id: str,
    query: str | None = None,
    *,
    vector: VectorLike | None = None,
    model: str | None = None,
    distance: str | None = None,
    filters: SearchFilters | None = None,
    limit: int = 10,
    offset: int = 0,
    exact_threshold: int | None = None,
    ef_search: int | None = None,
) -> list[SearchHit]:
    """Items nearest to ``vector`` (or to ``query`` encoded by the model searched): the
    serving model's vectors unless ``model`` names another one.

    Tenants with at most ``exact_threshold`` vectors (default
    ``Settings.exact_search_max_rows``) are searched exactly, larger ones through the model's
    index; ``why["plan"]`` says which. A ``distance`` other than the index's forces the exact
    plan, since the index cannot order by it."""
    _check_page(limit, offset)
    if limit == 0:
        return []
    declare_user(session, user_id)
    settings = get_settings()
    threshold = settings.exact_search_max_rows if exact_threshold is None else exact_threshold
    # Bookmarks of an import still being embedded by the serving model may have only the
    # first-pass model's vectors (worker.bookmarks.first_pass): rank those too. A vector
    # given by the caller is in the serving model's space, so it cannot search them.
    spec, rows, files, pending = _model_and_tenant(
        session, user_id, model, threshold + 1, first_pass=model is None and vector is None
    )
    q = _query_vector(query, vector, spec, files)
    metric = distance or spec.distance
    if metric not in OPERATORS:
        raise ValueError(f"unknown distance {metric!r}: use cosine, l2 or ip")
    use_index = metric == spec.distance and rows > threshold
    first_pass = _first_pass_model(session, pending) if pending is not None else None
    # With a second list, both are fetched from the top and the page is cut after merging.
    page_limit, page_offset = (limit, offset) if first_pass is None else (offset + limit, 0)
    if use_index:
        matches = _index_matches(
            session, user_id, spec, q, filters, page_limit, page_offset, ef_search
        )
    else:
        op = OPERATORS[metric]
        matches = _exact_matches(session, user_id, spec, q, op, filters, page_limit, page_offset)
    plan = "index" if use_index else "exact"
    ranked = [_Ranked(m, spec.model, metric, plan, similarity(m.value, metric)) for m in matches]
    if first_pass is not None:
        ranked = _with_first_pass(
            session, user_id, query, first_pass, ranked, filters, offset, limit
        )
    loaded = _load_hits(session, user_id, [r.match for r in ranked])
    hits = []
    for r in ranked:
        if r.match.item_id not in loaded:
            continue
        why = {
            "semantic": r.match.value,
            "distance": r.metric,
            "matched": r.match.matched,
            "plan": r.plan,
            "model": r.model,
        }
        if r.first_pass is not None:
            why["first_pass_similarity"] = r.first_pass
        hits.append(_hit(loaded[r.match.item_id], r.score, why))
    return hits


@dataclass(frozen=True)
class _Ranked:
    """A semantic match with its model, distance, plan and score (a similarity on the
    serving model's scale)."""

    match: _Match
    model: str
    metric: str
    plan: str
    score: float
    first_pass: float | None = None  # a stand-in's own similarity, by the first-pass model


def _first_pass_model(session: Session, name: str) -> tuple[IndexSpec, _ModelFiles]:
    """The first-pass model's index facts and files (read only while a tenant has rows of
    it: the usual search pays no second round trip)."""
    row = session.execute(
        text(
            "SELECT name, dimensions, distance, index_kind, index_precision, index_params, "
            "path, package FROM embedding_model WHERE name = :name"
        ),
        {"name": name},
    ).one()
    return IndexSpec.from_row(row), _ModelFiles(row.name, row.path, row.package)


def _with_first_pass(
    session: Session,
    user_id: str,
    query: str | None,
    first_pass: tuple[IndexSpec, _ModelFiles],
    serving: list[_Ranked],
    filters: SearchFilters | None,
    offset: int,
    limit: int,
) -> list[_Ranked]:
    """The serving model's matches and the stand-ins' (items with only a first-pass
    vector), merged by similarity on the serving model's scale, then the page.

    The two models' similarities are not on one scale (a static model's run higher or lower
    for the same pair), and merging by rank would put the best stand-in level with the best
    real match however poor it is. So the serving candidates' own texts are encoded with the
    first-pass model too, and a stand-in's first-pass similarity is mapped onto the serving
    scale through those candidates: both lists of similarities sorted, the stand-in's placed
    among the first-pass ones and read off the serving ones (linear in between, a shift of
    the nearest end outside). Without serving candidates the stand-ins keep their order.

    The first-pass rows are exactly the items without serving-model vectors: a batch's write
    deletes its items' stand-ins in the transaction that adds their real vectors. The scan is
    exact: the rows are short-lived and have no index."""
    spec, files = first_pass
    q = _query_vector(query, None, spec, files)
    extra = _exact_matches(session, user_id, spec, q, spec.operator, filters, offset + limit, 0)
    seen = {r.match.item_id for r in serving}
    pending = [m for m in extra if m.item_id not in seen]
    own = np.array([similarity(m.value, spec.distance) for m in pending], dtype=np.float64)
    mapped = _onto_serving_scale(session, user_id, serving, own, spec, files, q)
    merged = serving + [
        _Ranked(m, spec.model, spec.distance, "exact", float(score), float(raw))
        for m, score, raw in zip(pending, mapped, own, strict=True)
    ]
    merged.sort(key=lambda r: (-r.score, r.match.item_id))
    return merged[offset : offset + limit]


def _onto_serving_scale(
    session: Session,
    user_id: str,
    serving: list[_Ranked],
    own: NDArray[np.float64],
    spec: IndexSpec,
    files: _ModelFiles,
    q: NDArray[np.float32],
) -> NDArray[np.float64]:
    """First-pass similarities ``own`` mapped onto the serving model's scale through the
    serving candidates (see ``_with_first_pass``)."""
    ids = [r.match.embedding_id for r in serving if r.match.embedding_id is not None]
    if not ids or not own.size:
        return own
    contents: dict[int, str] = {
        row.id: row.content
        for row in session.execute(
            text("SELECT id, content FROM embedding WHERE id = ANY(:ids) AND user_id = :u"),
            {"ids": ids, "u": user_id},
        )
    }
    pairs = [
        (contents[r.match.embedding_id], r.score)
        for r in serving
        if r.match.embedding_id in contents
    ]
    if not pairs:
        return own
    vectors = np.asarray(_embedder(files).encode([c for c, _ in pairs]), dtype=np.float32)
    first_pass_side = np.array(
        [similarity(_distance(v, q, spec.distance), spec.distance) for v in vectors]
    )
    xs = np.sort(first_pass_side.astype(np.float64))
    ys = np.sort(np.array([score for _, score in pairs], dtype=np.float64))
    mapped = np.interp(own, xs, ys)
    above, below = own > xs[-1], own < xs[0]
    mapped[above] = ys[-1] + (own[above] - xs[-1])
    mapped[below] = ys[0] + (own[below] - xs[0])
    return mapped


# --- full text ------------------------------------------------------------------------------


def _text_matches(
    session: Session,
    user_id: str,
    query: str,
    filters: SearchFilters | None,
    limit: int,
    offset: int,
) -> list[_Match]:
    """Items whose latest analysis or any chunk matches, ranked by the better of the two.

    A row that also holds the query's words as an exact phrase (``phraseto_tsquery``, two
    lexemes or more) has its rank multiplied by ``PHRASE_BOOST``: cover density alone ranks
    "quantum harmonic oscillator" barely above the same words a few positions apart.
    Chunks of every model are searched (during a model cut-over an item may have only the
    new model's rows); duplicates across models collapse in the per-item grouping."""
    params: dict[str, Any] = {
        "user_id": user_id,
        "q": query,
        "limit": limit,
        "offset": offset,
        "boost": PHRASE_BOOST,
    }
    where = _filter_sql(filters, params)
    sql = f"""
        WITH q AS (
            SELECT websearch_to_tsquery('{TS_CONFIG}', :q) AS tsq,
                   phraseto_tsquery('{TS_CONFIG}', :q) AS phrase,
                   numnode(phraseto_tsquery('{TS_CONFIG}', :q)) > 1 AS has_phrase
        ),
        chunk_hits AS (
            SELECT DISTINCT ON (e.item_id) e.item_id, e.id, e.chunk_index, s.rank, s.phrase
            FROM embedding e CROSS JOIN q
            CROSS JOIN LATERAL (
                SELECT ts_rank_cd(e.search_vector, q.tsq)
                       * CASE WHEN p.phrase THEN :boost ELSE 1 END AS rank, p.phrase
                FROM (SELECT q.has_phrase AND e.search_vector @@ q.phrase AS phrase) p
            ) s
            WHERE e.user_id = :user_id AND e.search_vector @@ q.tsq
            ORDER BY e.item_id, s.rank DESC, e.chunk_index DESC
        ),
        analysis_hits AS (
            SELECT a.item_id, s.rank, s.phrase
            FROM analysis a CROSS JOIN q
            CROSS JOIN LATERAL (
                SELECT ts_rank_cd(a.search_vector, q.tsq)
                       * CASE WHEN p.phrase THEN :boost ELSE 1 END AS rank, p.phrase
                FROM (SELECT q.has_phrase AND a.search_vector @@ q.phrase AS phrase) p
            ) s
            WHERE a.user_id = :user_id AND a.search_vector @@ q.tsq
              AND a.version = (SELECT max(a2.version) FROM analysis a2
                               WHERE a2.item_id = a.item_id AND a2.user_id = :user_id)
        ),
        best AS (
            SELECT coalesce(c.item_id, a.item_id) AS item_id, c.id, c.chunk_index,
                   greatest(c.rank, a.rank) AS rank,
                   coalesce(c.phrase, false) OR coalesce(a.phrase, false) AS phrase,
                   CASE WHEN c.rank IS NULL OR a.rank > c.rank THEN 'analysis'
                        WHEN c.chunk_index < 0 THEN 'title_summary' ELSE 'chunk' END AS matched
            FROM chunk_hits c FULL JOIN analysis_hits a ON a.item_id = c.item_id
        )
        SELECT best.* FROM best JOIN item i ON i.id = best.item_id
        WHERE {_ITEM_SCOPE}{where}
        ORDER BY best.rank DESC, best.item_id LIMIT :limit OFFSET :offset
    """
    return [
        _Match(r.item_id, r.id, float(r.rank), r.matched, r.phrase)
        for r in session.execute(text(sql), params)
    ]


def text_search(
    session: Session,
    user_id: str,
    query: str,
    *,
    filters: SearchFilters | None = None,
    limit: int = 10,
    offset: int = 0,
) -> list[SearchHit]:
    """Full-text search with web-search syntax (``"a phrase"``, ``-word``, ``or``), English
    stemming, ranked by cover density (``ts_rank_cd``: nearby terms rank higher). A query
    with no searchable words returns ``[]``."""
    _check_page(limit, offset)
    if limit == 0 or not query.strip():
        return []
    declare_user(session, user_id)
    matches = _text_matches(session, user_id, query, filters, limit, offset)
    rows = _load_hits(session, user_id, matches, tsquery=query)
    return [
        _hit(rows[m.item_id], m.value, {"text": m.value, "matched": m.matched, "phrase": m.phrase})
        for m in matches
        if m.item_id in rows
    ]


# --- hybrid ---------------------------------------------------------------------------------


def rrf_scores(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> dict[int, float]:
    """Reciprocal rank fusion: each list adds 1/(k + rank), rank counted from 1. Needs no
    score calibration between lists, which is why it is the default."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item_id in enumerate(ranking, start=1):
            scores[item_id] = scores.get(item_id, 0.0) + 1.0 / (k + rank)
    return scores


def _normalised(hits: Sequence[SearchHit]) -> dict[int, float]:
    """Min-max scaling to [0, 1] within one list (one hit, or equal scores: all 1)."""
    if not hits:
        return {}
    low = min(h.score for h in hits)
    span = max(h.score for h in hits) - low
    return {h.item_id: (h.score - low) / span if span > 0 else 1.0 for h in hits}


def _fused_scores(
    semantic: Sequence[SearchHit],
    textual: Sequence[SearchHit],
    mode: Fusion,
    k: int,
    weights: tuple[float, float],
) -> dict[int, float]:
    """Fused score per item. Exact-phrase text matches count once more (as a third ranked
    list for RRF, as a second text weight when weighted): otherwise an item that is best
    semantically and second by text ties with the phrase match and wins on a tie-break."""
    phrase = [h.item_id for h in textual if h.why.get("phrase")]
    if mode == "rrf":
        return rrf_scores([[h.item_id for h in semantic], [h.item_id for h in textual], phrase], k)
    if mode != "weighted":
        raise ValueError(f"unknown fusion mode {mode!r}: use 'rrf' or 'weighted'")
    sem, txt = _normalised(semantic), _normalised(textual)
    bonus = set(phrase)
    return {
        item: weights[0] * sem.get(item, 0.0)
        + weights[1] * (txt.get(item, 0.0) + (1.0 if item in bonus else 0.0))
        for item in sem.keys() | txt.keys()
    }


def _merge(
    item_id: int,
    score: float,
    mode: Fusion,
    semantic: dict[int, tuple[int, SearchHit]],
    textual: dict[int, tuple[int, SearchHit]],
) -> SearchHit:
    """One fused hit. The text side's hit, where there is one, gives the snippet (a headline
    of the matching words) and what matched."""
    sem, txt = semantic.get(item_id), textual.get(item_id)
    ranked = txt or sem
    assert ranked is not None  # every fused id comes from one of the two lists
    base = ranked[1]
    why: dict[str, Any] = {
        mode: score,
        "semantic": sem[1].why["semantic"] if sem else None,
        "semantic_rank": sem[0] if sem else None,
        "text": txt[1].score if txt else None,
        "text_rank": txt[0] if txt else None,
        "phrase": bool(txt and txt[1].why.get("phrase")),
        "matched": base.why["matched"],
    }
    if sem:
        why["plan"] = sem[1].why["plan"]
        why["model"] = sem[1].why.get("model")
    return SearchHit(
        item_id=item_id,
        kind=base.kind,
        title=base.title,
        snippet=base.snippet or (sem[1].snippet if sem else ""),
        score=score,
        why=why,
        url=base.url,
        category=base.category,
        created_at=base.created_at,
    )


def hybrid_search(
    session: Session,
    user_id: str,
    query: str,
    *,
    vector: VectorLike | None = None,
    mode: Fusion = "rrf",
    k: int = RRF_K,
    weights: tuple[float, float] = (0.7, 0.3),
    filters: SearchFilters | None = None,
    limit: int = 10,
    offset: int = 0,
    model: str | None = None,
    exact_threshold: int | None = None,
    ef_search: int | None = None,
) -> list[SearchHit]:
    """Semantic and full-text results fused by reciprocal rank (``k``) or by a weighted blend
    of min-max normalised scores (``weights`` = (semantic, text)). ``why`` carries both
    sides' scores and ranks."""
    _check_page(limit, offset)
    if limit == 0 or (vector is None and not query.strip()):
        return []
    depth = max(HYBRID_DEPTH, offset + limit)
    semantic = semantic_search(
        session,
        user_id,
        query,
        vector=vector,
        model=model,
        filters=filters,
        limit=depth,
        exact_threshold=exact_threshold,
        ef_search=ef_search,
    )
    textual = text_search(session, user_id, query, filters=filters, limit=depth)
    scores = _fused_scores(semantic, textual, mode, k, weights)
    sem = {h.item_id: (rank, h) for rank, h in enumerate(semantic, start=1)}
    txt = {h.item_id: (rank, h) for rank, h in enumerate(textual, start=1)}
    order = sorted(scores, key=lambda item: (-scores[item], item))
    return [_merge(i, scores[i], mode, sem, txt) for i in order[offset : offset + limit]]


def search(
    session: Session,
    user_id: str,
    query: str,
    *,
    mode: Mode = "hybrid",
    vector: VectorLike | None = None,
    filters: SearchFilters | None = None,
    limit: int = 10,
    offset: int = 0,
    fusion: Fusion = "rrf",
    model: str | None = None,
    exact_threshold: int | None = None,
    ef_search: int | None = None,
) -> list[SearchHit]:
    """One entry point for the three modes (what the CLI and an API would call)."""
    if mode == "text":
        return text_search(session, user_id, query, filters=filters, limit=limit, offset=offset)
    if mode == "semantic":
        return semantic_search(
            session,
            user_id,
            query or None,
            vector=vector,
            model=model,
            filters=filters,
            limit=limit,
            offset=offset,
            exact_threshold=exact_threshold,
            ef_search=ef_search,
        )
    if mode == "hybrid":
        return hybrid_search(
            session,
            user_id,
            query,
            vector=vector,
            mode=fusion,
            filters=filters,
            limit=limit,
            offset=offset,
            model=model,
            exact_threshold=exact_threshold,
            ef_search=ef_search,
        )
    raise ValueError(f"unknown search mode {mode!r}: use hybrid, semantic or text")
