"""Torch modules of EDJE: vision backbone wrapper, token-compression adapter, checkpoint I/O."""
import schemas  # noqa: F401,E402  (quiets Beam's BigQuery notice before apache_beam loads)
