"""Beam steps, one per file, reusable by any job."""
