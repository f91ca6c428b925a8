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
import threading
from collections.abc import Sequence
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

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """Unit vectors (float32), one row per text, in input order."""
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        if not texts:
            return out
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
        norms = np.linalg.norm(out, axis=1)
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
