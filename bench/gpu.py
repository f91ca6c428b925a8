"""Embedding on a CUDA GPU: the model's own ``encode`` against our embedding stage.

Run in two steps because the GPU machine has torch and sentence-transformers but neither our
database nor the model package:

  python -m bench.gpu prepare DIR      # here: the corpus texts and the model files into DIR
  python -m bench.gpu run DIR          # there: prints texts/s and ratios, writes DIR/gpu.json

``prepare`` writes the exact texts the CPU benchmarks embed (the upload corpus's chunks and
the 100,000-bookmark export's texts, see bench/ingest_uploads.py and bench/import_bookmarks.py)
and a copy of the all-MiniLM-L6-v2 files whose weights are stored in float16 to halve the
transfer; ``run`` casts them back to float32 for the float32 figures, so those measure the
float32 model (the rounding of the weights changes vectors in the 4th decimal, not the speed).

Measured per corpus, in one process, each after a warm-up: the raw
``SentenceTransformer.encode`` at several batch sizes (float32 and float16), and our
``SentenceTransformerEmbedder.encode`` (dedupe, length-sorted, token-bounded batches) with
GPU-sized batches. Ratios are ours / the best raw figure of the same precision.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

RAW_BATCHES = (32, 128, 512)
# On a GPU a batch is bounded by memory, not cache: far larger batches than on 2 CPU cores.
OUR_BATCH = 512
OUR_MAX_BATCH_TOKENS = 512 * 258


def prepare(out: Path, *, docs: int, bookmarks: int) -> None:
    import tempfile

    from safetensors.torch import load_file, save_file

    from bench.import_bookmarks import bookmark_texts, generate_export
    from bench.ingest_uploads import write_corpus
    from worker.config import get_settings
    from worker.ingest.chunk import chunk_document
    from worker.ingest.embed import default_model_path
    from worker.ingest.parse import parse
    from worker.ingest.sources import load_source
    from worker.runtime import default_embedder

    out.mkdir(parents=True, exist_ok=True)
    embedder = default_embedder()
    settings = get_settings()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        passages: list[str] = []
        for path in write_corpus(root, docs):
            doc = parse(load_source(path, upload_root=root, max_bytes=10**8))
            chunks = chunk_document(doc, embedder, max_tokens=settings.chunk_max_tokens)
            passages.extend(c.text for c in chunks)
    titles = bookmark_texts(generate_export(bookmarks))
    (out / "texts.json").write_text(json.dumps({"passages": passages, "bookmarks": titles}))

    model_src = Path(default_model_path())
    model_dst = out / "model"
    shutil.copytree(model_src, model_dst, dirs_exist_ok=True)
    weights = load_file(str(model_src / "model.safetensors"))
    half = {k: v.half().contiguous() for k, v in weights.items()}
    save_file(half, model_dst / "model.safetensors")
    print(f"{len(passages)} passages, {len(titles)} bookmark texts, model in {model_dst}")


def _timed(fn: Any, *, repeat: int = 2) -> float:
    """Best of ``repeat`` timings (after the caller's warm-up), with the GPU synchronised."""
    import torch

    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def run(where: Path) -> dict[str, Any]:
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    from worker.ingest.embed import SentenceTransformerEmbedder

    texts = json.loads((where / "texts.json").read_text())
    model_dir = str(where / "model")
    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "corpora": {},
    }
    raw = SentenceTransformer(model_dir, device="cuda")
    ours = SentenceTransformerEmbedder(
        model_dir,
        name="all-MiniLM-L6-v2",
        batch_size=OUR_BATCH,
        max_batch_tokens=OUR_MAX_BATCH_TOKENS,
        device="cuda",
    )
    for corpus, items in texts.items():
        figures: dict[str, float] = {}
        for precision in ("float32", "float16"):
            model = raw.float() if precision == "float32" else raw.half()
            ours._model = model  # the same weights on the same device: only batching differs
            model.encode(items[:1024], batch_size=128)  # warm-up: kernels, allocator
            best_raw = 0.0
            for batch in RAW_BATCHES:
                seconds = _timed(
                    lambda m=model, t=items, b=batch: m.encode(
                        t, batch_size=b, show_progress_bar=False
                    )
                )
                rate = len(items) / seconds
                figures[f"raw_{precision}_batch{batch}"] = rate
                best_raw = max(best_raw, rate)
            seconds = _timed(lambda t=items: ours.encode(t))
            figures[f"ours_{precision}"] = len(items) / seconds
            figures[f"ratio_{precision}"] = figures[f"ours_{precision}"] / best_raw
        report["corpora"][corpus] = {"texts": len(items), **figures}
        print(f"{corpus}: {len(items)} texts")
        for key, value in figures.items():
            print(f"  {key:28s} {value:12,.2f}{'' if key.startswith('ratio') else ' texts/s'}")
    (where / "gpu.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("dir", type=Path)
    prep.add_argument("--docs", type=int, default=210)
    prep.add_argument("--bookmarks", type=int, default=100_000)
    go = sub.add_parser("run")
    go.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.dir, docs=args.docs, bookmarks=args.bookmarks)
    else:
        run(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
