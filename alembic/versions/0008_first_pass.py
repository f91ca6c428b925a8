"""first-pass models: a static model that makes a large import searchable at once

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30

``embedding_model.state`` may be 'first_pass': a fast model (model2vec) that embeds a bulk
import's new bookmarks while they are staged, so the import is searchable when its staging
commits; the serving model's vectors follow batch by batch and replace them. At most one
model has that state (a unique partial index). ``import_job.first_pass_at`` is when the
staging that wrote those vectors committed (NULL: the import had no first pass), and
``first_pass_model`` which model it used. Nullable columns rewrite no rows.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("ck_embedding_model_state", "embedding_model", type_="check")
    op.create_check_constraint(
        "ck_embedding_model_state",
        "embedding_model",
        "state IN ('active', 'backfilling', 'retired', 'first_pass')",
    )
    op.create_index(
        "uq_embedding_model_first_pass",
        "embedding_model",
        ["state"],
        unique=True,
        postgresql_where=sa.text("state = 'first_pass'"),
    )
    op.add_column("import_job", sa.Column("first_pass_at", sa.DateTime(timezone=True)))
    op.add_column("import_job", sa.Column("first_pass_model", sa.Text()))


def downgrade() -> None:
    op.drop_column("import_job", "first_pass_model")
    op.drop_column("import_job", "first_pass_at")
    op.drop_index("uq_embedding_model_first_pass", table_name="embedding_model")
    # A first-pass model's vectors are only a stand-in for the serving model's: drop them
    # with the model, since the older schema has no state for it.
    op.execute(
        "DELETE FROM embedding WHERE model IN "
        "(SELECT name FROM embedding_model WHERE state = 'first_pass')"
    )
    op.execute("DELETE FROM embedding_model WHERE state = 'first_pass'")
    op.drop_constraint("ck_embedding_model_state", "embedding_model", type_="check")
    op.create_check_constraint(
        "ck_embedding_model_state",
        "embedding_model",
        "state IN ('active', 'backfilling', 'retired')",
    )
