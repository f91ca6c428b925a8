"""The model's own tokenizer, read from ``tokenizer.json`` in its directory with the
``tokenizers`` package (no torch), shared by every embedder: chunking counts tokens exactly
as the model will."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ModelTokenizer:
    """Mixin for an embedder with a ``model_path`` holding ``tokenizer.json``."""

    model_path: str
    _tokenizer: Any = None

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
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encodings]

    def token_offsets_batch(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [e.offsets for e in encodings]
