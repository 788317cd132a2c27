"""Imports Beam's BigQuery client stubs once with their "apitools not found" notice dropped.

Beam logs that line on the root logger at ``import apache_beam`` whenever the GCP extras are
absent, although nothing here uses BigQuery. The root logger is left exactly as it was found
(a NullHandler stops ``logging.warning`` from calling basicConfig while the notice is raised).
"""
import logging

_NOTICE = "apitools not found"


def _drop_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOTICE)


def import_beam_quietly() -> None:
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)
    root.addFilter(_drop_notice)
    try:
        import apache_beam.io.gcp.internal.clients.bigquery  # noqa: F401
    except ImportError:
        pass
    finally:
        root.removeFilter(_drop_notice)
        root.removeHandler(guard)
