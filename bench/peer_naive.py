"""The floor: a naive pipeline. One document at a time: encode its chunks with the model,
one ``INSERT`` per vector, one commit per document. What a first script usually does.

``python -m bench.peer_naive --corpus C --kind bookmarks --model-path M --threads 2 --dsn D``
"""

from __future__ import annotations

from collections.abc import Sequence

from bench._peer import DIMENSIONS, Timer, arguments, count_rows, emit, load, offline

TABLE = "naive_embedding"


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(__doc__ or "", argv)
    offline(args.threads)
    import psycopg
    from pgvector.psycopg import register_vector
    from sentence_transformers import SentenceTransformer

    docs = load(args.corpus, args.kind)["docs"]
    model = SentenceTransformer(args.model_path, device="cpu")
    model.encode(["warm up"] * 8, normalize_embeddings=True, show_progress_bar=False)
    with psycopg.connect(args.dsn) as conn:
        conn.execute(
            f"CREATE TABLE {TABLE} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            f" doc int NOT NULL, chunk_index int NOT NULL, content text NOT NULL,"
            f" embedding vector({DIMENSIONS}) NOT NULL)"
        )
        conn.commit()
        register_vector(conn)
        with Timer() as t:
            for d, doc in enumerate(docs):
                vectors = model.encode(
                    doc["chunks"], normalize_embeddings=True, show_progress_bar=False
                )
                for i, (text, vector) in enumerate(zip(doc["chunks"], vectors, strict=True)):
                    conn.execute(
                        f"INSERT INTO {TABLE} (doc, chunk_index, content, embedding)"
                        " VALUES (%s, %s, %s, %s)",
                        (d, i, text, vector),
                    )
                conn.commit()
    emit({"seconds": t.seconds, "rows": count_rows(args.dsn, TABLE), "documents": len(docs)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
