"""Changing the embedding model without downtime: add → backfill → activate → retire.

The second model is real: a model2vec static model distilled offline from the packaged
all-MiniLM-L6-v2 files (256 dimensions), once, into ``.data/test-models`` (reused by later
sessions; the ``static_model_dir`` fixture in conftest.py). The registry is shared by the
whole test database, so a module fixture saves the default model's row and vectors first and
puts everything back afterwards.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, text

from worker import backfill, client
from worker.backfill import TASK_BACKFILL_BATCH, TASK_BACKFILL_FINISH
from worker.config import get_settings
from worker.db.engine import session_scope
from worker.db.indexes import IndexSpec, create_model_index, drop_model_index, index_name
from worker.db.indexes import index_state as _index_state
from worker.errors import ModelLifecycleError
from worker.ingest.store import copy_embeddings
from worker.ingest.types import EmbeddedChunk
from worker.models import activate, add_model, list_models, requeue_stuck_backfills, resume, retire
from worker.search import hybrid_search, semantic_search
from worker.subprocess_worker import WorkerProcess

DEFAULT = "all-MiniLM-L6-v2"
STATIC = "mlc-minilm-static-256"
PREFIX = "mlc-"  # users and models of this module, removed at the end
EMBEDDING_COLUMNS = (
    "id, item_id, analysis_id, user_id, chunk_index, content, embedding, model, dimensions, "
    "source, created_at, updated_at"
)
MODEL_FACTS = (
    "index_kind, index_precision, index_params, rows_at_build, built_at, last_recall, "
    "last_recall_at"
)


# --- saving and restoring the shared registry ----------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def registry(engine: Engine) -> Iterator[None]:
    """Save the default model's row and vectors (a scenario retires it) in a temp table on a
    connection of its own, and restore them, its serving flag and its index at the end."""
    keeper = engine.connect()
    keeper.execute(
        text(
            f"CREATE TEMP TABLE mlc_saved AS SELECT {EMBEDDING_COLUMNS} FROM embedding "
            f"WHERE model = '{DEFAULT}'"
        )
    )
    facts = keeper.execute(
        text(
            f"SELECT name, dimensions, distance, {MODEL_FACTS} FROM embedding_model WHERE name = :n"
        ),
        {"n": DEFAULT},
    ).one()
    keeper.commit()
    try:
        yield
    finally:
        with keeper.begin():
            keeper.execute(text("DELETE FROM item WHERE user_id LIKE :p"), {"p": PREFIX + "%"})
            keeper.execute(text("DELETE FROM embedding WHERE model LIKE :p"), {"p": PREFIX + "%"})
            keeper.execute(
                text("DELETE FROM embedding_model WHERE name LIKE :p"), {"p": PREFIX + "%"}
            )
            keeper.execute(
                text(
                    "UPDATE embedding_model SET state = 'active', serving = true, "
                    "index_kind = :index_kind, index_precision = :index_precision, "
                    "index_params = :index_params, rows_at_build = :rows_at_build, "
                    "built_at = :built_at, last_recall = :last_recall, "
                    "last_recall_at = :last_recall_at WHERE name = :name"
                ),
                {**facts._mapping, "index_params": _jsonb(facts.index_params)},
            )
            keeper.execute(
                text(
                    f"INSERT INTO embedding ({EMBEDDING_COLUMNS}) OVERRIDING SYSTEM VALUE "
                    f"SELECT {EMBEDDING_COLUMNS} FROM mlc_saved s WHERE NOT EXISTS "
                    "(SELECT 1 FROM embedding e WHERE e.id = s.id) "
                    "AND EXISTS (SELECT 1 FROM item i WHERE i.id = s.item_id)"
                )
            )
        keeper.close()
        create_model_index(engine, IndexSpec.from_row(facts))


def _jsonb(value: Any) -> Any:
    from psycopg.types.json import Jsonb

    return Jsonb(value or {})


# --- helpers -------------------------------------------------------------------------------


def new_user() -> str:
    return f"{PREFIX}{uuid.uuid4().hex[:10]}"


def unit(rng: np.random.Generator, dims: int) -> list[float]:
    v = rng.standard_normal(dims).astype(np.float32)
    return list(v / np.linalg.norm(v))


def seed_items(engine: Engine, user: str, texts: list[str], model: str = DEFAULT) -> list[int]:
    """Done items with a chunk and a title+summary vector for ``model`` (random vectors:
    the backfill reads only their stored texts)."""
    rng = np.random.default_rng(len(texts))
    ids = []
    with session_scope(engine) as s:
        for t in texts:
            item_id = s.execute(
                text(
                    "INSERT INTO item (user_id, kind, status, title) "
                    "VALUES (:u, 'upload', 'done', :t) RETURNING id"
                ),
                {"u": user, "t": t[:40]},
            ).scalar_one()
            rows = [
                (item_id, None, user, EmbeddedChunk(0, t, unit(rng, 384), {"kind": "chunk"})),
                (
                    item_id,
                    None,
                    user,
                    EmbeddedChunk(-1, "title " + t, unit(rng, 384), {"kind": "title_summary"}),
                ),
            ]
            copy_embeddings(s.connection(), rows, model=model, dimensions=384)
            ids.append(item_id)
    return ids


def models_of(engine: Engine, item_id: int) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(
            conn.execute(
                text("SELECT model, count(*) FROM embedding WHERE item_id = :i GROUP BY model"),
                {"i": item_id},
            ).all()
        )


def serving(engine: Engine) -> str:
    with engine.connect() as conn:
        name: str = conn.execute(
            text("SELECT name FROM embedding_model WHERE serving")
        ).scalar_one()
    return name


def index_state(engine: Engine, model: str, kind: str = "hnsw") -> str:
    with engine.connect() as conn:
        return _index_state(conn, index_name(model, kind))


def rows_of(engine: Engine, model: str) -> int:
    with engine.connect() as conn:
        count: int = conn.execute(
            text("SELECT count(*) FROM embedding WHERE model = :m"), {"m": model}
        ).scalar_one()
    return count


def assert_all_served(engine: Engine) -> None:
    """The invariant of every step: no live, done item of this module lacks vectors of the
    model search uses."""
    with engine.connect() as conn:
        lacking = (
            conn.execute(
                text(
                    "SELECT i.id FROM item i WHERE i.user_id LIKE :p AND i.status = 'done' "
                    "AND i.deleted_at IS NULL AND NOT EXISTS (SELECT 1 FROM embedding e "
                    "WHERE e.item_id = i.id AND e.model = "
                    "(SELECT name FROM embedding_model WHERE serving))"
                ),
                {"p": PREFIX + "%"},
            )
            .scalars()
            .all()
        )
    assert lacking == []


def batch_rows_for(engine: Engine, batches: int) -> int:
    """Source rows per batch that cut today's live vectors into about ``batches`` batches:
    the shared test database may hold thousands of other modules' items."""
    with engine.connect() as conn:
        rows: int = conn.execute(
            text(
                "SELECT count(*) FROM embedding e JOIN item i ON i.id = e.item_id "
                "WHERE i.deleted_at IS NULL AND e.model = "
                "(SELECT name FROM embedding_model WHERE serving)"
            )
        ).scalar_one()
    return max(2, rows // batches)


def recorder() -> tuple[list[tuple[str, int]], Callable[[str, list[Any], str], None]]:
    sent: list[tuple[str, int]] = []

    def send(task: str, args: list[Any], queue: str) -> None:
        sent.append((task, int(args[0])))

    return sent, send


def run_batches(ids: list[int]) -> list[dict[str, Any]]:
    settings = get_settings()
    return [backfill.run_batch(backfill_engine(), settings, b) for b in ids]


def backfill_engine() -> Engine:
    from worker.db.engine import get_engine

    return get_engine()


def top(hits: list[Any]) -> int:
    assert hits, "no hits"
    item_id: int = hits[0].item_id
    return item_id


# --- the static embedder ---------------------------------------------------------------------


def test_static_embedder_runs_without_torch_and_chunks_within_bounds(
    static_model_dir: Path,
) -> None:
    code = (
        "import sys, numpy as np\n"
        "from worker.ingest.static_embed import StaticModelEmbedder\n"
        "from worker.ingest.chunk import chunk_document\n"
        "from worker.ingest.types import Document\n"
        f"e = StaticModelEmbedder({str(static_model_dir)!r}, name='s')\n"
        "v = e.encode(['a cat on a sofa', '', '\\u2603\\u2603', 'a cat on a sofa'])\n"
        "assert v.dtype == np.float32 and v.shape == (4, 256), v.shape\n"
        "assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)\n"
        "assert np.array_equal(v[0], v[3]) and np.all(np.isfinite(v))\n"
        "assert e.encode([]).shape == (0, 256)\n"
        "text = ' '.join(f'sentence {i} about mills and rivers.' for i in range(400))\n"
        "chunks = chunk_document(Document(text), e, max_tokens=64, overlap_tokens=8)\n"
        "assert len(chunks) > 5 and all(e.count_tokens(c.text) <= 64 for c in chunks)\n"
        "sys.exit('torch' in sys.modules)\n"
    )
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


# --- refusals --------------------------------------------------------------------------------


def test_add_refuses_missing_or_empty_files(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(ModelLifecycleError, match="does not exist"):
        add_model(engine, PREFIX + "nowhere", path=str(tmp_path / "nowhere"))
    with pytest.raises(ModelLifecycleError, match="no model files"):
        add_model(engine, PREFIX + "empty", path=str(tmp_path))
    with pytest.raises(ModelLifecycleError, match="exactly one"):
        add_model(engine, PREFIX + "neither")
    with pytest.raises(ModelLifecycleError, match="not installed"):
        add_model(engine, PREFIX + "pkg", package="no-such-model-package")
    with pytest.raises(ModelLifecycleError, match="invalid model name"):
        add_model(engine, "bad name!", path=str(tmp_path))
    assert not [m for m in list_models(engine) if m["name"].startswith(PREFIX)]


def test_refusals_and_a_cut_over_in_process(engine: Engine, static_model_dir: Path) -> None:
    """Each refusal of the lifecycle, with the batches and the finish step run in this process
    (the worker path is the next test)."""
    settings = get_settings()
    user = new_user()
    seed_items(engine, user, ["cats purr on the sofa", "repairing a bicycle tyre", "bond yields"])
    sent, send = recorder()

    with pytest.raises(ModelLifecycleError, match="serves search"):
        retire(engine, DEFAULT)
    with pytest.raises(ModelLifecycleError, match="unknown model"):
        activate(engine, PREFIX + "nope")

    rows = batch_rows_for(engine, 10)
    added = add_model(engine, STATIC, path=str(static_model_dir), batch_rows=rows, send=send)
    assert added["kind"] == "static" and added["dimensions"] == 256
    assert added["batches"] == len(sent) >= 3
    with pytest.raises(ModelLifecycleError, match="already registered"):
        add_model(engine, STATIC, path=str(static_model_dir), send=send)
    with pytest.raises(ModelLifecycleError, match="still backfilling"):
        activate(engine, STATIC)

    results = run_batches([b for task, b in sent if task == TASK_BACKFILL_BATCH])
    assert [r["status"] for r in results] == ["done"] * len(results)
    assert [r["job_complete"] for r in results] == [False] * (len(results) - 1) + [True]
    assert run_batches([results[0]["batch_id"]])[0]["status"] == "finished"  # a redelivery

    # An upload that had read the model list before the model was added: only old vectors.
    [late] = seed_items(engine, user, ["a late arrival about tomato gardening"])
    swept = backfill.finish_job(engine, settings, added["job_id"])
    assert swept["status"] == "swept" and len(swept["batch_ids"]) == 1
    with pytest.raises(ModelLifecycleError, match="still backfilling"):
        activate(engine, STATIC)
    assert run_batches(swept["batch_ids"])[0]["job_complete"]
    done = backfill.finish_job(engine, settings, added["job_id"])
    assert done["status"] == "done" and done["recall"] is not None
    assert models_of(engine, late) == {DEFAULT: 2, STATIC: 2}
    assert index_state(engine, STATIC) == "valid"
    [row] = [m for m in list_models(engine) if m["name"] == STATIC]
    assert row["state"] == "backfilling" and row["missing_items"] == 0 and row["ready"]
    assert row["backfill"]["status"] == "done" and row["backfill"]["percent"] == 100.0

    # A failed concurrent build leaves an INVALID index behind: not good enough to serve.
    _break_index(engine, STATIC)
    with pytest.raises(ModelLifecycleError, match="invalid"):
        activate(engine, STATIC)
    sent.clear()
    resumed = resume(engine, STATIC, send=send)
    assert sent == [(TASK_BACKFILL_FINISH, resumed["job_id"])]  # nothing missing: finish
    assert backfill.finish_job(engine, settings, resumed["job_id"])["status"] == "done"
    assert index_state(engine, STATIC) == "valid"

    # An item the model lacks blocks the cut-over until resume has embedded it.
    [extra] = seed_items(engine, user, ["one more note about sourdough bread"])
    with pytest.raises(ModelLifecycleError, match="none for"):
        activate(engine, STATIC)
    sent.clear()
    resumed = resume(engine, STATIC, send=send)
    assert [t for t, _ in sent] == [TASK_BACKFILL_BATCH]
    assert run_batches([b for _, b in sent])[0]["job_complete"]
    assert backfill.finish_job(engine, settings, resumed["job_id"])["status"] == "done"

    assert activate(engine, STATIC) == {"model": STATIC, "changed": True, "previous": DEFAULT}
    assert serving(engine) == STATIC
    assert activate(engine, STATIC)["changed"] is False
    with session_scope(engine) as s:
        hit = semantic_search(s, user, "sourdough")[0]
    assert hit.item_id == extra and hit.why["model"] == STATIC
    with pytest.raises(ModelLifecycleError, match="serves search"):
        retire(engine, STATIC)

    # The old model stayed active and complete: switching back is as instant.
    assert activate(engine, DEFAULT)["changed"] is True
    out = retire(engine, STATIC)
    assert out["deleted_rows"] > 0 and rows_of(engine, STATIC) == 0
    assert index_state(engine, STATIC) == "missing"
    [row] = [m for m in list_models(engine) if m["name"] == STATIC]
    assert row["state"] == "retired" and not row["serving"] and not row["ready"]
    with pytest.raises(ModelLifecycleError, match="retired"):
        activate(engine, STATIC)


def _break_index(engine: Engine, model: str) -> None:
    """Leave the model's index INVALID the way a failed CREATE INDEX CONCURRENTLY does: a
    row whose vector cannot be cast to the model's dimension makes the build fail."""
    spec = IndexSpec(model, 256)
    drop_model_index(engine, spec.name)
    [bogus] = seed_items(engine, new_user(), ["x"], model="unused")
    with session_scope(engine) as s:
        s.execute(
            text(
                "INSERT INTO embedding (item_id, user_id, chunk_index, content, embedding, model, "
                "dimensions) SELECT id, user_id, 5, 'x', '[1,0,0]', :m, 3 FROM item WHERE id = :i"
            ),
            {"m": model, "i": bogus},
        )
    with pytest.raises(Exception, match="dimensions"):
        create_model_index(engine, spec)
    with session_scope(engine) as s:
        s.execute(text("DELETE FROM item WHERE id = :i"), {"i": bogus})
    assert index_state(engine, model) == "invalid"


# --- the whole change through a real worker ---------------------------------------------------

DOCS = {
    "cats": "My cat sleeps on the sofa all afternoon and purrs when the sun warms the cushions. "
    "Cats are calm pets that like a quiet house.",
    "bikes": "To repair a flat bicycle tyre, remove the wheel, find the puncture and glue a "
    "patch over the hole in the inner tube.",
    "markets": "Quarterly revenue grew eight percent on strong cloud sales, and the company "
    "raised its profit forecast for the year.",
    "mill": "The river town grew around its water mill. Farmers brought grain every autumn and "
    "the miller ground it into flour.",
}
LATE_DOCS = {
    "garden": "Tomatoes need sun, rich soil and steady watering; pinch the side shoots.",
    "bread": "Sourdough bread rises slowly with a wild yeast starter and a long fermentation.",
}


def _upload(upload_root: Path, user: str, name: str, body: str) -> int:
    path = upload_root / user / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return client.enqueue_upload(user, path)


def _wait(check: Callable[[], Any], what: str, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _job_status(engine: Engine, job_id: int) -> str:
    with engine.connect() as conn:
        status: str = conn.execute(
            text("SELECT status FROM backfill_job WHERE id = :id"), {"id": job_id}
        ).scalar_one()
    return status


def _blocked_on(engine: Engine, job_id: int, item_id: int) -> bool:
    """The batch holding ``item_id`` is claimed and its write waits for our item lock."""
    with engine.connect() as conn:
        status = conn.execute(
            text("SELECT status FROM backfill_batch WHERE job_id = :j AND :i = ANY(item_ids)"),
            {"j": job_id, "i": item_id},
        ).scalar_one()
        waiting = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock' "
                "AND query LIKE '%FROM item WHERE id = ANY%'"
            )
        ).scalar_one()
    return bool(status == "processing" and waiting)


@pytest.mark.integration
def test_model_change_through_a_worker_killed_mid_backfill(
    engine: Engine,
    celery_worker: WorkerProcess,
    upload_root: Path,
    static_model_dir: Path,
) -> None:
    user = new_user()
    ids = {name: _upload(upload_root, user, name, body) for name, body in DOCS.items()}
    assert client.wait_for_items(user, list(ids.values()), timeout=300, poll=0.3) == {"done": 4}
    assert all(models_of(engine, i) and DEFAULT in models_of(engine, i) for i in ids.values())
    assert_all_served(engine)

    # Hold one item's row lock: the worker's write of that item's batch must wait for it,
    # which is where it will be killed (a deterministic "mid-backfill").
    held = engine.connect()
    held.begin()
    held.execute(text("SELECT id FROM item WHERE id = :i FOR UPDATE"), {"i": ids["markets"]})
    try:
        # The name was retired by the previous test: adding it again brings it back.
        rows = batch_rows_for(engine, 8)  # several batches before the held item's
        added = add_model(engine, STATIC, path=str(static_model_dir), batch_rows=rows)
        job_id = added["job_id"]
        # Uploads go on while the model backfills; they queue behind the batches.
        late = {n: _upload(upload_root, user, n, b) for n, b in LATE_DOCS.items()}
        for _ in range(2):  # search keeps answering from the serving model meanwhile
            with session_scope(engine) as s:
                hits = hybrid_search(s, user, "which pet purrs on the couch?")
                sem = semantic_search(s, user, "fixing a puncture on my bike")
            assert top(hits) == ids["cats"] and hits[0].why["model"] == DEFAULT
            assert top(sem) == ids["bikes"] and sem[0].why["model"] == DEFAULT
        _wait(lambda: _blocked_on(engine, job_id, ids["markets"]), "the blocked batch", 240)
        celery_worker.kill()  # SIGKILL to the whole process group, mid-batch
    finally:
        held.rollback()
        held.close()
    assert _job_status(engine, job_id) in ("queued", "running")
    assert serving(engine) == DEFAULT
    assert_all_served(engine)

    # The killed batch is what requeue would resend (here without waiting 15 minutes).
    stuck = requeue_stuck_backfills(
        engine,
        get_settings().model_copy(update={"stuck_after_seconds": 0}),
        lambda *_: None,
        dry_run=True,
    )
    with engine.connect() as conn:
        killed = conn.execute(
            text("SELECT id FROM backfill_batch WHERE job_id = :j AND :i = ANY(item_ids)"),
            {"j": job_id, "i": ids["markets"]},
        ).scalar_one()
    assert killed in stuck["would_resend_batches"]

    celery_worker.start()
    celery_worker.wait_ready()
    resumed = resume(engine, STATIC)
    assert resumed["job_id"] == job_id and resumed["sent_batches"] >= 1
    _wait(lambda: _job_status(engine, job_id) in ("done", "failed"), "the backfill", 300)
    client.wait_for_items(user, list(late.values()), timeout=300, poll=0.3)
    with engine.connect() as conn:
        job = conn.execute(text("SELECT * FROM backfill_job WHERE id = :id"), {"id": job_id}).one()
        batch = conn.execute(
            text("SELECT status, attempts FROM backfill_batch WHERE id = :id"), {"id": killed}
        ).one()
    assert job.status == "done", job.error
    assert (batch.status, batch.attempts) == ("done", 2)  # the killed claim, then the resent
    assert job.details["recall"] is not None and index_state(engine, STATIC) == "valid"
    for item_id in [*ids.values(), *late.values()]:  # every item has both, late ones too
        assert set(models_of(engine, item_id)) == {DEFAULT, STATIC}
    assert serving(engine) == DEFAULT
    assert_all_served(engine)

    assert activate(engine, STATIC)["changed"]
    assert_all_served(engine)
    with session_scope(engine) as s:
        hits = semantic_search(s, user, "a cat that purrs on the sofa")
        spec_dims = s.execute(
            text("SELECT dimensions FROM embedding_model WHERE serving")
        ).scalar_one()
    assert top(hits) == ids["cats"] and hits[0].why["model"] == STATIC and spec_dims == 256

    out = retire(engine, DEFAULT)
    assert out["deleted_rows"] > 0 and rows_of(engine, DEFAULT) == 0
    assert index_state(engine, DEFAULT) == "missing"
    assert_all_served(engine)

    # New items now: the static model alone, its tokenizer cutting the chunks.
    fresh = _upload(upload_root, user, "fresh", "Owls hunt at night and sleep in old barns.")
    client.wait_for_items(user, [fresh], timeout=300, poll=0.3)
    assert set(models_of(engine, fresh)) == {STATIC}
    assert_all_served(engine)
    with session_scope(engine) as s:
        assert top(semantic_search(s, user, "owls hunting at night in barns")) == fresh
