"""Ingestion and embedding worker: uploads and bookmark imports into PostgreSQL + pgvector."""

__version__ = "0.1.0"
