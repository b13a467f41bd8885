"""The W3C trace context of the request that submitted a job: {"traceparent": ..., "tracestate": ...}.

Why: with tracing on (service_common/tracing.py) a job's run continues the trace of its `POST /v1/jobs`.
The Celery message can't carry it: a message is a slot for whichever job is fairest (worker/tasks.py), not
necessarily the one it was sent for, so the context is stored with the job. NULL with tracing off and
for jobs from before this revision (their runs start traces of their own).

Additive: older replicas ignore the column.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("trace_context", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("trace_context")
