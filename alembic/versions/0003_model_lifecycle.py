"""model lifecycle: the serving flag, backfill jobs and their batches

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06

``state`` says whether new items are embedded with a model (active, backfilling) or not
(retired); ``serving`` says which one model answers searches. Two facts, two columns: after a
cut-over the old model stays ``active`` (still embedded, so a switch back is instant) without
serving. The unique partial index makes "exactly one serving model" a database rule.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_MODEL = "all-MiniLM-L6-v2"


def _id() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column("id", sa.BigInteger(), sa.Identity(always=True), primary_key=True)


def _times() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
    ]


def _count(name: str, kind: type[sa.types.TypeEngine] = sa.Integer) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, kind(), server_default="0", nullable=False)


def upgrade() -> None:
    op.add_column(
        "embedding_model",
        sa.Column("serving", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.create_check_constraint(
        "ck_embedding_model_serving_active", "embedding_model", "NOT serving OR state = 'active'"
    )
    op.create_index(
        "uq_embedding_model_serving",
        "embedding_model",
        ["serving"],
        unique=True,
        postgresql_where=sa.text("serving"),
    )
    # The seeded default serves; failing that (a renamed default), the oldest active model.
    op.execute(
        sa.text(
            "UPDATE embedding_model SET serving = true WHERE id = (SELECT id FROM embedding_model "
            "WHERE state = 'active' ORDER BY (name = :name) DESC, id LIMIT 1)"
        ).bindparams(name=DEFAULT_MODEL)
    )

    op.create_table(
        "backfill_job",
        _id(),
        sa.Column("model_id", sa.BigInteger(), nullable=False),
        sa.Column("source_model", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), server_default="queued", nullable=False),
        _count("total_batches"),
        _count("total_items"),
        _count("total_rows", sa.BigInteger),
        _count("done_batches"),
        _count("done_items"),
        _count("rows_written", sa.BigInteger),
        _count("failed_batches"),
        _count("passes"),
        sa.Column("error", sa.Text()),
        sa.Column("details", pg.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        *_times(),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'indexing', 'done', 'failed', 'cancelled')",
            name="ck_backfill_job_status",
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["embedding_model.id"],
            name="fk_backfill_job_model_id_embedding_model",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_backfill_job"),
    )
    op.create_index(
        "ix_backfill_job_model_id_created_at", "backfill_job", ["model_id", "created_at"]
    )
    op.create_index(
        "ix_backfill_job_open",
        "backfill_job",
        ["status", "updated_at"],
        postgresql_where=sa.text("status IN ('queued', 'running', 'indexing')"),
    )

    op.create_table(
        "backfill_batch",
        _id(),
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("item_ids", pg.ARRAY(sa.BigInteger()), nullable=False),
        _count("source_rows"),
        sa.Column("status", sa.Text(), server_default="queued", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True)),
        sa.Column("rows_written", sa.Integer()),
        sa.Column("error", sa.Text()),
        *_times(),
        sa.CheckConstraint(
            "status IN ('queued', 'processing', 'done', 'failed')",
            name="ck_backfill_batch_status",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["backfill_job.id"],
            name="fk_backfill_batch_job_id_backfill_job",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_backfill_batch"),
        sa.UniqueConstraint("job_id", "seq", name="uq_backfill_batch_job_id_seq"),
    )
    op.create_index("ix_backfill_batch_job_id_status", "backfill_batch", ["job_id", "status"])
    op.create_index(
        "ix_backfill_batch_stuck",
        "backfill_batch",
        ["status", "updated_at"],
        postgresql_where=sa.text("status IN ('queued', 'processing')"),
    )


def downgrade() -> None:
    op.drop_table("backfill_batch")
    op.drop_table("backfill_job")
    op.drop_index("uq_embedding_model_serving", table_name="embedding_model")
    op.drop_constraint("ck_embedding_model_serving_active", "embedding_model", type_="check")
    op.drop_column("embedding_model", "serving")
