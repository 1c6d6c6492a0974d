"""Ergot's media processing plane: versioned media workflows as Dagster assets."""

__version__ = "0.1.0"
