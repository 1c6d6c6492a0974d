"""The ingest root, where Ergot-managed source media lives, as a Dagster resource."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from ergot_dagster.sources.root import SourceRoot, open_source_root


class SourceRootResource(ConfigurableResource):
    """What source refs are relative to (`ERGOT_INGEST_ROOT`): a directory or `s3://bucket/prefix`."""

    root: str = Field(description="the ingest root: a local directory or s3://bucket/prefix")

    @property
    def path(self) -> Path:
        """The root as a local path (meaningful only for a local root)."""
        return Path(self.root).expanduser()

    def open(self) -> SourceRoot:
        """The root, local or in object storage."""
        return open_source_root(self.root)
