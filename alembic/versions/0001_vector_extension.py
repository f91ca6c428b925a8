"""pgvector and btree_gin extensions, and the immutable helper used by generated tsvector columns

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    # GIN over (user_id, tags): user_id stays first in every user index.
    op.execute("CREATE EXTENSION IF NOT EXISTS btree_gin")
    # array_to_string is only STABLE; a generated column needs IMMUTABLE. For text[] the
    # result cannot change between calls, so wrapping it is safe.
    op.execute(
        "CREATE OR REPLACE FUNCTION worker_immutable_array_to_string(text[]) RETURNS text "
        "LANGUAGE sql IMMUTABLE PARALLEL SAFE "
        "AS $$ SELECT coalesce(array_to_string($1, ' '), '') $$"
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS worker_immutable_array_to_string(text[])")
    # The extension may be shared with other schemas' data: dropping it is only safe when
    # nothing else uses the type, which DROP EXTENSION (without CASCADE) checks for us.
    op.execute("DROP EXTENSION IF EXISTS btree_gin")
    op.execute("DROP EXTENSION IF EXISTS vector")
