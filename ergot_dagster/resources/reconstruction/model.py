"""The shapes the reconstruction runtime works with: its stage params, the options of its targets,
the job handed to the worker, and the `cameras` document (format `ergot.sparse/1`).

Everything that crosses a boundary (request params, target options, the worker's document) is
validated here, so a bad value fails naming its field instead of deep inside the engine.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ergot_dagster.errors import PermanentRuntimeError
from ergot_dagster.resources.stage_params import no_bool_or_text

OPERATION = "sparse_reconstruction"
INPUT_NAME = "images"
SPARSE_FORMAT = "ergot.sparse/1"
# The stage's outputs and the files the worker writes for them.
OUTPUT_FILES = {"points": "points.ply", "cameras": "cameras.json", "model": "model.zip"}
# COLMAP's camera models that suit frames of an ordinary (non-fisheye) capture.
CameraModel = Literal["SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV"]
MAX_IMAGES = 2000


class SparseParams(BaseModel):
    """The stage params of `sparse_reconstruction` (bound from the workflow's settings)."""

    model_config = ConfigDict(extra="forbid")

    camera_model: CameraModel = Field(
        default="SIMPLE_RADIAL", description="COLMAP camera model fitted to the images"
    )
    single_camera: bool = Field(
        default=True, description="all images share one camera (frames of one capture)"
    )
    matcher: Literal["exhaustive", "sequential"] = Field(
        default="exhaustive",
        description="exhaustive: every pair of images; sequential: each image with its next ones",
    )
    sequential_overlap: int = Field(
        default=10, ge=1, le=200, description="sequential matcher: neighbours matched per image"
    )
    max_image_size: int = Field(
        default=1600, ge=64, le=8192, description="longest side features are extracted at"
    )
    max_features: int = Field(default=8192, ge=64, le=65536, description="SIFT features per image")
    min_registered_images: int = Field(
        default=3, ge=2, le=MAX_IMAGES, description="fewest registered images that make a result"
    )
    min_registered_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0, description="fewest registered images, as a share of all"
    )

    @field_validator(
        "sequential_overlap",
        "max_image_size",
        "max_features",
        "min_registered_images",
        "min_registered_fraction",
        mode="before",
    )
    @classmethod
    def _numbers(cls, value: Any) -> Any:
        return no_bool_or_text(value)

    @field_validator("single_camera", mode="before")
    @classmethod
    def _boolean(cls, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, not {value!r}")
        return value

    def needed(self, total: int) -> int:
        """How many of `total` images must register for the reconstruction to count."""
        return max(self.min_registered_images, math.ceil(self.min_registered_fraction * total))


class LocalOptions(BaseModel):
    """`options` of a local target: the engine and the CPU threads it may use."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["colmap"] = "colmap"
    threads: int = Field(default=0, ge=0, le=256, description="CPU threads; 0: every core")
    seed: int = Field(
        default=0, ge=0, le=2**31 - 1, description="RANSAC and mapper seed, for repeatable runs"
    )

    @field_validator("threads", "seed", mode="before")
    @classmethod
    def _numbers(cls, value: Any) -> Any:
        return no_bool_or_text(value)


def problems(exc: ValidationError) -> str:
    """`field: message; ...` for a pydantic error, without echoing whole inputs."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def parse_params(params: dict[str, Any]) -> SparseParams:
    """The stage's params: a missing or null one takes its default, a bad one fails permanently."""
    given = {key: value for key, value in params.items() if value is not None}
    try:
        return SparseParams.model_validate(given)
    except ValidationError as exc:
        raise PermanentRuntimeError(f"invalid {OPERATION} params: {problems(exc)}") from None


# -- the worker's job -----------------------------------------------------------------------------


class WorkerImage(BaseModel):
    """One input image: where it is, and its place (1-based) in the input set."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    index: int = Field(ge=1)


class WorkerJob(BaseModel):
    """What the adapter asks of one worker run."""

    model_config = ConfigDict(extra="forbid")

    images: list[WorkerImage] = Field(min_length=2, max_length=MAX_IMAGES)
    params: SparseParams
    options: LocalOptions
    workdir: Path = Field(description="the worker's scratch: prepared images, database, model")
    outputs: Path = Field(description="where the output files go (`OUTPUT_FILES`)")


# -- the cameras document (ergot.sparse/1) --------------------------------------------------------

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class CameraDoc(BaseModel):
    """A camera's intrinsics, in the pixels of the image it belongs to."""

    model_config = _STRICT

    camera_id: int
    model: str
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    params: dict[str, float] = Field(description="COLMAP's parameters by name: f, cx, cy, k...")


class ImageDoc(BaseModel):
    """A registered image: which input it is, its camera, and its pose.

    The pose maps world to camera: x_cam = R(q) x_world + t, with q a unit quaternion written
    w, x, y, z. `centre` is the camera's position in the world, -R(q)^T t.
    """

    model_config = _STRICT

    name: str
    index: int = Field(ge=1, description="1-based position in the input set")
    sha256: str
    camera: CameraDoc
    rotation_wxyz: list[float] = Field(min_length=4, max_length=4)
    translation: list[float] = Field(min_length=3, max_length=3)
    centre: list[float] = Field(min_length=3, max_length=3)
    keypoints: int = Field(ge=0)
    observations: int = Field(ge=0, description="keypoints that see a point of the cloud")


class UnregisteredDoc(BaseModel):
    """An input image that the reconstruction could not place."""

    model_config = _STRICT

    name: str
    index: int = Field(ge=1)
    sha256: str
    keypoints: int = Field(ge=0)


class CountsDoc(BaseModel):
    """The figures of the reconstruction kept (the largest model found)."""

    model_config = _STRICT

    input_images: int = Field(ge=0)
    registered_images: int = Field(ge=0)
    points: int = Field(ge=0)
    observations: int = Field(ge=0)
    mean_reprojection_error_px: float = Field(ge=0)
    mean_track_length: float = Field(ge=0)
    models_found: int = Field(ge=0, description="disconnected models; the largest is kept")


class SparseDocument(BaseModel):
    """The `cameras` artifact: what was reconstructed, how, and where every camera is."""

    model_config = _STRICT

    format: Literal["ergot.sparse/1"] = SPARSE_FORMAT
    engine: dict[str, Any]
    params: dict[str, Any]
    camera_mode: Literal["single", "per_image"]
    conventions: dict[str, str]
    counts: CountsDoc
    images: list[ImageDoc]
    unregistered: list[UnregisteredDoc]
