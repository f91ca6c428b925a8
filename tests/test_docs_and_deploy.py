"""The README, compose.yml, Dockerfile and Procfile agree with the code (there is no Docker
engine here, so these are checked by reading them)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from worker.cli import cli
from worker.config import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _resolve_command(argv: list[str]) -> None:
    """Fail unless ``worker ARGV...`` names a real command (checked with --help)."""
    assert argv and argv[0] == "worker", argv
    words = [w for w in argv[1:] if not w.startswith("-")]
    result = CliRunner().invoke(cli, [*words[:2], "--help"])
    if result.exit_code != 0:  # a positional argument after the command
        result = CliRunner().invoke(cli, [*words[:1], "--help"])
    assert result.exit_code == 0, (argv, result.output)


def test_readme_starts_with_the_two_commands() -> None:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_documents_every_setting() -> None:
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in README]
    assert not missing


def test_readme_commands_exist() -> None:
    for match in re.finditer(r"^\| `(worker [^`]*)`", README, re.M):
        first = match.group(1).split(" / ")[0]
        argv = [w for w in shlex.split(first.replace("\\|", "|")) if not w.startswith("[")]
        argv = [w.split("|")[0] for w in argv if w.isidentifier() or w == "worker" or "|" in w]
        _resolve_command(argv)


def test_compose_services_and_health() -> None:
    compose = yaml.safe_load((ROOT / "compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "worker", "beat"} <= set(services)
    assert services["postgres"]["image"].startswith("pgvector/pgvector")
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["redis"]
    assert "--appendonly" in services["redis"]["command"]
    assert services["worker"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    for name in ("migrate", "worker", "beat"):
        _resolve_command(services[name]["command"])
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql+psycopg://")


@pytest.mark.parametrize("line", (ROOT / "Procfile").read_text().strip().splitlines())
def test_procfile_commands_exist(line: str) -> None:
    kind, command = line.split(":", 1)
    argv = shlex.split(command)
    if kind == "release":
        assert argv == ["alembic", "upgrade", "head"]
        assert (ROOT / "alembic.ini").exists()
    else:
        _resolve_command(argv)


def test_dockerfile_installs_cpu_torch_through_bootstrap() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "scripts/bootstrap" in dockerfile
    assert "download.pytorch.org/whl/cpu" in dockerfile
    bootstrap = (ROOT / "scripts" / "bootstrap").read_text()
    assert bootstrap.index("torch==") < bootstrap.index('install -e "$spec"')
