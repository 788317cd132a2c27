"""Data contracts: Arrow schemas, the store manifest, version constants."""
