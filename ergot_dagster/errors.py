"""The plane's error types.

The split between permanent and transient failures is what retry policies key on: a transient error
(a runtime that is unreachable, overloaded or slow) may succeed if tried again; a permanent one (bad
media, invalid settings, a missing source) never will, and says why.
"""

from __future__ import annotations


class ErgotError(Exception):
    """Base of every error the plane raises on purpose."""


class DefinitionError(ErgotError):
    """A workflow definition, or the lock that pins it, is invalid."""


class RequestError(ErgotError):
    """A request names something that does not exist or settings that break the schema."""


class UnknownWorkflowError(RequestError):
    """A request names a workflow, or a version of one, that is not published."""


class InvalidSettingsError(RequestError):
    """A request's settings break the workflow's settings schema; `problems` names each field."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


class SourceError(ErgotError):
    """A source ref is unknown, unsafe, unreadable or not the media a workflow accepts."""


class RuntimeFailure(ErgotError):
    """A runtime could not do its job. `transient` says whether trying again could help."""

    transient: bool = False

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class PermanentRuntimeError(RuntimeFailure):
    """The runtime rejected the work itself (bad media, invalid parameters)."""

    transient = False


class TransientRuntimeError(RuntimeFailure):
    """The runtime failed for a reason unrelated to the work (unreachable, overloaded)."""

    transient = True


class RuntimeTimeoutError(TransientRuntimeError):
    """A wait on a runtime passed its deadline."""


class StoreError(ErgotError):
    """The artifact store refused a write or cannot find what was asked for."""
