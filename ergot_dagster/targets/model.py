"""What a runtime target is: a named backend of one runtime type, where it is, how much it takes.

Targets are data (a YAML file), not code. Secrets never appear in it: `auth` names the environment
variables that hold them.
"""

from __future__ import annotations

import os
import re
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ergot_dagster.orchestration.k8s_hints import KubernetesHints
from ergot_dagster.workflows.model import RUNTIME_TYPE, CapabilityTag

TARGET_NAME = r"^[a-z0-9][a-z0-9-]{0,47}$"
ENV_NAME = r"^[A-Z_][A-Z0-9_]{0,127}$"


class Locality(BaseModel):
    """Where a target runs: on this node (`local`) or elsewhere (`remote`), and a free label."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "remote"] = "local"
    site: str = Field(default="", description="a site or cluster label, e.g. gpu-rack-2")


class TargetAuth(BaseModel):
    """How to authenticate to a target. Only environment variable *names* are configured here."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["none", "bearer", "header"] = "none"
    token_env: str | None = Field(default=None, pattern=ENV_NAME)
    header: str = Field(default="Authorization", description="header for kind=header")

    @model_validator(mode="after")
    def _token_named(self) -> TargetAuth:
        if self.kind != "none" and not self.token_env:
            raise ValueError(f"auth kind {self.kind!r} needs `token_env`, the variable holding it")
        return self

    def headers(self) -> dict[str, str]:
        """The request headers carrying the credential, read from the environment now."""
        if self.kind == "none" or not self.token_env:
            return {}
        token = os.environ.get(self.token_env)
        if not token:
            raise LookupError(
                f"environment variable {self.token_env} (the target's credential) is not set"
            )
        if self.kind == "bearer":
            return {"Authorization": f"Bearer {token}"}
        return {self.header: token}


class RoutingHints(BaseModel):
    """Hints for routing: a queue/pool affinity, the workflows this target is preferred for, and
    where on a Kubernetes cluster the runs that use it execute (`orchestration.k8s_hints`)."""

    model_config = ConfigDict(extra="forbid")

    pool: str | None = None
    prefer_for: list[str] = Field(default_factory=list)
    kubernetes: KubernetesHints | None = None


class RuntimeTarget(BaseModel):
    """One execution backend."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=TARGET_NAME)
    runtime: str = Field(pattern=RUNTIME_TYPE)
    capabilities: list[CapabilityTag] = Field(default_factory=list)
    locality: Locality = Field(default_factory=Locality)
    concurrency: int = Field(default=1, ge=1, le=1000, description="runs at a time on this target")
    endpoint: str | None = Field(default=None, description="base URL of a remote service")
    auth: TargetAuth = Field(default_factory=TargetAuth)
    routing: RoutingHints = Field(default_factory=RoutingHints)
    options: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="adapter settings of this target (e.g. the local engine and its model, the "
        "remote API's model name); never secrets, which come from `auth`",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/") if value else value

    @property
    def public_endpoint(self) -> str | None:
        """The endpoint as it may be recorded: no user, password, query or fragment."""
        if not self.endpoint:
            return None
        parts = urlsplit(self.endpoint)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    @property
    def concurrency_tag(self) -> str:
        """The run tag whose presence counts a run against this target's concurrency limit."""
        return f"ergot/target.{self.name}"
