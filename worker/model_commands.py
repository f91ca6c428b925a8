"""``worker models``: change the embedding model without downtime.

worker models add NAME --path DIR | --package PKG [--distance cosine|l2|ip] [--index hnsw|ivfflat]
                  [--first-pass]
worker models list [--json]
worker models distil DIR [--dimensions 256]
worker models activate NAME
worker models retire NAME
worker models resume NAME
"""

from __future__ import annotations

import json
from typing import Any

import click
from sqlalchemy import Engine

from worker.config import get_settings
from worker.db.models import DISTANCES, INDEX_KINDS
from worker.render import table


def _engine() -> Engine:
    from worker.db.engine import get_engine

    return get_engine(get_settings())


def _echo(result: dict[str, Any]) -> None:
    click.echo(json.dumps(result, indent=2, default=str))


@click.group("models")
def models() -> None:
    """Embedding models: add one (background re-embed), list, activate, retire, resume."""


@models.command("add")
@click.argument("name")
@click.option("--path", type=click.Path(file_okay=False), default=None, help="Model directory.")
@click.option("--package", default=None, help="An installed package that ships the model.")
@click.option("--distance", type=click.Choice(DISTANCES), default="cosine", show_default=True)
@click.option("--index", "index_kind", type=click.Choice(INDEX_KINDS), default="hnsw")
@click.option("--halfvec", is_flag=True, help="Index at half precision (half the size).")
@click.option("--batch-rows", default=1000, show_default=True, type=click.IntRange(1, 100_000))
@click.option(
    "--first-pass",
    is_flag=True,
    help="A fast (static) model that makes bulk imports searchable while they are staged; "
    "the serving model's vectors replace its rows. Nothing is backfilled.",
)
def add_cmd(
    name: str,
    path: str | None,
    package: str | None,
    distance: str,
    index_kind: str,
    halfvec: bool,
    batch_rows: int,
    first_pass: bool,
) -> None:
    """Register NAME from local files (never downloaded) and start re-embedding every live
    item with it in the background; search keeps using the serving model meanwhile. With
    --first-pass, register it as the first-pass model of bulk imports instead."""
    from worker.models import add_model

    result = add_model(
        _engine(),
        name,
        path=path,
        package=package,
        distance=distance,
        index_kind=index_kind,
        index_precision="halfvec" if halfvec else "vector",
        batch_rows=batch_rows,
        first_pass=first_pass,
    )
    if first_pass:
        click.echo(
            f"added {name} ({result['kind']}, {result['dimensions']} dims) as the first-pass "
            "model: bulk imports are searchable with it as soon as they are staged"
        )
        return
    click.echo(
        f"added {name} ({result['kind']}, {result['dimensions']} dims): backfill job "
        f"{result['job_id']}, {result['items']} items in {result['batches']} batches; "
        f"follow with `worker models list`"
    )


@models.command("distil")
@click.argument("target", type=click.Path(file_okay=False))
@click.option("--dimensions", default=256, show_default=True, type=click.IntRange(8, 1024))
def distil_cmd(target: str, dimensions: int) -> None:
    """Distil a static (model2vec) model from the default model's files into TARGET, offline:
    a fast first-pass model (`worker models add NAME --path TARGET --first-pass`) or a cheap
    second model. Needs the `distil` extra."""
    from worker.ingest.embed import default_model_path
    from worker.ingest.static_embed import distil

    source = get_settings().model_path or default_model_path()
    try:
        out = distil(source, target, dimensions=dimensions)
    except (RuntimeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"distilled {source} into {out} ({dimensions} dimensions)")


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Everything, as JSON.")
def list_cmd(as_json: bool) -> None:
    """Every model: state, serving, vectors, backfill progress, index, recall, readiness."""
    from worker.models import list_models

    rows = list_models(_engine())
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for row in rows:
        backfill = row["backfill"] or {}
        row["serving"] = "yes" if row["serving"] else ""
        row["backfill"] = (
            f"{backfill['status']} {backfill['percent']}% ({backfill['batches']} batches"
            + (f", {backfill['rows_per_s']} rows/s" if backfill.get("rows_per_s") else "")
            + ")"
            if backfill
            else ""
        )
        recall = row["last_recall"]
        row["last_recall"] = f"{recall:.3f}" if recall is not None else ""
    cols = ["name", "state", "serving", "dimensions", "rows", "items", "missing_items"]
    cols += ["backfill", "index_state", "last_recall", "ready"]
    click.echo(table(rows, cols))
    for row in rows:
        if (row.get("backfill") or "").startswith("failed"):
            click.echo(f"{row['name']}: backfill failed; `worker models resume {row['name']}`")


@models.command("activate")
@click.argument("name")
def activate_cmd(name: str) -> None:
    """Make NAME the model search uses (refused until its backfill and index are complete)."""
    from worker.models import activate

    result = activate(_engine(), name)
    if result["changed"]:
        click.echo(f"{name} now serves search (was {result['previous']})")
    else:
        click.echo(f"{name} already serves search")


@models.command("retire")
@click.argument("name")
def retire_cmd(name: str) -> None:
    """Stop embedding with NAME, drop its index and delete its vectors (not the serving one)."""
    from worker.models import retire

    result = retire(_engine(), name)
    click.echo(
        f"{name} retired: index {result['index_dropped']} dropped, {result['deleted_rows']} "
        f"vectors deleted in {result['delete_batches']} batches ({result['seconds']}s)"
    )


@models.command("resume")
@click.argument("name")
def resume_cmd(name: str) -> None:
    """Send NAME's pending backfill batches again (after a crash or lost messages), retry
    failed ones, or finish the job (sweep, index, recall)."""
    from worker.models import resume

    result = resume(_engine(), name)
    _echo(result)
