"""Processing requests: what a consumer asks for, and how it becomes exactly one Dagster run."""
