"""Identical texts embedded once per batch: ``python -m bench.dedupe [--texts 1500]``.

Our embedder is given the same bookmark texts once, then each of them three times over
(shuffled, as the same title recurs across an export); it counts the texts that reach the
model and times both calls. Target (issue 10): the repeats reach the model once, so the
second call costs about what the first does.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence
from typing import Any

REPEATS = 3


def measure(texts: Sequence[str], repeats: int = REPEATS) -> dict[str, Any]:
    from worker.runtime import default_embedder

    embedder = default_embedder()
    model = embedder.model  # type: ignore[attr-defined]
    reached = 0
    encode = model.encode

    def counting(sentences: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        nonlocal reached
        reached += len(sentences)
        return encode(sentences, *args, **kwargs)

    model.encode = counting
    try:
        embedder.encode(list(texts[:8]))  # warm
        reached = 0
        start = time.perf_counter()
        once = embedder.encode(list(texts))
        once_s = time.perf_counter() - start
        once_reached = reached
        repeated = [t for t in texts for _ in range(repeats)]
        random.Random(7).shuffle(repeated)
        reached = 0
        start = time.perf_counter()
        again = embedder.encode(repeated)
        repeated_s = time.perf_counter() - start
        repeated_reached = reached
    finally:
        del model.encode  # the class's own method again
    index = {t: i for i, t in enumerate(texts)}
    same = all(float(again[k] @ once[index[t]]) > 0.9999 for k, t in enumerate(repeated[:200]))
    return {
        "texts": len(texts),
        "repeats": repeats,
        "once_s": once_s,
        "repeated_s": repeated_s,
        "once_reached": once_reached,
        "repeated_reached": repeated_reached,
        "same_vectors": same,
    }


def describe(result: dict[str, Any]) -> str:
    n, k = result["texts"], result["repeats"]
    return (
        f"{n:,} texts: {result['once_reached']:,} reached the model in {result['once_s']:.2f}s; "
        f"the same texts {k} times each ({n * k:,}): {result['repeated_reached']:,} reached it, "
        f"in {result['repeated_s']:.2f}s ({result['repeated_s'] / result['once_s']:.2f}x); "
        f"vectors {'the same' if result['same_vectors'] else 'DIFFERENT'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dedupe", description=__doc__)
    parser.add_argument("--texts", type=int, default=1500)
    args = parser.parse_args(argv)
    from bench.import_bookmarks import bookmark_texts, generate_export

    texts = bookmark_texts(generate_export(args.texts, seed=17))
    print(describe(measure(texts)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
