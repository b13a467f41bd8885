"""The tensor index of uploaded weights: {name: [dtype, shape]} from the file's header.

Why: a job naming uploaded weights re-read and re-parsed the file's header at every submission (a 16 MB
header of 240,000 tensors took 4.9 s each time, for every child of a sweep). The header is now parsed
once at upload and this column keeps what a submission needs. Weights stored before it have NULL here;
their header is read once, at the first job that names them, and stored.

Additive: older replicas ignore the column.

Revision ID: 0008
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("weights", sa.Column("tensor_index", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("weights") as batch:
        batch.drop_column("tensor_index")
