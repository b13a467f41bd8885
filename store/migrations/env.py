"""Alembic environment: runs on the connection store.migrations hands it, inside its locked transaction."""

from alembic import context

from store.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `rigl db upgrade` (store.migrations.upgrade), which passes the "
                       "connection and takes the upgrade lock")
context.configure(connection=connection, target_metadata=Base.metadata, transactional_ddl=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
