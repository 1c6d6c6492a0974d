"""Ergot-managed source media: the ingest root, the record kept for each file, and ingest itself."""
