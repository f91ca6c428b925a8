"""The ceiling every end-to-end figure is divided by: the model's own encode on the same texts,
in one process with every core of the machine."""

from __future__ import annotations

import os
import time
from typing import Any


def encode_seconds(embedder: Any, texts: list[str]) -> float:
    """The faster of ``SentenceTransformer.encode`` (its default batch of 32, sorted by
    length) and our embedder's token-budget batches, with torch on every core (the worker's
    processes each get a share; the ceiling is the whole machine). Load and warm-up are not
    timed."""
    import torch

    embedder.encode(texts[:32])
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    embedder.model.encode(texts, normalize_embeddings=True)
    raw = time.perf_counter() - start
    start = time.perf_counter()
    embedder.encode(texts)
    return min(raw, time.perf_counter() - start)
