"""The upload pipeline: sources → parse → chunk → analyze → embed → store, one module a stage."""
