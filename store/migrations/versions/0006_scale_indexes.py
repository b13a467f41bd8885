"""Indexes for many jobs and workers (bench/scale.py): keyset pages, event cursors and the fair claim.

Why: at 100,000 jobs an owner's list (`WHERE owner = ? ORDER BY seq DESC`), a status-filtered list, an
event stream's cursor read (`WHERE job_id = ? AND id > ? ORDER BY id`) and the claim's "whose latest job
started longest ago" (`max(started_at)` per owner) each read or sorted every matching row; with these
each is a short walk of one index. (job_id, id) replaces the single-column events index it covers.

Additive for older replicas (they only get faster). Built inside the upgrade's transaction: it blocks
writes to the table while it runs, about a second per 100,000 jobs or 2 million events on 2 cores.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_owner_seq", "jobs", ["owner", "seq"])
    op.create_index("ix_jobs_status_seq", "jobs", ["status", "seq"])
    op.create_index("ix_jobs_owner_started", "jobs", ["owner", "started_at"])
    op.create_index("ix_events_job_id_id", "events", ["job_id", "id"])
    op.drop_index("ix_events_job_id", table_name="events")


def downgrade() -> None:
    op.create_index("ix_events_job_id", "events", ["job_id"])
    op.drop_index("ix_events_job_id_id", table_name="events")
    op.drop_index("ix_jobs_owner_started", table_name="jobs")
    op.drop_index("ix_jobs_status_seq", table_name="jobs")
    op.drop_index("ix_jobs_owner_seq", table_name="jobs")
