"""The artifact store as a Dagster resource."""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from ergot_dagster.artifacts.store import ArtifactStore, open_store


class ArtifactStoreResource(ConfigurableResource):
    """Where derived artifacts and their manifests are kept (`ERGOT_STORAGE`)."""

    location: str = Field(description="a local directory (object storage comes later)")

    def get_store(self) -> ArtifactStore:
        return open_store(self.location)
