"""The sparsity plan of a job, measured at submission: jobs.plan (JSON, nullable).

Why: `GET /v1/jobs/{id}/sparsity` of a job without a report rebuilt its model at every call (3-6 s of API
CPU for a 300-layer model, at every poll). The plan is now measured once, when the job is checked at
submission (in a bounded child process, api/model_build.py), and stored here. Jobs stored before it
have NULL: their plan is measured at the first read, bounded the same way, and stored.

Additive: older replicas ignore the column.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("plan", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("plan")
