"""Search over a real PostgreSQL + pgvector: plans, tenant isolation, filters, fusion.

Most tests register a small model of their own (64 dimensions, its own partial HNSW index)
inside the rolled-back ``db_session`` transaction and insert vectors they control; one test
uses the real embedding model when it is installed.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from sqlalchemy import text
from sqlalchemy.orm import Session

from worker.db.indexes import IndexSpec, create_index_sql
from worker.ingest.fake import HashEmbedder
from worker.search import (
    SearchFilters,
    SearchHit,
    VectorLike,
    hybrid_search,
    index_candidates_sql,
    search,
    semantic_search,
    text_search,
)

DIM = 64
T0 = datetime(2025, 1, 1, tzinfo=UTC)
EXACT = 10**9  # an exact_threshold no tenant here reaches
INDEX = 0  # an exact_threshold that sends every non-empty tenant through the index


def unit_of(v: NDArray[np.float32]) -> NDArray[np.float32]:
    return (v / np.linalg.norm(v)).astype(np.float32)


def unit(rng: np.random.Generator, dim: int = DIM) -> NDArray[np.float32]:
    return unit_of(rng.standard_normal(dim, dtype=np.float32))


def ids(hits: Sequence[SearchHit]) -> list[int]:
    return [h.item_id for h in hits]


@pytest.fixture
def model(db_session: Session) -> IndexSpec:
    """A model of this test only (rolled back with the test), without its index yet."""
    spec = IndexSpec(model=f"search-test-{uuid.uuid4().hex[:8]}", dimensions=DIM)
    db_session.execute(
        text("INSERT INTO embedding_model (name, dimensions, distance) VALUES (:n, :d, 'cosine')"),
        {"n": spec.model, "d": DIM},
    )
    return spec


def build_index(session: Session, spec: IndexSpec) -> None:
    """The model's partial HNSW index, built after the rows (in the test's transaction)."""
    session.execute(text(create_index_sql(spec, concurrently=False)))
    session.execute(text("ANALYZE embedding"))


def add_item(
    session: Session,
    user_id: str,
    model: str,
    chunks: Sequence[tuple[str, VectorLike]],
    *,
    kind: str = "upload",
    title: str | None = None,
    created_at: datetime = T0,
    category: str | None = None,
    summary: str | None = None,
    tags: Sequence[str] | None = None,
    folder: Sequence[str] | None = None,
) -> int:
    """One done item with its chunks (index 0..), an analysis when a category or summary is
    given, and a bookmark row when tags or a folder are."""
    item_id: int = session.execute(
        text(
            "INSERT INTO item (user_id, kind, status, title, created_at) "
            "VALUES (:u, :k, 'done', :t, :c) RETURNING id"
        ),
        {"u": user_id, "k": kind, "t": title, "c": created_at},
    ).scalar_one()
    if category is not None or summary is not None:
        session.execute(
            text(
                "INSERT INTO analysis (item_id, user_id, version, title, summary, category, "
                "provider, model) VALUES (:i, :u, 1, :t, :s, :c, 'test', 'test')"
            ),
            {"i": item_id, "u": user_id, "t": title, "s": summary, "c": category},
        )
    if tags is not None or folder is not None:
        session.execute(
            text(
                "INSERT INTO bookmark (item_id, user_id, url, canonical_url, domain, "
                "folder_path, tags) VALUES (:i, :u, :url, :url, 'example.com', :f, :tags)"
            ),
            {
                "i": item_id,
                "u": user_id,
                "url": f"https://example.com/{item_id}",
                "f": list(folder or []),
                "tags": list(tags or []),
            },
        )
    for index, (content, vector) in enumerate(chunks):
        session.execute(
            text(
                "INSERT INTO embedding (item_id, user_id, chunk_index, content, embedding, "
                "model, dimensions) VALUES (:i, :u, :c, :content, :v, :m, :d)"
            ),
            {
                "i": item_id,
                "u": user_id,
                "c": index,
                "content": content,
                "v": np.asarray(vector, dtype=np.float32),
                "m": model,
                "d": len(vector),
            },
        )
    return item_id


def reference_order(
    session: Session, user_id: str, model: str, q: NDArray[np.float32]
) -> list[int]:
    """Items by their best chunk's cosine distance, with index scans switched off."""
    session.execute(text("SET LOCAL enable_indexscan = off"))
    session.execute(text("SET LOCAL enable_bitmapscan = off"))
    rows = session.execute(
        text(
            "SELECT e.item_id, min(e.embedding <=> CAST(:q AS vector)) AS d FROM embedding e "
            "WHERE e.user_id = :u AND e.model = :m GROUP BY e.item_id ORDER BY d, e.item_id"
        ),
        {"q": q, "u": user_id, "m": model},
    ).all()
    session.execute(text("SET LOCAL enable_indexscan = on"))
    session.execute(text("SET LOCAL enable_bitmapscan = on"))
    return [r.item_id for r in rows]


# --- plans ------------------------------------------------------------------------------


def test_index_plan_uses_the_partial_index(db_session: Session, model: IndexSpec) -> None:
    """The candidate query's expression and literal predicate match the index: with sorting
    priced out, the planner orders by the HNSW index instead of sorting btree rows."""
    rng = np.random.default_rng(1)
    add_item(db_session, "u-plan", model.model, [("x", unit(rng)) for _ in range(5)])
    build_index(db_session, model)
    db_session.execute(text("SET LOCAL enable_sort = off"))
    plan = "\n".join(
        db_session.execute(
            text("EXPLAIN " + index_candidates_sql(model, model.operator, "")),
            {"user_id": "u-plan", "q": unit(rng), "n": 10},
        ).scalars()
    )
    db_session.execute(text("SET LOCAL enable_sort = on"))
    assert model.name in plan, plan


def test_index_results_equal_exact_results(db_session: Session, model: IndexSpec) -> None:
    rng = np.random.default_rng(2)
    user = "u-equal"
    for n in range(40):
        add_item(db_session, user, model.model, [(f"c{n}a", unit(rng)), (f"c{n}b", unit(rng))])
    add_item(db_session, "u-other", model.model, [("o", unit(rng)) for _ in range(30)])
    build_index(db_session, model)
    for _ in range(4):
        q = unit(rng)
        truth = reference_order(db_session, user, model.model, q)[:10]
        exact = semantic_search(
            db_session, user, vector=q, model=model.model, exact_threshold=EXACT
        )
        db_session.execute(text("SET LOCAL enable_sort = off"))  # make the index plan real
        indexed = semantic_search(
            db_session, user, vector=q, model=model.model, exact_threshold=INDEX, ef_search=200
        )
        db_session.execute(text("SET LOCAL enable_sort = on"))
        assert ids(exact) == truth
        assert ids(indexed) == truth
        assert {h.why["plan"] for h in exact} == {"exact"}
        assert {h.why["plan"] for h in indexed} == {"index"}
        assert [h.score for h in indexed] == pytest.approx([h.score for h in exact], abs=1e-5)
        assert all(h.why["matched"] == "chunk" for h in indexed)


def test_scan_settings_do_not_outlive_the_search(db_session: Session, model: IndexSpec) -> None:
    """The index plan's iterative-scan settings are rolled back with their savepoint, so the
    caller's transaction keeps its own."""
    rng = np.random.default_rng(9)
    add_item(db_session, "u-gucs", model.model, [("x", unit(rng)) for _ in range(3)])
    build_index(db_session, model)
    db_session.execute(text("SET LOCAL hnsw.ef_search = 17"))
    db_session.execute(text("SET LOCAL hnsw.iterative_scan = off"))
    hits = semantic_search(
        db_session, "u-gucs", vector=unit(rng), model=model.model, exact_threshold=INDEX
    )
    assert hits and hits[0].why["plan"] == "index"
    assert db_session.execute(text("SHOW hnsw.ef_search")).scalar_one() == "17"
    assert db_session.execute(text("SHOW hnsw.iterative_scan")).scalar_one() == "off"


def test_iterative_scan_fills_a_page_for_a_one_percent_tenant(
    db_session: Session, model: IndexSpec
) -> None:
    """5,000 rows, the tenant owns 50 and sits far from the query; the others crowd it.
    Without iterative scans a filtered HNSW scan returns next to nothing here."""
    rng = np.random.default_rng(3)
    q = unit(rng)
    others: list[dict[str, Any]] = []
    for n in range(10):
        item = add_item(db_session, f"u-crowd-{n}", model.model, [])
        for chunk in range(495):
            near = unit_of(q + rng.standard_normal(DIM, dtype=np.float32) * np.float32(0.3))
            others.append({"i": item, "u": f"u-crowd-{n}", "c": chunk, "v": near})
    db_session.execute(
        text(
            "INSERT INTO embedding (item_id, user_id, chunk_index, content, embedding, model, "
            f"dimensions) VALUES (:i, :u, :c, 'crowd', :v, '{model.model}', {DIM})"
        ),
        others,
    )
    user = "u-small"
    for n in range(50):
        add_item(db_session, user, model.model, [(f"mine {n}", unit(rng))])
    build_index(db_session, model)

    # The planner would rightly pick the btree for 50 rows; price sorting out so that the
    # HNSW scan is what gets tested.
    db_session.execute(text("SET LOCAL enable_sort = off"))
    assert len(_plain_hnsw_items(db_session, model, user, q)) < 10  # 0 here
    hits = semantic_search(db_session, user, vector=q, model=model.model, exact_threshold=INDEX)
    db_session.execute(text("SET LOCAL enable_sort = on"))
    exact = semantic_search(db_session, user, vector=q, model=model.model, exact_threshold=EXACT)
    assert len(hits) == 10
    assert {h.why["plan"] for h in hits} == {"index"}
    assert set(ids(hits)) <= set(reference_order(db_session, user, model.model, q))
    assert len(set(ids(hits)) & set(ids(exact))) >= 7  # approximate, but not far off


def _plain_hnsw_items(
    session: Session, spec: IndexSpec, user: str, q: NDArray[np.float32]
) -> set[int]:
    """The same candidate query without iterative scan (pgvector's default, ef_search 40):
    the index hands back its 40 nearest rows, and the user filter then drops the crowd's."""
    session.execute(text("SET LOCAL hnsw.iterative_scan = off"))
    session.execute(text("SET LOCAL hnsw.ef_search = 40"))
    rows = session.execute(
        text(index_candidates_sql(spec, spec.operator, "")), {"user_id": user, "q": q, "n": 40}
    ).all()
    return {r.item_id for r in rows}


# --- isolation ----------------------------------------------------------------------------


def _twin_corpus(session: Session, model: str, users: Sequence[str]) -> dict[str, list[int]]:
    """Identical items for every user: same text, vectors, tags, folders and categories."""
    out: dict[str, list[int]] = {u: [] for u in users}
    for user in users:
        rng = np.random.default_rng(4)  # same vectors for each user
        for n in range(6):
            out[user].append(
                add_item(
                    session,
                    user,
                    model,
                    [(f"shared secret recipe number {n}", unit(rng))],
                    kind="bookmark",
                    title=f"recipe {n}",
                    category="food",
                    summary="a shared secret recipe",
                    tags=["cooking"],
                    folder=["Kitchen", "Recipes"],
                )
            )
    return out


def test_no_mode_or_filter_returns_another_users_rows(
    db_session: Session, model: IndexSpec
) -> None:
    users = ("u-alice", "u-bob")
    items = _twin_corpus(db_session, model.model, users)
    build_index(db_session, model)
    q = unit(np.random.default_rng(4))
    filters = [
        None,
        SearchFilters(kind="bookmark"),
        SearchFilters(tags=["cooking"]),
        SearchFilters(folder="Kitchen"),
        SearchFilters(category="food"),
        SearchFilters(created_after=T0 - timedelta(days=1)),
    ]
    for user in users:
        mine = set(items[user])
        for f in filters:
            sem = {"vector": q, "model": model.model, "filters": f, "limit": 50}
            results = [
                semantic_search(db_session, user, exact_threshold=EXACT, **sem),  # type: ignore[arg-type]
                semantic_search(db_session, user, exact_threshold=INDEX, **sem),  # type: ignore[arg-type]
                text_search(db_session, user, "secret recipe", filters=f, limit=50),
                hybrid_search(db_session, user, "secret recipe", **sem),  # type: ignore[arg-type]
                hybrid_search(db_session, user, "secret", mode="weighted", **sem),  # type: ignore[arg-type]
                search(db_session, user, "recipe", mode="text", filters=f, limit=50),
                search(db_session, user, "recipe", mode="semantic", **sem),  # type: ignore[arg-type]
            ]
            for hits in results:
                assert set(ids(hits)) == mine, (user, f)


def test_deleted_items_are_never_returned(db_session: Session, model: IndexSpec) -> None:
    rng = np.random.default_rng(5)
    user = "u-deleter"
    keep = add_item(db_session, user, model.model, [("keep this note", unit(rng))])
    gone = add_item(db_session, user, model.model, [("delete this note", unit(rng))])
    build_index(db_session, model)
    db_session.execute(text("UPDATE item SET deleted_at = now() WHERE id = :i"), {"i": gone})
    q = unit(rng)
    for threshold in (EXACT, INDEX):
        hits = semantic_search(
            db_session, user, vector=q, model=model.model, exact_threshold=threshold
        )
        assert ids(hits) == [keep]
    assert ids(text_search(db_session, user, "note")) == [keep]
    assert ids(hybrid_search(db_session, user, "note", vector=q, model=model.model)) == [keep]


# --- hybrid -------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["rrf", "weighted"])
@pytest.mark.parametrize("query", ["quantum harmonic oscillator", '"quantum harmonic oscillator"'])
def test_hybrid_ranks_the_exact_phrase_first(
    db_session: Session, model: IndexSpec, fusion: str, query: str
) -> None:
    """Vectors from a bag-of-words embedder, so the semantic side alone cannot tell the
    phrase from the same words scattered; the text side's cover density can."""
    embedder = HashEmbedder(DIM)
    user = "u-phrase"
    texts = [
        "notes on harmonic functions, then a quantum walk, then an oscillator circuit",
        "an oscillator can be quantum or harmonic depending on the model chosen",
        "the quantum harmonic oscillator is the model every physics course starts with",
        "sourdough bread needs a starter, flour, water and patience",
    ]
    items = [add_item(db_session, user, model.model, [(t, embedder.encode([t])[0])]) for t in texts]
    q = embedder.encode(["quantum harmonic oscillator"])[0]
    hits = hybrid_search(
        db_session,
        user,
        query,
        vector=q,
        model=model.model,
        mode=fusion,  # type: ignore[arg-type]
    )
    assert hits[0].item_id == items[2]
    assert items[3] not in ids(hits[:3])
    top = hits[0].why
    assert top["text_rank"] == 1 and top["semantic"] is not None and top[fusion] > 0
    assert "**" in hits[0].snippet  # the text side's headline marks the matched words


def test_rrf_scores() -> None:
    from worker.search import rrf_scores

    scores = rrf_scores([[1, 2, 3], [3, 1]], k=60)
    assert scores[1] == pytest.approx(1 / 61 + 1 / 62)
    assert scores[3] == pytest.approx(1 / 63 + 1 / 61)
    assert scores[2] == pytest.approx(1 / 62)


# --- filters and pages --------------------------------------------------------------------


def test_filters_each_restrict(db_session: Session, model: IndexSpec) -> None:
    rng = np.random.default_rng(6)
    user = "u-filters"
    base = unit(rng)

    def near() -> NDArray[np.float32]:
        noise: NDArray[np.float32] = rng.standard_normal(DIM, dtype=np.float32)
        return unit_of(base + noise * np.float32(0.1))

    def add(**kw: Any) -> int:
        return add_item(db_session, user, model.model, [("common words here", near())], **kw)

    upload = add(kind="upload", category="science", created_at=T0)
    old_upload = add(kind="upload", category="finance", created_at=T0 - timedelta(days=30))
    python = add(kind="bookmark", tags=["python", "web"], folder=["Dev", "Python"])
    python_only = add(kind="bookmark", tags=["python"], folder=["Dev"], created_at=T0)
    news = add(kind="bookmark", tags=["news"], folder=["Devotion"], category="science")
    # A newer analysis version changes the category: only the latest counts.
    db_session.execute(
        text(
            "INSERT INTO analysis (item_id, user_id, version, category, provider, model) "
            "VALUES (:i, :u, 2, 'politics', 'test', 'test')"
        ),
        {"i": news, "u": user},
    )
    build_index(db_session, model)
    expected = [
        (SearchFilters(kind="upload"), {upload, old_upload}),
        (SearchFilters(kind="bookmark"), {python, python_only, news}),
        (SearchFilters(tags=["python"]), {python, python_only}),
        (SearchFilters(tags=["python", "web"]), {python}),
        (SearchFilters(folder="Dev"), {python, python_only}),  # not "Devotion"
        (SearchFilters(folder=["Dev", "Python"]), {python}),
        (SearchFilters(folder="/Dev/Python/"), {python}),
        (SearchFilters(category="science"), {upload}),  # news moved on to politics
        (SearchFilters(category="politics"), {news}),
        (SearchFilters(created_before=T0), {old_upload}),
        (
            SearchFilters(created_after=T0, created_before=T0 + timedelta(seconds=1)),
            {upload, python, python_only, news},
        ),
        (SearchFilters(kind="bookmark", tags=["python"], folder="Dev/Python"), {python}),
    ]
    for f, want in expected:
        for threshold in (EXACT, INDEX):
            hits = semantic_search(
                db_session,
                user,
                vector=base,
                model=model.model,
                filters=f,
                limit=20,
                exact_threshold=threshold,
            )
            assert set(ids(hits)) == want, (f, threshold)
        assert set(ids(text_search(db_session, user, "common words", filters=f))) == want, f
    bookmark = semantic_search(
        db_session, user, vector=base, model=model.model, filters=SearchFilters(tags=["news"])
    )[0]
    assert bookmark.url == f"https://example.com/{news}" and bookmark.category == "politics"


def test_pages_are_disjoint_and_cover_everything(db_session: Session, model: IndexSpec) -> None:
    rng = np.random.default_rng(7)
    user = "u-pages"
    items = {
        add_item(db_session, user, model.model, [(f"page word {n}", unit(rng)), ("x", unit(rng))])
        for n in range(25)
    }
    build_index(db_session, model)
    q = unit(rng)
    runs: dict[str, Callable[[int], list[SearchHit]]] = {
        "exact": lambda o: semantic_search(
            db_session, user, vector=q, model=model.model, exact_threshold=EXACT, offset=o
        ),
        "index": lambda o: semantic_search(
            db_session, user, vector=q, model=model.model, exact_threshold=INDEX, offset=o
        ),
        "text": lambda o: text_search(db_session, user, "page word", offset=o),
        "hybrid": lambda o: hybrid_search(
            db_session, user, "page word", vector=q, model=model.model, offset=o
        ),
    }
    for name, run in runs.items():
        pages = [ids(run(offset)) for offset in (0, 10, 20, 30)]
        assert [len(p) for p in pages] == [10, 10, 5, 0], name
        seen = [i for page in pages for i in page]
        assert len(seen) == len(set(seen)) and set(seen) == items, name


# --- full text ------------------------------------------------------------------------------


def test_text_search_understands_websearch_syntax(db_session: Session, model: IndexSpec) -> None:
    rng = np.random.default_rng(8)
    user = "u-text"
    snake = add_item(
        db_session, user, model.model, [("the python snake hides in the jungle", unit(rng))]
    )
    lang = add_item(
        db_session,
        user,
        model.model,
        [("python is a programming language with batteries included", unit(rng))],
    )
    java = add_item(db_session, user, model.model, [("java programming over coffee", unit(rng))])
    rust = add_item(db_session, user, model.model, [("rust systems programming", unit(rng))])
    summary = add_item(
        db_session, user, model.model, [("unrelated body text", unit(rng))], summary="Jungle trek"
    )

    def found(query: str) -> set[int]:
        return set(ids(text_search(db_session, user, query)))

    assert found('"programming language"') == {lang}
    assert found("python -snake") == {lang}
    assert found("java or rust") == {java, rust}
    assert found("programming") == {lang, java, rust}
    assert found("jungles") == {snake, summary}  # stemmed; the analysis matches too
    for garbage in ("", "   ", "!!! &&& ::", "'", "the of and", '"', "-", "or"):
        assert text_search(db_session, user, garbage) == [], garbage
    hit = text_search(db_session, user, "coffee")[0]
    assert "**coffee**" in hit.snippet and hit.why["matched"] == "chunk"
    assert text_search(db_session, user, "trek")[0].why["matched"] == "analysis"


# --- arguments and the real model ---------------------------------------------------------


def test_bad_arguments_raise(db_session: Session, model: IndexSpec) -> None:
    with pytest.raises(ValueError, match="dimensions"):
        semantic_search(db_session, "u", vector=[1.0, 0.0], model=model.model)
    with pytest.raises(ValueError, match="unknown embedding model"):
        semantic_search(db_session, "u", vector=[1.0] * DIM, model="no-such-model")
    with pytest.raises(ValueError, match="query string or a vector"):
        semantic_search(db_session, "u", model=model.model)
    with pytest.raises(ValueError, match="limit"):
        text_search(db_session, "u", "x", limit=-1)
    with pytest.raises(ValueError, match="mode"):
        search(db_session, "u", "x", mode="fuzzy")  # type: ignore[arg-type]
    assert semantic_search(db_session, "u", vector=[1.0] * DIM, model=model.model) == []


def test_importing_search_does_not_import_torch() -> None:
    code = "import sys, worker.search; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_query_string_is_encoded_by_the_real_model(db_session: Session) -> None:
    pytest.importorskip("sentence_transformers")
    try:
        from worker.runtime import default_embedder

        embedder = default_embedder()
        vectors = embedder.encode(
            [
                "my cat sleeps on the sofa and purrs all afternoon",
                "quarterly revenue grew eight percent on strong cloud sales",
                "how to repair a flat bicycle tyre with a patch kit",
            ]
        )
    except (ImportError, FileNotFoundError, OSError) as exc:
        pytest.skip(f"embedding model unavailable: {exc}")
    user = f"u-real-{uuid.uuid4().hex[:6]}"
    texts = ["cat", "revenue", "bicycle"]
    items = [
        add_item(db_session, user, embedder.name, [(t, v)])
        for t, v in zip(texts, vectors, strict=True)
    ]
    hits = semantic_search(db_session, user, "which pet purrs on the couch?")
    assert ids(hits)[0] == items[0]
    hits = search(db_session, user, "fixing a puncture on my bike")
    assert ids(hits)[0] == items[2]
