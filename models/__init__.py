"""Torch modules of EDJE: vision backbone wrapper, token-compression adapter, checkpoint I/O."""
