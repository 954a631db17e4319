"""Celery task definitions (public names in :mod:`workers.contract`)."""
