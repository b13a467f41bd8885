"""How a sweep searches: `sweeps.search`, the strategy (random or optuna), its budget, ranges, pruner and,
for optuna, the trials asked so far (store/search.py). NULL: a grid sweep, as before.

Additive: older replicas ignore the column (and treat every sweep as a grid).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sweeps", sa.Column("search", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sweeps") as batch:
        batch.drop_column("search")
