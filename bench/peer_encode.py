"""The ceiling: the model's own ``SentenceTransformer.encode`` over every chunk of the corpus,
nothing else (no database, no queue). Run by ``bench.peers`` once per batch size given.

``python -m bench.peer_encode --corpus C --kind uploads --model-path M --threads 2
--batch-sizes 32,64``
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
    seconds: dict[str, float] = {}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        with Timer() as t:
            model.encode(
                texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
            )
        seconds[str(batch_size)] = t.seconds
    emit({"texts": len(texts), "seconds_by_batch_size": seconds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
