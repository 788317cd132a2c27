"""Beam steps, one per file, reusable by any job."""
import schemas  # noqa: F401,E402  (quiets Beam's BigQuery notice before apache_beam loads)
