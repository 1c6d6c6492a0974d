"""The artifact store as a Dagster resource."""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from ergot_dagster.artifacts.store import ArtifactStore, open_store


class ArtifactStoreResource(ConfigurableResource):
    """Where derived artifacts and their manifests are kept (`ERGOT_STORAGE`).

    Each `get_store()` is a new store object. Files it fetches to this machine (blobs from object
    storage, source files from an S3 ingest root) are removed when it is closed or dropped, which
    for a step is when the step's code returns.
    """

    location: str = Field(
        description="a local directory, a file:// URL, or s3://bucket/prefix (object storage)"
    )

    def get_store(self) -> ArtifactStore:
        return open_store(self.location)
