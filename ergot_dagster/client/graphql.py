"""Posting queries to Dagster's GraphQL endpoint, with errors turned into client exceptions."""

from __future__ import annotations

import json
from typing import Any

import httpx

from ergot_dagster.client.errors import ClientError, ServerUnreachableError


class GraphQLTransport:
    """One GraphQL endpoint: `<base url>/graphql`."""

    def __init__(
        self, base_url: str, *, timeout_s: float = 30.0, headers: dict[str, str] | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(timeout=timeout_s, headers=headers or {})

    def execute(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = self._client.post(
                f"{self.base_url}/graphql", json={"query": query, "variables": variables or {}}
            )
        except httpx.TransportError as exc:
            raise ServerUnreachableError(
                f"the Dagster webserver at {self.base_url} did not answer: {exc}"
            ) from exc
        if response.status_code >= 500:
            raise ServerUnreachableError(
                f"the Dagster webserver at {self.base_url} answered HTTP {response.status_code}"
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise ClientError(f"{self.base_url}/graphql did not answer JSON") from exc
        if body.get("errors"):
            messages = "; ".join(e.get("message", "?") for e in body["errors"])
            raise ClientError(f"GraphQL error: {messages}")
        return body["data"]

    def close(self) -> None:
        self._client.close()


def metadata_values(entries: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Dagster metadata entries (as the `Meta` fragment returns them) as plain values by label.

    JSON entries are parsed; entry types the fragment does not ask for map to None.
    """
    values: dict[str, Any] = {}
    for entry in entries or []:
        kind = entry.get("__typename")
        if kind == "JsonMetadataEntry":
            values[entry["label"]] = json.loads(entry["jsonString"])
        elif kind == "IntMetadataEntry":
            raw = entry.get("intValue")
            values[entry["label"]] = raw if raw is not None else int(entry["intRepr"])
        else:
            field = _VALUE_FIELDS.get(kind or "")
            values[entry["label"]] = entry.get(field) if field else None
    return values


_VALUE_FIELDS = {
    "TextMetadataEntry": "text",
    "FloatMetadataEntry": "floatValue",
    "BoolMetadataEntry": "boolValue",
    "UrlMetadataEntry": "url",
    "PathMetadataEntry": "path",
    "MarkdownMetadataEntry": "mdStr",
}
