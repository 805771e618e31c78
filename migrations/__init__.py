"""Alembic migrations for SkinScan's database (run with `skinscan migrate`)."""
