"""The consumer contract: typed models and a client over Dagster's GraphQL API."""

from ergot_dagster.client.client import ErgotClient
from ergot_dagster.client.errors import (
    ClientError,
    RequestConflictError,
    RequestRejectedError,
    ServerUnreachableError,
    UnknownRunError,
)
from ergot_dagster.client.models import RunHandle, RunStatus

__all__ = [
    "ClientError",
    "ErgotClient",
    "RequestConflictError",
    "RequestRejectedError",
    "RunHandle",
    "RunStatus",
    "ServerUnreachableError",
    "UnknownRunError",
]
