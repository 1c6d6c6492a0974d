"""Artifacts: their manifests, the content-addressed store that holds them, and lineage."""
