"""COLMAP through pycolmap, on CPU: features, matches, incremental mapping.

Imported by the worker only: loading pycolmap takes a moment and a health probe does no work.
Every step writes to the COLMAP database in the worker's scratch directory; the mapper's models
are returned with the figures the worker needs to explain a failure (keypoints per image,
geometrically verified pairs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pycolmap

from ergot_dagster.resources.reconstruction.model import LocalOptions, SparseParams
from ergot_dagster.resources.reconstruction.prepare import PreparedImage

Progress = Callable[[float, str], None]
# Fractions of the whole job at which each step ends (mapping is the rest).
FEATURES_DONE = 0.35
MATCHING_DONE = 0.55


@dataclass
class EngineResult:
    """What the mapper found, and what the database says about the images."""

    models: list[pycolmap.Reconstruction]
    camera_mode: str
    keypoints: dict[str, int]
    verified_pairs: int
    info: dict[str, Any] = field(default_factory=dict)


def engine_info(options: LocalOptions) -> dict[str, Any]:
    """The engine's name, version and how it ran (recorded in the `cameras` document)."""
    return {
        "name": "colmap",
        "pycolmap": version("pycolmap"),
        "device": "cpu",
        "threads": options.threads,
        "seed": options.seed,
    }


def reconstruct(
    images: list[PreparedImage],
    image_dir: Path,
    mask_dir: Path | None,
    params: SparseParams,
    options: LocalOptions,
    workdir: Path,
    progress: Progress,
) -> EngineResult:
    """Run features, matching and mapping over `images`; every model the mapper kept."""
    threads = options.threads or -1
    pycolmap.set_random_seed(options.seed)
    database = workdir / "database.db"
    names = [image.name for image in images]
    # One camera for all images needs them all the same size; otherwise each has its own.
    same_size = len({(image.width, image.height) for image in images}) == 1
    single = params.single_camera and same_size
    camera_mode = "single" if single else "per_image"

    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = params.camera_model
    if mask_dir is not None:
        reader.mask_path = str(mask_dir)
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.max_image_size = params.max_image_size
    extraction.num_threads = threads
    extraction.sift.max_num_features = params.max_features
    progress(0.05, f"extracting features of {len(names)} images")
    pycolmap.extract_features(
        database,
        image_dir,
        image_names=names,
        camera_mode=pycolmap.CameraMode.SINGLE if single else pycolmap.CameraMode.PER_IMAGE,
        reader_options=reader,
        extraction_options=extraction,
        device=pycolmap.Device.cpu,
    )
    keypoints = _keypoints(database)
    progress(FEATURES_DONE, f"features: {sum(keypoints.values())} keypoints; matching")

    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = threads
    if params.matcher == "sequential":
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = params.sequential_overlap
        pairing.num_threads = threads
        pycolmap.match_sequential(
            database, matching_options=matching, pairing_options=pairing, device=pycolmap.Device.cpu
        )
    else:
        pycolmap.match_exhaustive(database, matching_options=matching, device=pycolmap.Device.cpu)
    verified = _verified_pairs(database)
    progress(MATCHING_DONE, f"{verified} verified image pairs; mapping")

    mapping = pycolmap.IncrementalPipelineOptions()
    mapping.num_threads = threads
    mapping.random_seed = options.seed
    # Keep even a two-image model, so that a failure can say how many images did register.
    mapping.min_model_size = 2
    attempts = 0

    def next_image() -> None:
        nonlocal attempts
        attempts += 1
        share = min(1.0, attempts / max(1, len(names)))
        fraction = MATCHING_DONE + (0.95 - MATCHING_DONE) * share
        progress(fraction, f"mapping: placing image {attempts} of {len(names)}")

    models = pycolmap.incremental_mapping(
        database,
        image_dir,
        workdir / "sparse",
        options=mapping,
        next_image_callback=next_image,
    )
    ordered = sorted(models.values(), key=lambda m: (m.num_reg_images(), m.num_points3D()))
    return EngineResult(
        models=list(reversed(ordered)),
        camera_mode=camera_mode,
        keypoints=keypoints,
        verified_pairs=verified,
        info=engine_info(options),
    )


def _keypoints(database: Path) -> dict[str, int]:
    db = pycolmap.Database.open(database)
    try:
        return {
            image.name: db.num_keypoints_for_image(image.image_id) for image in db.read_all_images()
        }
    finally:
        db.close()


def _verified_pairs(database: Path) -> int:
    """Image pairs whose matches passed geometric verification (at least one inlier).

    `Database.num_verified_image_pairs` counts every pair that was tried, verified or not.
    """
    db = pycolmap.Database.open(database)
    try:
        _, inliers = db.read_two_view_geometry_num_inliers()
        return sum(1 for count in inliers if count > 0)
    finally:
        db.close()
