"""The real model behind the Embedder protocol: shapes, normalisation, order, batching, and
that importing the module stays free of torch. The model is loaded once per test session
(``get_embedder`` caches it per process, so test_analyze shares it)."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from worker.ingest.chunk import chunk_document
from worker.ingest.embed import (
    SentenceTransformerEmbedder,
    batch_cost,
    build_embedded,
    default_model_path,
    filled_batches,
    get_embedder,
    title_summary_text,
    token_batches,
)
from worker.ingest.fake import HashEmbedder
from worker.ingest.types import Document, Embedder

ROOT = Path(__file__).resolve().parents[1]
MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def embedder() -> Iterator[SentenceTransformerEmbedder]:
    yield get_embedder(MODEL, threads=2)


def test_limits_are_known_without_loading_the_model() -> None:
    fresh = SentenceTransformerEmbedder(default_model_path(), name=MODEL)
    assert (fresh.dimensions, fresh.max_tokens, fresh.max_seq_length) == (384, 254, 256)
    assert fresh._model is None
    assert fresh.count_tokens("Hello, world!") == 4
    assert fresh.token_offsets("Hello, world!") == [(0, 5), (5, 6), (7, 12), (12, 13)]
    assert fresh._model is None


def test_importing_and_chunking_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from worker.ingest.embed import SentenceTransformerEmbedder, default_model_path\n"
        "from worker.ingest.chunk import chunk_document\n"
        "from worker.ingest.types import Document\n"
        "e = SentenceTransformerEmbedder(default_model_path(), name='m')\n"
        "assert chunk_document(Document('Some text. ' * 300), e)\n"
        "heavy = ('torch', 'sentence_transformers', 'transformers')\n"
        "bad = [m for m in heavy if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_embedder_is_cached_per_process(embedder: SentenceTransformerEmbedder) -> None:
    assert get_embedder(MODEL) is embedder
    assert get_embedder(MODEL, default_model_path()) is embedder


def test_encode_shapes_and_norms(embedder: SentenceTransformerEmbedder) -> None:
    vectors = embedder.encode(["a cat sat on the mat", "stock markets fell sharply"])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_empty_input_gives_an_empty_matrix(embedder: SentenceTransformerEmbedder) -> None:
    vectors = embedder.encode([])
    assert vectors.shape == (0, 384) and vectors.dtype == np.float32


def test_dedupe_and_length_sorting_keep_input_order(
    embedder: SentenceTransformerEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = [
        "short",
        "a somewhat longer sentence about the weather in spring",
        "x " * 300,  # past the model's limit: truncated the same way by both paths
        "medium length text about football",
        "",
    ]
    texts = [base[i] for i in (1, 0, 2, 1, 3, 0, 4, 2, 3)]
    # Small batches, so the sorted path really runs several batches of mixed lengths.
    monkeypatch.setattr(embedder, "batch_size", 2)
    monkeypatch.setattr(embedder, "max_batch_tokens", 300)
    ours = embedder.encode(texts)
    plain = embedder.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(ours, plain, atol=1e-5)
    np.testing.assert_array_equal(ours[0], ours[3])


def test_chunks_are_tokenised_for_counting_once(
    embedder: SentenceTransformerEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoding the chunks just made reuses the token counts the chunker verified them with;
    the counts stay exact (a text counted afresh gives the same), and the memo is bounded."""
    from worker.ingest import tokens

    text = "\n\n".join(
        f"Paragraph {i} says something about rivers and hills." * 9 for i in range(6)
    )
    chunks = chunk_document(Document(text=text), embedder, max_tokens=64)
    calls: list[int] = []
    real = embedder.tokenizer.encode_batch

    def spy(texts: list[str], **kwargs: object) -> object:
        calls.append(len(texts))
        return real(texts, **kwargs)

    monkeypatch.setattr(embedder, "_tokenizer", type("T", (), {"encode_batch": staticmethod(spy)}))
    embedder.encode([c.text for c in chunks])
    assert calls == []  # every chunk's count was known
    assert embedder.count_tokens_batch([c.text for c in chunks]) == [c.token_count for c in chunks]
    fresh = [f"an unseen text number {i}" for i in range(3)]
    assert embedder.count_tokens_batch(fresh) == [
        len(real([t], add_special_tokens=False)[0].ids) for t in fresh
    ]
    assert calls == [3]
    monkeypatch.setattr(tokens, "COUNT_MEMO_TEXTS", 2)
    monkeypatch.setattr(embedder, "_counts", None)  # made afresh, with the lower bound
    embedder.count_tokens_batch(["one", "two", "three", "x" * (tokens.COUNT_MEMO_MAX_CHARS + 1)])
    assert embedder._counts is not None and embedder._counts.keys() == ["two", "three"]


def test_token_batches_respect_both_bounds() -> None:
    lengths = [5, 256, 12, 200, 5, 40, 120, 30, 12, 5, 12, 5, 5]
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    for cut in (token_batches, filled_batches):
        batches = cut(order, lengths, 4, 300)
        assert [k for b in batches for k in b] == order
        assert all(_allowed(b, lengths, 4, 300) for b in batches)
        # A text longer than the token budget gets a batch of its own, however many there are.
        assert cut(range(3), [999] * 3, 4, 10) == [[0], [1], [2]]
        assert cut([], [], 4, 10) == []
    # Filled: each batch as long as the bounds allow.
    assert filled_batches(range(9), [256] * 8 + [2], 64, 2048) == [list(range(8)), [8]]


def test_a_short_last_chunk_is_not_padded_to_a_full_one() -> None:
    full = [256] * 7
    # Padding 130 tokens to 256 costs more than a forward pass of its own ...
    assert token_batches(range(8), [*full, 130], 64, 2048) == [list(range(7)), [7]]
    # ... padding 250 to 256 does not.
    assert token_batches(range(8), [*full, 250], 64, 2048) == [list(range(8))]


def test_the_device_chooses_how_batches_are_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU by least cost, on an accelerator filled (no model loaded, no GPU needed)."""
    lengths = [256] * 7 + [130]
    cpu = SentenceTransformerEmbedder(default_model_path(), name=MODEL, max_batch_tokens=2048)
    gpu = SentenceTransformerEmbedder(
        default_model_path(), name=MODEL, max_batch_tokens=2048, device="cuda"
    )
    assert cpu._batches(list(range(8)), lengths) == [list(range(7)), [7]]
    assert gpu._batches(list(range(8)), lengths) == [list(range(8))]
    assert gpu._model is None
    # encode cuts through _batches.
    cuts: list[list[list[int]]] = []
    real = cpu._batches

    def spy(order: list[int], lengths: list[int]) -> list[list[int]]:
        cuts.append(real(order, lengths))
        return cuts[-1]

    monkeypatch.setattr(cpu, "_batches", spy)
    monkeypatch.setattr(cpu, "_model", _ZeroModel())
    assert cpu.encode(["one", "two words", "three more words"]).shape == (3, 384)
    assert len(cuts) == 1 and sorted(k for b in cuts[0] for k in b) == [0, 1, 2]


class _ZeroModel:
    """Stands in for the SentenceTransformer: one zero vector per text."""

    def encode(self, texts: list[str], **_: object) -> NDArray[np.float32]:
        return np.zeros((len(texts), 384), dtype=np.float32)


def test_token_batches_cut_at_the_least_modelled_cost() -> None:
    """Against every split into runs, on small random inputs in any order: the batches are
    allowed, cover every text once, in order, and cost the least that any split can."""
    rng = random.Random(5)
    for _ in range(300):
        n = rng.randint(1, 9)
        lengths = [rng.choice([0, 3, 8, 40, 100, 180, 256]) for _ in range(n)]
        order = rng.sample(range(n), n)
        size, budget = rng.randint(1, 5), rng.choice([50, 256, 512, 1024])
        splits = [_runs(n, cuts) for cuts in itertools.product([False, True], repeat=n - 1)]
        best = min(
            _cost([[order[k] for k in run] for run in runs], lengths)
            for runs in splits
            if all(_allowed([order[k] for k in run], lengths, size, budget) for run in runs)
        )
        found = token_batches(order, lengths, size, budget)
        assert [k for b in found for k in b] == order
        assert all(_allowed(b, lengths, size, budget) for b in found)
        assert _cost(found, lengths) == pytest.approx(best)


def _allowed(batch: list[int], lengths: list[int], size: int, budget: int) -> bool:
    return len(batch) == 1 or (len(batch) <= size and _padded(batch, lengths) <= budget)


def _runs(n: int, cuts: tuple[bool, ...]) -> list[list[int]]:
    """0..n-1 cut into consecutive runs after each k where cuts[k-1]."""
    runs, run = [], [0]
    for k, cut in enumerate(cuts, start=1):
        if cut:
            runs.append(run)
            run = []
        run.append(k)
    return [*runs, run]


def _padded(run: list[int], lengths: list[int]) -> int:
    return len(run) * max(lengths[k] for k in run)


def _cost(runs: list[list[int]], lengths: list[int]) -> float:
    return sum(batch_cost(len(r), max(lengths[k] for k in r)) for r in runs)


def test_throughput_is_reported(embedder: SentenceTransformerEmbedder) -> None:
    """Not a benchmark (bench/ is): prints texts/s for chunk-sized and short texts."""
    sentences = [f"Item {i} in the report says revenue grew in region {i % 7}." for i in range(64)]
    chunks = [" ".join(sentences[i : i + 16]) for i in range(16)]  # ~230 tokens each
    for label, texts in (("chunks", chunks), ("sentences", sentences)):
        started = time.perf_counter()
        embedder.encode(texts)
        rate = len(texts) / (time.perf_counter() - started)
        print(f"encode {label}: {rate:.1f} texts/s")


def check_rows(embedder: Embedder) -> None:
    doc = Document("First paragraph about rivers.\n\nSecond paragraph about mountains.")
    chunks = chunk_document(doc, embedder, max_tokens=6, overlap_tokens=0)
    extra = title_summary_text("Nature", "Rivers and mountains.")
    vectors = embedder.encode([c.text for c in chunks])
    rows = build_embedded(chunks, vectors, extra, embedder.encode([extra])[0])
    assert [r.chunk_index for r in rows] == [*range(len(chunks)), -1]
    assert rows[0].source == {"kind": "chunk", "start": chunks[0].start, "end": chunks[0].end}
    assert rows[-1].source == {"kind": "title_summary"}
    assert rows[-1].content == "Nature\n\nRivers and mountains."
    assert all(len(r.vector) == embedder.dimensions for r in rows)
    # A chunk's vector is the same whether it is encoded alone or beside other texts.
    alone = embedder.encode([chunks[0].text])[0]
    np.testing.assert_allclose(rows[0].vector, alone, atol=1e-5)
    assert [r.chunk_index for r in build_embedded(chunks, vectors)] == list(range(len(chunks)))


def test_rows_with_the_fake_embedder() -> None:
    check_rows(HashEmbedder())


def test_rows_with_the_real_model(embedder: SentenceTransformerEmbedder) -> None:
    check_rows(embedder)


def test_build_embedded_rejects_mismatched_vectors() -> None:
    chunks = chunk_document(Document("one. two."), HashEmbedder(), max_tokens=2, overlap_tokens=0)
    with pytest.raises(ValueError):
        build_embedded(chunks, np.zeros((len(chunks) + 1, 4), dtype=np.float32))


def _glibc() -> bool:
    from worker.runtime import _libc

    return _libc() is not None


@pytest.mark.skipif(not _glibc(), reason="malloc_trim is glibc's")
def test_memory_is_trimmed_only_above_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a task a child above WORKER_TRIM_ABOVE_MB hands freed heap back; below it (or
    switched off), or not grown since its last trim, the ~8 ms trim is skipped."""
    from worker import runtime
    from worker.config import get_settings
    from worker.runtime import resident_mb, trim_memory

    monkeypatch.setattr(runtime, "_after_last_trim_mb", 0.0)
    settings = get_settings()
    here = resident_mb()
    assert here > 10  # this test process, with numpy loaded
    above = settings.model_copy(update={"worker_trim_above_mb": 1})
    below = settings.model_copy(update={"worker_trim_above_mb": int(here) + 10_000})
    off = settings.model_copy(update={"worker_trim_above_mb": 0})
    monkeypatch.setattr(runtime, "TRIM_REGROWTH_MB", 0)
    assert trim_memory(above) is True
    monkeypatch.setattr(runtime, "TRIM_REGROWTH_MB", 64)
    assert trim_memory(above) is False  # not grown since: a steady size above the limit
    assert trim_memory(below) is False
    assert trim_memory(off) is False
    # 125 MiB in heap-sized pieces with small live objects between them, as a forward pass
    # leaves the heap: freeing the pieces alone gives little back (the small ones pin the
    # heap's top); the trim returns the free pages inside it.
    blocks, pins = [], []
    for _ in range(2000):
        blocks.append(bytearray(64 * 1024))
        pins.append(bytearray(100))
    grown = resident_mb()
    del blocks
    # As if this were the first trim (the pieces may have reused pages the one above left).
    monkeypatch.setattr(runtime, "_after_last_trim_mb", 0.0)
    monkeypatch.setattr(runtime, "TRIM_REGROWTH_MB", 0)
    assert trim_memory(above) is True
    assert resident_mb() < grown - 50
    del pins
