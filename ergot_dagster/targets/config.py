"""Loading runtime targets: a YAML file, with environment overrides for a deployment.

The file is `runtime_targets.yaml` in the repository unless `ERGOT_RUNTIME_TARGETS` names another.
A deployment overrides a target's endpoint or concurrency without editing the file:

    ERGOT_TARGET_<NAME>_ENDPOINT=http://studio.internal:8188
    ERGOT_TARGET_<NAME>_CONCURRENCY=4

where <NAME> is the target name in upper case with `-` as `_` (ffmpeg-local -> FFMPEG_LOCAL).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ergot_dagster.errors import DefinitionError
from ergot_dagster.targets.model import RuntimeTarget

POOL_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}$")
POOL_TAG_PREFIX = "ergot/pool."


class TargetsConfig(BaseModel):
    """Every configured target, and the pools some of them share."""

    model_config = ConfigDict(extra="forbid")

    targets: list[RuntimeTarget] = Field(default_factory=list)
    pools: dict[str, int] = Field(
        default_factory=dict,
        description="pool name -> runs at a time across every target whose `routing.pool` "
        "names it (e.g. several targets on one GPU box)",
    )

    @model_validator(mode="after")
    def _unique(self) -> TargetsConfig:
        names = [t.name for t in self.targets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"target names must be unique; repeated: {', '.join(duplicates)}")
        for name, limit in self.pools.items():
            if not POOL_NAME.match(name) or limit < 1:
                raise ValueError(f"pool {name!r} needs a name like gpu-box-1 and a limit >= 1")
        for target in self.targets:
            pool = target.routing.pool
            if pool is not None and pool not in self.pools:
                raise ValueError(
                    f"target {target.name} names pool {pool!r}, which `pools` does not declare"
                )
        return self

    def get(self, name: str) -> RuntimeTarget | None:
        return next((t for t in self.targets if t.name == name), None)


def _env_key(name: str, field: str) -> str:
    return f"ERGOT_TARGET_{name.upper().replace('-', '_')}_{field}"


def _apply_overrides(raw: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    for target in raw.get("targets") or []:
        if not isinstance(target, dict) or not isinstance(target.get("name"), str):
            continue
        endpoint = environ.get(_env_key(target["name"], "ENDPOINT"))
        if endpoint:
            target["endpoint"] = endpoint
        concurrency = environ.get(_env_key(target["name"], "CONCURRENCY"))
        if concurrency:
            target["concurrency"] = concurrency
    return raw


def load_targets(path: Path, environ: dict[str, str] | None = None) -> TargetsConfig:
    """Read and validate the targets file; `DefinitionError` names the file and the field."""
    environ = dict(os.environ) if environ is None else environ
    if not path.exists():
        raise DefinitionError(f"runtime targets file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise DefinitionError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise DefinitionError(f"{path}: expected a mapping with a `targets` list")
    try:
        return TargetsConfig.model_validate(_apply_overrides(raw, environ))
    except ValidationError as exc:
        problems = [
            f"{path}: field `{'.'.join(str(p) for p in e['loc'])}`: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        ]
        raise DefinitionError("\n".join(problems)) from None


_cache: dict[tuple[str, int, int, tuple[tuple[str, str], ...]], TargetsConfig] = {}


def cached_targets(path: Path) -> TargetsConfig:
    """`load_targets`, re-read only when the file or its environment overrides change.

    The run queue asks for the limits on every dequeue; parsing YAML each time is waste.
    """
    try:
        stat = path.stat()
    except OSError:
        raise DefinitionError(f"runtime targets file {path} does not exist") from None
    overrides = tuple(
        sorted((k, v) for k, v in os.environ.items() if k.startswith("ERGOT_TARGET_"))
    )
    key = (str(path), stat.st_mtime_ns, stat.st_size, overrides)
    if key not in _cache:
        _cache.clear()
        _cache[key] = load_targets(path)
    return _cache[key]
