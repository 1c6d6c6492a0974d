"""The runtime targets configuration as a Dagster resource."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from ergot_dagster.targets.config import TargetsConfig, cached_targets


class RuntimeTargetsResource(ConfigurableResource):
    """Where the runtime targets are declared (`ERGOT_RUNTIME_TARGETS`)."""

    path: str = Field(description="the runtime targets YAML file")

    def get(self) -> TargetsConfig:
        return cached_targets(Path(self.path))
