"""Sensors: ingest of new source media and the request inbox (runtime health comes later)."""
