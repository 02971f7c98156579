"""Evaluation: every channel under one harness and ledger, reports, sharding, ablations and benchmarks."""
