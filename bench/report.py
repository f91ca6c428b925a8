"""Figures of one ``bench.peers`` run → ``results.md`` (ratios, targets, machine, versions)
and a PNG chart. Plain functions over the figures dict that ``bench.peers`` writes to
``bench/out/peers.json``, so a report can be rebuilt from a saved run:
``python -m bench.report bench/out/peers.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = {"uploads": "long passages (uploaded files)", "bookmarks": "short texts (bookmarks)"}
PEER_LABELS = {
    "langchain": "LangChain (langchain-postgres PGVectorStore)",
    "llamaindex": "LlamaIndex (IngestionPipeline + PGVectorStore)",
    "naive": "naive (1 doc at a time, 1 INSERT per vector)",
}
CEILING_BATCH = 32  # SentenceTransformer.encode's default batch size
RSS_TARGET_MB = 700
E2E_TARGET = 0.95
RERUN_TARGET = 0.05
COPY_TARGET = 5.0
FIRST_PASS_TARGET = 50.0


@dataclass(frozen=True)
class Row:
    system: str
    seconds: float
    rate: float  # corpus texts per second
    ratio: float  # rate / the model's own encode rate
    note: str = ""
    others: float | None = None  # cores others kept busy meanwhile (bench.contention)


@dataclass(frozen=True)
class Target:
    what: str
    measured: str
    met: bool | None  # None: not measured by this run


def ceiling_seconds(kind: dict[str, Any]) -> float:
    return statistics.fmean(kind["ceiling"]["seconds"])


def ceiling_rate(kind: dict[str, Any]) -> float:
    return float(kind["texts"]) / ceiling_seconds(kind)


def _row(
    kind: dict[str, Any], system: str, seconds: float, note: str = "", others: float | None = None
) -> Row:
    rate = kind["texts"] / seconds
    return Row(system, seconds, rate, rate / ceiling_rate(kind), note, others)


def others_cores(result: dict[str, Any]) -> float | None:
    contention = result.get("contention")
    return None if contention is None else float(contention["others_cores"])


def ours_label(run: dict[str, Any], cores: int) -> str:
    processes = run["concurrency"]
    threads = max(1, cores // processes)
    analysis = "" if run["analysis"] == "off" else f", analysis {run['analysis']}"
    tokens = f" (≤ {run['max_batch_tokens']} tokens)" if run.get("max_batch_tokens") else ""
    return (
        f"ours: {processes} process{'es' if processes > 1 else ''} x "
        f"{threads} thread{'s' if threads > 1 else ''}, batch {run['batch_size']}{tokens}"
        f"{analysis}"
    )


def side_by_side(figures: dict[str, Any], kind_name: str) -> list[Row]:
    """The ceiling, ours (first configuration: one process using every core, like each peer),
    and each peer, on one corpus."""
    kind = figures[kind_name]
    cores = figures["machine"]["cores"] or 1
    spread = kind["ceiling"]["seconds"]
    others = [others_cores(r) for r in kind["ceiling"].get("runs", [])]
    rows = [
        Row(
            "model's own encode (ceiling)",
            ceiling_seconds(kind),
            ceiling_rate(kind),
            1.0,
            "mean of " + ", ".join(f"{s:.1f} s" for s in spread) + " (before, after)",
            max((o for o in others if o is not None), default=None),
        )
    ]
    first = kind["ours"][0]
    rows.append(
        _row(
            kind,
            ours_label(first, cores),
            first["seconds"],
            "parse + chunk included",
            others_cores(first),
        )
    )
    for name, label in PEER_LABELS.items():
        peer = kind["peers"].get(name)
        if peer is None:
            continue
        note = f"{peer['rows']} rows"
        if "embed_batch_size" in peer:
            note += f", embed batch {peer['embed_batch_size']}"
        rows.append(_row(kind, label, peer["seconds"], note, others_cores(peer)))
    return rows


def child_rss(memory: list[dict[str, Any]]) -> float:
    """The largest pool child (the process holding the model), MiB."""
    return max((m["rss_mib"] for m in memory if m["role"] == "child"), default=0.0)


def main_rss(memory: list[dict[str, Any]]) -> float:
    return max((m["rss_mib"] for m in memory if m["role"] == "main"), default=0.0)


def targets(figures: dict[str, Any]) -> list[Target]:
    out = []
    for kind_name, what in (
        ("bookmarks", "end to end ≥ 0.95x encode, bookmarks"),
        ("uploads", "end to end ≥ 0.95x encode, uploads, analysis off"),
    ):
        kind = figures[kind_name]
        ratios = [
            (_row(kind, "", r["seconds"]).ratio, r) for r in kind["ours"] if r["analysis"] == "off"
        ]
        first = ratios[0][0]
        best, best_run = max(ratios, key=lambda pair: pair[0])
        measured = f"{first:.2f}x"
        if best_run is not kind["ours"][0]:
            cores = figures["machine"]["cores"] or 1
            measured += f" (best {best:.2f}x, {ours_label(best_run, cores).removeprefix('ours: ')})"
        out.append(Target(what, measured, best >= E2E_TARGET))
    for kind_name, what in (
        ("uploads", "re-uploading unchanged files ≤ 5 % of the first run"),
        ("bookmarks", "re-importing an unchanged export ≤ 5 % of the first run"),
    ):
        runs = figures[kind_name]["ours"]
        shares = [r["rerun_seconds"] / r["seconds"] for r in runs]
        out.append(
            Target(
                what,
                f"{100 * shares[0]:.1f} % (all configurations: "
                + ", ".join(f"{100 * s:.1f}" for s in shares)
                + " %)",
                max(shares) <= RERUN_TARGET,
            )
        )
    copy = figures["copy"]
    n = copy["vectors"]
    out.append(
        Target(
            f"COPY ≥ 5x executemany ({n:,} vectors)",
            f"{copy['ratio']:.1f}x (against text literals: {copy['ratio_text']:.1f}x)",
            copy["ratio"] >= COPY_TARGET,
        )
    )
    peaks = [child_rss(r["memory_peak"]) for kind_name in KINDS for r in figures[kind_name]["ours"]]
    afters = [
        child_rss(r["memory_after"]) for kind_name in KINDS for r in figures[kind_name]["ours"]
    ]
    out.append(
        Target(
            "worker RSS ≤ 700 MB per process with the model loaded",
            f"largest pool child: {max(afters):.0f} MiB after the run, {max(peaks):.0f} MiB "
            "at the peak",
            max(peaks) * 2**20 / 1e6 <= RSS_TARGET_MB,
        )
    )
    out.append(dedupe_target(figures))
    out.append(first_pass_target(figures))
    return out


def dedupe_target(figures: dict[str, Any]) -> Target:
    """bench.dedupe: every text given several times reaches the model once."""
    what = "identical texts embedded once per batch"
    dedupe = figures.get("dedupe")
    if dedupe is None:
        return Target(what, "not measured by this run", None)
    from bench.dedupe import describe

    met = (
        dedupe["repeated_reached"] == dedupe["once_reached"] == dedupe["texts"]
        and dedupe["same_vectors"]
    )
    return Target(what, describe(dedupe), met)


def first_pass_target(figures: dict[str, Any]) -> Target:
    """A bulk import with a static first-pass model (bench.first_pass): until searchable,
    against the time LangChain's rate on the bookmark texts of the same run would need."""
    first = figures.get("first_pass")
    langchain = figures.get("bookmarks", {}).get("peers", {}).get("langchain")
    if first is None or langchain is None:
        return Target(
            "static-model first pass: 100,000 bookmarks searchable ≥ 50x sooner than LangChain",
            "not measured by this run",
            None,
        )
    rate = langchain["texts"] / langchain["seconds"]
    langchain_s = first["rows"] / rate
    ratio = langchain_s / first["searchable_s"]
    return Target(
        f"static-model first pass: {first['rows']:,} bookmarks searchable ≥ 50x sooner than "
        "LangChain",
        f"{ratio:.1f}x: searchable after {first['searchable_s']:.1f} s (staging and first pass "
        f"in one transaction); at LangChain's {rate:.0f}/s on the bookmark texts, "
        f"{langchain_s:.0f} s",
        ratio >= FIRST_PASS_TARGET,
    )


# --- markdown -----------------------------------------------------------------------------------


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "—"}[met]


def markdown(figures: dict[str, Any], *, chart: str = "results.png") -> str:
    meta, machine = figures["meta"], figures["machine"]
    cores = machine["cores"] or 1
    lines = [
        "# Benchmarks: side by side with the peers",
        "",
        f"One run of `python -m bench{' --quick' if meta['quick'] else ''}` "
        f"on {meta['date']}, revision {meta['revision']}, {meta['wall_s'] / 60:.1f} minutes. "
        "Every figure below comes from this one run, on the same corpus, the same "
        f"all-MiniLM-L6-v2 files (`{meta['model_path']}`) and the same torch threads "
        f"({meta['threads']} per process for every single-process system). Ratios are to the "
        "model's own `encode` on the same texts in the same run; the machine is shared, so "
        "absolute times mean little. *Others' cores* is how many cores other users of the "
        "machine kept busy during a step (0 = we had it to ourselves)" + _quiet(meta) + ".",
        "",
        f"Machine: {machine['cpu']}, {cores} cores, {machine['memory_gib']} GiB, "
        f"{machine['os']}; load average {meta['load_start'][0]:.2f} at the start, "
        f"{meta['load_end'][0]:.2f} at the end.",
        "",
        f"![throughput of each system]({chart})",
        "",
    ]
    for kind_name, title in KINDS.items():
        kind = figures[kind_name]
        lines += [
            f"## {title[0].upper()}{title[1:]}",
            "",
            f"{kind['documents']} documents, {kind['texts']} texts to embed "
            f"({kind['tokens'] / kind['texts']:.0f} tokens on average).",
            "",
            "| system | seconds | texts/s | x encode | others' cores | note |",
            "|---|---:|---:|---:|---:|---|",
        ]
        lines += [
            f"| {r.system} | {r.seconds:.1f} | {r.rate:.1f} | {r.ratio:.2f} | "
            f"{_cores(r.others)} | {r.note} |"
            for r in side_by_side(figures, kind_name)
        ]
        lines.append("")
    lines += [
        "## Ours by configuration",
        "",
        "Threads per process are the cores divided by the worker's concurrency. The rerun is "
        "the same input enqueued again, unchanged, by the same user. RSS is that of the "
        "largest pool child (it holds the model) and of the Celery main process.",
        "",
        "| corpus | configuration | texts/s | x encode | others' cores | rerun "
        "| child RSS warm / peak / after (MiB) | main RSS (MiB) |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for kind_name in KINDS:
        kind = figures[kind_name]
        for run in kind["ours"]:
            row = _row(kind, "", run["seconds"])
            lines.append(
                f"| {kind_name} | {ours_label(run, cores).removeprefix('ours: ')} | "
                f"{row.rate:.1f} | {row.ratio:.2f} | {_cores(others_cores(run))} | "
                f"{100 * run['rerun_seconds'] / run['seconds']:.1f} % "
                f"({run['rerun_seconds']:.1f} s) | "
                f"{child_rss(run['memory_warm']):.0f} / {child_rss(run['memory_peak']):.0f} / "
                f"{child_rss(run['memory_after']):.0f} | {main_rss(run['memory_after']):.0f} |"
            )
    sizes = sorted(int(b) for b in figures["bookmarks"]["encode_sweep"]["seconds"])
    lines += [
        "",
        "## The model's own encode by batch size",
        "",
        "`SentenceTransformer.encode` (which sorts each call's texts by length) at each batch "
        "size, on the same sample; the last column is the same encode in the peers' "
        "environment (equal rates: the two environments run the same model stack).",
        "",
        "| corpus | sample | "
        + " | ".join(f"batch {b}" for b in sizes)
        + " | peers' env, batch 32 |",
        "|---|---:|" + "---:|" * (len(sizes) + 1),
    ]
    for kind_name in KINDS:
        sweep = figures[kind_name]["encode_sweep"]
        cells = []
        for b in sizes:
            s = sweep["seconds"].get(str(b))
            cells.append(f"{sweep['texts'] / s:.1f}/s" if s else "—")
        peers_rate = sweep["texts"] / sweep["peers_env_seconds_32"]
        lines.append(
            f"| {kind_name} | {sweep['texts']} | " + " | ".join(cells) + f" | {peers_rate:.1f}/s |"
        )
    copy = figures["copy"]
    best = copy["best_s"]
    lines += [
        "",
        f"## COPY against executemany ({copy['vectors']:,} vectors of 384 dimensions)",
        "",
        "Into a table shaped like `embedding` with no vector index, one transaction each, "
        "alternating twice; the best of each.",
        "",
        "| method | seconds | vectors/s | COPY is … faster |",
        "|---|---:|---:|---:|",
        f"| binary COPY (pgvector's binary adapter) | {best['copy']:.2f} | "
        f"{copy['vectors'] / best['copy']:,.0f} | — |",
        f"| executemany, same adapters (psycopg 3 pipelines it) | {best['executemany']:.2f} | "
        f"{copy['vectors'] / best['executemany']:,.0f} | {copy['ratio']:.1f}x |",
        f"| executemany, vectors as text literals (as LangChain) | "
        f"{best['executemany_text']:.2f} | {copy['vectors'] / best['executemany_text']:,.0f} | "
        f"{copy['ratio_text']:.1f}x |",
        "",
        "## Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| {t.what} | {t.measured} | {_verdict(t.met)} |" for t in targets(figures)]
    lines += [
        "",
        "## How each system was run",
        "",
        "- Ours: `worker.client` enqueues into the real Redis; a real `celery worker` "
        "(`worker.subprocess_worker.WorkerProcess`, analysis off unless said) parses, chunks "
        f"({meta['chunk_max_tokens']} tokens, overlap {meta['chunk_overlap_tokens']}), embeds "
        f"(length-sorted batches of at most the batch size and {meta['embed_max_batch_tokens']} "
        "padded tokens, cut where padding and forward passes cost least) and writes with "
        "binary COPY into the migrated schema, whose HNSW index is updated row by row; timed "
        "from the first enqueue to the last row committed, after a warm-up job in each pool "
        "process.",
        "- LangChain is given exactly our chunks in one `add_texts` call; LlamaIndex gets the "
        "text our parser extracted and splits it itself (SentenceSplitter, 254 tokens of the "
        "model's tokenizer, overlap 32); the naive pipeline gets our chunks per document. "
        "Their parse time is not counted, ours is; their tables have no vector index, ours "
        "has. Library defaults otherwise (LangChain embeds in batches of 32, LlamaIndex of "
        "10).",
        "- Each system has its own fresh database on the same PostgreSQL, its own process, "
        "`torch.set_num_threads` equal to the cores, one-threaded tokenizers, and "
        "`HF_HUB_OFFLINE=1`: nothing is downloaded.",
        "",
        "## Versions",
        "",
    ]
    versions = figures["versions"]
    lines.append(f"- Python {versions['python']}; " + _versions(versions["servers"]))
    lines.append("- ours: " + _versions(versions["ours"]))
    lines.append("- peers' environment (`.venv-peers`): " + _versions(versions["peers"]))
    lines.append("")
    return "\n".join(lines)


def _quiet(meta: dict[str, Any]) -> str:
    quiet = meta.get("quiet")
    if not quiet:
        return ""
    return (
        f"; before each step the run waited for others to use at most "
        f"{quiet['max_others_cores']} cores, up to {quiet['step_timeout_s']:.0f} s a step and "
        f"{quiet['budget_s']:.0f} s in all ({quiet['budget_left_s']:.0f} s of it left unused)"
    )


def _cores(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _versions(packages: dict[str, str | None]) -> str:
    return ", ".join(f"{name} {v}" for name, v in packages.items() if v)


def summary(figures: dict[str, Any]) -> str:
    """The side-by-side ratios and the targets, for the terminal."""
    out = []
    for kind_name in KINDS:
        out.append(f"{kind_name}:")
        out += [
            f"  {r.ratio:5.2f}x {r.rate:8.1f} texts/s  {r.system}"
            for r in side_by_side(figures, kind_name)
        ]
    out.append("targets:")
    out += [f"  [{_verdict(t.met):^10}] {t.what}: {t.measured}" for t in targets(figures)]
    return "\n".join(out)


# --- chart --------------------------------------------------------------------------------------


def chart(figures: dict[str, Any], path: Path) -> None:
    """Three panels: each system's throughput as a ratio to encode; ours and encode against
    batch size (bookmarks); ours against worker concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cores = figures["machine"]["cores"] or 1
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    ax = axes[0]
    systems = ["ours", "langchain", "llamaindex", "naive"]
    labels = ["ours", "LangChain", "LlamaIndex", "naive"]
    width = 0.38
    for k, kind_name in enumerate(KINDS):
        kind = figures[kind_name]
        values = [_row(kind, "", kind["ours"][0]["seconds"]).ratio] + [
            _row(kind, "", kind["peers"][s]["seconds"]).ratio if s in kind["peers"] else 0.0
            for s in systems[1:]
        ]
        xs = [i + (k - 0.5) * width for i in range(len(systems))]
        bars = ax.bar(xs, values, width, label=f"{kind_name} ({ceiling_rate(kind):.0f} texts/s)")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(systems)), labels)
    ax.set_ylabel("throughput ÷ the model's own encode")
    ax.set_title("Each system, same corpus, same model, same run")
    ax.legend(title="corpus (encode rate)", fontsize=8)

    ax = axes[1]
    kind = figures["bookmarks"]
    sweep = kind["encode_sweep"]
    sizes = sorted(int(b) for b in sweep["seconds"])
    ax.plot(
        sizes,
        [sweep["texts"] / sweep["seconds"][str(b)] for b in sizes],
        marker="o",
        label="model encode",
    )
    runs = sorted(
        (
            r
            for r in kind["ours"]
            if r["concurrency"] == 1 and r["analysis"] == "off" and not r.get("max_batch_tokens")
        ),
        key=lambda r: r["batch_size"],
    )
    ax.plot(
        [r["batch_size"] for r in runs],
        [kind["texts"] / r["seconds"] for r in runs],
        marker="s",
        label="ours end to end (1 process)",
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size (texts)")
    ax.set_ylabel("bookmark texts/s")
    ax.set_title("Short texts: throughput against batch size")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)

    ax = axes[2]
    for kind_name in KINDS:
        kind = figures[kind_name]
        runs = sorted(
            (
                r
                for r in kind["ours"]
                if r["batch_size"] == 64
                and r["analysis"] == "off"
                and not r.get("max_batch_tokens")
            ),
            key=lambda r: r["concurrency"],
        )
        ax.plot(
            [f"{r['concurrency']} x {max(1, cores // r['concurrency'])}" for r in runs],
            [_row(kind, "", r["seconds"]).ratio for r in runs],
            marker="o",
            label=kind_name,
        )
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("worker processes x torch threads each")
    ax.set_ylabel("ours ÷ the model's own encode")
    ax.set_title("Ours against worker concurrency")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.suptitle(
        f"{figures['machine']['cpu']}, {cores} cores — {figures['meta']['date']}", fontsize=9
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild results.md and the chart from a saved figures file."""
    args = list(sys.argv[1:] if argv is None else argv)
    source = Path(args[0]) if args else Path(__file__).parent / "out" / "peers.json"
    figures = json.loads(source.read_text())
    here = Path(__file__).parent
    (here / "results.md").write_text(markdown(figures))
    chart(figures, here / "results.png")
    print(summary(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
