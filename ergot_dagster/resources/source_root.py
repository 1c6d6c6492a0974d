"""The ingest root, where Ergot-managed source media lives, as a Dagster resource."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from ergot_dagster.errors import SourceError
from ergot_dagster.refs import InvalidRefError, resolve_under_root


class SourceRootResource(ConfigurableResource):
    """The directory source refs are relative to (`ERGOT_INGEST_ROOT`)."""

    root: str = Field(description="the ingest root directory")

    @property
    def path(self) -> Path:
        return Path(self.root).expanduser()

    def resolve(self, ref: str) -> Path:
        """The file behind a source ref; `SourceError` if missing or outside the root."""
        if not self.path.is_dir():
            raise SourceError(f"the ingest root {self.root} does not exist")
        try:
            return resolve_under_root(self.path, ref)
        except (InvalidRefError, FileNotFoundError) as exc:
            raise SourceError(str(exc)) from exc
