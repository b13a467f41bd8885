"""File sizes and parameter counts as 64-bit integers.

A checkpoint, upload or weights file over 2 GiB, or a model with more than 2^31 parameters (a 7B
language model), overflowed the 32-bit INTEGER columns on PostgreSQL. SQLite's INTEGER is already
64-bit; the batch operations keep both databases' declared types equal to the models.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = {"checkpoints": ("size",), "datasets": ("size",), "weights": ("size", "params"),
           "architectures": ("params",)}


def _retype(old, new) -> None:
    for table, columns in COLUMNS.items():
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.alter_column(column, existing_type=old, type_=new, existing_nullable=False)


def upgrade() -> None:
    _retype(sa.Integer(), sa.BigInteger())


def downgrade() -> None:
    _retype(sa.BigInteger(), sa.Integer())
