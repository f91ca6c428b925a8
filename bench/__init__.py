"""Benchmarks: each prints ratios measured side by side in one run (absolute times on shared
2-core machines mean little)."""
