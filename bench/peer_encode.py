"""The ceiling: the model's own ``SentenceTransformer.encode`` over every chunk of the corpus,
nothing else (no database, no queue). Run by ``bench.peers`` once per batch size given.

``python -m bench.peer_encode --corpus C --kind uploads --model-path M --threads 2
--batch-sizes 32,64 [--repeats 2]``: with repeats, the sizes run in turn forwards, then
backwards, …, and the fastest time of each counts (a neighbour's burst then hits one
repeat of a size, not every size after it).
"""

from __future__ import annotations

from collections.abc import Sequence

from bench._peer import Timer, arguments, chunk_texts, emit, load, offline


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(__doc__ or "", argv)
    offline(args.threads)
    from sentence_transformers import SentenceTransformer

    texts = [t for _, _, t in chunk_texts(load(args.corpus, args.kind))]
    if args.limit:
        texts = texts[: args.limit]
    model = SentenceTransformer(args.model_path, device="cpu")
    model.encode(texts[:32], normalize_embeddings=True, show_progress_bar=False)  # warm-up
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    runs: dict[str, list[float]] = {str(b): [] for b in sizes}
    for repeat in range(args.repeats):
        for batch_size in sizes if repeat % 2 == 0 else reversed(sizes):
            with Timer() as t:
                model.encode(
                    texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
                )
            runs[str(batch_size)].append(t.seconds)
    emit(
        {
            "texts": len(texts),
            "seconds_by_batch_size": {b: min(s) for b, s in runs.items()},
            "runs": runs,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
