"""Helpers for the pydantic models of adapters' stage params and target options."""

from __future__ import annotations

from typing import Any


def no_bool_or_text(value: Any) -> Any:
    """A `mode="before"` validator for number fields: refuse booleans and strings.

    Lax pydantic would read `true` as 1 and "40" as 40; a number param that is a bool or a string
    is a mistake in the workflow, not a number.
    """
    if isinstance(value, bool | str):
        raise ValueError(f"must be a number, not {value!r}")
    return value
