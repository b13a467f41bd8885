"""Job name, tags, free metadata, and the sparsity method as a column, for the list filters.

Tags are rows of job_tags (indexed by tag) so filtering by one is an index lookup on SQLite and
PostgreSQL alike; jobs.tags keeps them as submitted, for display. jobs.method is filled from each
existing job's resolved spec.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("name", sa.String(200), nullable=True))
    op.add_column("jobs", sa.Column("tags", sa.JSON(), nullable=True))
    op.add_column("jobs", sa.Column("meta", sa.JSON(), nullable=True))
    op.add_column("jobs", sa.Column("method", sa.String(16), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        method = "CAST(resolved_spec AS json) -> 'sparsity' ->> 'method'"
    else:
        method = "json_extract(resolved_spec, '$.sparsity.method')"
    op.execute(f"UPDATE jobs SET method = {method}")
    op.create_index("ix_jobs_owner_method", "jobs", ["owner", "method"])
    op.create_table(
        "job_tags",
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("tag", sa.String(64), primary_key=True),
    )
    op.create_index("ix_job_tags_tag", "job_tags", ["tag", "job_id"])


def downgrade() -> None:
    op.drop_index("ix_job_tags_tag", table_name="job_tags")
    op.drop_table("job_tags")
    op.drop_index("ix_jobs_owner_method", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for column in ("method", "meta", "tags", "name"):
            batch.drop_column(column)
