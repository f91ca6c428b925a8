"""``python -m bench`` (``make bench``): every benchmark in turn at its default size, each
printing its ratios. Run one alone with ``python -m bench.<name> --help``."""

from __future__ import annotations

import sys

from bench import fairness, import_bookmarks, index_upkeep, ingest_uploads, search

BENCHES = {
    "ingest_uploads": ingest_uploads.main,
    "import_bookmarks": import_bookmarks.main,
    "search": search.main,
    "index_upkeep": index_upkeep.main,
    "fairness": fairness.main,
}


def main(argv: list[str]) -> int:
    chosen = argv or list(BENCHES)
    unknown = [name for name in chosen if name not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHES)}", file=sys.stderr)
        return 2
    for name in chosen:
        print(f"\n=== {name} ===", flush=True)
        code = BENCHES[name]([])
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
