"""Runnable jobs: ``python -m pipeline.<job> --help``."""
import schemas  # noqa: F401,E402  (quiets Beam's BigQuery notice before apache_beam loads)
