"""A deterministic stand-in for the embedding model, for unit tests and dry runs.

It needs no torch and no model files, loads in no time, and gives the same vector for the
same text in every process (``hashlib``, not ``hash()``, which is salted per process).
Texts that share words get similar vectors, which is enough for tests of ranking code.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

# A token is a run of word characters or a single other non-space character, so that counts
# behave like a real tokenizer's (punctuation is a token of its own).
_TOKEN = re.compile(r"\w+|[^\w\s]")


class HashEmbedder:
    """Satisfies ``worker.ingest.types.Embedder`` with hashed bag-of-words vectors."""

    def __init__(self, dimensions: int = 384, *, max_tokens: int = 254, name: str = "") -> None:
        if dimensions < 2:
            raise ValueError("dimensions must be at least 2")
        self.dimensions = dimensions
        self.max_tokens = max_tokens
        self.name = name or f"hash-{dimensions}"
        self.encoded_texts = 0  # how many texts encode() has seen, for tests of caching

    def count_tokens(self, text: str) -> int:
        return sum(1 for _ in _TOKEN.finditer(text))

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in _TOKEN.finditer(text)]

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row] = self._vector(text)
        self.encoded_texts += len(texts)
        return out

    def _vector(self, text: str) -> NDArray[np.float32]:
        vec = np.zeros(self.dimensions, dtype=np.float32)
        words = [m.group().lower() for m in _TOKEN.finditer(text)] or [text]
        for word in words:
            index, sign = self._bucket(word)
            vec[index] += sign
        norm = float(np.linalg.norm(vec))
        if norm == 0.0:  # words cancelled out: fall back to the whole text's bucket
            index, sign = self._bucket(text)
            vec[index] = sign
            norm = 1.0
        return vec / norm

    def _bucket(self, word: str) -> tuple[int, float]:
        # Signed hashing keeps unrelated words from all adding up in the same direction.
        digest = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        return value % self.dimensions, (1.0 if value >> 63 else -1.0)
