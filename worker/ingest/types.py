"""Small typed values passed between the stages of the upload pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True, slots=True)
class Source:
    """Bytes read from the upload root, with what the sniffing found."""

    path: str
    data: bytes
    mime_type: str  # sniffed from content, e.g. "application/pdf", "text/plain"
    sha256: str


@dataclass(frozen=True, slots=True)
class Document:
    """Extracted text of one file. ``text`` is what gets chunked; ``title`` may be empty."""

    text: str
    title: str = ""
    mime_type: str = "text/plain"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a document that fits the model. ``start``/``end`` are character offsets
    into ``Document.text`` so that coverage can be checked (chunks may overlap)."""

    index: int
    text: str
    start: int
    end: int
    token_count: int


@dataclass(frozen=True, slots=True)
class AnalysisResult:
    summary: str
    keywords: list[str]
    category: str | None
    language: str | None
    word_count: int
    provider: str
    model: str
    raw_response: dict[str, Any] = field(default_factory=dict)
    title: str = ""


@dataclass(frozen=True, slots=True)
class EmbeddedChunk:
    """A vector ready to store. ``chunk_index`` is -1 for the title+summary vector."""

    chunk_index: int
    content: str
    vector: Sequence[float] | NDArray[np.float32]  # a row of the encoder's array is kept as is
    source: dict[str, Any]


class Embedder(Protocol):
    """What the pipeline needs of an embedding model. The real one wraps sentence-transformers
    (``worker.ingest.embed``); unit tests pass a deterministic fake."""

    name: str
    dimensions: int
    max_tokens: int  # the model's maximum sequence length, in its own tokens

    def count_tokens(self, text: str) -> int:
        """Tokens the model would see for ``text``, without special tokens."""
        ...

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character (start, end) of each token of ``text``, without special tokens."""
        ...

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """Unit-normalised vectors, one row per text, in the order given."""
        ...
