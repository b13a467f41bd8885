"""Everything the create_all releases added after the first (up to commit 123de6a), added only where missing.

A database made before migrations may come from any of those releases: each start's create_all added
the tables that release knew, never a column. So this revision looks before it adds: the same upgrade
serves a first-release database and one made by the last create_all release.

  82cb5ef  api_keys, idempotency
  86820da  jobs.worker, jobs.preempt_requested
  dbb0cae  ix_jobs_owner_status
  0285fa5  jobs.preemptions, owner_locks, pending_deletions
  8f9e082  jobs.devices
  d6e20a2  weights

Columns added to a table that has rows carry a server default (the value old rows get; also what an
older replica's INSERT, which leaves them out, gets during a rolling deploy).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)

def _job_columns() -> list[sa.Column]:
    return [
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("preempt_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("preemptions", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("devices", sa.Integer(), nullable=False, server_default="1"),
    ]


def _tables() -> dict[str, sa.Table]:
    return {
        "api_keys": sa.Table(
            "api_keys", sa.MetaData(),
            sa.Column("id", sa.String(40), primary_key=True),
            sa.Column("owner", sa.String(64), nullable=False, index=True),
            sa.Column("name", sa.String(200), nullable=False),
            sa.Column("admin", sa.Boolean(), nullable=False),
            sa.Column("secret_sha256", sa.String(64), nullable=False),
            sa.Column("created_at", TZ, nullable=False),
            sa.Column("revoked_at", TZ, nullable=True),
        ),
        "idempotency": sa.Table(
            "idempotency", sa.MetaData(),
            sa.Column("owner", sa.String(64), primary_key=True),
            sa.Column("key", sa.String(200), primary_key=True),
            sa.Column("body_sha256", sa.String(64), nullable=False),
            sa.Column("job_id", sa.String(40), nullable=False),
            sa.Column("created_at", TZ, nullable=False),
        ),
        "owner_locks": sa.Table(
            "owner_locks", sa.MetaData(),
            sa.Column("owner", sa.String(64), primary_key=True),
            sa.Column("touched_at", TZ, nullable=False),
        ),
        "pending_deletions": sa.Table(
            "pending_deletions", sa.MetaData(),
            sa.Column("job_id", sa.String(40), primary_key=True),
            sa.Column("requested_at", TZ, nullable=False),
        ),
        "weights": sa.Table(
            "weights", sa.MetaData(),
            sa.Column("id", sa.String(40), primary_key=True),
            sa.Column("owner", sa.String(64), nullable=False, index=True),
            sa.Column("name", sa.String(200), nullable=False),
            sa.Column("size", sa.Integer(), nullable=False),
            sa.Column("sha256", sa.String(64), nullable=False),
            sa.Column("tensors", sa.Integer(), nullable=False),
            sa.Column("params", sa.Integer(), nullable=False),
            sa.Column("created_at", TZ, nullable=False),
        ),
    }


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    present = set(inspector.get_table_names())
    job_columns = {c["name"] for c in inspector.get_columns("jobs")}
    for column in _job_columns():
        if column.name not in job_columns:
            op.add_column("jobs", column)
    if "ix_jobs_owner_status" not in {i["name"] for i in inspector.get_indexes("jobs")}:
        op.create_index("ix_jobs_owner_status", "jobs", ["owner", "status"])
    for name, table in _tables().items():
        if name not in present:
            table.create(bind)  # with its indexes (ix_api_keys_owner, ix_weights_owner)


def downgrade() -> None:
    raise NotImplementedError("0002 can't be undone: a create_all release may have made these tables and "
                              "columns itself, and dropping them loses API keys and uploads")
