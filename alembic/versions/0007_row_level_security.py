"""row-level security: every user table is readable and writable only for the user that
the transaction declares in ``app.user_id``

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

A second line of defence behind the ``user_id`` filter of every query: a database role
bound by these policies sees and writes only the rows of the user its transaction declares
(``set_config('app.user_id', …, true)``, what ``ROW_LEVEL_SECURITY=true`` makes the client and
search do), and nothing when none is declared.

Enabled without FORCE on purpose: the tables' owner (the role that runs migrations and the
worker, whose requeue, backfill and upkeep work across users) and superusers are not bound,
so nothing changes for a deployment until producers and search connect with a role of their
own (see README, "Row-level security"). ``current_setting(…, true)`` is NULL when nothing is
declared, and NULL matches no row.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every table holding user data, each with a user_id column.
TENANT_TABLES = (
    "item",
    "upload",
    "bookmark",
    "import_job",
    "import_batch",
    "analysis",
    "embedding",
)
USER_MATCHES = "user_id = current_setting('app.user_id', true)"


def upgrade() -> None:
    for table in TENANT_TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY pol_{table}_user ON {table} "
            f"USING ({USER_MATCHES}) WITH CHECK ({USER_MATCHES})"
        )


def downgrade() -> None:
    for table in TENANT_TABLES:
        op.execute(f"DROP POLICY IF EXISTS pol_{table}_user ON {table}")
        op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
