"""Workflow definitions: the model, loading and locking, and turning them into assets and runs."""
