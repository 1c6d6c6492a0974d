"""What a runtime target asks of the Kubernetes pod its runs execute in.

A target's `routing.kubernetes` block (in the targets file) names node labels to select, taints
to tolerate, compute resources (such as `nvidia.com/gpu: 1`), pod labels and a service account.
It is validated here, the way the Kubernetes API server would judge it, so that a bad block is
refused when the targets file loads instead of when a run's Job is created. Turning the hints of
a run's targets into the run's `dagster-k8s/config` tag is `orchestration.k8s`.

This module imports nothing heavy (no kubernetes client): the consumer's client loads target
declarations too.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Kubernetes' own grammars: a qualified name (label key, resource name), a label value, a DNS
# subdomain (service account name).
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_PREFIX = rf"{_DNS_LABEL}(\.{_DNS_LABEL})*"
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
QUALIFIED_NAME = re.compile(rf"^({_PREFIX}/)?{_NAME}$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
DNS_SUBDOMAIN = re.compile(rf"^{_PREFIX}$")

# Native resources; any other name with a domain prefix is an extended resource (a device such
# as nvidia.com/gpu), which Kubernetes counts in whole units and never overcommits.
NATIVE_RESOURCES = ("cpu", "memory", "ephemeral-storage")

_QUANTITY = re.compile(
    r"^(?P<number>[0-9]+(\.[0-9]*)?|\.[0-9]+)"
    r"((?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)|[eE](?P<exponent>[+-]?[0-9]+))?$"
)
_MULTIPLIERS = {
    None: Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}


def parse_quantity(text: str | int | float) -> Decimal:
    """The value of a Kubernetes quantity (`500m`, `2Gi`, `1`, `1e3`); ValueError if malformed."""
    raw = str(text).strip()
    match = _QUANTITY.match(raw)
    if not match:
        raise ValueError(f"{raw!r} is not a Kubernetes quantity (such as 500m, 2Gi or 1)")
    try:
        number = Decimal(match["number"])
    except InvalidOperation:
        raise ValueError(f"{raw!r} is not a Kubernetes quantity") from None
    if match["exponent"] is not None:
        return number * Decimal(10) ** int(match["exponent"])
    return number * _MULTIPLIERS[match["suffix"]]


def is_extended_resource(name: str) -> bool:
    """A device or other extended resource: a prefixed name outside kubernetes.io."""
    if "/" not in name:
        return False
    domain = name.split("/", 1)[0]
    return not (domain == "kubernetes.io" or domain.endswith(".kubernetes.io"))


def _labels(value: dict[str, str], what: str) -> dict[str, str]:
    for key, label in value.items():
        prefix, _, name = key.rpartition("/")
        if not QUALIFIED_NAME.match(key) or len(name) > 63 or len(prefix) > 253:
            raise ValueError(f"{what} key {key!r} is not a valid Kubernetes label key")
        if len(label) > 63 or not LABEL_VALUE.match(label):
            raise ValueError(
                f"{what} {key}: {label!r} is not a valid Kubernetes label value (at most 63 "
                "letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"
            )
    return value


class Toleration(BaseModel):
    """A taint the run's pod tolerates (Kubernetes' `Toleration`, snake_case)."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.key is not None and not QUALIFIED_NAME.match(self.key):
            raise ValueError(f"toleration key {self.key!r} is not a valid Kubernetes label key")
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists takes no `value`")
        if self.operator == "Equal" and not self.key:
            raise ValueError("a toleration with operator Equal needs a `key`")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("`toleration_seconds` applies only to effect NoExecute")
        return self

    def as_k8s(self) -> dict[str, str | int]:
        """The toleration as it goes into a pod spec: only the fields that are set."""
        return self.model_dump(exclude_none=True)


class ComputeResources(BaseModel):
    """Requests and limits of the run worker container, as Kubernetes quantities."""

    model_config = ConfigDict(extra="forbid")

    requests: dict[str, str] = Field(default_factory=dict)
    limits: dict[str, str] = Field(default_factory=dict)

    @field_validator("requests", "limits", mode="before")
    @classmethod
    def _quantities(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value
        out: dict[str, str] = {}
        for name, quantity in value.items():
            if not isinstance(name, str) or not QUALIFIED_NAME.match(name):
                raise ValueError(f"{name!r} is not a Kubernetes resource name")
            if isinstance(quantity, bool) or not isinstance(quantity, (str, int, float)):
                raise ValueError(f"{name}: {quantity!r} is not a Kubernetes quantity")
            parse_quantity(quantity)
            out[name] = str(quantity)
        return out

    @model_validator(mode="after")
    def _coherent(self) -> ComputeResources:
        for name, quantity in {**self.requests, **self.limits}.items():
            if is_extended_resource(name) and parse_quantity(quantity) % 1 != 0:
                raise ValueError(f"{name}: an extended resource is counted in whole units")
        for name, request in self.requests.items():
            limit = self.limits.get(name)
            if is_extended_resource(name):
                # Kubernetes never overcommits devices: a request alone is refused.
                if limit is None:
                    raise ValueError(f"{name} goes in `limits` (requests may only repeat it)")
                if parse_quantity(request) != parse_quantity(limit):
                    raise ValueError(f"{name}: request {request} and limit {limit} must be equal")
            elif limit is not None and parse_quantity(request) > parse_quantity(limit):
                raise ValueError(f"{name}: request {request} is more than the limit {limit}")
        return self


class KubernetesHints(BaseModel):
    """A target's wishes for the pod of every run routed to it (`routing.kubernetes`)."""

    model_config = ConfigDict(extra="forbid")

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="node labels the pod must land on"
    )
    tolerations: list[Toleration] = Field(default_factory=list)
    resources: ComputeResources = Field(default_factory=ComputeResources)
    labels: dict[str, str] = Field(default_factory=dict, description="labels on the run's pod")
    service_account_name: str | None = Field(
        default=None, description="the pod's service account, when not the launcher's default"
    )

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, value: dict[str, str]) -> dict[str, str]:
        return _labels(value, "node_selector")

    @field_validator("labels")
    @classmethod
    def _pod_labels(cls, value: dict[str, str]) -> dict[str, str]:
        return _labels(value, "label")

    @field_validator("service_account_name")
    @classmethod
    def _account(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 253 or not DNS_SUBDOMAIN.match(value)):
            raise ValueError(f"{value!r} is not a valid Kubernetes service account name")
        return value
