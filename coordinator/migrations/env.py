"""Alembic environment for the coordinator store.

There is no alembic.ini: `coordinator.store.migrate(engine)` builds the Config in code and
hands over an open connection (inside a write transaction) as `config.attributes["connection"]`.
Offline SQL (`--sql`, for a DBA) works when the Config carries `sqlalchemy.url`
(`coordinator.store.alembic_config(url)`).

On PostgreSQL the upgrade first takes a transaction-scoped advisory lock, so two processes
opening a fresh store at once migrate one after the other instead of racing.
"""

from __future__ import annotations

from alembic import context

from coordinator.store import VERSION_TABLE, Base

MIGRATION_LOCK = 0x66656463  # "fedc": any constant; the same in every process


def _run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run the store's migrations through coordinator.store.migrate(engine) or open_store()")
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        transactional_ddl=True,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        context.run_migrations()


def _run_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _run_offline()
else:
    _run_online()
