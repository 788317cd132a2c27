"""Runnable jobs: ``python -m pipeline.<job> --help``."""
