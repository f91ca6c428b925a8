"""Chunking: token limits, boundaries, overlap and coverage. No torch: the fake embedder for
most tests, the real model's tokenizer.json (through ``tokenizers`` only) for one."""

from __future__ import annotations

import time
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.ingest.chunk import chunk_document, line_spans, paragraph_spans, sentence_spans
from worker.ingest.fake import HashEmbedder
from worker.ingest.types import Chunk, Document, Embedder

SENTENCES = [
    "The river rose quickly after three days of rain.",
    "Farmers moved their animals to higher ground before nightfall.",
    "In the town, volunteers filled sandbags outside the library!",
    "Would the old bridge hold until the water went down?",
    "Engineers inspected it twice and said it was safe for now.",
    "By morning the level had dropped and the roads reopened.",
]


def assert_invariants(doc: Document, chunks: list[Chunk], embedder: Embedder, limit: int) -> None:
    """What every chunking must satisfy, whatever the text."""
    covered = bytearray(len(doc.text))
    for i, c in enumerate(chunks):
        assert c.index == i
        assert c.text == doc.text[c.start : c.end]
        assert c.text == c.text.strip() and c.text
        assert c.token_count == embedder.count_tokens(c.text) <= limit
        covered[c.start : c.end] = b"\x01" * (c.end - c.start)
    for a, b in pairwise(chunks):
        assert a.start < b.start and a.end < b.end  # progress, in text order
    missing = [i for i, ch in enumerate(doc.text) if not ch.isspace() and not covered[i]]
    assert not missing, f"characters not in any chunk: {missing[:10]}"


def test_empty_and_blank_documents_have_no_chunks() -> None:
    embedder = HashEmbedder()
    assert chunk_document(Document(""), embedder) == []
    assert chunk_document(Document(" \n\n\t \n"), embedder) == []


def test_short_document_is_one_chunk_without_surrounding_whitespace() -> None:
    doc = Document("\n\n  Hello world. This is short.  \n")
    [chunk] = chunk_document(doc, HashEmbedder())
    assert chunk.text == "Hello world. This is short."
    assert (chunk.start, chunk.token_count) == (4, 7)


def test_paragraphs_that_fit_are_kept_whole() -> None:
    paragraphs = [" ".join(SENTENCES[i : i + 2]) for i in range(0, 6, 2)]  # ~22 tokens each
    doc = Document("\n\n".join(paragraphs))
    chunks = chunk_document(doc, HashEmbedder(), max_tokens=50, overlap_tokens=0)
    assert [c.text for c in chunks] == ["\n\n".join(paragraphs[:2]), paragraphs[2]]


def test_long_paragraph_is_cut_at_sentence_ends() -> None:
    doc = Document(" ".join(SENTENCES * 4))
    embedder = HashEmbedder()
    chunks = chunk_document(doc, embedder, max_tokens=40, overlap_tokens=0)
    assert len(chunks) > 3
    assert all(c.text[-1] in ".!?" for c in chunks)
    assert_invariants(doc, chunks, embedder, 40)


def test_hard_wrapped_sentence_is_cut_at_line_breaks_before_words() -> None:
    lines = [f"line {i} has some words in it without a full stop" for i in range(30)]
    doc = Document("\n".join(lines))
    chunks = chunk_document(doc, HashEmbedder(), max_tokens=25, overlap_tokens=0)
    assert [c.text for c in chunks] == ["\n".join(lines[i : i + 2]) for i in range(0, 30, 2)]


def test_sentence_longer_than_the_limit_is_cut_between_words() -> None:
    words = [f"word{i}" for i in range(500)]
    doc = Document(" ".join(words))
    embedder = HashEmbedder()
    chunks = chunk_document(doc, embedder, max_tokens=30, overlap_tokens=5)
    for c in chunks:
        assert c.start == 0 or doc.text[c.start - 1] == " "
        assert c.end == len(doc.text) or doc.text[c.end] == " "
    assert_invariants(doc, chunks, embedder, 30)


def test_giant_word_is_cut_anywhere_but_still_covered() -> None:
    from worker.ingest.chunk import MAX_CHARS_PER_TOKEN

    doc = Document("a" * 5000 + " tail")
    embedder = HashEmbedder(max_tokens=8)
    # One "word" of 5000 characters is a single fake token, but a chunk holds at most about
    # MAX_CHARS_PER_TOKEN characters per allowed token: it is cut, and still all covered.
    chunks = chunk_document(doc, embedder)
    assert_invariants(doc, chunks, embedder, 8)
    assert len(chunks) > 1 and chunks[-1].text.endswith("tail")
    assert max(len(c.text) for c in chunks) <= 1.5 * 8 * MAX_CHARS_PER_TOKEN


def test_overlap_repeats_the_tail_of_the_previous_chunk() -> None:
    doc = Document(" ".join(SENTENCES * 5))
    embedder = HashEmbedder()
    chunks = chunk_document(doc, embedder, max_tokens=60, overlap_tokens=12)
    assert len(chunks) > 3
    for prev, nxt in pairwise(chunks):
        assert nxt.start < prev.end, "each chunk after the first overlaps the previous one"
        assert 0 < embedder.count_tokens(doc.text[nxt.start : prev.end]) <= 12
        # Whole sentences fit in 12 tokens, so the overlap starts at a sentence start.
        assert doc.text[nxt.start - 2] in ".!?"
    assert_invariants(doc, chunks, embedder, 60)


def test_overlap_falls_back_to_word_boundaries() -> None:
    doc = Document(" ".join(SENTENCES * 5))
    embedder = HashEmbedder()
    chunks = chunk_document(doc, embedder, max_tokens=60, overlap_tokens=4)
    for prev, nxt in pairwise(chunks):
        assert doc.text[nxt.start - 1] == " "
        assert 0 < embedder.count_tokens(doc.text[nxt.start : prev.end]) <= 4


def test_limit_is_the_smaller_of_max_tokens_and_the_model_limit() -> None:
    doc = Document(" ".join(SENTENCES * 10))
    embedder = HashEmbedder(max_tokens=30)
    assert max(c.token_count for c in chunk_document(doc, embedder, max_tokens=500)) <= 30
    assert max(c.token_count for c in chunk_document(doc, embedder, max_tokens=15)) <= 15


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        chunk_document(Document("x"), HashEmbedder(), max_tokens=0)
    with pytest.raises(ValueError):
        chunk_document(Document("x"), HashEmbedder(), overlap_tokens=-1)


class ContextSensitiveEmbedder(HashEmbedder):
    """Counts one extra token for a text that does not start at a capital letter, like a
    byte-level BPE whose first word has no leading-space form: piece counts do not add up."""

    def count_tokens(self, text: str) -> int:
        return super().count_tokens(text) + (0 if text[:1].isupper() else 1)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        offsets = super().token_offsets(text)
        if offsets and not text[:1].isupper():
            offsets.insert(0, (0, 0))
        return offsets


class ByteTokenEmbedder(HashEmbedder):
    """Like byte-level BPE on non-ASCII text: each such character is two tokens with the
    same offsets, so no cut may fall between them."""

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for start, end in super().token_offsets(text):
            if text[start:end].isascii():
                out.append((start, end))
            else:
                out.extend((k, k + 1) for k in range(start, end) for _ in range(2))
        return out

    def count_tokens(self, text: str) -> int:
        return len(self.token_offsets(text))


def test_tokenizers_whose_counts_do_not_add_up_still_get_the_limit() -> None:
    doc = Document(" ".join(s.lower() for s in SENTENCES * 6))
    embedder = ContextSensitiveEmbedder()
    chunks = chunk_document(doc, embedder, max_tokens=20, overlap_tokens=5)
    assert all(embedder.count_tokens(c.text) <= 20 for c in chunks)


def test_splitters() -> None:
    text = "One. Two!  three\nstill three.\n\nPara two: 東京。大阪\uff01 end"
    assert [text[s:e] for s, e in paragraph_spans(text)] == [
        "One. Two!  three\nstill three.",
        "Para two: 東京。大阪\uff01 end",
    ]
    assert [text[s:e] for s, e in sentence_spans(text)] == [
        "One.",
        "Two!",
        "three\nstill three.",
        "Para two: 東京。",
        "大阪\uff01",
        "end",
    ]
    assert [text[s:e] for s, e in line_spans(text, 0, 30)] == ["One. Two!  three", "still three."]
    assert sentence_spans("pi is 3.14 and e.g.x stays") == [(0, 26)]


TEXT_ALPHABET = st.sampled_from(
    ["word", "Ab", "the", "x" * 30, ".", "!", "?", ",", " ", " ", " ", "\n", "\n\n", "\t",
     "東京", "。", "é", "ß", "-", "\u00a0", "\u200b", "...", '"']
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(TEXT_ALPHABET, max_size=300),
    limit=st.integers(min_value=1, max_value=40),
    overlap=st.integers(min_value=0, max_value=12),
)
def test_any_text_is_covered_within_the_limit(parts: list[str], limit: int, overlap: int) -> None:
    doc = Document("".join(parts))
    embedder = HashEmbedder()
    chunks = chunk_document(doc, embedder, max_tokens=limit, overlap_tokens=overlap)
    assert_invariants(doc, chunks, embedder, limit)
    # One character can be two tokens for these two: a limit of 1 cannot always be met.
    for other in (ContextSensitiveEmbedder(), ByteTokenEmbedder()):
        chunks = chunk_document(doc, other, max_tokens=max(2, limit), overlap_tokens=overlap)
        assert_invariants(doc, chunks, other, max(2, limit))


def test_five_megabyte_single_line_is_fast() -> None:
    sentence = "Quarterly revenue grew by 12 percent while costs stayed flat. "
    doc = Document(sentence * (5_000_000 // len(sentence)))
    started = time.perf_counter()
    chunks = chunk_document(doc, HashEmbedder())
    elapsed = time.perf_counter() - started
    print(f"5 MB single line: {len(chunks)} chunks in {elapsed:.2f} s")
    assert chunks[-1].end == len(doc.text.rstrip())
    assert elapsed < 30  # a few seconds here; generous for a busy 2-core CI machine


def test_real_tokenizer_limit_and_coverage() -> None:
    """The model's own WordPiece tokenizer (tokenizers only, no torch): 254 tokens at most."""
    from tokenizers import Tokenizer

    from worker.ingest.embed import SentenceTransformerEmbedder, default_model_path

    embedder = SentenceTransformerEmbedder(default_model_path(), name="all-MiniLM-L6-v2")
    assert embedder.max_tokens == 254
    text = "\n\n".join(
        [
            " ".join(SENTENCES * 12),
            "Ünïcödé naïve café déjà-vu " * 60,
            "東京は日本の首都です。" * 80,
            "supercalifragilisticexpialidocious" * 40 + " end",
            "\n".join(f"- item {i}: configure_the_service_{i}()" for i in range(120)),
        ]
    )
    doc = Document(text)
    chunks = chunk_document(doc, embedder)
    reference = Tokenizer.from_file(f"{default_model_path()}/tokenizer.json")
    reference.no_truncation()
    reference.no_padding()
    for c in chunks:
        assert len(reference.encode(c.text, add_special_tokens=False).ids) == c.token_count <= 254
    assert_invariants(doc, chunks, embedder, 254)


def test_junk_without_whitespace_makes_small_chunks_in_bounded_memory() -> None:
    """A megabyte of hex without whitespace or punctuation is a few unknown tokens for
    WordPiece; counted in tokens alone it made chunks of megabytes (a 50 MB line took 2.3 GB
    to re-count). Chunks stay near MAX_CHARS_PER_TOKEN characters per allowed token."""
    import random
    import tracemalloc

    from worker.ingest.chunk import MAX_CHARS_PER_TOKEN
    from worker.ingest.embed import SentenceTransformerEmbedder, default_model_path

    embedder = SentenceTransformerEmbedder(default_model_path(), name="all-MiniLM-L6-v2")
    junk = random.Random(3).randbytes(500_000).hex()
    doc = Document("A normal sentence first. " + junk + " and a normal end.")
    tracemalloc.start()
    chunks = chunk_document(doc, embedder)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert_invariants(doc, chunks, embedder, 254)
    longest = max(len(c.text) for c in chunks)
    assert longest <= 1.5 * 254 * MAX_CHARS_PER_TOKEN, longest
    assert peak < 200 * 2**20  # Python-side allocations; the tokenizer's own are bounded too
