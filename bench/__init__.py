"""Benchmarks: every figure beside its bare-Celery floor measured in the same run."""
