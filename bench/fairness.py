"""Fairness under a big import: ``python -m bench.fairness [--bookmarks N] [--uploads M]``.

One real worker (``--concurrency`` prefork processes, default 2: the cores here) on real
Redis and PostgreSQL, in one run:
  (a) idle: user ``bench-idle`` uploads M small documents one by one, each timed from
      enqueue to searchable (status ``done``: its vectors commit in the same transaction);
  (b) loaded: user ``bench-bulk`` imports N bookmarks (the bulk lane: released by the
      dispatcher a few batches at a time); once its batches are being embedded, user
      ``bench-loaded`` uploads the same M documents one by one, timed the same way.
Prints p50/p95 of both and the ratio loaded ÷ idle (target: p95 at most 2x), with the
import's own progress (recent rate, ETA) while the uploads ran. The import is then cancelled
(what it created is removed), unless ``--finish`` waits for it: the uploads' timings are only
meaningful while it runs, and 50,000 bookmarks through the transformer take many minutes on
two cores. ``--fifo`` adds the behaviour before the dispatcher for comparison: the same
import with every batch sent to the ingest queue at once (use a smaller ``--bookmarks``:
the first upload waits for the whole import). JSON lands in bench/out/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._db import drop_database, fresh_database, use_upload_root

DB_NAME = "bench_fairness"
OUT = Path(__file__).parent / "out"
# The import embeds alone this long before the uploads start: its rate alone, for comparison.
ALONE_S = 20.0


def write_documents(root: Path, n: int) -> list[Path]:
    """Small Markdown notes, two paragraphs (about 150 words) each."""
    from worker.fixtures import prose

    paths = []
    for i in range(n):
        path = root / f"note{i:03d}.md"
        path.write_text(f"# Note {i}\n\n{prose(100 + i, paragraphs=2)}\n")
        paths.append(path)
    return paths


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): of 20 values, p95 is the 19th smallest."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "n": len(latencies),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(percentile(latencies, 95), 3),
        "max_s": round(max(latencies), 3),
    }


def item_done(item_id: int) -> bool:
    from sqlalchemy import text

    from worker.db.engine import session_scope

    with session_scope() as s:
        status = s.execute(
            text("SELECT status FROM item WHERE id = :id"), {"id": item_id}
        ).scalar_one()
    if status in ("failed", "skipped"):
        raise RuntimeError(f"upload {item_id} ended {status}")
    return bool(status == "done")


def upload_one_by_one(user: str, paths: list[Path], *, timeout: float = 900) -> list[float]:
    """Enqueue each document after the previous one is searchable; seconds each took."""
    from worker import client

    latencies = []
    for path in paths:
        start = time.perf_counter()
        item_id = client.enqueue_upload(user, path)
        while not item_done(item_id):
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"upload {item_id} not done after {timeout}s")
            time.sleep(0.01)
        latencies.append(time.perf_counter() - start)
    return latencies


def warm_up(root: Path, concurrency: int, user: str) -> None:
    """Load the model (and the analyzer) in every worker process before anything is timed:
    several uploads at once, so that each process takes one, plus a small import. A user of
    its own per worker: the same files again for the same user would be unchanged no-ops."""
    from bench.import_bookmarks import generate_export
    from worker import client
    from worker.fixtures import prose

    ids = []
    for i in range(3 * concurrency):
        path = root / f"warm{i}.md"
        path.write_text(prose(i, paragraphs=1))
        ids.append(client.enqueue_upload(user, path))
    client.wait_for_items(user, ids, timeout=600, poll=0.1)
    (root / "warm.html").write_bytes(generate_export(50, seed=3))
    job = client.import_bookmarks(user, root / "warm.html")
    client.wait_for_import(user, job, timeout=600)


def loaded_run(
    root: Path,
    docs: list[Path],
    bookmarks: int,
    *,
    user: str,
    bulk_user: str,
    finish: bool,
    fifo: bool = False,
) -> dict[str, Any]:
    """Start the import, wait until its batches are being embedded, time the uploads, note
    the import's progress, then cancel it (or wait for it with ``finish``)."""
    from bench.import_bookmarks import generate_export
    from worker import client
    from worker.bookmarks.dispatch import interactive_recently
    from worker.config import get_settings

    # The idle uploads left the "interactive work about" marker: let it lapse, so that the
    # import starts with every process, as it would on a quiet system.
    while interactive_recently(get_settings()):
        time.sleep(0.5)
    export = root / f"{bulk_user}.html"
    export.write_bytes(generate_export(bookmarks, seed=11))
    job = client.import_bookmarks(bulk_user, export)
    started = time.perf_counter()
    embedding_since = None
    while True:  # parsed, staged, and embedding alone for ALONE_S (its rate alone)
        p = client.import_status(bulk_user, job)
        assert p is not None
        if p.status == "processing" and p.rate_per_s:
            embedding_since = embedding_since or time.perf_counter()
            if fifo or time.perf_counter() - embedding_since >= ALONE_S:
                break
        if p.finished or time.perf_counter() - started > 1800:
            raise RuntimeError(f"import not embedding: {p}")
        time.sleep(0.2)
    before = client.import_status(bulk_user, job)
    latencies = upload_one_by_one(user, docs)
    during = client.import_status(bulk_user, job)
    assert before is not None and during is not None
    if during.finished and not fifo:
        raise RuntimeError(
            f"the import ended ({during.status}) before the uploads did: use more --bookmarks"
        )
    outcome: dict[str, Any] = {
        "import": {
            "lane": during.lane,
            "bookmarks": bookmarks,
            "rate_alone_per_s": round(before.rate_per_s or 0, 1),
            "processed_before_uploads": before.processed,
            "processed_after_uploads": during.processed,
            "recent_rate_per_s": round(during.rate_per_s or 0, 1),
            "eta_s": round(during.eta_s) if during.eta_s is not None else None,
        },
        "uploads": summary(latencies),
        "latencies_s": [round(x, 3) for x in latencies],
    }
    if during.finished:  # fifo: the first upload waited for the whole import
        outcome["import"].update(status=f"{during.status} before the uploads were")
    elif finish:
        t0 = time.perf_counter()
        done = client.wait_for_import(bulk_user, job, timeout=24 * 3600)
        outcome["import"].update(
            status=done.status, finished_after_s=round(time.perf_counter() - t0, 1)
        )
    else:
        result = client.cancel_import(bulk_user, job)
        outcome["import"].update(status="cancelled after the uploads", removed=result["removed"])
    return outcome


def run_worker(
    workdir: Path, env: dict[str, str], concurrency: int, body: Any, name: str
) -> dict[str, Any]:
    from worker.subprocess_worker import WorkerProcess

    worker = WorkerProcess(
        workdir / f"worker-{name}.log", env=env, concurrency=concurrency, name=f"bench-{name}"
    ).start()
    try:
        worker.wait_ready()
        result: dict[str, Any] = body()
        return result
    finally:
        worker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bookmarks", type=int, default=50_000)
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes")
    parser.add_argument("--finish", action="store_true", help="wait for the whole import")
    parser.add_argument(
        "--fifo", action="store_true", help="also run the import with every batch sent at once"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ["WORKER_CONCURRENCY"] = str(args.concurrency)
    fresh_database(DB_NAME)
    from worker.app import app, configure

    report: dict[str, Any] = {"bookmarks": args.bookmarks, "concurrency": args.concurrency}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "uploads"
            root.mkdir()
            settings = use_upload_root(root)
            configure(app, settings)
            report["settings"] = {
                k: getattr(settings, k)
                for k in (
                    "bulk_import_threshold",
                    "bulk_batch_size",
                    "bulk_max_in_flight_per_user",
                    "bulk_in_flight_cap",
                    "bookmark_batch_size",
                )
            }
            docs = write_documents(root, args.uploads)
            env = dict(os.environ)

            def fair() -> dict[str, Any]:
                warm_up(root, args.concurrency, "bench-warm")
                idle = upload_one_by_one("bench-idle", docs)
                loaded = loaded_run(
                    root,
                    docs,
                    args.bookmarks,
                    user="bench-loaded",
                    bulk_user="bench-bulk",
                    finish=args.finish,
                )
                return {"idle": summary(idle), "idle_latencies_s": idle, "loaded": loaded}

            report.update(run_worker(Path(tmp), env, args.concurrency, fair, "fair"))
            if args.fifo:
                fifo_env = {**env, "BULK_IMPORT_THRESHOLD": str(args.bookmarks + 1)}

                def fifo() -> dict[str, Any]:
                    warm_up(root, args.concurrency, "bench-warm-fifo")
                    return loaded_run(
                        root,
                        docs,
                        args.bookmarks,
                        user="bench-fifo",
                        bulk_user="bench-fifo-bulk",
                        finish=False,
                        fifo=True,
                    )

                report["fifo"] = run_worker(Path(tmp), fifo_env, args.concurrency, fifo, "fifo")
    finally:
        drop_database(DB_NAME)
    OUT.mkdir(exist_ok=True)
    (OUT / "fairness.json").write_text(json.dumps(report, indent=2, default=str))
    print_report(report)
    return 0


def print_report(report: dict[str, Any]) -> None:
    idle, loaded = report["idle"], report["loaded"]["uploads"]
    imp = report["loaded"]["import"]
    print(
        f"worker: {report['concurrency']} processes; import of {report['bookmarks']:,} "
        f"bookmarks ({imp['lane']} lane), settings {report['settings']}"
    )
    print(
        f"uploads on an idle worker:         p50 {idle['p50_s']:.3f}s  p95 {idle['p95_s']:.3f}s"
        f"  (n={idle['n']})"
    )
    print(
        f"same uploads while the import ran: p50 {loaded['p50_s']:.3f}s  "
        f"p95 {loaded['p95_s']:.3f}s  (max {loaded['max_s']:.3f}s)"
    )
    ratio50 = loaded["p50_s"] / idle["p50_s"]
    ratio95 = loaded["p95_s"] / idle["p95_s"]
    verdict = "met" if ratio95 <= 2 else "missed"
    print(f"loaded / idle: p50 {ratio50:.2f}x, p95 {ratio95:.2f}x (target p95 <= 2x: {verdict})")
    print(
        f"the import meanwhile: {imp['processed_before_uploads']:,} -> "
        f"{imp['processed_after_uploads']:,} processed; recent rate alone "
        f"{imp['rate_alone_per_s']}/s, during the uploads {imp['recent_rate_per_s']}/s, "
        f"ETA {imp['eta_s']}s; {imp['status']}"
        + (f" (removed {imp['removed']:,} bookmarks)" if "removed" in imp else "")
    )
    if "fifo" in report:
        fifo = report["fifo"]["uploads"]
        print(
            f"before the dispatcher (every batch queued at once): p50 {fifo['p50_s']:.3f}s  "
            f"p95 {fifo['p95_s']:.3f}s  max {fifo['max_s']:.3f}s "
            f"({fifo['max_s'] / idle['p95_s']:.0f}x the idle p95: the first upload waited for "
            f"the whole import); the import {report['fifo']['import']['status']}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
