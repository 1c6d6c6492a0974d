"""The artifact manifest: what every derived file says about itself.

A manifest is written once, next to the content-addressed bytes, and copied into the metadata of
the Dagster materialization that produced it. It is the unit a consumer receives.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_VERSION = 1


class ParentRef(BaseModel):
    """What an artifact came from: an ingested source, another artifact or a library entry."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["source", "artifact", "library"]
    ref: str
    sha256: str
    input: str | None = Field(default=None, description="the workflow input it was bound to")


class RuntimeInfo(BaseModel):
    """Which runtime produced an artifact, and its job id there (a pid, a prompt id...)."""

    model_config = ConfigDict(extra="forbid")

    type: str
    target: str
    job_id: str | None = None
    endpoint: str | None = Field(
        default=None,
        description="the remote server that did the work (scheme, host, port and path only; "
        "never credentials); None for a local engine",
    )


class SetMember(BaseModel):
    """One file of an image set (an artifact name that holds many files)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    media_type: str
    size: int
    sha256: str
    uri: str


class ExecutedBy(BaseModel):
    """Where the step that made an artifact executed: the machine (or pod) and process."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(description="the host name of the machine that ran the step")
    pid: int = Field(description="the run worker's process id on that host")
    launcher: Literal["local", "remote", "kubernetes", "in_process"] = Field(
        description="local: a run worker on the control node; remote: started by a remote code "
        "server; kubernetes: a Job's pod; in_process: `ergot run` or a test, no launcher"
    )
    code_server: str | None = Field(
        default=None, description="host:port of the remote code server that started the run"
    )
    pod: str | None = Field(default=None, description="the Kubernetes pod, under Kubernetes")


class ArtifactManifest(BaseModel):
    """An immutable record of one stored artifact."""

    model_config = ConfigDict(extra="forbid")

    manifest_version: int = MANIFEST_VERSION
    ref: str
    name: str
    kind: Literal["file", "set"] = "file"
    media_type: str
    size: int
    sha256: str
    uri: str
    workflow: str = Field(description="family/name@version")
    run_id: str
    source_ref: str
    parents: list[ParentRef]
    runtime: RuntimeInfo
    stage: str | None = None
    members: list[SetMember] = Field(default_factory=list)
    created_at: datetime
    executed_by: ExecutedBy | None = Field(
        default=None, description="where the step that made it ran; absent before contract 1.4.0"
    )
