"""Side by side in one run: us against the model's own ``encode``, LangChain, LlamaIndex and
a naive pipeline, on the same corpus, the same model files and the same torch threads.
``python -m bench`` (``make bench``) runs it; ``python -m bench.peers --quick`` is a small one.

For each corpus (long passages from uploaded files; short bookmark texts):
  1. the model's own ``SentenceTransformer.encode`` on every chunk (the ceiling), measured
     before and after the systems (their mean counts; the two show the machine's drift),
     and at several batch sizes;
  2. ours end to end: enqueue → real Celery worker → rows committed, at several worker
     concurrencies (and batch sizes for bookmarks), then the same input again unchanged;
  3. LangChain (``langchain-postgres`` PGVectorStore + HuggingFaceEmbeddings);
  4. LlamaIndex (``IngestionPipeline`` + SentenceSplitter + HuggingFaceEmbedding +
     PGVectorStore);
  5. naive: one document at a time, one INSERT per vector, one commit per document;
then 6. binary COPY against executemany for 100,000 vectors, and 7. the worker's resident
memory after warm-up, at the peak and after the run.

Every system runs in its own fresh database on the same PostgreSQL, each in a process of its
own (the peers in ``.venv-peers``: their pins conflict with ours, see bench/README.md).
Writes bench/results.md, bench/results.png and bench/out/peers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from bench import report
from bench._peer import RESULT_PREFIX
from bench.contention import Step, server_pids, wait_for_quiet
from bench.ours import WorkerRun, measure

ROOT = Path(__file__).resolve().parent.parent
PEERS_VENV = ROOT / ".venv-peers"
PEER_MODULES = {
    "langchain": "bench.peer_langchain",
    "llamaindex": "bench.peer_llamaindex",
    "naive": "bench.peer_naive",
}
# Runs in the peers' environment (the project's own isn't importable there).
PEERS_VERSIONS = """
import json, sys
from importlib.metadata import version, PackageNotFoundError
names = sys.argv[1:]
out = {}
for n in names:
    try:
        out[n] = version(n)
    except PackageNotFoundError:
        out[n] = None
print(json.dumps(out))
"""
PEER_PACKAGES = (
    "langchain-postgres",
    "langchain-core",
    "langchain-huggingface",
    "llama-index-core",
    "llama-index-vector-stores-postgres",
    "llama-index-embeddings-huggingface",
)
MODEL_STACK = (
    "torch",
    "sentence-transformers",
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "numpy",
    "psycopg",
    "pgvector",
    "SQLAlchemy",
)
OUR_PACKAGES = (*MODEL_STACK, "celery", "redis", "matplotlib", "psutil")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small corpus: about 3 minutes")
    parser.add_argument("--docs", type=int, help="uploaded documents (default 140, quick 28)")
    parser.add_argument("--bookmarks", type=int, help="bookmarks (default 3000, quick 600)")
    parser.add_argument(
        "--vectors", type=int, help="vectors for COPY vs executemany (default 100000, quick 20000)"
    )
    parser.add_argument(
        "--first-pass-rows",
        type=int,
        help="bookmarks of the first-pass import (default 100000, quick 20000)",
    )
    parser.add_argument(
        "--peers-python",
        type=Path,
        default=Path(os.environ.get("BENCH_PEERS_PYTHON", PEERS_VENV / "bin" / "python")),
        help="python of the peers' environment (make bench-env builds .venv-peers)",
    )
    parser.add_argument(
        "--quiet-cores",
        type=float,
        default=0.3,
        help="before each step, wait until others use at most this many cores",
    )
    parser.add_argument(
        "--quiet-timeout", type=float, help="…but no longer than this (s; default 60, quick 20)"
    )
    parser.add_argument(
        "--quiet-budget",
        type=float,
        help="…and no longer than this for the whole run (s; default 300, quick 60)",
    )
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results.md")
    parser.add_argument("--chart", type=Path, default=ROOT / "bench" / "results.png")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "peers.json")
    args = parser.parse_args(argv)
    args.docs = args.docs or (28 if args.quick else 140)
    args.bookmarks = args.bookmarks or (600 if args.quick else 3000)
    args.vectors = args.vectors or (20_000 if args.quick else 100_000)
    args.first_pass_rows = args.first_pass_rows or (20_000 if args.quick else 100_000)
    if args.quiet_timeout is None:
        args.quiet_timeout = 20.0 if args.quick else 60.0
    if args.quiet_budget is None:
        args.quiet_budget = 60.0 if args.quick else 300.0
    return args


def plan(quick: bool) -> dict[str, Any]:
    """What is measured for each corpus: our worker configurations (concurrency, batch size,
    analysis, padded tokens per batch or None for the default) and the batch sizes of the
    encode sweep. The first configuration is the one compared with the peers."""
    if quick:
        return {
            "uploads": {"ours": [(1, 64, "off", None), (2, 64, "off", None)], "sweep": [16, 64]},
            "bookmarks": {
                "ours": [(1, 64, "off", None), (2, 64, "off", None)],
                "sweep": [16, 64, 128],
            },
        }
    return {
        "uploads": {
            "ours": [
                (1, 64, "off", None),
                (2, 64, "off", None),
                (1, 64, "off", 4096),
                (1, 64, "local", None),
            ],
            "sweep": [16, 64],
        },
        "bookmarks": {
            "ours": [
                (1, 64, "off", None),
                (2, 64, "off", None),
                (1, 16, "off", None),
                (1, 256, "off", None),
            ],
            "sweep": [16, 64, 128, 256],
        },
    }


# --- subprocesses -----------------------------------------------------------------------------


def run_peer(
    python: Path, module: str, args: list[str], *, label: str, timeout: float = 3600
) -> dict[str, Any]:
    """Run one measured subprocess and return its result line; fail with its output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OMP_NUM_THREADS", None)  # the subprocess sets it (bench._peer.offline)
    started = time.perf_counter()
    proc = subprocess.run(
        [str(python), "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            result["wall_s"] = time.perf_counter() - started
            result["load_after"] = os.getloadavg()[0]
            return result
    tail = (proc.stdout + proc.stderr)[-4000:]
    raise RuntimeError(f"{label} ({module}) exited {proc.returncode} without a result:\n{tail}")


def check_peers_python(python: Path) -> None:
    if not python.exists():
        raise SystemExit(
            f"no peers' environment at {python}: run `make bench-env` (scripts/bootstrap-peers) "
            "or give --peers-python / BENCH_PEERS_PYTHON"
        )
    probe = subprocess.run(
        [str(python), "-c", "import langchain_postgres, llama_index.vector_stores.postgres"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode:
        raise SystemExit(f"{python} lacks the peers: {probe.stderr.strip()[-500:]}")


def package_versions(python: Path, names: Sequence[str]) -> dict[str, str | None]:
    out = subprocess.run(
        [str(python), "-c", PEERS_VERSIONS, *names],
        capture_output=True,
        text=True,
        check=True,
    )
    versions: dict[str, str | None] = json.loads(out.stdout)
    return versions


# --- one corpus ---------------------------------------------------------------------------------


@dataclass
class Gate:
    """Before each measured step, wait for the machine to be quiet (others using at most
    ``max_others`` cores), up to ``timeout`` seconds a step and ``budget`` seconds for the
    whole run (a machine busy for good should not make the run last for ever); record how
    long it waited and how many cores others kept busy during the step (bench.contention)."""

    servers: list[int]
    max_others: float
    timeout: float
    budget: float

    def measure(self, label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        limit = max(2.0, min(self.timeout, self.budget))
        waited, before = wait_for_quiet(self.servers, max_others=self.max_others, timeout=limit)
        self.budget -= waited
        if before > self.max_others:
            print(f"  (not quiet after {waited:.0f}s: others use {before:.1f} cores)", flush=True)
        with Step(self.servers) as step:
            result = fn()
        result["contention"] = {
            "waited_s": round(waited, 1),
            "others_cores_before": round(before, 2),
            "others_cores": round(step.others_cores, 2),
            "step_s": round(step.seconds, 1),
        }
        print(f"  {label}: others used {step.others_cores:.2f} cores meanwhile", flush=True)
        return result


def run_kind(
    kind: str,
    corpus: Any,
    workdir: Path,
    *,
    peers_python: Path,
    model_path: str,
    threads: int,
    steps: dict[str, Any],
    gate: Gate,
) -> dict[str, Any]:
    from bench._db import drop_plain_database, fresh_plain_database

    common = [
        "--corpus",
        str(corpus.path),
        "--kind",
        kind,
        "--model-path",
        model_path,
        "--threads",
        str(threads),
    ]
    texts = corpus.chunk_count(kind)
    out: dict[str, Any] = {
        "documents": len(corpus.data[kind]["docs"]),
        "texts": texts,
        "tokens": corpus.token_count(kind),
        "ceiling": {"seconds": [], "runs": []},
        "ours": [],
        "peers": {},
    }

    def ceiling(label: str) -> None:
        print(f"[{kind}] model encode ({label})", flush=True)
        r = gate.measure(
            "encode",
            lambda: run_peer(Path(sys.executable), "bench.peer_encode", common, label="encode"),
        )
        out["ceiling"]["seconds"].append(r["seconds_by_batch_size"]["32"])
        out["ceiling"]["runs"].append(r)

    def ours(concurrency: int, batch_size: int, analysis: str, tokens: int | None) -> None:
        label = f"{kind}-c{concurrency}-b{batch_size}-{analysis}" + (
            f"-t{tokens}" if tokens else ""
        )
        print(f"[{kind}] ours end to end: {label}", flush=True)
        run = WorkerRun(kind, label, concurrency, batch_size, analysis, texts, tokens)
        db = f"bench_peers_{kind}"
        out["ours"].append(gate.measure(label, lambda: measure(run, corpus, workdir, db).as_dict()))

    def peer(name: str) -> None:
        print(f"[{kind}] {name}", flush=True)
        db = f"bench_peers_{name}"
        dsn = fresh_plain_database(db)
        python = Path(sys.executable) if name == "naive" else peers_python
        try:
            out["peers"][name] = gate.measure(
                name,
                lambda: run_peer(python, PEER_MODULES[name], [*common, "--dsn", dsn], label=name),
            )
        finally:
            drop_plain_database(db)

    ceiling("before")
    first, *others = steps["ours"]
    ours(*first)
    for name in PEER_MODULES:
        peer(name)
    for config in others:
        ours(*config)
    ceiling("after")

    # Batch-size sweep of the model's own encode (on a sample), twice, and the
    # same encode in the peers' environment: equal rates show the two stacks are the same.
    sweep_limit = min(texts, 200 if kind == "uploads" else 1500)
    sizes = ",".join(str(b) for b in sorted({32, *steps["sweep"]}))
    print(f"[{kind}] encode batch-size sweep ({sizes}) on {sweep_limit} texts", flush=True)
    sweep = gate.measure(
        "sweep",
        lambda: run_peer(
            Path(sys.executable),
            "bench.peer_encode",
            [*common, "--batch-sizes", sizes, "--limit", str(sweep_limit), "--repeats", "2"],
            label="sweep",
        ),
    )
    out["encode_sweep"] = {
        "texts": sweep["texts"],
        "seconds": sweep["seconds_by_batch_size"],
        "contention": sweep["contention"],
    }
    print(f"[{kind}] the same encode in the peers' environment", flush=True)
    peers_encode = gate.measure(
        "encode, peers' environment",
        lambda: run_peer(
            peers_python,
            "bench.peer_encode",
            [*common, "--limit", str(sweep_limit)],
            label="encode in the peers' environment",
        ),
    )
    out["encode_sweep"]["peers_env_seconds_32"] = peers_encode["seconds_by_batch_size"]["32"]
    return out


# --- facts about the run -------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    memory_gib = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    import platform

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "os": platform.platform(),
    }


def git_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def server_versions() -> dict[str, str]:
    import psycopg
    import redis

    from bench._db import drop_plain_database, fresh_plain_database
    from worker.config import get_settings

    dsn = fresh_plain_database("bench_peers_versions")
    try:
        with psycopg.connect(dsn) as conn:
            pg = conn.execute("SHOW server_version").fetchone()
            vec = conn.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
            ).fetchone()
    finally:
        drop_plain_database("bench_peers_versions")
    info = redis.Redis.from_url(get_settings().redis_url).info("server")
    return {
        "PostgreSQL": str(pg[0]) if pg else "?",
        "pgvector (extension)": str(vec[0]) if vec else "?",
        "Redis": str(info.get("redis_version", "?")),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_peers_python(args.peers_python)
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from bench._db import use_configured_services
    from worker.app import app, configure
    from worker.config import get_settings, mask_url
    from worker.ingest.embed import default_model_path

    use_configured_services()
    settings = get_settings()
    print(
        f"PostgreSQL {mask_url(settings.database_url.rsplit('/', 1)[0])}, "
        f"Redis {mask_url(settings.celery_broker_url)}",
        flush=True,
    )
    model_path = settings.model_path or default_model_path()
    threads = os.cpu_count() or 1
    figures: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "revision": git_revision(),
            "quick": args.quick,
            "threads": threads,
            "model_path": model_path,
            "load_start": os.getloadavg(),
            "chunk_max_tokens": settings.chunk_max_tokens,
            "chunk_overlap_tokens": settings.chunk_overlap_tokens,
            "embed_max_batch_tokens": settings.embed_max_batch_tokens,
        },
        "machine": machine(),
    }
    started = time.perf_counter()
    # The client side (enqueue, waiting) uses this process's settings and Celery app.
    configure(app, settings)
    steps = plan(args.quick)
    gate = Gate(
        server_pids([settings.database_url, settings.celery_broker_url]),
        args.quiet_cores,
        args.quiet_timeout,
        args.quiet_budget,
    )
    with TemporaryDirectory(prefix="bench-peers-") as tmp:
        from bench.corpus import build

        corpus = build(Path(tmp), docs=args.docs, bookmarks=args.bookmarks)
        print(
            f"corpus: {args.docs} documents → {corpus.chunk_count('uploads')} chunks; "
            f"{corpus.chunk_count('bookmarks')} bookmarks",
            flush=True,
        )
        for kind in ("uploads", "bookmarks"):
            figures[kind] = run_kind(
                kind,
                corpus,
                Path(tmp),
                peers_python=args.peers_python,
                model_path=model_path,
                threads=threads,
                steps=steps[kind],
                gate=gate,
            )
        from bench import dedupe, first_pass

        print("identical texts given three times over to our embedder", flush=True)
        sample = [t for doc in corpus.data["bookmarks"]["docs"] for t in doc["chunks"]][:1500]
        figures["dedupe"] = gate.measure("dedupe", lambda: dedupe.measure(sample))
        print(
            f"first pass: a {args.first_pass_rows:,}-bookmark import with a static first-pass "
            "model",
            flush=True,
        )
        figures["first_pass"] = gate.measure(
            "first_pass", lambda: first_pass.measure(args.first_pass_rows, Path(tmp))
        )
    print(f"COPY against executemany, {args.vectors:,} vectors", flush=True)
    from bench import copy_rows
    from bench._db import drop_plain_database, fresh_plain_database

    dsn = fresh_plain_database("bench_peers_copy")
    try:
        figures["copy"] = gate.measure("copy", lambda: copy_rows.measure(dsn, args.vectors))
    finally:
        drop_plain_database("bench_peers_copy")
    figures["meta"]["load_end"] = os.getloadavg()
    figures["meta"]["quiet"] = {
        "max_others_cores": args.quiet_cores,
        "step_timeout_s": args.quiet_timeout,
        "budget_s": args.quiet_budget,
        "budget_left_s": round(gate.budget, 1),
    }
    figures["meta"]["wall_s"] = time.perf_counter() - started
    figures["versions"] = {
        "python": sys.version.split()[0],
        "ours": package_versions(Path(sys.executable), OUR_PACKAGES),
        "peers": package_versions(args.peers_python, (*PEER_PACKAGES, *MODEL_STACK)),
        "servers": server_versions(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=1, default=str))
    args.results.write_text(report.markdown(figures, chart=args.chart.name))
    report.chart(figures, args.chart)
    print(report.summary(figures))
    print(f"wrote {args.results}, {args.chart} and {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
