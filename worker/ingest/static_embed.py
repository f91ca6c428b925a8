"""Texts to vectors with a model2vec static model (a token-embedding table, no transformer).

A static model is a directory with ``config.json`` (``"model_type": "model2vec"``),
``model.safetensors`` and ``tokenizer.json``. It loads offline in a fraction of a second and
needs only numpy, safetensors and tokenizers (no torch), and encodes short texts tens of
thousands a second on two cores: a cheap second model, or a fast first pass.

``model_kind`` tells a static directory from a sentence-transformers one by its files, so
the caller (``worker.runtime``) can pick the loader without guessing from a name.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from worker.ingest.tokens import ModelTokenizer

ModelKind = Literal["static", "sentence-transformers"]
# model2vec's own default truncation for ``encode`` when config.json does not name one.
DEFAULT_MAX_LENGTH = 512
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_kind(model_dir: str | Path) -> ModelKind:
    """Which loader reads ``model_dir``. Raises ValueError with what is wrong: a missing
    directory, or one without the files of either kind of model."""
    path = Path(model_dir)
    if not path.exists():
        raise ValueError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    config = _read_json(path / "config.json")
    if config.get("model_type") == "model2vec":
        missing = [f for f in ("model.safetensors", "tokenizer.json") if not (path / f).is_file()]
        if missing:
            raise ValueError(f"{path}: model2vec model without {', '.join(missing)}")
        return "static"
    if (path / "modules.json").is_file() and (path / "sentence_bert_config.json").is_file():
        # Weights sit at the top for the usual Transformer-first layout.
        if not any((path / f).is_file() for f in _WEIGHT_FILES):
            raise ValueError(f"{path}: sentence-transformers config but no model weights")
        return "sentence-transformers"
    raise ValueError(
        f"{path} holds no model files: expected a model2vec static model (config.json with "
        "model_type 'model2vec', model.safetensors, tokenizer.json) or a sentence-transformers "
        "model (modules.json, sentence_bert_config.json, weights)"
    )


class StaticModelEmbedder(ModelTokenizer):
    """``Embedder`` over a model2vec static model directory (read offline).

    The model2vec package imports on first ``encode`` only, like torch for the transformer
    embedder: the chunker needs just the tokenizer."""

    def __init__(self, model_path: str, *, name: str, batch_size: int = 1024) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if model_kind(model_path) != "static":
            raise ValueError(f"{model_path} is not a model2vec static model")
        self.model_path = model_path
        self.name = name
        self.batch_size = batch_size
        self._model: Any = None
        self._table32: NDArray[np.float32] | None = None
        self._word_ids: dict[str, tuple[int, ...]] = {_TEXT_SEPARATOR: (-1,)}
        self._words_lock = threading.Lock()
        self._bert: bool | None = None
        self._added_re: re.Pattern[str] | None = None
        self._lock = threading.Lock()
        config = _read_json(Path(model_path) / "config.json")
        # A static model has no position limit; model2vec still truncates at max_length
        # (512 unless the config says otherwise), so chunks are held to the same bound.
        self.max_tokens = int(config.get("max_length") or DEFAULT_MAX_LENGTH)
        dims = config.get("hidden_dim")
        self.dimensions = int(dims) if dims else int(self.model.dim)

    # --- model -----------------------------------------------------------------------------

    @property
    def model(self) -> Any:
        """The ``model2vec.StaticModel``, loaded once (thread-safe)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    from model2vec import StaticModel

                    # A local directory: from_pretrained reads it and never reaches a hub
                    # (model_kind has checked that it exists).
                    self._model = StaticModel.from_pretrained(self.model_path, normalize=True)
        return self._model

    def load(self) -> None:
        _ = self.model

    @property
    def _table(self) -> NDArray[np.float32] | None:
        """The token-embedding table in float32, for models that are a plain table (no
        token remapping, no per-token weights); None for the others."""
        if self._table32 is None:
            model = self.model
            if model.token_mapping is None and model.weights is None:
                self._table32 = np.asarray(model.embedding, dtype=np.float32)
            else:
                self._table32 = np.empty((0, 0), dtype=np.float32)
        return self._table32 if self._table32.size else None

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """Unit vectors (float32), one row per text, in input order."""
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        if not texts:
            return out
        table = self._table
        if table is not None:
            for start in range(0, len(texts), self.batch_size):
                batch = texts[start : start + self.batch_size]
                out[start : start + len(batch)] = self._token_sums(batch, table)
        else:
            vectors = self.model.encode(
                list(texts),
                max_length=self.max_tokens,
                batch_size=self.batch_size,
                normalize=False,
                show_progress_bar=False,
                # A Celery prefork child is daemonic and may not start worker processes.
                use_multiprocessing=False,
            )
            out[:] = np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dimensions)
        norms = np.sqrt(np.einsum("ij,ij->i", out, out))  # np.linalg.norm: 20x slower here
        empty = norms == 0
        # A text made only of unknown tokens averages to zero, and pgvector's cosine distance
        # to a zero vector is NaN (it also stays out of cosine indexes). Such a text carries
        # no signal, so any fixed unit vector is as good as another: the uniform one.
        out[empty] = 1.0 / np.sqrt(self.dimensions)
        norms[empty] = 1.0
        # Normalised here in float32: the stored table is float16, so model2vec's own
        # normalisation is only good to about 1e-3.
        out /= norms[:, None]
        return out

    def _token_sums(self, texts: Sequence[str], table: NDArray[np.float32]) -> NDArray[np.float32]:
        """Each text's token vectors summed (the mean's direction, which is all a unit
        vector keeps), as one sparse (texts x vocabulary) product with the table.

        The same tokens as ``StaticModel.encode``: the same character cut, truncation (unknown
        tokens count towards it, then are dropped), so the same vectors to about 1e-6.
        model2vec groups texts by token count and averages a gathered (texts, tokens, dim)
        array per group, and gathers in float16: 1.8x slower over 100,000 bookmark texts;
        the tokenizer is most of what is left."""
        cut = self.max_tokens * self.model.median_token_length
        texts = [t[:cut] for t in texts]
        out = np.zeros((len(texts), table.shape[1]), dtype=np.float32)
        plain = [i for i, t in enumerate(texts) if self._splittable(t)]
        plain_set = set(plain)
        others = [i for i in range(len(texts)) if i not in plain_set]
        if plain:
            out[plain] = _sums(*self._kept(*self._word_pieces([texts[i] for i in plain])), table)
        if others:
            encodings = self.model.tokenizer.encode_batch_fast(
                [texts[i] for i in others], add_special_tokens=False
            )
            ids = [e.ids for e in encodings]
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
            out[others] = _sums(*self._kept(flat, lengths), table)
        return out

    def _kept(
        self, flat: NDArray[np.int64], lengths: NDArray[np.int64]
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Each text's first ``max_tokens`` ids, then without the unknown token (model2vec
        truncates in the tokenizer and drops unknowns afterwards)."""
        limit = self.max_tokens
        if lengths.size and lengths.max() > limit:
            starts = np.cumsum(lengths) - lengths
            position = np.arange(flat.size) - np.repeat(starts, lengths)
            flat = flat[position < limit]
            lengths = np.minimum(lengths, limit)
        unknown = self.model.unk_token_id
        if unknown is not None:
            known = flat != unknown
            if not known.all():
                owner = np.repeat(np.arange(lengths.size), lengths)
                lengths = np.bincount(owner[known], minlength=lengths.size).astype(np.int64)
                flat = flat[known]
        return flat, lengths

    def _splittable(self, text: str) -> bool:
        """Whether ``_word_pieces`` gives exactly what the tokenizer would for ``text``."""
        return (
            self._bert_words
            and _PLAIN_ASCII.fullmatch(text) is not None
            and (self._added_re is None or self._added_re.search(text) is None)
        )

    def _word_pieces(self, texts: Sequence[str]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """The token ids of printable-ASCII texts (flat, unknown tokens included, not
        truncated) and each text's count, with the words split here and each distinct word
        cut into pieces by the tokenizer once.

        A BERT tokenizer (BertNormalizer + BertPreTokenizer + WordPiece, as models distilled
        from all-MiniLM-L6-v2 have) lowercases ASCII, splits it at whitespace, makes each
        punctuation character a word, and cuts every word into pieces on its own. Bookmark
        texts repeat their words (tags, domains, folder names), so looking a word's pieces
        up costs far less than normalising and cutting it again: the tokenizer took 5.5
        CPU-seconds for 100,000 bookmark texts, most of a first pass. The texts are split as
        one string with a separator word, so that the per-word work stays in C."""
        words = _ASCII_WORDS.findall(_TEXT_SEPARATOR.join(texts).lower())
        # The cache is the process's, and searches may encode queries from other threads.
        with self._words_lock:
            cache = self._word_ids
            new = list(set(words) - cache.keys())
            if len(cache) + len(new) > _WORD_CACHE_MAX:
                cache.clear()
                cache[_TEXT_SEPARATOR] = (-1,)
                new = list(set(words) - cache.keys())
            if new:
                pieces = self.model.tokenizer.encode_batch_fast(new, add_special_tokens=False)
                cache.update(zip(new, (tuple(p.ids) for p in pieces), strict=True))
            marked = np.fromiter(chain.from_iterable(map(cache.__getitem__, words)), dtype=np.int64)
        # A -1 between texts; text k ends at the k-th of them (the last at the end).
        marks = np.append(np.flatnonzero(marked == -1), marked.size)
        lengths = np.diff(marks, prepend=-1) - 1
        return marked[marked != -1], lengths

    @property
    def _bert_words(self) -> bool:
        """Whether the tokenizer is the BERT kind that ``_word_pieces`` can split for."""
        if self._bert is None:
            config = json.loads(self.model.tokenizer.to_str())
            normalizer = config.get("normalizer") or {}
            self._bert = (
                normalizer.get("type") == "BertNormalizer"
                and normalizer.get("lowercase") is True
                and (config.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
                and (config.get("model") or {}).get("type") == "WordPiece"
            )
            # Added tokens ([PAD], [UNK], ...) are matched in the raw text before anything
            # else: a text holding one takes the slow path.
            added = [
                str(t["content"]) for t in config.get("added_tokens") or [] if t.get("content")
            ]
            self._added_re = (
                re.compile("|".join(map(re.escape, added)), re.IGNORECASE) if added else None
            )
        return self._bert


# Printable ASCII with tab and line breaks only: other control characters are deleted by
# BertNormalizer (which would join the words around them), so such texts take the slow path.
_PLAIN_ASCII = re.compile(r"[\t\n\r -~]*")
# BertPreTokenizer on lowercased ASCII: runs of letters and digits, and each punctuation
# character (every printable non-alphanumeric ASCII character counts as punctuation); and the
# separator put between texts (a control character, so never inside a splittable text).
_TEXT_SEPARATOR = "\x1e"
_ASCII_WORDS = re.compile(r"[a-z0-9]+|[!-/:-@\[-`{-~]|\x1e")
# Distinct words remembered per process (their pieces are a few ints each).
_WORD_CACHE_MAX = 500_000


def _sums(
    flat: NDArray[np.int64], lengths: NDArray[np.int64], table: NDArray[np.float32]
) -> NDArray[np.float32]:
    """Per text, the sum of the table's rows for its ids: (texts x vocabulary) counts as a
    sparse matrix times the table."""
    import scipy.sparse

    indptr = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    counts = scipy.sparse.csr_matrix(
        (np.ones(flat.size, dtype=np.float32), flat, indptr), shape=(lengths.size, table.shape[0])
    )
    return np.asarray(counts @ table, dtype=np.float32)


def distil(source_dir: str | Path, target: str | Path, *, dimensions: int = 256) -> Path:
    """Distil a static model from a sentence-transformers model's files, offline (model2vec's
    ``distill``: each vocabulary token through the transformer once, then PCA), into
    ``target``. Written whole or not at all: it goes to a sibling directory renamed at the
    end. About 20 s on two idle cores for all-MiniLM-L6-v2.

    Needs model2vec's distillation dependency (``pip install 'ingestion-worker[distil]'``);
    never downloads anything."""
    import os

    try:
        from model2vec.distill import distill
    except ImportError as exc:
        raise RuntimeError(
            f"distilling needs model2vec's distill dependencies ({exc}): "
            "pip install 'ingestion-worker[distil]'"
        ) from exc
    target = Path(target)
    if target.exists():
        raise ValueError(f"{target} already exists")
    model = distill(model_name=str(source_dir), pca_dims=dimensions)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(str(partial))
    partial.rename(target)
    return target
