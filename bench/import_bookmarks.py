"""Bookmark import throughput: ``python -m bench.import_bookmarks [--rows N]``.

In one run, on one generated Netscape export:
  (a) the import task's parse + canonicalise + dedupe + stage (``parse_and_stage``: the file
      read in a thread while its blocks are inserted) in bookmarks/s, median of three;
  (b) the model's own ``encode`` rate on the exact texts we embed (the ceiling: one process,
      every core; before and after the runs);
  (c) end to end through a real Celery worker (as deployed: one process per core) and Redis:
      enqueue → every bookmark embedded and committed (searchable), then indexed; printed as
      ratios to (b).
Targets (issue 6): (a) >= 20,000/s; (c)/(b) >= 0.85.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench._db import (
    drop_database,
    fresh_database,
    keep_worker_log,
    use_upload_root,
    worker_log_records,
)

DB_NAME = "bench_import"
WORDS = [
    "python",
    "rust",
    "database",
    "vector",
    "search",
    "index",
    "postgres",
    "garden",
    "recipe",
    "bread",
    "travel",
    "music",
    "history",
    "science",
    "football",
    "energy",
    "solar",
    "climate",
    "finance",
    "market",
    "health",
    "running",
    "design",
    "photography",
    "camera",
    "review",
    "guide",
    "tutorial",
    "news",
    "kubernetes",
    "docker",
    "linux",
    "security",
]


def generate_export(n: int, seed: int = 7) -> bytes:
    rng = random.Random(seed)
    out = io.StringIO()
    out.write("<!DOCTYPE NETSCAPE-Bookmark-file-1>\n<TITLE>Bookmarks</TITLE>\n<DL><p>\n")
    for folder in range(0, n, 500):
        out.write(f'<DT><H3 ADD_DATE="1600000000">Folder {folder // 500}</H3>\n<DL><p>\n')
        for i in range(folder, min(folder + 500, n)):
            title = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
            tags = ",".join(rng.sample(WORDS, 2))
            host = f"{rng.choice(WORDS)}{i % 300}.example.com"
            out.write(
                f'<DT><A HREF="https://{host}/{rng.choice(WORDS)}/{i}?utm_source=feed" '
                f'ADD_DATE="{1600000000 + i}" TAGS="{tags}">{title.title()}</A>\n'
            )
        out.write("</DL><p>\n")
    out.write("</DL><p>\n")
    return out.getvalue().encode()


def measure_staging(data: bytes, user_id: str, workdir: Path) -> tuple[float, int]:
    """The import task's own staging (``parse_and_stage``): the file read in a thread while
    its blocks are inserted, all in one transaction."""
    from sqlalchemy import text

    from worker.bookmarks.importer import claim_job, parse_and_stage
    from worker.db import queries
    from worker.db.engine import get_engine, session_scope

    settings = use_upload_root(workdir)
    (workdir / "stage.html").write_bytes(data)
    with session_scope() as s:
        job = queries.insert_import_job(
            s, user_id=user_id, filename="stage.html", file_size=len(data)
        )
    engine = get_engine()
    start = time.perf_counter()
    claim = claim_job(engine, job)
    assert claim is not None
    parse_and_stage(engine, settings, claim)
    elapsed = time.perf_counter() - start
    with session_scope() as s:
        row = s.execute(
            text("SELECT status, total, error FROM import_job WHERE id = :id"), {"id": job}
        ).one()
        # Staged only to be measured: its batches must not reach the workers started next.
        s.execute(text("DELETE FROM import_batch WHERE import_job_id = :id"), {"id": job})
        s.execute(text("UPDATE import_job SET status = 'cancelled' WHERE id = :id"), {"id": job})
    if row.error:
        raise RuntimeError(f"staging failed: {row.error}")
    return elapsed, int(row.total)


def bookmark_texts(data: bytes) -> list[str]:
    from worker.bookmarks.importer import bookmark_text, read_export

    export = read_export(io.BytesIO(data))
    return [
        bookmark_text(b.title, b.description, b.tags, b.folder_path, b.domain, b.url)
        for b in export.bookmarks.values()
    ]


def measure_encode(texts: list[str]) -> float:
    from bench._ceiling import encode_seconds
    from worker.runtime import default_embedder

    return encode_seconds(default_embedder(), texts)


def add_background(rows: int, dimensions: int = 384, seed: int = 3) -> None:
    """Another tenant's ``rows`` vectors in the main partition, its HNSW index rebuilt over
    them in bulk: the live-index path then pays what it pays in a database already in use
    (an insert walks a graph of this size), not the cost of an empty one."""
    import numpy as np
    from sqlalchemy import text

    from worker.db.engine import get_engine
    from worker.db.indexes import IndexSpec, create_model_index
    from worker.ingest.store import copy_embeddings
    from worker.ingest.types import EmbeddedChunk

    engine = get_engine()
    rng = np.random.default_rng(seed)
    with engine.begin() as conn:
        spec_row = conn.execute(
            text(
                "SELECT name, dimensions, distance, index_kind, index_precision, index_params "
                "FROM embedding_model WHERE serving"
            )
        ).one()
        spec = IndexSpec.from_row(spec_row)
        conn.execute(text(f"DROP INDEX IF EXISTS {spec.name}"))
        item_ids = conn.execute(
            text(
                "INSERT INTO item (user_id, kind, status, title) SELECT 'bench-background', "
                "'upload', 'done', 'background ' || g FROM generate_series(1, :n) g RETURNING id"
            ),
            {"n": rows},
        ).scalars()
        vectors = rng.standard_normal((rows, dimensions)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        copy_embeddings(
            conn,
            (
                (item_id, None, "bench-background", EmbeddedChunk(0, "background", list(v), {}))
                for item_id, v in zip(item_ids, vectors, strict=True)
            ),
            model=spec.model,
            dimensions=dimensions,
        )
    create_model_index(engine, spec)


def _batch_stages(log_path: Path) -> dict[str, float]:
    """Seconds per stage summed over the worker's bookmark-batch lines (JSON logs)."""
    totals: dict[str, float] = {}
    for record in worker_log_records(log_path):
        if "bookmark batch" not in str(record.get("msg", "")):
            continue
        for stage, ms in (record.get("durations_ms") or {}).items():
            totals[stage] = totals.get(stage, 0.0) + float(ms) / 1000
    return totals


def _indexed_seconds(job_id: int) -> float:
    """How long the segment's bulk index build took after the last batch (0: none)."""
    from sqlalchemy import text

    from worker.db.engine import get_engine

    with get_engine().connect() as conn:
        row = conn.execute(
            text(
                "SELECT segment, EXTRACT(EPOCH FROM segment_indexed_at - finished_at) AS s "
                "FROM import_job WHERE id = :id"
            ),
            {"id": job_id},
        ).one()
    return float(row.s or 0.0) if row.segment else 0.0


def _wait_indexed(job_id: int, timeout: float = 600) -> None:
    from sqlalchemy import text

    from worker.db.engine import get_engine

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with get_engine().connect() as conn:
            row = conn.execute(
                text("SELECT segment, segment_indexed_at FROM import_job WHERE id = :id"),
                {"id": job_id},
            ).one()
        if row.segment is None or row.segment_indexed_at is not None:
            return
        time.sleep(0.2)
    raise TimeoutError(f"segment of import job {job_id} not indexed after {timeout}s")


def measure_end_to_end(
    data: bytes, workdir: Path, *, segment_min: int, user: str
) -> dict[str, float | str | int]:
    """Enqueue → every bookmark embedded, committed and (for a segment) indexed, through a
    real worker. ``segment_min`` is BULK_SEGMENT_MIN_BOOKMARKS for that worker."""
    from worker import client
    from worker.config import get_settings
    from worker.subprocess_worker import WorkerProcess

    upload_root = workdir / "uploads"
    upload_root.mkdir(parents=True, exist_ok=True)
    (upload_root / "export.html").write_bytes(data)
    use_upload_root(upload_root)
    log_path = workdir / f"worker-{user}.log"
    env = {
        **os.environ,
        "BULK_SEGMENT_MIN_BOOKMARKS": str(segment_min),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }
    concurrency = get_settings().worker_concurrency
    worker = WorkerProcess(log_path, name="bench", env=env, concurrency=concurrency).start()
    try:
        worker.wait_ready()
        # Warm every pool child's model so that load time is not counted: a bulk import (an
        # interactive one would also hold a process back for BULK_RESERVE_SECONDS) with a
        # batch in flight for each child.
        settings = get_settings()
        warm_rows = max(settings.bulk_import_threshold, 2 * concurrency * settings.bulk_batch_size)
        (upload_root / "warm.html").write_bytes(generate_export(warm_rows, seed=1))
        warm = client.import_bookmarks(f"{user}-warm", upload_root / "warm.html")
        client.wait_for_import(f"{user}-warm", warm)
        log_path.write_text("")  # batch lines of the measured import only
        start = time.perf_counter()
        job = client.import_bookmarks(user, upload_root / "export.html")
        progress = client.wait_for_import(user, job, poll=0.1)
        done_s = time.perf_counter() - start
        _wait_indexed(job)
        total_s = time.perf_counter() - start
    finally:
        worker.stop()
    keep_worker_log(log_path, user)
    stages = _batch_stages(log_path)
    index_s = _indexed_seconds(job)
    return {
        "status": progress.status,
        "created": progress.created,
        "done_s": done_s,
        "total_s": total_s,
        "encode_s": stages.get("encode", 0.0),
        "write_s": stages.get("write", 0.0),
        "index_s": index_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--stage-rows", type=int, default=100_000)
    parser.add_argument("--stage-repeats", type=int, default=3)
    parser.add_argument(
        "--background", type=int, default=50_000, help="another tenant's vectors, indexed"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="worker processes (WORKER_CONCURRENCY); default: the worker's own, one per core",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    # The worker as deployed (one process per core, the cores shared out as torch threads);
    # the ceiling is one process encoding with every core.
    if args.concurrency is not None:
        os.environ["WORKER_CONCURRENCY"] = str(args.concurrency)
    fresh_database(DB_NAME)
    from worker.app import app, configure
    from worker.config import get_settings

    configure(app, get_settings())
    runs: dict[str, dict[str, float | str | int]] = {}
    try:
        big = generate_export(args.stage_rows)
        data = generate_export(args.rows, seed=11)
        texts = bookmark_texts(data)
        with tempfile.TemporaryDirectory() as tmp:
            # Each a first import of its own user; the machine is shared, so the median.
            stagings = [
                measure_staging(big, f"bench-stage-{i}", Path(tmp))
                for i in range(args.stage_repeats)
            ]
            if args.background:
                add_background(args.background)
            # The ceiling before and after the runs (their mean): drift on a shared machine
            # then weighs on both sides alike.
            encode_before = measure_encode(texts)
            runs["segment"] = measure_end_to_end(data, Path(tmp), segment_min=1, user="bench-seg")
            runs["live index"] = measure_end_to_end(
                data, Path(tmp), segment_min=0, user="bench-live"
            )
            encode_after = measure_encode(texts)
    finally:
        drop_database(DB_NAME)
    entries = stagings[0][1]
    rates = sorted(entries / seconds for seconds, _ in stagings)
    print(
        f"(a) parse+canonicalise+dedupe+stage of {entries:,} bookmarks, {len(rates)} runs: "
        f"median {statistics.median(rates):,.0f}/s (runs: "
        f"{', '.join(f'{r:,.0f}' for r in rates)}; target >= 20,000/s)"
    )
    encode_s = (encode_before + encode_after) / 2
    encode_rate = len(texts) / encode_s
    print(
        f"(b) model encode on the same texts: {len(texts)} in {encode_s:.2f}s "
        f"(before {encode_before:.2f}s, after {encode_after:.2f}s) = {encode_rate:,.1f}/s"
    )
    print(f"(c) end to end through a real worker, {args.background:,} other vectors indexed:")
    for label, r in runs.items():
        total = float(r["total_s"])
        write_share = (float(r["write_s"]) + float(r["index_s"])) / total
        searchable = len(texts) / float(r["done_s"]) / encode_rate
        indexed = len(texts) / total / encode_rate
        print(
            f"    {label:10s}: {r['status']}, {r['created']} created; searchable after "
            f"{float(r['done_s']):.1f}s, indexed after {total:.1f}s; ratio to encode "
            f"{searchable:.3f} until searchable, {indexed:.3f} until indexed (target >= "
            f"0.85); write path (writes + bulk index) {write_share:.1%} of end to end "
            f"(target < 10%)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
