"""The model's own tokenizer, read from ``tokenizer.json`` in its directory with the
``tokenizers`` package (no torch), shared by every embedder: chunking counts tokens exactly
as the model will."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.lru import LRU

# Chunking counts the tokens of every chunk it makes (to verify it), and encoding those chunks
# moments later needs the same counts to sort and cut its batches: the counts of the texts
# last counted are kept (least recently used out first), so that a chunk is tokenised for
# counting once, not twice. Only texts up to a chunk's size are kept (a chunk holds at most
# 16 characters per token, see ``worker.ingest.chunk``): the memo stays under ~8 MB of text.
COUNT_MEMO_TEXTS = 2048
COUNT_MEMO_MAX_CHARS = 4096


class ModelTokenizer:
    """Mixin for an embedder with a ``model_path`` holding ``tokenizer.json``."""

    model_path: str
    _tokenizer: Any = None
    _counts: LRU[str, int] | None = None

    @property
    def tokenizer(self) -> Any:
        """The fast tokenizer, with the truncation/padding of tokenizer.json switched off
        (the file may ask for 128 tokens: chunking needs the true length of every text)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(Path(self.model_path) / "tokenizer.json"))
            tok.no_truncation()
            tok.no_padding()
            self._tokenizer = tok
        return self._tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        offsets: list[tuple[int, int]] = self.tokenizer.encode(
            text, add_special_tokens=False
        ).offsets
        return offsets

    def count_tokens_batch(self, texts: Sequence[str]) -> list[int]:
        """``count_tokens`` for many texts in one call; the Rust side uses every core."""
        if self._counts is None:
            self._counts = LRU(COUNT_MEMO_TEXTS)
        counts = self._counts.get_many(texts)
        missing = [t for t, n in zip(texts, counts, strict=True) if n is None]
        if not missing:
            return [n for n in counts if n is not None]
        encodings = self.tokenizer.encode_batch(missing, add_special_tokens=False)
        fresh = {t: len(e.ids) for t, e in zip(missing, encodings, strict=True)}
        self._counts.put_many((t, n) for t, n in fresh.items() if len(t) <= COUNT_MEMO_MAX_CHARS)
        return [fresh[t] if n is None else n for t, n in zip(texts, counts, strict=True)]

    def token_offsets_batch(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [e.offsets for e in encodings]
