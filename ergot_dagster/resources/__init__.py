"""Dagster resources: the artifact store, the ingest root, and one adapter per runtime type."""
