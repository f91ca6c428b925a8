"""Database access: engine and sessions, typed models, queries, vector indexes, operations."""
