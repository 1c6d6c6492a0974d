"""The processing request: one consumer's ask, idempotent by its request id."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ergot_dagster.refs import InvalidRefError, validate_input_ref

REQUEST_ID = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
WORKFLOW_SPEC = r"^[a-z][a-z0-9_]{0,63}(@[0-9]{1,9})?$"
MAX_CONTEXT_BYTES = 16 * 1024
MAX_TIMEOUT_S = 7 * 24 * 3600


class RequestSources(BaseModel):
    """The primary input (its ref becomes the run's partition) and any other named inputs.

    A ref is a source ref (a path relative to the ingest root), an artifact ref
    (`artifact:<run id>/<name>`) or a library ref (`library:<library>/<name>`; an input that
    takes a library also accepts `<library>/<name>`). An input declared `many` takes a list.
    """

    model_config = ConfigDict(extra="forbid")

    primary: str = Field(
        description="the primary input's ref: a source ref, an artifact ref or a library ref"
    )
    inputs: dict[str, str | list[str]] = Field(
        default_factory=dict,
        description="input name -> a source, artifact or library ref, or a list of them",
    )

    @field_validator("primary")
    @classmethod
    def _primary(cls, value: str) -> str:
        try:
            return validate_input_ref(value)
        except InvalidRefError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        for name, given in value.items():
            refs = given if isinstance(given, list) else [given]
            if not refs:
                raise ValueError(f"input {name!r}: an empty list")
            for ref in refs:
                try:
                    validate_input_ref(ref)
                except InvalidRefError as exc:
                    raise ValueError(f"input {name!r}: {exc}") from None
        return value


class ProcessingRequest(BaseModel):
    """A request to run one workflow on Ergot-managed media."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(pattern=REQUEST_ID, description="the idempotency key")
    workflow: str = Field(pattern=WORKFLOW_SPEC, description="`name` or `name@version`")
    sources: RequestSources
    context: dict[str, Any] = Field(
        default_factory=dict, description="the consumer's own context, returned untouched"
    )
    settings: dict[str, Any] = Field(default_factory=dict)
    execution_target: str = Field(
        default="local",
        pattern=r"^(local|remote|[a-z0-9][a-z0-9-]{0,47})$",
        description="`local`, `remote`, or the name of a runtime target",
    )
    priority: int = Field(default=0, ge=-1000, le=1000, description="higher runs first")
    max_retries: int = Field(default=0, ge=0, le=10, description="new runs after a crashed one")
    timeout_s: float | None = Field(
        default=None, gt=0, le=MAX_TIMEOUT_S, description="bound on the whole run"
    )

    @field_validator("context")
    @classmethod
    def _context_size(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(value, ensure_ascii=False).encode())
        if size > MAX_CONTEXT_BYTES:
            raise ValueError(f"context is {size} bytes; the limit is {MAX_CONTEXT_BYTES}")
        return value

    def canonical_json(self) -> str:
        """The request as canonical JSON: equal requests give equal text."""
        return json.dumps(
            self.model_dump(mode="json"),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def validation_summary(exc: ValidationError) -> str:
    """A request's validation errors on one line, each naming its field."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    )
