"""Sensors: ingest of new source media (and, later, the request inbox and runtime health)."""
