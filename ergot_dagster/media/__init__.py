"""Media helpers shared by ingest and the runtimes: subprocesses, probing, hashing, media types."""
