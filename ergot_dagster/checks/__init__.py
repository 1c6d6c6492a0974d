"""Asset check evaluators, by name, for the `checks:` of workflow definitions.

An evaluator reads a produced artifact and the check's parameters (thresholds, usually bound from
request settings) and says whether it passes. The factory turns each `checks:` entry into a
Dagster asset check, so results appear on the asset in the UI.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ergot_dagster.artifacts.manifest import ArtifactManifest


class CheckOutcome(BaseModel):
    """One evaluation: passed or not, a sentence saying why, and figures for the UI."""

    passed: bool
    description: str
    metadata: dict[str, Any] = Field(default_factory=dict)


Evaluator = Callable[[Path, ArtifactManifest, dict[str, Any]], CheckOutcome]
_EVALUATORS: dict[str, Evaluator] = {}


def evaluator(name: str) -> Callable[[Evaluator], Evaluator]:
    """Decorator: register a check evaluator under `name`."""

    def register(fn: Evaluator) -> Evaluator:
        if name in _EVALUATORS:
            raise ValueError(f"check evaluator {name!r} is registered twice")
        _EVALUATORS[name] = fn
        return fn

    return register


def get_evaluator(name: str) -> Evaluator:
    from ergot_dagster.checks import qc  # noqa: F401  (registers the QC evaluators)

    if name not in _EVALUATORS:
        raise KeyError(f"no check evaluator {name!r} (known: {', '.join(sorted(_EVALUATORS))})")
    return _EVALUATORS[name]


def evaluator_names() -> list[str]:
    from ergot_dagster.checks import qc  # noqa: F401

    return sorted(_EVALUATORS)
