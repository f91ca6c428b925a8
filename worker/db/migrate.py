"""Alembic driven from Python, with the same Settings as the worker."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.script import ScriptDirectory

from alembic import command
from worker.config import Settings, get_settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def alembic_config(settings: Settings | None = None) -> Config:
    ini = REPO_ROOT / "alembic.ini"
    if not ini.exists():
        raise FileNotFoundError(
            f"{ini} not found: migrations ship with the source tree (install with pip -e)"
        )
    cfg = Config(str(ini))
    cfg.attributes["database_url"] = (settings or get_settings()).database_url
    return cfg


def script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def upgrade(revision: str = "head", settings: Settings | None = None) -> None:
    command.upgrade(alembic_config(settings), revision)


def downgrade(revision: str, settings: Settings | None = None) -> None:
    command.downgrade(alembic_config(settings), revision)


def current(settings: Settings | None = None) -> None:
    command.current(alembic_config(settings), verbose=True)


def history(settings: Settings | None = None) -> None:
    command.history(alembic_config(settings), verbose=False)


def revision(message: str, settings: Settings | None = None) -> None:
    command.revision(alembic_config(settings), message=message, autogenerate=True)


# embedding's partitions (migration 0004) are made at run time, not declared.
_EMBEDDING_PARTITION = re.compile(r"^embedding_(main|s\d+)$")


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """What autogenerate compares. Left out on purpose: the per-model vector indexes (created
    from embedding_model rows by worker.db.indexes) and embedding's partitions."""
    if type_ == "index" and reflected and name and name.startswith("embedding_vec_"):
        return False
    if type_ == "table" and name and _EMBEDDING_PARTITION.match(name):
        return False
    return not (type_ == "table" and name == "alembic_version")
