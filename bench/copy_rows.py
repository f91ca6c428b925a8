"""Binary ``COPY`` against ``executemany`` for N 384-d vectors, into one table shaped like
``embedding`` and with no vector index, in one transaction each:

- ``copy``: ``COPY … FROM STDIN (FORMAT BINARY)`` with pgvector's binary adapter (what the
  worker does);
- ``executemany``: one ``INSERT`` per row through psycopg 3's ``executemany`` (pipelined: one
  round trip per batch, not per row) with the same adapters: the fair comparison;
- ``executemany_text``: the same with each vector sent as its text literal
  (``'[0.1, …]'::vector``), as LangChain's store does.

The three alternate, twice, in the same database; the best of each counts.

``python -m bench.copy_rows [--vectors 100000]`` on the configured server.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

DIMENSIONS = 384
TABLE = "copy_bench"
COLUMNS = "(item_id, chunk_index, content, embedding)"


def vectors(n: int, seed: int = 3) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, DIMENSIONS), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def _rows(v: NDArray[np.float32]) -> list[tuple[int, int, str, NDArray[np.float32]]]:
    return [(i // 8, i % 8, f"chunk {i} of a document", v[i]) for i in range(len(v))]


def _copy(conn: Any, rows: list[tuple[int, int, str, NDArray[np.float32]]]) -> None:
    with conn.cursor() as cur, cur.copy(f"COPY {TABLE} {COLUMNS} FROM STDIN (FORMAT BINARY)") as cp:
        cp.set_types(["int8", "int4", "text", "vector"])
        for row in rows:
            cp.write_row(row)


def _executemany(conn: Any, rows: list[tuple[int, int, str, NDArray[np.float32]]]) -> None:
    with conn.cursor() as cur:
        cur.executemany(f"INSERT INTO {TABLE} {COLUMNS} VALUES (%s, %s, %s, %s)", rows)


def _executemany_text(conn: Any, rows: list[tuple[int, int, str, NDArray[np.float32]]]) -> None:
    literal_rows = [(a, b, c, str(v.tolist())) for a, b, c, v in rows]
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {TABLE} {COLUMNS} VALUES (%s, %s, %s, %s::vector)", literal_rows
        )


WRITERS = {"copy": _copy, "executemany": _executemany, "executemany_text": _executemany_text}


def measure(dsn: str, n: int, rounds: int = 2) -> dict[str, Any]:
    """Seconds per method and round, and the row count each left in the table."""
    import psycopg
    from pgvector.psycopg import register_vector

    rows = _rows(vectors(n))
    seconds: dict[str, list[float]] = {name: [] for name in WRITERS}
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(
            f"CREATE TABLE {TABLE} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            f" item_id bigint NOT NULL, chunk_index int NOT NULL, content text NOT NULL,"
            f" embedding vector({DIMENSIONS}) NOT NULL)"
        )
        conn.commit()
        register_vector(conn)
        for _ in range(rounds):
            for name, write in WRITERS.items():
                conn.execute(f"TRUNCATE {TABLE}")
                conn.commit()
                start = time.perf_counter()
                write(conn, rows)
                conn.commit()
                seconds[name].append(time.perf_counter() - start)
                row = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
                if row is None or row[0] != n:
                    raise RuntimeError(f"{name} left {row} rows in {TABLE}, expected {n}")
        conn.execute(f"DROP TABLE {TABLE}")
        conn.commit()
    best = {k: min(v) for k, v in seconds.items()}
    return {
        "vectors": n,
        "seconds": seconds,
        "best_s": best,
        "ratio": best["executemany"] / best["copy"],
        "ratio_text": best["executemany_text"] / best["copy"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.copy_rows", description=__doc__)
    parser.add_argument("--vectors", type=int, default=100_000)
    args = parser.parse_args(argv)
    from bench._db import drop_plain_database, fresh_plain_database

    dsn = fresh_plain_database("bench_copy")
    try:
        result = measure(dsn, args.vectors)
    finally:
        drop_plain_database("bench_copy")
    best = result["best_s"]
    print(
        f"{args.vectors:,} vectors: COPY {best['copy']:.2f}s, executemany "
        f"{best['executemany']:.2f}s: COPY {result['ratio']:.1f}x faster (target >= 5x); "
        f"executemany with text literals {best['executemany_text']:.2f}s "
        f"({result['ratio_text']:.1f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
