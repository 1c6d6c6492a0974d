"""The ingest root, where Ergot-managed source media lives, as a Dagster resource."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field


class SourceRootResource(ConfigurableResource):
    """The directory source refs are relative to (`ERGOT_INGEST_ROOT`)."""

    root: str = Field(description="the ingest root directory")

    @property
    def path(self) -> Path:
        return Path(self.root).expanduser()
