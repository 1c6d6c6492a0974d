"""The runtime targets configuration as a Dagster resource."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from ergot_dagster.targets.config import TargetsConfig, cached_targets
from ergot_dagster.targets.model import RuntimeTarget


class RuntimeTargetsResource(ConfigurableResource):
    """Where the runtime targets are declared (`ERGOT_RUNTIME_TARGETS`)."""

    path: str = Field(description="the runtime targets YAML file")

    def get(self) -> TargetsConfig:
        return cached_targets(Path(self.path))


class RuntimeTargetResource(ConfigurableResource):
    """One runtime target, by name: the Dagster UI lists each target among the resources, with
    the runtime, endpoint and limits it was configured with (secrets appear only as the names of
    the environment variables holding them)."""

    path: str = Field(description="the runtime targets YAML file")
    name: str = Field(description="the target's name")
    runtime: str = Field(description="the runtime type it serves")
    locality: str = Field(description="local or remote, and its site")
    endpoint: str = Field(default="", description="base URL of a remote target")
    concurrency: int = Field(description="runs at a time on this target")
    capabilities: list[str] = Field(default_factory=list)
    auth_env: str = Field(default="", description="the variable holding its credential, if any")

    def get(self) -> RuntimeTarget:
        target = cached_targets(Path(self.path)).get(self.name)
        if target is None:
            raise LookupError(f"runtime target {self.name!r} is no longer configured")
        return target


def target_resources(path: Path, config: TargetsConfig) -> dict[str, RuntimeTargetResource]:
    """A resource per target, keyed `target_<name>` (`-` as `_`)."""
    return {
        f"target_{target.name.replace('-', '_')}": RuntimeTargetResource(
            path=str(path),
            name=target.name,
            runtime=target.runtime,
            locality=target.locality.kind
            + (f" ({target.locality.site})" if target.locality.site else ""),
            endpoint=target.public_endpoint or "",
            concurrency=target.concurrency,
            capabilities=list(target.capabilities),
            auth_env=target.auth.token_env or "",
        )
        for target in config.targets
    }
