"""Split a document into pieces that fit the embedding model, measured in its own tokens.

The order of preference for a cut is: a paragraph boundary (blank line), a sentence boundary,
a line break, a word boundary, and only for a single over-long word any token boundary. Pieces
at those levels are packed greedily into chunks of at most ``limit`` tokens, and each chunk
after the first repeats a short tail of the one before it (``overlap_tokens``), so that a
thought cut in two is still whole in one of the vectors.

Guarantees, checked by the tests:
- every chunk has at most ``limit`` tokens, counted by the embedder on the chunk's own text;
- every non-whitespace character of the document lies inside some chunk;
- ``chunk.text == doc.text[chunk.start:chunk.end]`` (chunks never start or end in whitespace);
- a chunk holds at most about ``MAX_CHARS_PER_TOKEN`` characters per allowed token (more only
  when a single piece is longer), so junk without whitespace cannot make huge chunks.

Cost: the text is tokenised about twice (once to measure the pieces, once to verify the
chunks), in bounded windows, so a 50 MB single-line file takes linear time and bounded
memory. An embedder that offers ``token_offsets_batch``/``count_tokens_batch`` (the real one
does) lets the Rust tokenizer use every core for both passes.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from worker.ingest.types import Chunk, Document, Embedder

# A blank line: a newline, optional horizontal whitespace, another newline (and any run after).
_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")
# Where a sentence ends. Latin punctuation needs whitespace after it (so "3.14" and "e.g.x"
# stay whole); CJK full stops need none, as CJK text has no spaces between sentences. A blank
# line ends one too; a single line break does not (hard-wrapped prose breaks lines anywhere).
# The lookbehinds and possessive quantifiers keep the scan linear on runs like "......".
_SENTENCE_BREAK = re.compile(
    r"(?<![.!?\u2026])[.!?\u2026]++[\"'\u201d\u2019)\]]*+\s++"
    r"|(?<![\u3002\uff01\uff1f])[\u3002\uff01\uff1f]++[\u300d\u300f\u201d\u2019\uff09)]*+\s*+"
    r"|\n[^\S\n]*+\n\s*+"
)
_LINE_BREAK = re.compile(r"\n\s*+")
# Paragraphs longer than this are tokenised in windows cut at whitespace: bounded memory for
# token offsets, and the tokenizer is faster on moderate inputs than on one huge string.
_WINDOW_CHARS = 64 * 1024
# Windows are tokenised in groups of about this many characters (one batch call each).
_GROUP_CHARS = 2 * 1024 * 1024

# Chunks are re-counted this many at a time (about 1.5 MB of text for full chunks), and never
# more than _COUNT_BATCH_CHARS at once: a tokenizer call holds per-character alignment data,
# so its memory grows with the characters it is given, not with the tokens.
_COUNT_BATCH = 1024
_COUNT_BATCH_CHARS = 2 * 1024 * 1024
# Characters per chunk are bounded too, at this many per allowed token: prose runs 4-6
# characters a token, so only junk reaches it. A "word" of megabytes without whitespace
# (base64, minified data) is one unknown token for WordPiece; counted in tokens alone, a
# 50 MB line would make chunks of megabytes, each tokenised again at gigabytes of memory.
MAX_CHARS_PER_TOKEN = 16

Offsets = list[tuple[int, int]]


@runtime_checkable
class BatchTokenizer(Protocol):
    """Optional extension of ``Embedder``: tokenise many texts in one call (in parallel)."""

    def token_offsets_batch(self, texts: Sequence[str]) -> list[Offsets]: ...

    def count_tokens_batch(self, texts: Sequence[str]) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class _Piece:
    """An unbreakable unit for packing: a paragraph, a sentence, or a slice of one."""

    start: int
    end: int
    tokens: int


def chunk_document(
    doc: Document,
    embedder: Embedder,
    *,
    max_tokens: int | None = None,
    overlap_tokens: int = 32,
) -> list[Chunk]:
    """Split ``doc.text`` into chunks of at most ``min(max_tokens, embedder.max_tokens)``
    tokens. Returns ``[]`` for a text that is empty or only whitespace."""
    limit = embedder.max_tokens if max_tokens is None else min(max_tokens, embedder.max_tokens)
    if limit < 1:
        raise ValueError(f"max_tokens must be at least 1, got {limit}")
    if overlap_tokens < 0:
        raise ValueError(f"overlap_tokens must be >= 0, got {overlap_tokens}")
    text = doc.text
    pieces = list(_pieces(text, embedder, limit))
    if not pieces:
        return []
    # Fast path: pack by the piece counts and verify all chunks in one batch. Counts add up
    # exactly for tokenizers that split at whitespace (WordPiece, the fake); when one does not
    # (a chunk came out too long), redo the packing verifying each chunk as it is made.
    spans = _pack(text, pieces, limit, overlap_tokens, embedder, verify=None)
    texts = [text[s:e] for s, e in spans]
    counts = _count_many(embedder, texts)
    if any(c > limit for c in counts):
        spans = _pack(text, pieces, limit, overlap_tokens, embedder, verify=embedder.count_tokens)
        texts = [text[s:e] for s, e in spans]
        counts = _count_many(embedder, texts)
    return [
        Chunk(index=i, text=t, start=s, end=e, token_count=c)
        for i, ((s, e), t, c) in enumerate(zip(spans, texts, counts, strict=True))
    ]


# --- text structure -------------------------------------------------------------------------


def paragraph_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each paragraph, stripped of surrounding whitespace, empty ones left out."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for m in _PARAGRAPH_BREAK.finditer(text):
        _append_stripped(text, pos, m.start(), spans)
        pos = m.end()
    _append_stripped(text, pos, len(text), spans)
    return spans


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of each sentence of ``text[start:end]``, in absolute offsets, stripped,
    with terminal punctuation kept in its sentence."""
    return _split(_SENTENCE_BREAK, text, start, len(text) if end is None else end)


def line_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of each non-empty line of ``text[start:end]``, stripped."""
    return _split(_LINE_BREAK, text, start, len(text) if end is None else end)


def _split(pattern: re.Pattern[str], text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    pos = start
    for m in pattern.finditer(text, start, end):
        _append_stripped(text, pos, m.end(), spans)
        pos = m.end()
    _append_stripped(text, pos, end, spans)
    return spans


def _append_stripped(text: str, start: int, end: int, out: list[tuple[int, int]]) -> None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start < end:
        out.append((start, end))


def _windows(text: str, start: int, end: int, size: int) -> Iterator[tuple[int, int]]:
    """Cut ``text[start:end]`` into spans of at most ``size`` characters, at the last
    whitespace of each window when there is one (so no word is split)."""
    while end - start > size:
        hi = start + size
        lo = start + size // 2
        cut = max(text.rfind(" ", lo, hi), text.rfind("\n", lo, hi), text.rfind("\t", lo, hi))
        if cut <= start:
            cut = hi  # no whitespace in half a window: a giant "word", any cut will do
        spans: list[tuple[int, int]] = []
        _append_stripped(text, start, cut, spans)
        yield from spans
        start = cut
        while start < end and text[start].isspace():
            start += 1
    spans = []
    _append_stripped(text, start, end, spans)
    yield from spans


# --- pieces ---------------------------------------------------------------------------------


def _pieces(text: str, embedder: Embedder, limit: int) -> Iterator[_Piece]:
    """Pieces of at most ``limit`` tokens (by the window's tokenisation), in text order,
    together covering every non-whitespace character."""
    group: list[tuple[int, int]] = []
    group_chars = 0
    for p_start, p_end in paragraph_spans(text):
        for w in _windows(text, p_start, p_end, _WINDOW_CHARS):
            group.append(w)
            group_chars += w[1] - w[0]
            if group_chars >= _GROUP_CHARS:
                yield from _pieces_of_group(text, group, embedder, limit)
                group, group_chars = [], 0
    yield from _pieces_of_group(text, group, embedder, limit)


def _pieces_of_group(
    text: str, spans: list[tuple[int, int]], embedder: Embedder, limit: int
) -> Iterator[_Piece]:
    all_offsets = _offsets_many(embedder, [text[s:e] for s, e in spans])
    max_chars = limit * MAX_CHARS_PER_TOKEN
    for (s, e), offsets in zip(spans, all_offsets, strict=True):
        absolute = [(a + s, b + s) for a, b in offsets]
        for piece in _pieces_of_span(text, s, e, absolute, limit):
            if piece.end - piece.start <= max_chars:
                yield piece
            else:  # few tokens over many characters: junk without whitespace
                yield from _slices(text, piece, [a for a, _ in absolute], max_chars)


def _slices(text: str, piece: _Piece, starts: list[int], max_chars: int) -> Iterator[_Piece]:
    """``piece`` cut into slices of at most ``max_chars`` characters (at whitespace where
    there is some), each counted as the tokens starting in it (at least one: a slice of one
    unknown "word" is still a token when it is embedded)."""
    for s, e in _windows(text, piece.start, piece.end, max_chars):
        yield _Piece(s, e, max(1, bisect_left(starts, e) - bisect_left(starts, s)))


def _pieces_of_span(
    text: str, start: int, end: int, offsets: Offsets, limit: int
) -> Iterator[_Piece]:
    """A paragraph (window) that fits is one piece; otherwise its sentences are; a sentence
    that does not fit is split into its lines, and a line that does not fit is cut by tokens."""
    if len(offsets) <= limit:
        yield _Piece(start, end, len(offsets))
        return
    starts = [a for a, _ in offsets]
    for s, e in sentence_spans(text, start, end):
        yield from _fitting(text, s, e, offsets, starts, limit, lines=True)


def _fitting(
    text: str, start: int, end: int, offsets: Offsets, starts: list[int], limit: int, lines: bool
) -> Iterator[_Piece]:
    i, j = bisect_left(starts, start), bisect_left(starts, end)
    if j - i <= limit:
        yield _Piece(start, end, j - i)
    elif lines and "\n" in text[start:end]:
        for s, e in line_spans(text, start, end):
            yield from _fitting(text, s, e, offsets, starts, limit, lines=False)
    else:
        yield from _cut_by_tokens(text, start, end, offsets[i:j], limit)


def _cut_by_tokens(
    text: str, start: int, end: int, offsets: Offsets, limit: int
) -> Iterator[_Piece]:
    """Slices of at most ``limit`` tokens, cut before a word start in the second half of
    each slice when there is one. Slices are contiguous (each ends, whitespace stripped,
    where the next begins), so characters the tokenizer skipped stay covered."""
    n = len(offsets)
    i = 0
    a = start
    while i < n:
        j = n if n - i <= limit else _cut_point(offsets, i, i + limit)
        # Tokens that share a start (bytes of one character in byte-level BPE) stay together:
        # a cut between them would make an empty slice.
        while j < n and offsets[j][0] <= a:
            j += 1
        b = end if j == n else offsets[j][0]
        while b > a and text[b - 1].isspace():
            b -= 1
        yield _Piece(a, b, j - i)
        i = j
        if j < n:
            a = offsets[j][0]


def _cut_point(offsets: Offsets, lo: int, hi: int) -> int:
    """The last token index in (lo + half, hi] that begins a word, else ``hi``."""
    for k in range(hi, lo + (hi - lo) // 2, -1):
        if _starts_word(offsets, k):
            return k
    return hi


def _starts_word(offsets: Offsets, k: int) -> bool:
    # Whitespace (or skipped text) between two tokens means the second begins a new word;
    # WordPiece continuations ("##ing") and punctuation touch the token before them.
    return k == 0 or offsets[k][0] > offsets[k - 1][1]


# --- packing --------------------------------------------------------------------------------


def _pack(
    text: str,
    pieces: list[_Piece],
    limit: int,
    overlap_tokens: int,
    embedder: Embedder,
    verify: Callable[[str], int] | None,
) -> list[tuple[int, int]]:
    """Greedy packing of ``pieces`` into (start, end) spans. With ``verify`` each span is
    re-counted on its own text and shrunk until it fits; without it the counts are trusted."""
    spans: list[tuple[int, int]] = []
    queue = list(reversed(pieces))  # a stack: pop() takes the next piece in text order
    previous: list[_Piece] = []
    max_chars = limit * MAX_CHARS_PER_TOKEN
    while queue:
        first = queue[-1]
        budget = min(overlap_tokens, limit - first.tokens)
        overlap = _overlap(text, previous, spans[-1][0] if spans else -1, budget, embedder)
        if overlap and first.start - overlap[0] > max_chars // 2:
            overlap = None  # a tail of junk "words": repeating it would double the chunk
        taken = _take(queue, limit - (overlap[1] if overlap else 0), max_chars)
        start = overlap[0] if overlap else taken[0].start
        if verify is not None:
            start, taken = _shrink_to_fit(text, queue, taken, start, limit, embedder, verify)
        spans.append((start, taken[-1].end))
        previous = taken
    return spans


def _take(queue: list[_Piece], budget: int, max_chars: int) -> list[_Piece]:
    """Pop pieces while they fit in ``budget`` tokens and ``max_chars`` characters; always
    at least one."""
    taken = [queue.pop()]
    total = taken[0].tokens
    while (
        queue and total + queue[-1].tokens <= budget and queue[-1].end - taken[0].start <= max_chars
    ):
        total += queue[-1].tokens
        taken.append(queue.pop())
    return taken


def _shrink_to_fit(
    text: str,
    queue: list[_Piece],
    taken: list[_Piece],
    start: int,
    limit: int,
    embedder: Embedder,
    verify: Callable[[str], int],
) -> tuple[int, list[_Piece]]:
    """Give pieces back to the queue, then drop the overlap, then split the first piece,
    until ``text[start:end]`` counts at most ``limit`` tokens. Every split makes the first
    piece strictly shorter, so this ends; only a single character that counts as more than
    ``limit`` tokens is left as it is."""
    while verify(text[start : taken[-1].end]) > limit:
        if len(taken) > 1:
            queue.append(taken.pop())
        elif start != taken[0].start:
            start = taken[0].start
        else:
            halves = _split_piece(text, taken[0], limit, embedder)
            if halves is None:
                break
            head, tail = halves
            queue.append(tail)
            taken, start = [head], head.start
    return start, taken


def _split_piece(
    text: str, piece: _Piece, limit: int, embedder: Embedder
) -> tuple[_Piece, _Piece] | None:
    """Cut a piece in two, both non-empty: by its own tokenisation (aiming a token below
    what it counts, since a slice may count differently from its share of the whole), else
    in the middle by characters. None for a piece of one character."""
    offsets = [
        (a + piece.start, b + piece.start)
        for a, b in embedder.token_offsets(text[piece.start : piece.end])
    ]
    target = max(1, min(limit, len(offsets) - 1))
    head = next(_cut_by_tokens(text, piece.start, piece.end, offsets, target), None)
    if head is None or not piece.start < head.end < piece.end:
        mid = (piece.start + piece.end) // 2
        spans: list[tuple[int, int]] = []
        _append_stripped(text, piece.start, mid, spans)
        if not spans:
            return None
        head = _Piece(spans[0][0], spans[0][1], target)
    rest: list[tuple[int, int]] = []
    _append_stripped(text, head.end, piece.end, rest)
    if not rest:
        return None
    return head, _Piece(rest[0][0], rest[0][1], max(0, piece.tokens - head.tokens))


def _overlap(
    text: str, previous: list[_Piece], after: int, budget: int, embedder: Embedder
) -> tuple[int, int] | None:
    """(start, tokens) of the tail of the previous chunk to repeat: whole trailing pieces
    (sentences) when the last one fits the budget, else the last words of the last piece.
    It starts after ``after`` (the previous chunk's start), so no chunk contains the whole
    of the one before it."""
    if not previous or budget <= 0:
        return None
    start, tokens = -1, 0
    for piece in reversed(previous):
        if tokens + piece.tokens > budget or piece.start <= after:
            break
        start, tokens = piece.start, tokens + piece.tokens
    if start >= 0 and tokens > 0:
        return start, tokens
    last = previous[-1]
    offsets = embedder.token_offsets(text[last.start : last.end])
    candidates = [
        k
        for k in range(max(0, len(offsets) - budget), len(offsets))
        if last.start + offsets[k][0] > after and (k == 0 or offsets[k][0] > offsets[k - 1][0])
    ]
    if not candidates:
        return None
    # Prefer a word start, so the overlap does not begin inside a word.
    k = next((k for k in candidates if _starts_word(offsets, k)), candidates[0])
    return last.start + offsets[k][0], len(offsets) - k


# --- tokenizer access -----------------------------------------------------------------------


def _offsets_many(embedder: Embedder, texts: list[str]) -> list[Offsets]:
    if isinstance(embedder, BatchTokenizer):
        return embedder.token_offsets_batch(texts)
    return [embedder.token_offsets(t) for t in texts]


def _count_many(embedder: Embedder, texts: list[str]) -> list[int]:
    if not isinstance(embedder, BatchTokenizer):
        return [embedder.count_tokens(t) for t in texts]
    # In slices: the tokenizer holds every encoding of a batch at once (ids, offsets, masks).
    counts: list[int] = []
    batch: list[str] = []
    chars = 0
    for text in texts:
        if batch and (len(batch) >= _COUNT_BATCH or chars + len(text) > _COUNT_BATCH_CHARS):
            counts.extend(embedder.count_tokens_batch(batch))
            batch, chars = [], 0
        batch.append(text)
        chars += len(text)
    if batch:
        counts.extend(embedder.count_tokens_batch(batch))
    return counts
