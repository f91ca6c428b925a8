"""Upload ingestion throughput: ``python -m bench.ingest_uploads [--docs N]``.

In one run, on one generated corpus of mixed types and sizes (txt, md, html, docx, pdf,
json, csv):
  1. the model's own ``encode`` rate on exactly the chunks the pipeline produces (ceiling,
     measured before and after the end-to-end runs, the mean of both);
  2. end to end through a real Celery worker: enqueue → every item done, in chunks/s,
     printed as a ratio to (1), with analysis on, and again with analysis off;
  3. the share of analysis time against the embedding stage, stage by stage in-process.
Targets (issue 5): ratio >= 0.90 with analysis on; analysis <= 15 % of the embed stage.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench._db import (
    drop_database,
    fresh_database,
    keep_worker_log,
    uploads_seconds,
    use_upload_root,
)

DB_NAME = "bench_uploads"
KINDS = ("txt", "md", "html", "docx", "pdf", "json", "csv")
SIZES = (1, 2, 3, 5, 8, 12, 20, 30, 45)  # paragraphs


def write_corpus(root: Path, docs: int) -> list[Path]:
    """``docs`` files, types in rotation, sizes from one paragraph (~70 words) to 45
    (~3,000 words): short notes to reports, about 1,000 words on average."""
    from worker.fixtures import make_docx, make_pdf, prose

    paths = []
    for i in range(docs):
        kind = KINDS[i % len(KINDS)]
        text = prose(i, paragraphs=SIZES[(i // len(KINDS)) % len(SIZES)])
        path = root / f"doc{i:04d}.{kind}"
        if kind in ("txt", "md"):
            path.write_text((f"# Document {i}\n\n" if kind == "md" else "") + text)
        elif kind == "html":
            body = "".join(f"<p>{p}</p>" for p in text.split("\n\n"))
            path.write_text(
                f"<html><head><title>Doc {i}</title></head><body><nav>Home</nav>"
                f"<main><h1>Doc {i}</h1>{body}</main></body></html>"
            )
        elif kind == "docx":
            path.write_bytes(make_docx(title=f"Doc {i}", body=text))
        elif kind == "pdf":
            # One text line per page is all the hand-made PDF holds: keep it short.
            path.write_bytes(make_pdf(text.split(".")[0][:200]))
        elif kind == "json":
            path.write_text(json.dumps({"title": f"Doc {i}", "sections": text.split("\n\n")}))
        else:
            rows = "\n".join(f'{n},"{p}"' for n, p in enumerate(text.split("\n\n")))
            path.write_text("section,text\n" + rows + "\n")
        paths.append(path)
    return paths


def ceiling_seconds(texts: list[str]) -> float:
    """The ceiling's time on ``texts``: measured before the end-to-end runs and again after
    them (the machine drifts by a few per cent over the minutes between, and the mean of
    before and after is fairer to both runs than either)."""
    from bench._ceiling import encode_seconds
    from worker.runtime import default_embedder

    return encode_seconds(default_embedder(), texts)


def in_process_stages(paths: list[Path], root: Path) -> tuple[dict[str, float], list[str]]:
    """Parse and chunk every file once; time encode and analysis on the same chunks (with
    every core, like the ceiling)."""
    from worker.config import get_settings
    from worker.ingest.analyze import LocalAnalyzer
    from worker.ingest.chunk import chunk_document
    from worker.ingest.embed import title_summary_text
    from worker.ingest.parse import parse
    from worker.ingest.process import analyzer_for
    from worker.ingest.sources import load_source
    from worker.runtime import default_embedder

    settings = get_settings()
    embedder = default_embedder()
    analyzer = analyzer_for(settings.model_copy(update={"analysis_provider": "local"}), embedder)
    assert isinstance(analyzer, LocalAnalyzer)
    embedder.encode(["warm up the model"] * 8)
    docs = []
    for path in paths:
        doc = parse(load_source(path, upload_root=root, max_bytes=10**8))
        docs.append((doc, chunk_document(doc, embedder, max_tokens=settings.chunk_max_tokens)))
    all_chunks = [c.text for _, chunks in docs for c in chunks]
    encode_all = ceiling_seconds(all_chunks)
    # As the worker does it: documents in groups of UPLOAD_GROUP_ITEMS, every group's chunks
    # in one encode, its keyword candidates in one, then each analysis, then the group's
    # title+summary texts in one encode (that vector is the pipeline's with or without
    # analysis: embedding, not analysis).
    chunks_s = extra_s = prefetch_s = analyse_s = 0.0
    size = settings.upload_group_items
    for group in (docs[i : i + size] for i in range(0, len(docs), size)):
        t0 = time.perf_counter()
        vectors = embedder.encode([c.text for _, chunks in group for c in chunks])
        t1 = time.perf_counter()
        analyzer.prefetch(group)
        tp = time.perf_counter()
        results, at = [], 0
        for doc, chunks in group:
            results.append(analyzer.analyze(doc, chunks, vectors[at : at + len(chunks)]))
            at += len(chunks)
        t2 = time.perf_counter()
        embedder.encode([title_summary_text(r.title, r.summary) for r in results])
        t3 = time.perf_counter()
        chunks_s += t1 - t0
        extra_s += t3 - t2
        prefetch_s += tp - t1
        analyse_s += t2 - t1
    return {
        "chunks": len(all_chunks),
        "encode_all_s": encode_all,
        "chunks_grouped_s": chunks_s,
        "title_summary_s": extra_s,
        "embed_grouped_s": chunks_s + extra_s,
        "keyword_prefetch_s": prefetch_s,
        "analyse_s": analyse_s,
    }, all_chunks


def end_to_end(paths: list[Path], workdir: Path, *, analysis: str, concurrency: int) -> float:
    from worker import client
    from worker.subprocess_worker import WorkerProcess

    env = dict(os.environ, ANALYSIS_PROVIDER=analysis, LOG_FORMAT="json", LOG_LEVEL="INFO")
    worker = WorkerProcess(
        workdir / f"worker-{analysis}.log", env=env, concurrency=concurrency, name="bench"
    ).start()
    user = f"bench-{analysis}"
    try:
        worker.wait_ready()
        # Several files at once, so that every pool child loads its model before the timing.
        warm = [client.enqueue_upload(user + "-warm", p) for p in paths[: 2 * concurrency]]
        client.wait_for_items(user + "-warm", warm, timeout=300, poll=0.1)
        elapsed, _ = uploads_seconds(user, paths, timeout=3600)
    finally:
        worker.stop()
        keep_worker_log(workdir / f"worker-{analysis}.log", analysis)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=210)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="worker processes, the cores shared out as torch threads; default: the "
        "worker's own (WORKER_CONCURRENCY, one per core)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    if args.concurrency is not None:
        os.environ["WORKER_CONCURRENCY"] = str(args.concurrency)
    fresh_database(DB_NAME)
    from worker.app import app, configure
    from worker.config import get_settings

    concurrency = get_settings().worker_concurrency

    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "uploads"
            root.mkdir()
            configure(app, use_upload_root(root))
            paths = write_corpus(root, args.docs)
            stages, texts = in_process_stages(paths, root)
            e2e_on = end_to_end(paths, Path(tmp), analysis="local", concurrency=concurrency)
            e2e_off = end_to_end(paths, Path(tmp), analysis="off", concurrency=concurrency)
            after = ceiling_seconds(texts)
    finally:
        drop_database(DB_NAME)
    chunks = stages["chunks"]
    before = stages["encode_all_s"]
    ceiling = chunks / ((before + after) / 2)
    print(f"corpus: {len(paths)} documents ({', '.join(KINDS)}), {chunks} chunks")
    print(
        f"model encode (ceiling, one process, all cores): {ceiling:.1f} chunks/s "
        f"(mean of {before:.1f} s before and {after:.1f} s after)"
    )
    print(f"worker processes: {concurrency}")
    for label, seconds in (("analysis on ", e2e_on), ("analysis off", e2e_off)):
        rate = chunks / seconds
        print(f"end to end, {label}: {rate:.1f} chunks/s = {rate / ceiling:.3f} x encode")
    share = stages["analyse_s"] / stages["embed_grouped_s"]
    print(
        f"analysis: {stages['analyse_s']:.2f}s against {stages['embed_grouped_s']:.2f}s of "
        f"embedding = {100 * share:.1f} % of the embed stage (target <= 15 %)"
    )
    print(model_bound(stages))
    return 0


def model_bound(stages: dict[str, float]) -> str:
    """Where the model's own time goes beyond the ceiling's, in process as the worker groups
    its items (the keyword candidates' time includes finding them, a few milliseconds a
    document), and the ratio that model time alone would allow (nothing else costing)."""
    ceiling = stages["encode_all_s"]
    parts = {
        "chunks in groups": stages["chunks_grouped_s"] - ceiling,
        "title+summary vectors": stages["title_summary_s"],
        "keyword candidates": stages["keyword_prefetch_s"],
    }
    shares = ", ".join(f"{name} {100 * s / ceiling:+.1f} %" for name, s in parts.items())
    bound = ceiling / (ceiling + sum(parts.values()))
    return (
        f"model time beyond the ceiling's: {shares}; with analysis on, the model alone "
        f"allows at most {bound:.3f} x encode"
    )


if __name__ == "__main__":
    raise SystemExit(main())
