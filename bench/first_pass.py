"""The static first pass: ``python -m bench.first_pass [--rows 100000] [--follow]``.

In one run:
  (a) LangChain's rate on the same bookmark texts (``langchain-postgres`` PGVectorStore +
      HuggingFaceEmbeddings, the peers' environment, ``--langchain-texts`` of them), and the
      time it would need for the whole import at that rate;
  (b) our import through a real worker as deployed, with a first-pass model registered (a
      model2vec model distilled offline from the default model's files): enqueue → the
      staging with the first pass committed (``import_job.first_pass_at``), i.e. every
      bookmark searchable; a search for one of them is run and shown;
  (c) with ``--follow``: until the serving model's vectors have replaced every stand-in.
Target (issue 10): (b) at least 50x sooner than (a).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._db import (
    drop_database,
    drop_plain_database,
    fresh_database,
    fresh_plain_database,
    keep_worker_log,
    use_upload_root,
    worker_log_records,
)
from bench.import_bookmarks import bookmark_texts, generate_export

DB_NAME = "bench_first_pass"
FIRST_PASS = "minilm-static-256"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


def static_model(cache: Path) -> Path:
    """The first-pass model: distilled once from the packaged model's files (offline), kept
    under .data/bench."""
    from worker.ingest.embed import default_model_path
    from worker.ingest.static_embed import distil

    target = cache / "minilm-static-256"
    if not (target / "model.safetensors").exists():
        cache.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        distil(default_model_path(), target, dimensions=256)
        print(f"distilled the first-pass model in {time.perf_counter() - started:.1f}s")
    return target


def langchain_rate(python: Path, texts: list[str], workdir: Path) -> dict[str, Any]:
    """LangChain's texts/s adding ``texts`` (bench.peer_langchain, its own fresh database)."""
    from bench.peers import run_peer
    from worker.config import get_settings
    from worker.ingest.embed import default_model_path

    corpus = workdir / "first-pass-corpus.json"
    corpus.write_text(json.dumps({"bookmarks": {"docs": [{"chunks": [t]} for t in texts]}}))
    db = "bench_first_pass_langchain"
    dsn = fresh_plain_database(db)
    try:
        result = run_peer(
            python,
            "bench.peer_langchain",
            [
                "--corpus",
                str(corpus),
                "--kind",
                "bookmarks",
                "--model-path",
                get_settings().model_path or default_model_path(),
                "--threads",
                str(os.cpu_count() or 1),  # one process on every core, as bench.peers runs it
                "--dsn",
                dsn,
            ],
            label="langchain",
        )
    finally:
        drop_plain_database(db)
    return {
        "texts": len(texts),
        "seconds": result["seconds"],
        "rate": len(texts) / result["seconds"],
    }


def _job_durations(log_path: Path, job_id: int) -> dict[str, float]:
    """The import job's staged line: its stages in seconds (JSON logs)."""
    for record in worker_log_records(log_path):
        if f"import job {job_id} staged" in str(record.get("msg", "")):
            return {k: float(v) / 1000 for k, v in (record.get("durations_ms") or {}).items()}
    return {}


def _first_pass_state(job_id: int) -> Any:
    from sqlalchemy import text

    from worker.db.engine import get_engine

    with get_engine().connect() as conn:
        return conn.execute(
            text(
                "SELECT status, created_count, first_pass_at, first_pass_model, error "
                "FROM import_job WHERE id = :id"
            ),
            {"id": job_id},
        ).one()


def measure_import(
    data: bytes, workdir: Path, *, user: str, probe: str, follow: bool
) -> dict[str, Any]:
    from sqlalchemy import text

    from worker import client
    from worker.config import get_settings
    from worker.db.engine import get_engine, session_scope
    from worker.search import semantic_search
    from worker.subprocess_worker import WorkerProcess

    upload_root = workdir / "uploads"
    upload_root.mkdir(parents=True, exist_ok=True)
    (upload_root / "export.html").write_bytes(data)
    use_upload_root(upload_root)
    log_path = workdir / "worker.log"
    env = {**os.environ, "LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}
    settings = get_settings()
    worker = WorkerProcess(
        log_path, name="bench", env=env, concurrency=settings.worker_concurrency
    ).start()
    out: dict[str, Any] = {}
    try:
        worker.wait_ready()
        # Warm the pool children (the transformer in each, the first-pass model in the one
        # that stages the warm import) with a small bulk import.
        warm_rows = max(settings.bulk_import_threshold, settings.first_pass_min_bookmarks)
        (upload_root / "warm.html").write_bytes(generate_export(warm_rows, seed=1))
        warm = client.import_bookmarks(f"{user}-warm", upload_root / "warm.html")
        client.wait_for_import(f"{user}-warm", warm)
        start = time.perf_counter()
        job = client.import_bookmarks(user, upload_root / "export.html")
        while True:
            state = _first_pass_state(job)
            if state.first_pass_at is not None or state.status in ("failed", "done"):
                break
            time.sleep(0.05)
        out["searchable_s"] = time.perf_counter() - start
        if state.first_pass_at is None:
            raise RuntimeError(f"import job {job} had no first pass: {state.status} {state.error}")
        out["created"] = state.created_count
        with session_scope() as s:
            # The first search in this process loads both models (torch's import alone is
            # seconds); the second shows what a search costs.
            started = time.perf_counter()
            semantic_search(s, user, "warm up", limit=3)
            out["first_search_ms"] = (time.perf_counter() - started) * 1000
            started = time.perf_counter()
            hits = semantic_search(s, user, probe, limit=3)
            out["search_ms"] = (time.perf_counter() - started) * 1000
        out["probe"] = probe
        out["hits"] = [(h.title, h.why.get("model"), round(h.score, 3)) for h in hits]
        if follow:
            # A search every few seconds while the serving model's batches replace the
            # stand-ins: the partition's contents shift under the planner all along.
            latencies = []
            while True:
                progress = client.import_status(user, job)
                if progress is None:
                    raise RuntimeError(f"import job {job} vanished")
                if progress.finished:
                    break
                with session_scope() as s:
                    started = time.perf_counter()
                    semantic_search(s, user, probe, limit=10)
                    latencies.append((time.perf_counter() - started) * 1000)
                time.sleep(5.0)
            out["done_s"] = time.perf_counter() - start
            out["status"] = progress.status
            out["search_during_ms"] = sorted(latencies)
            with get_engine().connect() as conn:
                out["stand_ins_left"] = conn.execute(
                    text("SELECT count(*) FROM embedding WHERE user_id = :u AND model = :m"),
                    {"u": user, "m": FIRST_PASS},
                ).scalar_one()
    finally:
        worker.stop()
    keep_worker_log(log_path, user)
    out["stages"] = _job_durations(log_path, job)
    return out


def measure(rows: int, workdir: Path, *, follow: bool = False) -> dict[str, Any]:
    """Our side, in a fresh database of its own: register the first-pass model, import a
    ``rows``-bookmark export through a real worker and time it until searchable."""
    engine = fresh_database(DB_NAME)
    from worker.app import app, configure
    from worker.config import get_settings
    from worker.models import add_model

    configure(app, get_settings())
    data = generate_export(rows, seed=11)
    probe = random.Random(5).choice(bookmark_texts(data)).split("\n", 1)[0]
    try:
        model_dir = static_model(ROOT / ".data" / "bench")
        add_model(engine, FIRST_PASS, path=str(model_dir), first_pass=True)
        result = measure_import(data, workdir, user="bench-first-pass", probe=probe, follow=follow)
    finally:
        drop_database(DB_NAME)
    result["rows"] = rows
    return result


def describe(ours: dict[str, Any], langchain_per_s: float) -> str:
    """The lines both entry points print."""
    langchain_s = ours["rows"] / langchain_per_s
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in ours["stages"].items())
    lines = [
        f"{ours['created']:,} new bookmarks searchable after {ours['searchable_s']:.2f}s "
        f"(job: {stages}); at LangChain's {langchain_per_s:,.1f}/s they would take "
        f"{langchain_s:,.0f}s: {langchain_s / ours['searchable_s']:.1f}x sooner (target >= 50x)",
        f"search {ours['probe']!r}: {ours['search_ms']:.0f} ms (the process's first search, "
        f"loading both models: {ours['first_search_ms']:.0f} ms): {ours['hits']}",
    ]
    if "done_s" in ours:
        lines.append(
            f"the serving model's vectors all in after {ours['done_s']:.1f}s ({ours['status']});"
            f" first-pass rows left: {ours['stand_ins_left']}"
        )
        during = ours["search_during_ms"]
        lines.append(
            f"{len(during)} searches meanwhile: median {during[len(during) // 2]:.0f} ms, "
            f"slowest {during[-1]:.0f} ms"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--langchain-texts", type=int, default=3000)
    parser.add_argument(
        "--peers-python",
        type=Path,
        default=Path(os.environ.get("BENCH_PEERS_PYTHON", DEFAULT_PEERS_PYTHON)),
    )
    parser.add_argument(
        "--follow", action="store_true", help="also wait for the serving model's vectors"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    if not args.peers_python.exists():
        raise SystemExit(
            f"no peers' environment at {args.peers_python}: `make bench-env`, or give "
            "--peers-python"
        )
    texts = bookmark_texts(generate_export(args.rows, seed=11))
    sample = random.Random(5).sample(texts, min(args.langchain_texts, len(texts)))
    with tempfile.TemporaryDirectory() as tmp:
        peer = langchain_rate(args.peers_python, sample, Path(tmp))
        ours = measure(args.rows, Path(tmp), follow=args.follow)
    print(f"LangChain adding {peer['texts']:,} of the same bookmark texts: {peer['rate']:,.1f}/s")
    print(describe(ours, peer["rate"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
