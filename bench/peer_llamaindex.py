"""LlamaIndex: an ``IngestionPipeline`` (``SentenceSplitter`` → ``HuggingFaceEmbedding``) into
``llama-index-vector-stores-postgres``'s ``PGVectorStore``, over the same documents (the
text our parser extracted) and the same local model directory. The splitter is configured
like ours: chunks of at most 254 tokens of the model's own tokenizer, 32 tokens of overlap,
no metadata counted into the chunk.

``python -m bench.peer_llamaindex --corpus C --kind uploads --model-path M --threads 2 --dsn D``
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from bench._peer import DIMENSIONS, Timer, arguments, count_rows, emit, load, offline

TABLE = "embedding"  # PGVectorStore prefixes it: data_embedding
CHUNK_TOKENS = 254
OVERLAP_TOKENS = 32


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(__doc__ or "", argv)
    offline(args.threads)
    from llama_index.core import Document
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from llama_index.vector_stores.postgres import PGVectorStore
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(args.model_path) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()

    def count_tokens(text: str) -> list[int]:
        ids: list[int] = tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    documents = [
        Document(
            text=doc["text"],
            metadata={"doc": d},
            excluded_embed_metadata_keys=["doc"],
            excluded_llm_metadata_keys=["doc"],
        )
        for d, doc in enumerate(load(args.corpus, args.kind)["docs"])
    ]
    splitter = SentenceSplitter(
        chunk_size=CHUNK_TOKENS, chunk_overlap=OVERLAP_TOKENS, tokenizer=count_tokens
    )
    embed = HuggingFaceEmbedding(model_name=args.model_path, device="cpu")
    embed.get_text_embedding_batch(["warm up"] * 8)
    url = urlsplit(args.dsn)
    store = PGVectorStore.from_params(
        host=url.hostname,
        port=str(url.port or 5432),
        database=url.path.lstrip("/"),
        user=url.username or "postgres",
        password=url.password or "",
        table_name=TABLE,
        embed_dim=DIMENSIONS,
    )
    pipeline = IngestionPipeline(transformations=[splitter, embed], vector_store=store)
    with Timer() as t:
        nodes = pipeline.run(documents=documents)
    emit(
        {
            "seconds": t.seconds,
            "rows": count_rows(args.dsn, f"data_{TABLE}"),
            "texts": len(nodes),
            "embed_batch_size": embed.embed_batch_size,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
