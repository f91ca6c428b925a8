"""What a document is about: title, language, summary, keywords, category.

``LocalAnalyzer`` works offline and reuses what the pipeline computes anyway: the chunk
vectors. The document vector is their normalised centroid; the summary is extracted from the
chunks nearest to it, ranking their sentences lexically (no sentence is embedded); keywords
are frequent phrases ranked by their similarity to the document vector (one small batch of
short texts, cached); the category is the label whose prompt vector is nearest (prompts
embedded once per process). That keeps analysis a small fraction of the embedding time.

``OpenAICompatibleAnalyzer`` asks a chat-completions endpoint instead and falls back to the
local analyzer on any failure, saying so in ``raw_response``.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import httpx
import numpy as np
from numpy.typing import NDArray

from worker.config import DEFAULT_LABELS
from worker.errors import ConfigError, describe
from worker.ingest.chunk import sentence_spans
from worker.ingest.types import AnalysisResult, Chunk, Document, Embedder
from worker.lru import LRU

# "other" is what is left when no label fits; a prompt vector for it would mean nothing.
FALLBACK_LABEL = "other"
# What each default label is compared with: a few words of the field. Measured here on sample
# texts, bare descriptions separate labels better (wider margins) than "This text is about
# {label}." or the label word alone. A label without a description is compared as itself.
DEFAULT_LABEL_DESCRIPTIONS: dict[str, str] = {
    "technology": "technology, computers, software and programming",
    "science": "science, research, physics, chemistry and biology",
    "business": "business, companies, markets and management",
    "finance": "finance, money, banking, investing and the economy",
    "health": "health, medicine, diseases and fitness",
    "politics": "politics, government, elections and laws",
    "sports": "sports, games, athletes and competitions",
    "entertainment": "entertainment, movies, music, television and celebrities",
    "education": "education, schools, universities, teaching and learning",
    "travel": "travel, tourism, destinations and holidays",
    "food": "food, cooking, recipes and restaurants",
}
WORDS_PER_MINUTE = 238
TITLE_MAX_CHARS = 200

_WORD = re.compile(r"[^\W\d_]+(?:['\u2019\-][^\W\d_]+)*")
# CJK ideographs and kana: each counts as a word (there are no spaces to count by).
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_WORD_OR_NUMBER = re.compile(r"\w+")
_SPACES = re.compile(r"\s+")


class Analyzer(Protocol):
    """Turns a chunked, embedded document into an ``AnalysisResult``."""

    name: str  # provider, stored in analysis.provider
    model: str

    def analyze(
        self,
        doc: Document,
        chunks: Sequence[Chunk],
        chunk_vectors: NDArray[np.float32],
        *,
        trace_id: str | None = None,
    ) -> AnalysisResult: ...


# --- small text helpers ---------------------------------------------------------------------


def collapse_spaces(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def count_words(text: str) -> int:
    """Words for reading time: letter/digit runs, with each CJK character one word."""
    cjk = len(_CJK.findall(text))
    if cjk:
        text = _CJK.sub(" ", text)
    return cjk + len(_WORD_OR_NUMBER.findall(text))


def derive_title(doc: Document) -> tuple[str, str]:
    """(title, method): the document's own title, else its first non-empty line without
    markdown heading marks, cut to ``TITLE_MAX_CHARS`` at a word boundary."""
    if doc.title.strip():
        return _trim(collapse_spaces(doc.title), TITLE_MAX_CHARS), "document_title"
    for line in doc.text.splitlines():
        line = collapse_spaces(line.lstrip("#").strip())
        if line:
            return _trim(line, TITLE_MAX_CHARS), "first_line"
    return "", "none"


def _trim(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", limit // 2, limit)
    return text[: cut if cut > 0 else limit].rstrip() + "\u2026"


def _content_words(text: str) -> list[str]:
    return [w for w in (m.group().lower() for m in _WORD.finditer(text)) if _is_content(w)]


def _is_content(word: str) -> bool:
    return len(word) > 2 and word not in STOPWORDS


# --- language -------------------------------------------------------------------------------

_LANGID: Any = None
_LANGID_LOCK = threading.Lock()
_LANGUAGE_SAMPLE_CHARS = 4000


def detect_language(text: str) -> tuple[str | None, dict[str, Any]]:
    """(ISO 639-1 code or None, how it was decided). Uses py3langid (its model ships in the
    wheel, ~0.7 s to load once per process); without it, a stopword count over a few
    European languages."""
    sample = text[:_LANGUAGE_SAMPLE_CHARS]
    if not _WORD.search(sample):
        return None, {"method": "none", "reason": "no letters"}
    identifier = _language_identifier()
    if identifier is None:
        return _stopword_language(sample)
    code, confidence = identifier.classify(sample)
    return str(code), {"method": "py3langid", "confidence": round(float(confidence), 4)}


def _language_identifier() -> Any:
    global _LANGID
    if _LANGID is None:
        with _LANGID_LOCK:
            if _LANGID is None:
                try:
                    module = importlib.import_module("py3langid.langid")
                except ImportError:
                    _LANGID = False
                else:
                    _LANGID = module.LanguageIdentifier.from_model_file(
                        module.MODEL_FILE, norm_probs=True
                    )
    return _LANGID or None


def _stopword_language(sample: str) -> tuple[str | None, dict[str, Any]]:
    words = [m.group().lower() for m in _WORD.finditer(sample)]
    scores = {
        lang: sum(1 for w in words if w in common) for lang, common in _LANGUAGE_WORDS.items()
    }
    best = max(scores, key=lambda k: scores[k])
    return (best if scores[best] else None), {"method": "stopwords", "scores": scores}


# --- vector caches --------------------------------------------------------------------------


class PhraseVectorCache:
    """LRU cache of short-text vectors per model: the same keyword candidates and label
    prompts come back document after document, and encoding them is the analyzer's main
    cost."""

    def __init__(self, maxsize: int = 20_000) -> None:
        self._data: LRU[tuple[str, int, str], NDArray[np.float32]] = LRU(maxsize)

    def vectors(self, embedder: Embedder, texts: Sequence[str]) -> tuple[NDArray[np.float32], int]:
        """(vectors in the order of ``texts``, how many had to be encoded)."""
        keys = [(embedder.name, embedder.dimensions, text) for text in texts]
        out = np.zeros((len(texts), embedder.dimensions), dtype=np.float32)
        missing: list[int] = []
        for i, vec in enumerate(self._data.get_many(keys)):
            if vec is None:
                missing.append(i)
            else:
                out[i] = vec
        if missing:
            fresh = embedder.encode([texts[i] for i in missing])
            out[missing] = fresh
            self._data.put_many((keys[i], vec) for i, vec in zip(missing, fresh, strict=True))
        return out, len(missing)


PHRASE_CACHE = PhraseVectorCache()


# --- the local analyzer ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Sentence:
    start: int
    end: int
    text: str
    terms: frozenset[str]
    words: int
    whole: bool


class LocalAnalyzer:
    """Offline analysis from the chunk vectors and the text (provider "local")."""

    name = "local"

    def __init__(
        self,
        embedder: Embedder,
        labels: Sequence[str] = DEFAULT_LABELS,
        summary_sentences: int = 3,
        keywords: int = 8,
        *,
        central_chunks: int = 3,
        keyword_candidates: int = 12,
        mmr_lambda: float = 0.6,
        max_text_chars: int = 1_000_000,
        label_descriptions: Mapping[str, str] | None = None,
    ) -> None:
        if not labels:
            raise ConfigError("analysis labels must not be empty")
        self.embedder = embedder
        self.model = embedder.name
        self.labels = tuple(labels)
        self.label_descriptions = {**DEFAULT_LABEL_DESCRIPTIONS, **(label_descriptions or {})}
        self.summary_sentences = summary_sentences
        self.keywords = keywords
        self.central_chunks = central_chunks
        self.keyword_candidates = keyword_candidates
        self.mmr_lambda = mmr_lambda
        self.max_text_chars = max_text_chars
        # Keyword candidates found by ``prefetch``, by document, for ``analyze`` to take,
        # with the document and the text they came from (a recycled id() cannot match, nor
        # a huge document's sample taken from other chunks).
        self._candidates: dict[int, tuple[Document, str, list[tuple[str, str]]]] = {}

    def warm_up(self) -> None:
        """Load the language model and embed the label prompts now, not on the first item."""
        _language_identifier()
        self._label_vectors()

    def prefetch(self, documents: Sequence[tuple[Document, Sequence[Chunk]]]) -> int:
        """Encode the keyword candidates of several documents in one model call, into the
        cache, so that analysing each of them then runs no model (one call per group of
        uploads rather than one per document: a dozen short phrases are a batch mostly
        made of overhead). Returns how many phrases were encoded."""
        phrases: dict[str, None] = {}
        self._candidates.clear()
        for doc, chunks in documents:
            text, _ = _text_for_terms(doc, chunks, self.max_text_chars)
            candidates = _candidate_phrases(text, self.keyword_candidates)
            self._candidates[id(doc)] = (doc, text, candidates)
            phrases.update((key, None) for key, _ in candidates)
        _, encoded = PHRASE_CACHE.vectors(self.embedder, list(phrases))
        return encoded

    def analyze(
        self,
        doc: Document,
        chunks: Sequence[Chunk],
        chunk_vectors: NDArray[np.float32],
        *,
        trace_id: str | None = None,
    ) -> AnalysisResult:
        timings: dict[str, float] = {}
        raw: dict[str, Any] = {"trace_id": trace_id, "timings_ms": timings}
        with _timed(timings, "title"):
            title, raw["title"] = _title_field(doc)
        with _timed(timings, "word_count"):
            word_count = count_words(doc.text)
        raw["word_count"] = word_count
        raw["reading_time_minutes"] = round(word_count / WORDS_PER_MINUTE, 1)
        if not chunks:
            language, raw["language"] = detect_language(doc.text)
            return self._result("", [], None, language, word_count, title, raw)
        if len(chunk_vectors) != len(chunks):
            raise ValueError(f"{len(chunks)} chunks but {len(chunk_vectors)} vectors")
        with _timed(timings, "document_vector"):
            doc_vector = _centroid(chunk_vectors)
            central = _central_chunks(chunk_vectors, doc_vector, self.central_chunks)
        with _timed(timings, "language"):
            sample = " ".join(chunks[i].text for i in sorted(central))
            language, raw["language"] = detect_language(sample)
        with _timed(timings, "term_weights"):
            text, sampled = _text_for_terms(doc, chunks, self.max_text_chars)
            weights = _term_weights(text, chunks)
        with _timed(timings, "summary"):
            summary, raw["summary"] = self._summary(doc, chunks, central, weights)
            raw["summary"]["central_chunks"] = central
            raw["summary"]["sampled_text"] = sampled
        with _timed(timings, "keywords"):
            keywords, raw["keywords"] = self._keywords(self._candidates_of(doc, text), doc_vector)
        with _timed(timings, "category"):
            category, raw["category"] = self._category(doc_vector)
        return self._result(summary, keywords, category, language, word_count, title, raw)

    def _result(
        self,
        summary: str,
        keywords: list[str],
        category: str | None,
        language: str | None,
        word_count: int,
        title: str,
        raw: dict[str, Any],
    ) -> AnalysisResult:
        return AnalysisResult(
            summary=summary,
            keywords=keywords,
            category=category,
            language=language,
            word_count=word_count,
            provider=self.name,
            model=self.model,
            raw_response=raw,
            title=title,
        )

    # --- summary ----------------------------------------------------------------------------

    def _summary(
        self,
        doc: Document,
        chunks: Sequence[Chunk],
        central: list[int],
        weights: dict[str, float],
    ) -> tuple[str, dict[str, Any]]:
        """The best-scoring sentences of the most central chunks, in document order."""
        sentences = _sentences_of(doc.text, [chunks[i] for i in central])
        scored = sorted(
            ((_sentence_score(s, weights), s) for s in sentences),
            key=lambda pair: -pair[0],
        )
        chosen = sorted((s for _, s in scored[: self.summary_sentences]), key=lambda s: s.start)
        info = {
            "method": "central_chunks+tfidf_sentences",
            "sentences_considered": len(sentences),
            "selected": [[s.start, s.end] for s in chosen],
            "scores": [round(score, 4) for score, _ in scored[: self.summary_sentences]],
        }
        return " ".join(s.text for s in chosen), info

    # --- keywords ---------------------------------------------------------------------------

    def _candidates_of(self, doc: Document, text: str) -> list[tuple[str, str]]:
        """The document's keyword candidates: as ``prefetch`` found them, else from ``text``."""
        kept = self._candidates.pop(id(doc), None)
        if kept is not None and kept[0] is doc and kept[1] == text:
            return kept[2]
        return _candidate_phrases(text, self.keyword_candidates)

    def _keywords(
        self, candidates: list[tuple[str, str]], doc_vector: NDArray[np.float32]
    ) -> tuple[list[str], dict[str, Any]]:
        """Frequent phrases, re-ranked by similarity to the document vector with MMR."""
        info: dict[str, Any] = {
            "method": "ngram_frequency+embedding_mmr",
            "candidates": len(candidates),
            "encoded": 0,
        }
        vectors, info["encoded"] = PHRASE_CACHE.vectors(self.embedder, [c for c, _ in candidates])
        if not candidates:
            return [], info
        relevance = vectors @ doc_vector
        keys = [key for key, _ in candidates]
        picked = _mmr(vectors, relevance, self.keywords, self.mmr_lambda, keys)
        info["scores"] = {candidates[i][0]: round(float(relevance[i]), 4) for i in picked}
        return [candidates[i][1] for i in picked], info

    # --- category ---------------------------------------------------------------------------

    def _category(self, doc_vector: NDArray[np.float32]) -> tuple[str | None, dict[str, Any]]:
        """Zero-shot: the label whose prompt is nearest to the document vector."""
        labels, vectors = self._label_vectors()
        info: dict[str, Any] = {"method": "zero_shot_label_descriptions"}
        if not labels:
            return (FALLBACK_LABEL if FALLBACK_LABEL in self.labels else None), info
        scores = vectors @ doc_vector
        info["scores"] = {
            label: round(float(s), 4) for label, s in zip(labels, scores, strict=True)
        }
        return labels[int(np.argmax(scores))], info

    def _label_vectors(self) -> tuple[list[str], NDArray[np.float32]]:
        labels = [label for label in self.labels if label != FALLBACK_LABEL]
        prompts = [self.label_descriptions.get(label, label) for label in labels]
        vectors, _ = PHRASE_CACHE.vectors(self.embedder, prompts)
        return labels, vectors


def _title_field(doc: Document) -> tuple[str, dict[str, Any]]:
    title, method = derive_title(doc)
    return title, {"method": method}


class _timed:
    """Context manager adding the elapsed milliseconds of a block to ``timings[key]``."""

    def __init__(self, timings: dict[str, float], key: str) -> None:
        self.timings, self.key = timings, key

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = (time.perf_counter() - self.start) * 1000
        self.timings[self.key] = round(self.timings.get(self.key, 0.0) + elapsed, 3)


def _centroid(vectors: NDArray[np.float32]) -> NDArray[np.float32]:
    mean: NDArray[np.float64] = vectors.mean(axis=0, dtype=np.float64)
    norm = float(np.linalg.norm(mean))
    return (mean / norm if norm > 0 else mean).astype(np.float32)


def _central_chunks(
    vectors: NDArray[np.float32], doc_vector: NDArray[np.float32], count: int
) -> list[int]:
    """Indexes of the ``count`` chunks most similar to the document vector, best first."""
    sims = vectors @ doc_vector
    return [int(i) for i in np.argsort(-sims, kind="stable")[:count]]


def _text_for_terms(doc: Document, chunks: Sequence[Chunk], max_chars: int) -> tuple[str, bool]:
    """The text term statistics are taken from: all of it, or for a huge document evenly
    spaced chunks adding up to about ``max_chars`` (statistics settle long before that)."""
    if len(doc.text) <= max_chars:
        return doc.text, False
    step = max(1, math.ceil(len(doc.text) / max_chars))
    return "\n\n".join(c.text for c in chunks[::step]), True


def _term_weights(text: str, chunks: Sequence[Chunk]) -> dict[str, float]:
    """TF-IDF of the document's content words, with chunks as the corpus for IDF (words
    spread evenly through the document say less about any part of it)."""
    tf = Counter(_content_words(text))
    if not tf:
        return {}
    df: Counter[str] = Counter()
    step = max(1, len(chunks) // 200)  # enough chunks for a stable IDF
    sample = chunks[::step]
    for chunk in sample:
        df.update(set(_content_words(chunk.text)))
    n = len(sample)
    return {t: c * (math.log((1 + n) / (1 + df[t])) + 1.0) for t, c in tf.items()}


def _sentences_of(text: str, chunks: Sequence[Chunk]) -> list[_Sentence]:
    """Sentences inside the union of the chunks' spans (chunks overlap: no duplicates)."""
    out: list[_Sentence] = []
    for start, end in _merge_spans([(c.start, c.end) for c in chunks]):
        for s, e in sentence_spans(text, start, end):
            words = _WORD.findall(text, s, e)
            out.append(
                _Sentence(
                    start=s,
                    end=e,
                    text=collapse_spaces(text[s:e]),
                    terms=frozenset(w.lower() for w in words if _is_content(w.lower())),
                    words=len(words),
                    whole=_begins_sentence(text, s) and _ends_sentence(text, e),
                )
            )
    return out


def _merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    return merged


def _begins_sentence(text: str, pos: int) -> bool:
    """True when ``pos`` follows the start of the text, a line break or terminal punctuation
    (a chunk may begin mid-sentence, and half a sentence makes a poor summary)."""
    before = text[max(0, pos - 64) : pos]
    kept = before.rstrip()
    if not kept or "\n" in before[len(kept) :]:
        return True
    return kept[-1] in ".!?\u2026\u3002\uff01\uff1f\"'\u201d\u2019)"


def _ends_sentence(text: str, pos: int) -> bool:
    tail = text[max(0, pos - 3) : pos].rstrip("\"'\u201d\u2019)]")
    return bool(tail) and tail[-1] in ".!?\u2026\u3002\uff01\uff1f"


def _sentence_score(sentence: _Sentence, weights: dict[str, float]) -> float:
    """Weight of the distinct content words, over the square root of the length (so long
    sentences do not win by size alone); fragments and extreme lengths are penalised."""
    if sentence.words < 4:
        return 0.0
    score = sum(weights.get(t, 0.0) for t in sentence.terms) / math.sqrt(sentence.words)
    if not sentence.whole:
        score *= 0.5
    if sentence.words > 60:
        score *= 0.5
    return score


def _candidate_phrases(text: str, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` (key, surface form) 1-3 word phrases of content words that appear
    next to each other (no stopword, punctuation or blank line between), most frequent
    first (ties: first seen first); longer phrases count a bit more, as they are rarer and
    more specific."""
    counts: Counter[str] = Counter()
    surfaces: dict[str, Counter[str]] = {}
    for run in _content_runs(text):
        for n in (1, 2, 3):
            for i in range(len(run) - n + 1):
                words = run[i : i + n]
                key = " ".join(w.lower() for w in words)
                counts[key] += 1
                surfaces.setdefault(key, Counter())[" ".join(words)] += 1
    ranked = sorted(counts, key=lambda k: -_phrase_score(counts[k], k.count(" ") + 1))
    return [(k, _surface(k, surfaces[k])) for k in ranked[:limit]]


def _phrase_score(count: int, words: int) -> float:
    """A repeated phrase gains with length (rarer, more specific). Among phrases seen once
    (most of a short text), three-word windows come last: most of them are accidents."""
    if count > 1:
        return count * (1 + 0.5 * (words - 1))
    return 1.0 if words < 3 else 0.8


def _surface(key: str, forms: Counter[str]) -> str:
    """Lower case unless the word is mostly written otherwise (names, acronyms)."""
    form, count = forms.most_common(1)[0]
    return form if count * 2 > sum(forms.values()) else key


def _content_runs(text: str) -> Iterator[list[str]]:
    """Runs of consecutive content words with only whitespace (no blank line) between."""
    run: list[str] = []
    last_end = 0
    for m in _WORD.finditer(text):
        word = m.group()
        gap = text[last_end : m.start()]
        if run and (gap.strip() or gap.count("\n") > 1 or not _is_content(word.lower())):
            yield run
            run = []
        if _is_content(word.lower()):
            run.append(word)
        last_end = m.end()
    if run:
        yield run


def _mmr(
    vectors: NDArray[np.float32],
    relevance: NDArray[np.float32],
    count: int,
    lam: float,
    phrases: Sequence[str],
) -> list[int]:
    """Maximal marginal relevance: relevant to the document, unlike those already picked.
    Likeness is the larger of vector similarity and word overlap, and a phrase whose words
    contain (or are contained in) a picked one's is skipped: "united beat" adds nothing
    to "manchester united beat"."""
    words = [frozenset(p.split()) for p in phrases]
    picked: list[int] = []
    redundancy = np.zeros(len(vectors), dtype=np.float32)
    available = np.ones(len(vectors), dtype=bool)
    while len(picked) < count and available.any():
        score = np.where(available, lam * relevance - (1 - lam) * redundancy, -np.inf)
        best = int(np.argmax(score))
        picked.append(best)
        available[best] = False
        for i in np.flatnonzero(available):
            shared = len(words[i] & words[best])
            if shared == min(len(words[i]), len(words[best])):
                available[i] = False
            overlap = shared / min(len(words[i]), len(words[best]))
            redundancy[i] = max(redundancy[i], overlap, float(vectors[i] @ vectors[best]))
    return picked


# --- OpenAI-compatible provider -------------------------------------------------------------

_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(?:[-_][a-z0-9]{2,8})?$")


class ReplyError(ValueError):
    """The provider answered, but not with what was asked for."""


class OpenAICompatibleAnalyzer:
    """Analysis by a chat-completions endpoint (provider "openai"), with the local analyzer
    as fallback: a down or confused provider delays nothing and loses nothing."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        *,
        fallback: LocalAnalyzer,
        timeout: float = 30.0,
        labels: Sequence[str] = DEFAULT_LABELS,
        keywords: int = 8,
        max_input_chars: int = 12_000,
        client: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key or ""
        self.fallback = fallback
        self.timeout = timeout
        self.labels = tuple(labels)
        self.keywords = keywords
        self.max_input_chars = max_input_chars
        # Made on first use, so a worker that builds this before forking does not share
        # one connection pool between processes.
        self._client = client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __repr__(self) -> str:  # never show the key, even in a debugger or a log line
        return f"OpenAICompatibleAnalyzer(base_url={self.base_url!r}, model={self.model!r})"

    def analyze(
        self,
        doc: Document,
        chunks: Sequence[Chunk],
        chunk_vectors: NDArray[np.float32],
        *,
        trace_id: str | None = None,
    ) -> AnalysisResult:
        started = time.perf_counter()
        try:
            body = self._request(doc, trace_id)
            fields = self._validate(body)
        except (httpx.HTTPError, ValueError, LookupError, TypeError) as exc:
            # ValueError covers ReplyError and undecodable JSON; LookupError a reply without
            # the expected "choices"; every one of them means "use the local analysis".
            return self._fall_back(doc, chunks, chunk_vectors, trace_id, exc)
        title, _ = derive_title(doc)
        raw = {
            "trace_id": trace_id,
            "request": {"base_url": self.base_url, "model": self.model},
            "reply": self._scrub(body),
            "timings_ms": {"request": round((time.perf_counter() - started) * 1000, 3)},
        }
        return AnalysisResult(
            summary=fields["summary"],
            keywords=fields["keywords"],
            category=fields["category"],
            language=fields["language"],
            word_count=count_words(doc.text),
            provider=self.name,
            model=self.model,
            raw_response=raw,
            title=title,
        )

    def _request(self, doc: Document, trace_id: str | None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        if trace_id:
            headers["X-Trace-Id"] = trace_id
        payload = {
            "model": self.model,
            "temperature": 0,
            "response_format": {"type": "json_object"},
            "messages": [
                {"role": "system", "content": self._instructions()},
                {"role": "user", "content": self._document_prompt(doc)},
            ],
        }
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout)
        response = self._client.post(
            f"{self.base_url}/chat/completions", json=payload, headers=headers, timeout=self.timeout
        )
        response.raise_for_status()
        return response.json()

    def _instructions(self) -> str:
        return (
            "You analyse documents. Reply with one JSON object and nothing else, with keys: "
            '"summary" (at most 3 sentences), '
            f'"keywords" (a list of at most {self.keywords} short phrases), '
            f'"category" (exactly one of: {", ".join(self.labels)}), '
            '"language" (the ISO 639-1 code of the document\'s language).'
        )

    def _document_prompt(self, doc: Document) -> str:
        title, _ = derive_title(doc)
        return f"Title: {title}\n\n{doc.text[: self.max_input_chars]}"

    def _validate(self, body: Any) -> dict[str, Any]:
        content = body["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise ReplyError("message content is not a string")
        try:
            reply = json.loads(_strip_code_fence(content))
        except json.JSONDecodeError as exc:
            raise ReplyError(f"message content is not JSON: {exc}") from exc
        if not isinstance(reply, dict):
            raise ReplyError("message content is not a JSON object")
        summary = reply.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise ReplyError("summary missing or not a string")
        keywords = reply.get("keywords", [])
        if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
            raise ReplyError("keywords is not a list of strings")
        return {
            "summary": summary.strip(),
            "keywords": [k.strip() for k in keywords if k.strip()][: self.keywords],
            "category": self._category(reply.get("category")),
            "language": _language(reply.get("language")),
        }

    def _category(self, value: Any) -> str | None:
        """The label as given when it is one of ours; otherwise "other" (when configured)."""
        if isinstance(value, str):
            label = value.strip().lower()
            if label in self.labels:
                return label
        return FALLBACK_LABEL if FALLBACK_LABEL in self.labels else None

    def _fall_back(
        self,
        doc: Document,
        chunks: Sequence[Chunk],
        chunk_vectors: NDArray[np.float32],
        trace_id: str | None,
        exc: Exception,
    ) -> AnalysisResult:
        result = self.fallback.analyze(doc, chunks, chunk_vectors, trace_id=trace_id)
        error = self._scrub(describe(exc))
        raw = {
            **result.raw_response,
            "fallback": True,
            "error": error,
            "requested": {"provider": self.name, "base_url": self.base_url, "model": self.model},
        }
        return replace(result, raw_response=raw)

    def _scrub(self, value: Any) -> Any:
        """``value`` with every occurrence of the API key masked (a provider might echo it)."""
        if not self._api_key:
            return value
        if isinstance(value, str):
            return value.replace(self._api_key, "***")
        if isinstance(value, dict):
            return {self._scrub(k): self._scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._scrub(v) for v in value]
        return value


def _strip_code_fence(content: str) -> str:
    """Some models wrap JSON in a markdown fence despite being asked not to."""
    text = content.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    return text


def _language(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    code = value.strip().lower()
    return code.split("-")[0].split("_")[0] if _LANGUAGE_CODE.match(code) else None


def make_analyzer(
    provider: str,
    embedder: Embedder,
    *,
    labels: Sequence[str] = DEFAULT_LABELS,
    base_url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    timeout: float = 30.0,
) -> Analyzer:
    """The analyzer a setting names: "local", or "openai" (which needs base_url and model)."""
    local = LocalAnalyzer(embedder, labels)
    if provider == "local":
        return local
    if provider == "openai":
        if not base_url or not model:
            raise ConfigError("the openai analysis provider needs a base URL and a model name")
        return OpenAICompatibleAnalyzer(
            base_url, model, api_key, fallback=local, timeout=timeout, labels=labels
        )
    raise ConfigError(f"unknown analysis provider {provider!r}: use 'local' or 'openai'")


# --- word lists -----------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


_ENGLISH = _words(
    """a about above after again against all almost also although always am among an and
another any anyone anything are around as at be became because become been before being below
between both but by can cannot could did do does doing done down during each either else even
ever every few for from further get gets got had has have having he her here hers herself him
himself his how however i if in into is it its itself just least less like made make many may
me might more most much must my myself neither never no nor not now of off often on once one
only or other others our ours ourselves out over own per perhaps quite rather really said same
say says see seen shall she should since so some such than that the their theirs them
themselves then there therefore these they this those though through thus to together too
toward towards under until up upon us use used uses using very via was we well were what
whatever when where whether which while who whom whose why will with within without would yet
you your yours yourself yourselves also etc new first two three way ways time thing things"""
)
_FRENCH = _words(
    """au aux avec ce ces cette dans de des du elle en est et eux il ils je la le les leur
leurs lui mais me même mes moi mon ne nos notre nous on ou où par pas pour qu que qui sa se ses
son sont sur ta te tes toi ton tu un une vos votre vous été être avoir fait comme plus très aussi
bien tout tous toutes"""
)
_GERMAN = _words(
    """aber alle als am an auch auf aus bei bin bis das dass dem den der des die dies doch
du durch ein eine einem einen einer eines er es für hat hatte ich ihr im in ist ja kann mit nach
nicht noch nur oder sich sie sind so über um und uns von vor war wie wir wird zu zum zur auch
werden wurde sehr"""
)
_SPANISH = _words(
    """al como con de del el ella en es esta este fue ha la las le lo los más me mi muy
no nos o para pero por que se sin sobre su sus también un una uno y ya está son"""
)
_ITALIAN = _words(
    """al alla anche che con da del della di e ed gli ha il in la le lo ma mi nel non
per più si sono su tra un una uno è come questo questa"""
)
_PORTUGUESE = _words(
    """ao aos com como da das de do dos ela ele em era essa esse está foi isso mais
mas na nas não no nos o os ou para pela pelo por que se sem seu sua são também um uma é"""
)
_DUTCH = _words(
    """aan al bij dat de die dit een en er het hij hoe ik in is je maar met naar niet nog
of om ook op te tot uit van voor was wat we wel wordt zijn ze zich"""
)

_LANGUAGE_WORDS: dict[str, frozenset[str]] = {
    "en": frozenset(_ENGLISH),
    "fr": frozenset(_FRENCH),
    "de": frozenset(_GERMAN),
    "es": frozenset(_SPANISH),
    "it": frozenset(_ITALIAN),
    "pt": frozenset(_PORTUGUESE),
    "nl": frozenset(_DUTCH),
}
STOPWORDS: frozenset[str] = frozenset().union(*_LANGUAGE_WORDS.values(), _ENGLISH)
