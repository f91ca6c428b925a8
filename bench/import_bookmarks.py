"""Bookmark import throughput: ``python -m bench.import_bookmarks [--rows N]``.

In one run, on one generated Netscape export:
  (a) parse + canonicalise + dedupe + stage (COPY, INSERT … SELECT) in bookmarks/s;
  (b) the model's own ``encode`` rate on the exact texts we embed (the ceiling);
  (c) end to end through a real Celery worker and Redis: enqueue → every bookmark embedded
      and committed; printed as a ratio to (b).
Targets (issue 6): (a) >= 20,000/s; (c)/(b) >= 0.85.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tempfile
import time
from pathlib import Path

from bench._db import drop_database, fresh_database

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


def measure_staging(data: bytes, user_id: str) -> tuple[float, int]:
    from worker.bookmarks.importer import read_export, stage_import
    from worker.db import queries
    from worker.db.engine import session_scope

    start = time.perf_counter()
    export = read_export(io.BytesIO(data))
    with session_scope() as s:
        job = queries.insert_import_job(s, user_id=user_id, filename="bench", file_size=len(data))
        stage_import(s, job, user_id, export, batch_size=256)
    return time.perf_counter() - start, export.entries


def bookmark_texts(data: bytes) -> list[str]:
    from worker.bookmarks.importer import bookmark_text, read_export

    export = read_export(io.BytesIO(data))
    return [
        bookmark_text(b.title, b.description, b.tags, b.folder_path, b.domain, b.url)
        for b in export.bookmarks.values()
    ]


def measure_encode(texts: list[str]) -> float:
    from worker.runtime import default_embedder

    embedder = default_embedder()
    embedder.encode(texts[:64])  # load and warm up outside the timing
    start = time.perf_counter()
    embedder.encode(texts)
    return time.perf_counter() - start


def measure_end_to_end(data: bytes, workdir: Path) -> tuple[float, dict[str, object]]:
    from worker import client
    from worker.subprocess_worker import WorkerProcess

    upload_root = workdir / "uploads"
    upload_root.mkdir(parents=True, exist_ok=True)
    (upload_root / "export.html").write_bytes(data)
    os.environ["UPLOAD_ROOT"] = str(upload_root)
    from worker.config import get_settings

    get_settings.cache_clear()
    worker = WorkerProcess(workdir / "worker.log", name="bench").start()
    try:
        worker.wait_ready()
        # Warm the worker's model with a tiny import so that load time is not counted.
        (upload_root / "warm.html").write_bytes(generate_export(3, seed=1))
        warm = client.import_bookmarks("bench-warm", upload_root / "warm.html")
        client.wait_for_import("bench-warm", warm)
        start = time.perf_counter()
        job = client.import_bookmarks("bench-e2e", upload_root / "export.html")
        progress = client.wait_for_import("bench-e2e", job)
        elapsed = time.perf_counter() - start
    finally:
        worker.stop()
    return elapsed, {"status": progress.status, "created": progress.created}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--stage-rows", type=int, default=100_000)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    # One worker process using both cores, and the ceiling measured with the same threads.
    os.environ["WORKER_CONCURRENCY"] = "1"
    fresh_database(DB_NAME)
    from worker.app import app, configure
    from worker.config import get_settings

    configure(app, get_settings())
    try:
        big = generate_export(args.stage_rows)
        stage_s, entries = measure_staging(big, "bench-stage")
        data = generate_export(args.rows, seed=11)
        texts = bookmark_texts(data)
        encode_s = measure_encode(texts)
        with tempfile.TemporaryDirectory() as tmp:
            e2e_s, outcome = measure_end_to_end(data, Path(tmp))
    finally:
        drop_database(DB_NAME)
    stage_rate = entries / stage_s
    encode_rate = len(texts) / encode_s
    e2e_rate = len(texts) / e2e_s
    print(
        f"(a) parse+canonicalise+dedupe+stage: {entries} bookmarks in {stage_s:.2f}s "
        f"= {stage_rate:,.0f}/s (target >= 20,000/s)"
    )
    print(
        f"(b) model encode on the same texts: {len(texts)} in {encode_s:.2f}s "
        f"= {encode_rate:,.1f}/s"
    )
    print(f"(c) end to end through a real worker: {outcome}, {e2e_s:.2f}s = {e2e_rate:,.1f}/s")
    print(f"    ratio end-to-end / encode = {e2e_rate / encode_rate:.3f} (target >= 0.85)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
