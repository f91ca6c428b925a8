"""Analysis: the local analyzer on real text with the real model (shared with test_embed
through the per-process embedder cache), and the OpenAI-compatible analyzer against a stub
server on 127.0.0.1, including every way it falls back."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pydoc_data.topics import topics  # the stdlib's own documentation: real English prose
from typing import Any, ClassVar

import numpy as np
import pytest

from worker.errors import ConfigError
from worker.ingest import analyze
from worker.ingest.analyze import (
    DEFAULT_LABELS,
    LocalAnalyzer,
    OpenAICompatibleAnalyzer,
    PhraseVectorCache,
    count_words,
    derive_title,
    detect_language,
    make_analyzer,
)
from worker.ingest.chunk import chunk_document
from worker.ingest.embed import (
    SentenceTransformerEmbedder,
    get_embedder,
)
from worker.ingest.fake import HashEmbedder
from worker.ingest.types import Document, Embedder

FOOTBALL = (
    "Manchester United beat Liverpool 2-1 at Old Trafford on Sunday in a thrilling Premier "
    "League match. The striker scored twice in the second half, and the goalkeeper made a "
    "crucial save from a penalty in the final minutes. The manager praised his team's "
    "defensive discipline and said the result keeps them in the race for the title. Fans "
    "celebrated long after the final whistle as the club moved up to third place in the "
    "league table."
)
SAMPLES = {
    "en": "The committee will meet again next week to discuss the budget for the new school "
    "building, which has been delayed by rising construction costs.",
    "fr": "Le comité se réunira de nouveau la semaine prochaine pour discuter du budget de la "
    "nouvelle école, dont la construction a été retardée par la hausse des coûts.",
    "de": "Der Ausschuss wird sich nächste Woche erneut treffen, um über das Budget für das "
    "neue Schulgebäude zu sprechen, dessen Bau sich wegen steigender Kosten verzögert hat.",
}
API_KEY = "sk-test-0123456789abcdef"


def normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def python_docs(words: int = 3000) -> str:
    """About ``words`` words of real technical prose from the stdlib's pydoc topics."""
    parts: list[str] = []
    total = 0
    for key in ("assignment", "for", "try", "with", "function", "class", "import", "while"):
        parts.append(topics[key])
        total += len(topics[key].split())
        if total >= words:
            break
    return "\n\n".join(parts)


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return get_embedder("all-MiniLM-L6-v2", threads=2)


@pytest.fixture(scope="module")
def local(embedder: SentenceTransformerEmbedder) -> LocalAnalyzer:
    analyzer = LocalAnalyzer(embedder)
    analyzer.warm_up()
    return analyzer


def run_local(analyzer: LocalAnalyzer, embedder: Embedder, doc: Document) -> Any:
    chunks = chunk_document(doc, embedder)
    return analyzer.analyze(doc, chunks, embedder.encode([c.text for c in chunks]), trace_id="t-1")


# --- local analyzer with the real model -----------------------------------------------------


def test_real_document(local: LocalAnalyzer, embedder: SentenceTransformerEmbedder) -> None:
    doc = Document(python_docs())
    result = run_local(local, embedder, doc)
    text = normalised(doc.text)
    assert result.provider == "local" and result.model == "all-MiniLM-L6-v2"
    assert result.title == "Assignment statements"
    assert result.language == "en"
    assert result.word_count == count_words(doc.text) > 2500
    assert result.category in DEFAULT_LABELS
    # Extractive: every summary sentence is a sentence of the text, whitespace aside.
    sentences = result.raw_response["summary"]["selected"]
    assert 1 <= len(sentences) <= 3
    for start, end in sentences:
        assert normalised(doc.text[start:end]) in normalised(result.summary)
        assert normalised(doc.text[start:end]) in text
    assert result.keywords and len(result.keywords) <= 8
    assert all(normalised(k) in text for k in result.keywords)
    raw = result.raw_response
    assert raw["trace_id"] == "t-1"
    assert raw["reading_time_minutes"] == round(result.word_count / 238, 1)
    assert set(raw["timings_ms"]) >= {"summary", "keywords", "category", "language"}
    assert raw["keywords"]["candidates"] <= 30
    assert len(raw["summary"]["central_chunks"]) == 3
    json.dumps(raw)  # stored as jsonb


def test_football_is_sports(local: LocalAnalyzer, embedder: SentenceTransformerEmbedder) -> None:
    result = run_local(local, embedder, Document(FOOTBALL, title="Match report"))
    assert result.category == "sports"
    assert result.title == "Match report"
    assert result.raw_response["title"]["method"] == "document_title"
    assert max(result.raw_response["category"]["scores"].values()) == pytest.approx(
        result.raw_response["category"]["scores"]["sports"]
    )
    assert all(normalised(k) in normalised(FOOTBALL) for k in result.keywords)


@pytest.mark.parametrize("code", sorted(SAMPLES))
def test_language_of_sample_paragraphs(
    code: str, local: LocalAnalyzer, embedder: SentenceTransformerEmbedder
) -> None:
    assert detect_language(SAMPLES[code])[0] == code
    assert run_local(local, embedder, Document(SAMPLES[code])).language == code


def test_analysis_costs_little_beside_embedding(
    embedder: SentenceTransformerEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reported, not asserted (timing on a shared 2-core machine is noisy): the analysis of
    a ~3000-word document against the embedding of its chunks. Keyword candidates start
    uncached, as for a new document; label vectors and the language model are warm, as in
    a worker after its first item."""
    monkeypatch.setattr(analyze, "PHRASE_CACHE", PhraseVectorCache())
    analyzer = LocalAnalyzer(embedder)
    analyzer.warm_up()
    doc = Document(python_docs())
    chunks = chunk_document(doc, embedder)
    started = time.perf_counter()
    vectors = embedder.encode([c.text for c in chunks])
    embed_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    result = analyzer.analyze(doc, chunks, vectors)
    analysis_ms = (time.perf_counter() - started) * 1000
    print(
        f"\n{len(doc.text.split())} words, {len(chunks)} chunks: embed {embed_ms:.0f} ms, "
        f"analysis {analysis_ms:.0f} ms ({100 * analysis_ms / embed_ms:.1f}%), "
        f"steps {result.raw_response['timings_ms']}"
    )


# --- local analyzer, no model ----------------------------------------------------------------


def test_empty_document_gives_empty_fields() -> None:
    result = LocalAnalyzer(HashEmbedder()).analyze(
        Document("   "), [], np.zeros((0, 384), np.float32)
    )
    assert (result.summary, result.keywords, result.category, result.language) == (
        "",
        [],
        None,
        None,
    )
    assert result.word_count == 0


def test_prefetch_encodes_a_groups_candidates_in_one_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(analyze, "PHRASE_CACHE", analyze.PhraseVectorCache())
    embedder = HashEmbedder()
    analyzer = LocalAnalyzer(embedder)
    analyzer.warm_up()  # the label prompts
    docs = [Document(FOOTBALL), Document(topics["assert"]), Document(topics["for"])]
    group = [(d, chunk_document(d, embedder)) for d in docs]
    calls: list[int] = []
    encode = embedder.encode
    monkeypatch.setattr(embedder, "encode", lambda texts: calls.append(len(texts)) or encode(texts))
    assert analyzer.prefetch(group) > 0 and len(calls) == 1
    found: list[str] = []
    candidates = analyze._candidate_phrases
    monkeypatch.setattr(
        analyze, "_candidate_phrases", lambda text, n: found.append(text) or candidates(text, n)
    )
    results = [analyzer.analyze(d, c, encode([x.text for x in c])) for d, c in group]
    assert len(calls) == 1  # every analysis found its candidates' vectors in the cache
    assert found == []  # and the candidates themselves, as the prefetch found them
    assert all(r.raw_response["keywords"]["encoded"] == 0 and r.keywords for r in results)
    # The same keywords as without the prefetch.
    monkeypatch.setattr(analyze, "PHRASE_CACHE", analyze.PhraseVectorCache())
    alone = [analyzer.analyze(d, c, encode([x.text for x in c])).keywords for d, c in group]
    assert [r.keywords for r in results] == alone


def test_keyword_vectors_are_cached() -> None:
    embedder = HashEmbedder()
    analyzer = LocalAnalyzer(embedder)
    doc = Document(FOOTBALL)
    chunks = chunk_document(doc, embedder)
    vectors = embedder.encode([c.text for c in chunks])
    first = analyzer.analyze(doc, chunks, vectors)
    assert first.raw_response["keywords"]["encoded"] > 0
    before = embedder.encoded_texts
    second = analyzer.analyze(doc, chunks, vectors)
    # Labels and candidates came from the cache: the analysis ran no model at all (the
    # title+summary vector is the pipeline's, encoded with the other items' in one call).
    assert embedder.encoded_texts == before
    assert first.keywords == second.keywords
    assert second.raw_response["keywords"]["encoded"] == 0


def test_title_falls_back_to_the_first_line() -> None:
    assert derive_title(Document("\n\n# Getting started\nBody")) == (
        "Getting started",
        "first_line",
    )
    long_title, _ = derive_title(Document("word " * 100))
    assert len(long_title) <= 201 and long_title.endswith("\u2026")
    assert derive_title(Document("")) == ("", "none")


def test_word_count_counts_cjk_characters() -> None:
    assert count_words("Hello world, it's 2024.") == 5
    assert count_words("東京は大きい") == 6


def test_make_analyzer() -> None:
    embedder = HashEmbedder()
    assert isinstance(make_analyzer("local", embedder, labels=["a", "b"]), LocalAnalyzer)
    remote = make_analyzer("openai", embedder, base_url="http://127.0.0.1:9", model="m")
    assert isinstance(remote, OpenAICompatibleAnalyzer)
    with pytest.raises(ConfigError):
        make_analyzer("openai", embedder, model="m")
    with pytest.raises(ConfigError):
        make_analyzer("nope", embedder)


# --- OpenAI-compatible analyzer against a stub ----------------------------------------------


class StubHandler(BaseHTTPRequestHandler):
    """Answers POST /v1/chat/completions as ``StubHandler.mode`` says."""

    mode: ClassVar[str] = "ok"
    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubHandler.requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        if self.mode == "slow":
            time.sleep(1.0)
        if self.mode == "error":
            self._send(500, b'{"error": "boom"}')
        elif self.mode == "garbage":
            self._send(200, json.dumps(_completion("this is not json at all")).encode())
        elif self.mode == "not-json":
            self._send(200, b"<html>proxy error</html>")
        elif self.mode == "no-choices":
            self._send(200, b'{"choices": []}')
        elif self.mode == "missing-summary":
            self._send(200, json.dumps(_completion(json.dumps({"keywords": []}))).encode())
        else:
            reply = {
                "summary": "A short summary.",
                "keywords": ["football", "league", " "],
                "category": "Sports",
                "language": "en-GB",
            }
            content = "```json\n" + json.dumps(reply) + "\n```"
            completion = _completion(content)
            completion["echo"] = f"Bearer {API_KEY}"  # a provider that echoes the key
            self._send(200, json.dumps(completion).encode())

    def _send(self, status: int, payload: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out first ("slow"): that is the point of the test

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        return


def _completion(content: str) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
    }


@pytest.fixture(scope="module")
def stub_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def remote(stub_url: str) -> Iterator[OpenAICompatibleAnalyzer]:
    embedder = HashEmbedder()
    analyzer = OpenAICompatibleAnalyzer(
        stub_url, "stub-model", API_KEY, fallback=LocalAnalyzer(embedder), timeout=0.5
    )
    StubHandler.requests.clear()
    yield analyzer
    StubHandler.mode = "ok"


def analyze_football(analyzer: OpenAICompatibleAnalyzer) -> Any:
    embedder = analyzer.fallback.embedder
    doc = Document(FOOTBALL)
    chunks = chunk_document(doc, embedder)
    return analyzer.analyze(doc, chunks, embedder.encode([c.text for c in chunks]), trace_id="t-9")


def test_valid_reply_is_used(remote: OpenAICompatibleAnalyzer) -> None:
    StubHandler.mode = "ok"
    result = analyze_football(remote)
    assert result.provider == "openai" and result.model == "stub-model"
    assert result.summary == "A short summary."
    assert result.keywords == ["football", "league"]
    assert (result.category, result.language) == ("sports", "en")
    assert result.word_count == count_words(FOOTBALL)
    [request] = StubHandler.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == f"Bearer {API_KEY}"
    assert request["body"]["model"] == "stub-model"
    assert result.raw_response["reply"]["id"] == "cmpl-1"
    assert "fallback" not in result.raw_response
    assert API_KEY not in json.dumps(result.raw_response)
    assert API_KEY not in repr(remote)


@pytest.mark.parametrize(
    "mode", ["error", "garbage", "not-json", "no-choices", "missing-summary", "slow"]
)
def test_failures_fall_back_to_local(remote: OpenAICompatibleAnalyzer, mode: str) -> None:
    StubHandler.mode = mode
    result = analyze_football(remote)
    raw = result.raw_response
    assert raw["fallback"] is True
    assert raw["error"]
    assert raw["requested"]["model"] == "stub-model"
    assert result.provider == "local"
    assert result.summary  # the local analysis, not an empty result
    assert API_KEY not in json.dumps(raw)


def test_unknown_category_maps_to_other(remote: OpenAICompatibleAnalyzer) -> None:
    assert remote._category("astrology") == "other"
    assert remote._category(None) == "other"
