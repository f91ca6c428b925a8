"""fairness and control of imports: lanes and held batches

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

``import_job.lane`` says whether an import's batches are sent at once (interactive) or
released a few at a time by the dispatcher (bulk). ``import_batch.held`` marks a batch staged
in the database and not meant to be in Redis (waiting for the dispatcher, or for a resume);
``released_at`` is when it was last handed to Redis, which the dispatcher uses to serve the
user it served least recently first. The defaults describe rows written before this
revision exactly: their batches were sent at once and are not held.

The job's status constraint already lists 'paused' and 'cancelled' (0002).
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "import_job",
        sa.Column("lane", sa.Text(), server_default="interactive", nullable=False),
    )
    op.create_check_constraint(
        "ck_import_job_lane", "import_job", "lane IN ('interactive', 'bulk')"
    )
    op.add_column(
        "import_batch",
        sa.Column("held", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.add_column("import_batch", sa.Column("released_at", sa.DateTime(timezone=True)))
    # A live table: build the index without blocking the workers' writes.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_import_batch_held",
            "import_batch",
            ["user_id", "import_job_id", "seq"],
            postgresql_where=sa.text("held AND status = 'queued'"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_import_batch_held",
            table_name="import_batch",
            postgresql_concurrently=True,
            if_exists=True,
        )
    op.drop_column("import_batch", "released_at")
    op.drop_column("import_batch", "held")
    op.drop_constraint("ck_import_job_lane", "import_job", type_="check")
    op.drop_column("import_job", "lane")
