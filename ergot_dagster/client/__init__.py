"""The consumer contract: typed models and a client over Dagster's GraphQL API.

from ergot_dagster.client import ErgotClient

with ErgotClient("http://127.0.0.1:3000") as plane:
    handle = plane.submit({"request_id": "ep12-poster", "workflow": "poster_extraction",
                           "sources": {"primary": "cam01/take_003.mov"}})
    status = plane.wait(handle.run_id, timeout_s=600)
"""

from ergot_dagster.artifacts.library import LibraryEntry
from ergot_dagster.artifacts.lineage import LineageNode
from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.client.client import ErgotClient
from ergot_dagster.client.errors import (
    ArtifactIntegrityError,
    ArtifactUnreachableError,
    ClientError,
    InvalidSettingsError,
    LaunchError,
    LibraryConflictError,
    PromotionError,
    RequestConflictError,
    RequestRejectedError,
    RetryRefusedError,
    ServerUnreachableError,
    SourceNotFoundError,
    UnknownArtifactError,
    UnknownLibraryEntryError,
    UnknownRunError,
    UnknownWorkflowError,
)
from ergot_dagster.client.models import (
    CONTRACT_VERSION,
    ArtifactOutcome,
    EventPage,
    InboxOutcome,
    RunError,
    RunEvent,
    RunHandle,
    RunPage,
    RunStatus,
)
from ergot_dagster.requests.model import ProcessingRequest

__all__ = [
    "CONTRACT_VERSION",
    "ArtifactIntegrityError",
    "ArtifactManifest",
    "ArtifactOutcome",
    "ArtifactUnreachableError",
    "ClientError",
    "ErgotClient",
    "EventPage",
    "InboxOutcome",
    "InvalidSettingsError",
    "LaunchError",
    "LibraryConflictError",
    "LibraryEntry",
    "LineageNode",
    "ProcessingRequest",
    "PromotionError",
    "RequestConflictError",
    "RequestRejectedError",
    "RetryRefusedError",
    "RunError",
    "RunEvent",
    "RunHandle",
    "RunPage",
    "RunStatus",
    "ServerUnreachableError",
    "SourceNotFoundError",
    "UnknownArtifactError",
    "UnknownLibraryEntryError",
    "UnknownRunError",
    "UnknownWorkflowError",
]
