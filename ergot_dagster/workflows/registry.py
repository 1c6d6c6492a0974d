"""The loaded workflow versions, and how a request's `name` or `name@version` finds one."""

from __future__ import annotations

from collections import defaultdict

from ergot_dagster.errors import UnknownWorkflowError
from ergot_dagster.workflows.model import WorkflowDefinition


class WorkflowRegistry:
    """Every loaded version of every workflow."""

    def __init__(self, definitions: list[WorkflowDefinition]) -> None:
        by_name: dict[str, dict[int, WorkflowDefinition]] = defaultdict(dict)
        for definition in definitions:
            by_name[definition.name][definition.version] = definition
        self._by_name = {name: dict(sorted(v.items())) for name, v in sorted(by_name.items())}

    def names(self) -> list[str]:
        return list(self._by_name)

    def versions(self, name: str) -> list[WorkflowDefinition]:
        return list(self._known(name).values())

    def latest(self, name: str) -> WorkflowDefinition:
        return self.versions(name)[-1]

    def all(self) -> list[WorkflowDefinition]:
        return [d for versions in self._by_name.values() for d in versions.values()]

    def _known(self, name: str) -> dict[int, WorkflowDefinition]:
        if name not in self._by_name:
            known = ", ".join(self._by_name) or "none"
            raise UnknownWorkflowError(f"unknown workflow {name!r}; known workflows: {known}")
        return self._by_name[name]

    def get(self, spec: str) -> WorkflowDefinition:
        """Resolve `name` (the latest version) or `name@version`."""
        name, _, version = spec.strip().partition("@")
        versions = self._known(name)
        if not version:
            return versions[max(versions)]
        if not version.isdigit() or int(version) not in versions:
            published = ", ".join(str(v) for v in versions)
            raise UnknownWorkflowError(
                f"workflow {name!r} has no version {version!r}; published versions: {published}"
            )
        return versions[int(version)]
