"""``python -m bench`` (``make bench``): the side-by-side run against the model's own encode,
LangChain, LlamaIndex and a naive pipeline (``bench.peers``), which writes bench/results.md
and bench/results.png. ``python -m bench --quick`` is its small version.

``python -m bench NAME…`` runs chosen benchmarks instead, each at its default size
(``all``: every one); ``python -m bench.<name> --help`` shows one's own options.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from bench import (
    copy_rows,
    fairness,
    first_pass,
    import_bookmarks,
    index_upkeep,
    ingest_uploads,
    peers,
    search,
)

BENCHES: dict[str, Callable[[list[str]], int]] = {
    "peers": peers.main,
    "ingest_uploads": ingest_uploads.main,
    "import_bookmarks": import_bookmarks.main,
    "first_pass": first_pass.main,
    "search": search.main,
    "index_upkeep": index_upkeep.main,
    "copy_rows": copy_rows.main,
    "fairness": fairness.main,
}


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Benchmark names, and the options for ``bench.peers`` (everything after the first
    option). No name means the side-by-side run; ``all`` means every benchmark."""
    names: list[str] = []
    rest = list(argv)
    while rest and not rest[0].startswith("-"):
        names.append(rest.pop(0))
    if not names:
        names = ["peers"]
    elif names == ["all"]:
        names = list(BENCHES)
    return names, rest


def main(argv: Sequence[str]) -> int:
    names, options = split_args(argv)
    unknown = [name for name in names if name not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHES)}", file=sys.stderr)
        return 2
    if options and names != ["peers"]:
        print(
            "options are for the side-by-side run only (python -m bench --quick)",
            file=sys.stderr,
        )
        return 2
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        code = BENCHES[name](options if name == "peers" else [])
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
