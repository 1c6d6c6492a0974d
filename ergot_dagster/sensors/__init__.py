"""Sensors: ingest of new source media, the request inbox, and runtime target health."""
