"""LangChain: ``langchain-postgres``'s ``PGVectorStore`` (the store its docs recommend) with
``langchain-huggingface``'s ``HuggingFaceEmbeddings`` over the same local model directory,
adding exactly the chunks our pipeline produced, in one ``add_texts`` call (its best case:
the whole corpus embedded in the library's default batches, then one INSERT per row).

``python -m bench.peer_langchain --corpus C --kind uploads --model-path M --threads 2 --dsn D``
"""

from __future__ import annotations

from collections.abc import Sequence

from bench._peer import DIMENSIONS, Timer, arguments, chunk_texts, count_rows, emit, load, offline

TABLE = "langchain_embedding"


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(__doc__ or "", argv)
    offline(args.threads)
    from langchain_huggingface import HuggingFaceEmbeddings
    from langchain_postgres import PGEngine, PGVectorStore

    chunks = chunk_texts(load(args.corpus, args.kind))
    texts = [text for _, _, text in chunks]
    metadatas = [{"doc": d, "chunk_index": i} for d, i, _ in chunks]
    embeddings = HuggingFaceEmbeddings(
        model_name=args.model_path,
        model_kwargs={"device": "cpu"},
        encode_kwargs={"normalize_embeddings": True},
    )
    embeddings.embed_documents(["warm up"] * 8)
    engine = PGEngine.from_connection_string(
        url=args.dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    )
    engine.init_vectorstore_table(table_name=TABLE, vector_size=DIMENSIONS)
    store = PGVectorStore.create_sync(engine=engine, embedding_service=embeddings, table_name=TABLE)
    with Timer() as t:
        store.add_texts(texts, metadatas=metadatas)
    emit({"seconds": t.seconds, "rows": count_rows(args.dsn, TABLE), "texts": len(texts)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
