"""The Dagster run config of a workflow: its schema (for the launchpad) and a request's values.

Each workflow's multi-asset takes `version`, `settings` and `inputs` as op config. Settings are
typed from the JSON Schema where every loaded version agrees on a property's type, so the UI's
launchpad can scaffold them with defaults; the JSON Schema of the chosen version is then checked
in full before any work starts.
"""

from __future__ import annotations

import json
from typing import Any

from dagster import Any as DagsterAny
from dagster import Bool, Field, Float, Int, Map, Permissive, String

from ergot_dagster.workflows.model import WorkflowDefinition

_JSON_TO_DAGSTER = {"integer": Int, "number": Float, "string": String, "boolean": Bool}


def op_name(definition: WorkflowDefinition) -> str:
    """The op (and multi-asset) name of a workflow, shared by all its versions."""
    return f"{definition.family}__{definition.name}"


def _settings_fields(versions: list[WorkflowDefinition]) -> dict[str, Field]:
    """Launchpad fields for the latest version's settings.

    Dagster fills a field's default into the run config before our code sees it, so a default is
    given to Dagster only when every loaded version has the property with that same default;
    otherwise a run pinned to an older version would silently get the latest version's default.
    The chosen version's own JSON Schema supplies the rest.
    """
    latest = versions[-1]
    fields: dict[str, Field] = {}
    for key, prop in (latest.settings.get("properties") or {}).items():
        if not isinstance(prop, dict):
            continue
        props = [(v.settings.get("properties") or {}).get(key) for v in versions]
        shapes = {json.dumps(p.get("type")) if isinstance(p, dict) else "absent" for p in props}
        json_type = prop.get("type")
        dagster_type = (
            _JSON_TO_DAGSTER.get(json_type, DagsterAny)
            if len(shapes) == 1 and isinstance(json_type, str)
            else DagsterAny
        )
        defaults = {
            json.dumps(p["default"]) if isinstance(p, dict) and "default" in p else None
            for p in props
        }
        description = prop.get("description")
        if len(defaults) == 1 and None not in defaults:
            fields[key] = Field(
                dagster_type,
                is_required=False,
                default_value=prop["default"],
                description=description,
            )
        else:
            fields[key] = Field(dagster_type, is_required=False, description=description)
    return fields


def config_schema(versions: list[WorkflowDefinition]) -> dict[str, Field]:
    """The op config schema of a workflow across its loaded versions."""
    latest = versions[-1]
    published = ", ".join(str(v.version) for v in versions)
    return {
        "version": Field(
            Int,
            default_value=latest.version,
            is_required=False,
            description=f"workflow version to run (published: {published}; default latest)",
        ),
        "settings": Field(
            Permissive(_settings_fields(versions)),
            is_required=False,
            description="request settings, checked against the version's JSON Schema",
        ),
        "inputs": Field(
            # A list for an input that takes several (`many`); bind_inputs checks the shape.
            Map(str, DagsterAny),
            is_required=False,
            default_value={},
            description="extra inputs by name: a source, artifact or library ref, or a list",
        ),
    }


def run_config_for(
    definition: WorkflowDefinition,
    settings: dict[str, Any] | None = None,
    inputs: dict[str, str | list[str]] | None = None,
) -> dict[str, Any]:
    """Run config that runs `definition` (this exact version) with `settings`."""
    return {
        "ops": {
            op_name(definition): {
                "config": {
                    "version": definition.version,
                    "settings": settings or {},
                    "inputs": inputs or {},
                }
            }
        }
    }
