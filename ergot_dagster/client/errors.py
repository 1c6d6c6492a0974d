"""What can go wrong talking to the plane, as exceptions a consumer can catch one by one."""

from __future__ import annotations


class ClientError(Exception):
    """Base of every client error."""


class ServerUnreachableError(ClientError):
    """The Dagster webserver did not answer (down, wrong URL, network)."""


class UnknownRunError(ClientError):
    """No run has that id."""


class RequestRejectedError(ClientError):
    """The request was refused before any run: unknown workflow, invalid settings, bad source."""


class UnknownWorkflowError(RequestRejectedError):
    """The request names a workflow, or a version of one, that the plane does not publish."""


class InvalidSettingsError(RequestRejectedError):
    """The request's settings break the workflow's schema; `problems` names each failing field."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


class SourceNotFoundError(RequestRejectedError):
    """A source the request names was never ingested, or is not media the workflow accepts."""


class RequestConflictError(ClientError):
    """The request id was already used for a different request."""


class LaunchError(ClientError):
    """Dagster refused to start the run for a reason of its own (the message says which)."""


class RetryRefusedError(ClientError):
    """The run cannot be retried (it is still going, or it succeeded)."""


class UnknownArtifactError(ClientError):
    """No stored artifact has that ref."""


class ArtifactIntegrityError(ClientError):
    """Downloaded bytes do not match the manifest's sha256 (nothing was kept)."""


class ArtifactUnreachableError(ClientError):
    """The artifact's bytes are not reachable from here (another host's disk, a private bucket)."""


class UnknownLibraryEntryError(ClientError):
    """Nothing is promoted under that library ref."""


class PromotionError(ClientError):
    """The plane refused or failed a promotion; the message says why."""


class LibraryConflictError(PromotionError):
    """The library name already names another artifact (entries are immutable)."""
