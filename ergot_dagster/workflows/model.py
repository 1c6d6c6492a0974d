"""The workflow definition: a versioned, runtime-neutral description of one media transformation.

A definition is data. It names its inputs (one of them the primary source, which is the partition),
the JSON Schema of its settings, the artifacts it produces, and a plan of stages, each run by one
runtime type. The asset factory turns it into Dagster assets; nothing here is specific to a runtime,
a family or a consumer.

Values in a stage's `inputs` and `params` may be bindings, written `${...}` as a whole string:

    ${inputs.<input name>}          a workflow input (the primary source or another input)
    ${settings.<key>}               a request setting (after defaults)
    ${stages.<stage id>.<output>}   an output of an earlier stage
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from ergot_dagster.workflows.settings_schema import SettingsError, validate_settings

IDENTIFIER = r"^[a-z][a-z0-9_]{0,63}$"
RUNTIME_TYPE = r"^[a-z][a-z0-9_]{0,31}$"
CAPABILITY = r"^[a-z0-9][a-z0-9._-]{0,63}$"
MEDIA_TYPE = r"^(\*|[a-z]+)/(\*|[a-z0-9][a-z0-9.+-]*)$"
ASSET_PATH = r"^[a-z][a-z0-9_]*/[a-z][a-z0-9_]*/[a-z][a-z0-9_]*$"
LIBRARY_NAME = r"^[a-z][a-z0-9_-]{0,63}$"
PLAN_RUNTIME = "plan"


def _capability(tag: str) -> str:
    if not re.match(CAPABILITY, tag):
        raise ValueError(f"{tag!r} is not a capability tag such as video.decode or gpu")
    return tag


# A capability tag, checked wherever one appears (workflows, stages, runtime targets).
CapabilityTag = Annotated[str, AfterValidator(_capability)]

_BINDING = re.compile(r"^\$\{(?P<scope>inputs|settings|stages)\.(?P<path>[^}]+)\}$")


class Binding(BaseModel):
    """A parsed `${scope.path}` reference."""

    scope: Literal["inputs", "settings", "stages"]
    path: list[str]


def parse_binding(value: Any) -> Binding | None:
    """The binding `value` spells, or None if it is a literal."""
    if not isinstance(value, str):
        return None
    match = _BINDING.match(value)
    if not match:
        if "${" in value:
            raise ValueError(
                f"{value!r} looks like a binding but is not one of "
                "${inputs.NAME}, ${settings.KEY}, ${stages.STAGE.OUTPUT}"
            )
        return None
    return Binding(scope=match.group("scope"), path=match.group("path").split("."))  # type: ignore[arg-type]


class InputSpec(BaseModel):
    """A named input of a workflow and the media it accepts."""

    model_config = ConfigDict(extra="forbid")

    media_types: list[str] = Field(min_length=1)
    primary: bool = False
    required: bool = True
    description: str = ""
    asset: str | None = Field(
        default=None,
        pattern=ASSET_PATH,
        description="another workflow's artifact (family/workflow/artifact) this input takes: "
        "the asset graph's edge, and the default binding (that artifact of the same partition) "
        "when a request names none",
    )
    many: bool = Field(
        default=False,
        description="the request gives a list of refs (in order), bound as a list of files",
    )
    max_items: int = Field(default=64, ge=1, le=1024, description="the longest list, when many")
    library: str | None = Field(
        default=None,
        pattern=LIBRARY_NAME,
        description="a library whose entries this input takes by name: a request may write "
        "`<library>/<entry>` for `library:<library>/<entry>`",
    )

    @field_validator("media_types")
    @classmethod
    def _media_types(cls, value: list[str]) -> list[str]:
        for item in value:
            if not re.match(MEDIA_TYPE, item):
                raise ValueError(
                    f"{item!r} is not a media type pattern such as video/* or image/jpeg"
                )
        return value


class OutputSpec(BaseModel):
    """One artifact in the artifact map."""

    model_config = ConfigDict(extra="forbid")

    media_type: str = Field(pattern=MEDIA_TYPE)
    required: bool = True
    kind: Literal["file", "set"] = Field(
        default="file", description="`set` is one artifact holding many files (an image set)"
    )
    description: str = ""

    @field_validator("media_type")
    @classmethod
    def _concrete(cls, value: str) -> str:
        if "*" in value:
            raise ValueError(f"an artifact has one concrete media type, not {value!r}")
        return value


class StageSpec(BaseModel):
    """One step of the plan, run by one runtime type."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=IDENTIFIER)
    runtime: str | None = Field(default=None, pattern=RUNTIME_TYPE)
    operation: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_./-]{0,127}$")
    template: dict[str, Any] | None = None
    inputs: dict[str, str] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, str | None] = Field(
        default_factory=dict,
        description="stage output name -> artifact name, or null for an output only later "
        "stages use",
    )
    timeout_s: float | None = Field(default=None, gt=0)
    capabilities: list[CapabilityTag] | None = Field(
        default=None,
        description="what this stage's target must offer; in a plan with several runtime types "
        "the workflow's capabilities cannot say which runtime needs which, so stages do",
    )

    @model_validator(mode="after")
    def _operation_or_template(self) -> StageSpec:
        if (self.operation is None) == (self.template is None):
            raise ValueError("a stage names exactly one of `operation` or `template`")
        for name, value in self.inputs.items():
            binding = parse_binding(value)
            if binding is None or binding.scope == "settings":
                raise ValueError(
                    f"stage input {name!r} must be ${{inputs.NAME}} or ${{stages.STAGE.OUTPUT}}, "
                    f"not {value!r}"
                )
        for name, value in self.params.items():
            binding = parse_binding(value)
            if binding is not None and binding.scope == "stages":
                raise ValueError(
                    f"param {name!r} cannot bind {value}; files from earlier stages go in `inputs`"
                )
        return self


class CheckSpec(BaseModel):
    """A Dagster asset check on one artifact, evaluated by a registered evaluator."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=IDENTIFIER)
    artifact: str = Field(pattern=IDENTIFIER)
    evaluator: str = Field(pattern=r"^[a-z][a-z0-9_.]*$")
    description: str = ""
    blocking: bool = False
    params: dict[str, Any] = Field(default_factory=dict)


class ExecutionSupport(BaseModel):
    """Where a workflow may run."""

    model_config = ConfigDict(extra="forbid")

    local: bool
    remote: bool


class WorkflowDefinition(BaseModel):
    """One immutable version of one workflow."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=IDENTIFIER)
    family: str = Field(pattern=IDENTIFIER)
    version: int = Field(ge=1)
    description: str = Field(min_length=1)
    runtime: str = Field(pattern=RUNTIME_TYPE)
    capabilities: list[CapabilityTag] = Field(default_factory=list)
    inputs: dict[str, InputSpec] = Field(min_length=1)
    settings: dict[str, Any] = Field(description="JSON Schema (draft 2020-12) of the settings")
    outputs: dict[str, OutputSpec] = Field(min_length=1)
    plan: list[StageSpec] = Field(min_length=1)
    checks: list[CheckSpec] = Field(default_factory=list)
    execution: ExecutionSupport

    @property
    def ref(self) -> str:
        """`family/name@version`, as manifests record it."""
        return f"{self.family}/{self.name}@{self.version}"

    @property
    def spec(self) -> str:
        """`name@version`, as requests name it."""
        return f"{self.name}@{self.version}"

    @property
    def primary_input(self) -> str:
        return next(name for name, spec in self.inputs.items() if spec.primary)

    def required_capabilities(self, runtime: str) -> set[str]:
        """What a target of `runtime` must offer to run this workflow's stages on that runtime.

        A stage's own `capabilities` when it declares them; otherwise the workflow's, when all
        stages share one runtime type (with several, the workflow's list cannot say which
        runtime needs what).
        """
        single_runtime = len({s.runtime or self.runtime for s in self.plan}) == 1
        needed: set[str] = set()
        for stage in self.plan:
            if (stage.runtime or self.runtime) != runtime:
                continue
            if stage.capabilities is not None:
                needed |= set(stage.capabilities)
            elif single_runtime:
                needed |= set(self.capabilities)
        return needed

    @field_validator("inputs", "outputs")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not re.match(IDENTIFIER, name):
                raise ValueError(f"{name!r} is not a valid name (lowercase letters, digits, _)")
        return value

    @field_validator("settings")
    @classmethod
    def _settings_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            where = "/".join(str(p) for p in exc.path) or "(root)"
            raise ValueError(f"not a valid JSON Schema at {where}: {exc.message}") from None
        if schema.get("type") != "object":
            raise ValueError("the settings schema must have `type: object`")
        try:
            validate_settings(schema, {})
        except SettingsError as exc:
            raise ValueError(
                f"the defaults do not satisfy the schema ({exc}); give every required "
                "setting a default"
            ) from None
        return schema

    @model_validator(mode="after")
    def _consistent(self) -> WorkflowDefinition:
        primaries = [name for name, spec in self.inputs.items() if spec.primary]
        if len(primaries) != 1:
            raise ValueError(
                "exactly one input must be `primary: true` (the source partition); "
                f"found {primaries}"
            )
        for name, spec in self.inputs.items():
            if spec.primary and spec.many:
                raise ValueError(
                    f"input {name!r} is primary (the partition) and cannot take a list (`many`)"
                )
        if self.runtime == PLAN_RUNTIME:
            for stage in self.plan:
                if stage.runtime is None:
                    raise ValueError(f"stage {stage.id!r} needs a `runtime` in a multi-stage plan")
        else:
            if len(self.plan) != 1:
                raise ValueError(
                    f"runtime {self.runtime!r} names a one-stage workflow but the plan has "
                    f"{len(self.plan)} stages; use `runtime: plan` for several"
                )
            stage = self.plan[0]
            if stage.runtime not in (None, self.runtime):
                raise ValueError(
                    f"stage {stage.id!r} runs on {stage.runtime!r} but the workflow runtime is "
                    f"{self.runtime!r}"
                )
            stage.runtime = self.runtime

        properties = set((self.settings.get("properties") or {}).keys())
        seen: dict[str, set[str]] = {}
        produced: dict[str, str] = {}
        for stage in self.plan:
            if stage.id in seen:
                raise ValueError(f"stage id {stage.id!r} is used twice")
            for value in [*stage.inputs.values(), *stage.params.values()]:
                binding = parse_binding(value)
                if binding is None:
                    continue
                if binding.scope == "inputs" and (
                    len(binding.path) != 1 or binding.path[0] not in self.inputs
                ):
                    raise ValueError(f"stage {stage.id!r}: {value} names no workflow input")
                if binding.scope == "settings" and binding.path[0] not in properties:
                    raise ValueError(f"stage {stage.id!r}: {value} names no setting in the schema")
                if binding.scope == "stages" and (
                    len(binding.path) != 2
                    or binding.path[0] not in seen
                    or binding.path[1] not in seen[binding.path[0]]
                ):
                    raise ValueError(
                        f"stage {stage.id!r}: {value} names no output of an earlier stage"
                    )
            for output, artifact in stage.outputs.items():
                if artifact is None:
                    continue
                if artifact not in self.outputs:
                    raise ValueError(
                        f"stage {stage.id!r} maps {output!r} to {artifact!r}, which is not in "
                        "`outputs`"
                    )
                if artifact in produced:
                    raise ValueError(
                        f"artifact {artifact!r} is produced by both {produced[artifact]!r} and "
                        f"{stage.id!r}"
                    )
                produced[artifact] = stage.id
            seen[stage.id] = set(stage.outputs)
        missing = [name for name in self.outputs if name not in produced]
        if missing:
            raise ValueError(f"no stage produces the artifacts {missing}")
        for check in self.checks:
            if check.artifact not in self.outputs:
                raise ValueError(f"check {check.name!r} is on {check.artifact!r}, not an artifact")
            for key, value in check.params.items():
                binding = parse_binding(value)
                if binding is None:
                    continue
                if binding.scope != "settings" or binding.path[0] not in properties:
                    raise ValueError(
                        f"check {check.name!r}: param {key!r} = {value} names no setting in the "
                        "schema"
                    )
        return self
