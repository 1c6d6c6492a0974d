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
    """Something an artifact was derived from: an ingested source file or another artifact."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["source", "artifact"]
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
