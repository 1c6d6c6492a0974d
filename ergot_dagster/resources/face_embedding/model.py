"""The shapes the face embedding runtime works with: its stage params, the options of its targets,
the answer of the embedding protocol (from a service or the local engine), and the `faces`
document it writes.

Everything that crosses a boundary (request params, target options, a service's answer, the local
worker's answer) is validated here, so a bad value fails with its name instead of deep inside the
engine or the output writer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ergot_dagster.errors import PermanentRuntimeError
from ergot_dagster.resources.stage_params import no_bool_or_text

OPERATION = "embed_faces"
FACES_FORMAT = "ergot.faces/1"
# Bounds on what an answer may hold: more is not a face embedding answer but a broken service.
MAX_DIMS = 8192
MAX_FACES_PER_ANSWER = 1000
MAX_LANDMARK_POINTS = 1000


class FaceParams(BaseModel):
    """The stage params of `embed_faces` (bound from the workflow's settings)."""

    model_config = ConfigDict(extra="forbid")

    min_face_px: int = Field(
        default=40, ge=8, le=4096, description="smallest face kept: box side in source pixels"
    )
    max_faces: int = Field(
        default=20, ge=1, le=200, description="faces kept per image or frame, largest first"
    )
    crop_margin: float = Field(
        default=0.25, ge=0.0, le=1.0, description="crop margin around the box, per side"
    )
    crop_size: int = Field(default=160, ge=32, le=1024, description="crop side in pixels")
    interval_s: float = Field(
        default=1.0, ge=0.04, le=3600.0, description="video: seconds between sampled frames"
    )
    max_frames: int = Field(default=10, ge=1, le=500, description="video: most frames sampled")
    max_side: int = Field(
        default=1600, ge=64, le=8192, description="longest side an image is analysed at"
    )

    @field_validator("*", mode="before")
    @classmethod
    def _numbers(cls, value: Any) -> Any:
        return no_bool_or_text(value)


class LocalOptions(BaseModel):
    """`options` of a local target: the engine and how it is tuned.

    `min_score` is on the engine's own scale: dlib's HOG detector reports an SVM margin, where 0
    is its own decision boundary; weak detections just above it are mostly not faces.
    """

    model_config = ConfigDict(extra="forbid")

    engine: Literal["dlib"] = "dlib"
    model: Literal["large", "small"] = Field(
        default="large", description="landmarks: large = 68 points, small = 5 points"
    )
    upsample: int = Field(
        default=1, ge=0, le=3, description="times the image is doubled before detection"
    )
    min_score: float = Field(default=0.5, ge=-5.0, le=5.0, description="detector score floor")
    jitters: int = Field(default=0, ge=0, le=50, description="re-samplings per descriptor")

    @field_validator("upsample", "min_score", "jitters", mode="before")
    @classmethod
    def _numbers(cls, value: Any) -> Any:
        return no_bool_or_text(value)


class RemoteOptions(BaseModel):
    """`options` of a remote target: what the service must answer with, and its score floor."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None, min_length=1, description="the embedding model the service must use"
    )
    dims: int | None = Field(default=None, ge=1, le=MAX_DIMS, description="expected dimensions")
    min_score: float | None = Field(default=None, description="the service's score floor")


def problems(exc: ValidationError) -> str:
    """`field: message; ...` for a pydantic error, without echoing whole inputs."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def parse_params(params: dict[str, Any]) -> FaceParams:
    """The stage's params: a missing or null one takes its default, a bad one fails permanently."""
    given = {key: value for key, value in params.items() if value is not None}
    try:
        return FaceParams.model_validate(given)
    except ValidationError as exc:
        raise PermanentRuntimeError(f"invalid {OPERATION} params: {problems(exc)}") from None


# -- the protocol's answer (docs/face-embedding-protocol.md) --------------------------------------

_FINITE = ConfigDict(allow_inf_nan=False, extra="ignore")


class WireBox(BaseModel):
    """A face box in the analysed image's pixels: top-left corner, width, height."""

    model_config = _FINITE

    x: float
    y: float
    w: float = Field(gt=0)
    h: float = Field(gt=0)


class WireImage(BaseModel):
    """The size of the image the service analysed (it must be the one sent)."""

    model_config = _FINITE

    width: int = Field(ge=1)
    height: int = Field(ge=1)


class WireFace(BaseModel):
    """One face as the protocol describes it."""

    model_config = _FINITE

    box: WireBox
    score: float
    landmarks: dict[str, list[tuple[float, float]]] = Field(default_factory=dict)
    embedding: list[float] = Field(min_length=1, max_length=MAX_DIMS)

    @field_validator("score", mode="before")
    @classmethod
    def _score(cls, value: Any) -> Any:
        return no_bool_or_text(value)

    @field_validator("embedding", mode="before")
    @classmethod
    def _values(cls, value: Any) -> Any:
        # "0.1" or true among the values is a broken answer, not something to coerce.
        if isinstance(value, list):
            for item in value:
                no_bool_or_text(item)
        return value

    @field_validator("landmarks")
    @classmethod
    def _bounded(
        cls, value: dict[str, list[tuple[float, float]]]
    ) -> dict[str, list[tuple[float, float]]]:
        if sum(len(points) for points in value.values()) > MAX_LANDMARK_POINTS:
            raise ValueError(f"more than {MAX_LANDMARK_POINTS} landmark points")
        return value


class EmbedAnswer(BaseModel):
    """The answer to one `POST /v1/faces:embed` (or one frame of the local worker)."""

    model_config = _FINITE

    model: str = Field(min_length=1, max_length=200)
    dims: int = Field(ge=1, le=MAX_DIMS)
    image: WireImage
    faces: list[WireFace] = Field(max_length=MAX_FACES_PER_ANSWER)

    @model_validator(mode="after")
    def _dims(self) -> EmbedAnswer:
        for index, face in enumerate(self.faces):
            if len(face.embedding) != self.dims:
                raise ValueError(
                    f"face {index} has an embedding of {len(face.embedding)} values, but the "
                    f"answer says dims {self.dims}"
                )
        return self


# -- the `faces` document -------------------------------------------------------------------------


class Box(BaseModel):
    """A face box in source pixels (the image, or the video frame at its display size)."""

    x: float
    y: float
    w: float
    h: float


class Face(BaseModel):
    """One face: where it is, how sure the detector was, its unit embedding and its crop."""

    id: str
    frame: int
    time_s: float | None
    box: Box
    score: float
    landmarks: dict[str, list[tuple[float, float]]]
    embedding: list[float] = Field(description="L2-normalised: cosine similarity is a dot product")
    norm: float = Field(description="the engine's own length of the vector, before normalising")
    crop: str | None = Field(description="file name of the face's crop in the `crops` set")


class FrameEntry(BaseModel):
    """One analysed picture: the image itself, or a frame sampled from the video."""

    index: int
    time_s: float | None
    width: int
    height: int
    detect_scale: float = Field(description="analysed size / source size (1 = full size)")
    faces: int


class FacesDocument(BaseModel):
    """The `faces` output (application/json)."""

    format: Literal["ergot.faces/1"] = FACES_FORMAT
    model: str
    dims: int
    normalization: Literal["l2"] = "l2"
    engine: dict[str, Any]
    source: dict[str, Any]
    params: dict[str, Any]
    frames: list[FrameEntry]
    faces: list[Face]
    count: int
