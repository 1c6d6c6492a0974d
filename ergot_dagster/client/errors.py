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


class RequestConflictError(ClientError):
    """The request id was already used for a different request."""


class LaunchError(ClientError):
    """Dagster refused to start the run for a reason of its own (the message says which)."""
