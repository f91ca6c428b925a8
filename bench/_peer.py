"""What every measured subprocess of ``bench.peers`` shares: the same arguments, the same
offline model files, the same torch threads, and one JSON line of results on stdout.

Standard library only at import time: these processes run in the peers' virtual
environment (``.venv-peers``), which has neither this project nor its dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "
DIMENSIONS = 384


def arguments(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--corpus", required=True, help="corpus.json written by bench.peers")
    parser.add_argument("--kind", choices=("uploads", "bookmarks"), required=True)
    parser.add_argument("--model-path", required=True, help="the model's local directory")
    parser.add_argument("--threads", type=int, required=True, help="torch.set_num_threads")
    parser.add_argument("--dsn", help="postgresql://… of this system's own fresh database")
    parser.add_argument(
        "--batch-sizes", default="32", help="comma-separated (bench.peer_encode only)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="bench.peer_encode only")
    parser.add_argument("--limit", type=int, default=0, help="first N texts only (0 = all)")
    return parser.parse_args(argv)


def offline(threads: int) -> None:
    """Before torch is imported: nothing may be downloaded, and every system gets the same
    number of intra-op threads (OpenMP and torch) and a single-threaded tokenizer."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def load(path: str, kind: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        corpus: dict[str, Any] = json.load(f)
    part: dict[str, Any] = corpus[kind]
    return part


def chunk_texts(part: dict[str, Any]) -> list[tuple[int, int, str]]:
    """(document, chunk index, text) for every chunk of the corpus, in document order."""
    return [
        (d, i, text) for d, doc in enumerate(part["docs"]) for i, text in enumerate(doc["chunks"])
    ]


def count_rows(dsn: str, table: str) -> int:
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()
    return int(row[0]) if row else 0


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def rss_mib() -> float:
    """This process's resident memory (Linux /proc, no psutil needed)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def emit(result: dict[str, Any]) -> None:
    result.setdefault("rss_mib", round(rss_mib(), 1))
    result.setdefault("python", sys.executable)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
