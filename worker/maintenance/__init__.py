"""Scheduled upkeep: vector indexes, VACUUM/ANALYZE, requeue of stuck work, statistics."""
