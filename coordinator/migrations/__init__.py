"""Alembic migrations of the coordinator store; run them through `coordinator.store.migrate`."""
