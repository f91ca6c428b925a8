"""bookmark: the user's note, read and archived state, and what else the export said

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

Read-it-later tools (Pocket, Instapaper, Readwise, Omnivore, wallabag, Karakeep) export a note
apart from the page's description, and whether an item was read or archived; ``NULL`` in
``is_read``/``is_archived`` means the export did not say. ``extra`` keeps the flags that have
no column (favourite, the tool's location or tab group, Pinboard's shared, Firefox keywords).
Adding nullable columns, and one with a constant default, rewrites no rows.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("bookmark", sa.Column("note", sa.Text()))
    op.add_column("bookmark", sa.Column("is_read", sa.Boolean()))
    op.add_column("bookmark", sa.Column("is_archived", sa.Boolean()))
    op.add_column(
        "bookmark",
        sa.Column("extra", pg.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
    )


def downgrade() -> None:
    for column in ("extra", "is_archived", "is_read", "note"):
        op.drop_column("bookmark", column)
