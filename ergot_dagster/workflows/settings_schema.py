"""Request settings against a definition's JSON Schema: defaults, validation, clear errors."""

from __future__ import annotations

import copy
from typing import Any

from jsonschema import Draft202012Validator


class SettingsError(ValueError):
    """Settings that break the schema. The message names every failing field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def apply_defaults(schema: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Fill in the schema's `default`s for absent properties, recursing into nested objects."""
    result = copy.deepcopy(settings)
    for key, prop in (schema.get("properties") or {}).items():
        if not isinstance(prop, dict):
            continue
        if key not in result and "default" in prop:
            result[key] = copy.deepcopy(prop["default"])
        if prop.get("type") == "object" and isinstance(result.get(key), dict):
            result[key] = apply_defaults(prop, result[key])
    return result


def _field(path: Any) -> str:
    parts = [str(p) for p in path]
    return "settings." + ".".join(parts) if parts else "settings"


def validate_settings(schema: dict[str, Any], settings: dict[str, Any] | None) -> dict[str, Any]:
    """Return `settings` with defaults applied, or raise `SettingsError` naming each bad field."""
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise SettingsError([f"settings must be an object, not {type(settings).__name__}"])
    filled = apply_defaults(schema, settings)
    validator = Draft202012Validator(schema)
    problems = []
    for error in sorted(validator.iter_errors(filled), key=lambda e: [str(p) for p in e.path]):
        if error.validator == "additionalProperties" and not error.path:
            allowed = sorted((schema.get("properties") or {}).keys())
            unknown = sorted(set(filled) - set(allowed))
            problems.append(
                f"unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(allowed) or 'none'}"
            )
        else:
            problems.append(f"{_field(error.path)}: {error.message}")
    if problems:
        raise SettingsError(problems)
    return filled
