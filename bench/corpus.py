"""The one corpus every system of ``bench.peers`` gets, written once per run:

- uploads: the generated files of ``bench.ingest_uploads`` (txt, md, html, docx, pdf, json,
  csv; short notes to reports), each parsed and chunked by our pipeline's own functions with
  the configured chunk size and overlap;
- bookmarks: the texts our importer embeds for a generated Netscape export
  (``bench.import_bookmarks``): title, tags, folder, domain and the words of the URL path.

Saved as ``corpus.json``: ``{kind: {"docs": [{"name", "text", "chunks": [...]}]}}``; a
bookmark is a document with one chunk, its text.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.import_bookmarks import generate_export
from bench.ingest_uploads import write_corpus


@dataclass
class Corpus:
    upload_root: Path
    upload_paths: list[Path]
    export_path: Path
    path: Path  # corpus.json
    data: dict[str, Any]

    def chunk_count(self, kind: str) -> int:
        return sum(len(doc["chunks"]) for doc in self.data[kind]["docs"])

    def token_count(self, kind: str) -> int:
        return int(self.data[kind]["tokens"])


def build(workdir: Path, *, docs: int, bookmarks: int) -> Corpus:
    from worker.bookmarks.importer import bookmark_text, read_export
    from worker.config import get_settings
    from worker.ingest.chunk import chunk_document
    from worker.ingest.parse import parse
    from worker.ingest.sources import load_source
    from worker.runtime import default_embedder

    settings = get_settings()
    embedder = default_embedder()  # only its tokenizer is used here: no torch
    root = workdir / "uploads"
    root.mkdir(parents=True, exist_ok=True)
    paths = write_corpus(root, docs)
    upload_docs = []
    for path in paths:
        doc = parse(load_source(path, upload_root=root, max_bytes=settings.max_upload_bytes))
        chunks = chunk_document(
            doc,
            embedder,
            max_tokens=settings.chunk_max_tokens,
            overlap_tokens=settings.chunk_overlap_tokens,
        )
        upload_docs.append(
            {"name": path.name, "text": doc.text, "chunks": [c.text for c in chunks]}
        )

    export = generate_export(bookmarks, seed=11)
    export_path = root / "bookmarks.html"
    export_path.write_bytes(export)
    parsed = read_export(io.BytesIO(export))
    bookmark_docs = []
    for b in parsed.bookmarks.values():
        text = bookmark_text(b.title, b.description, b.tags, b.folder_path, b.domain, b.url)
        bookmark_docs.append({"name": b.url, "text": text, "chunks": [text]})

    data: dict[str, Any] = {"uploads": {"docs": upload_docs}, "bookmarks": {"docs": bookmark_docs}}
    for part in data.values():
        texts = [t for doc in part["docs"] for t in doc["chunks"]]
        part["tokens"] = sum(embedder.count_tokens(t) for t in texts)
    corpus_path = workdir / "corpus.json"
    corpus_path.write_text(json.dumps(data), encoding="utf-8")
    return Corpus(root, paths, export_path, corpus_path, data)
