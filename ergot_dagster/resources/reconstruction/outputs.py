"""The stage's files from a COLMAP model: `points.ply`, `cameras.json` (ergot.sparse/1) and
`model.zip` (COLMAP's binary model: cameras.bin, images.bin, points3D.bin, rigs.bin, frames.bin).

Imported by the worker only (it reads pycolmap objects). Every file is written under a temporary
name and renamed, so a killed worker never leaves a half-written output.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pycolmap

from ergot_dagster.resources.reconstruction.model import (
    OUTPUT_FILES,
    SPARSE_FORMAT,
    CameraDoc,
    CountsDoc,
    ImageDoc,
    SparseDocument,
    SparseParams,
    UnregisteredDoc,
)
from ergot_dagster.resources.reconstruction.ply import write_ply
from ergot_dagster.resources.reconstruction.prepare import PreparedImage

CONVENTIONS = {
    "pose": "world to camera: x_cam = R(q) x_world + t",
    "rotation_wxyz": "unit quaternion q, scalar first (w, x, y, z)",
    "centre": "camera centre in world coordinates: -R(q)^T t",
    "camera_axes": "x right, y down, z forward (looking direction)",
    "units": "the reconstruction's own scale and origin (a similarity away from the scene's)",
    "intrinsics": "pixels of the input image, origin at its top-left corner",
}
# Zip entries get this fixed time, so the same model always zips to the same bytes.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _floats(values: np.ndarray, digits: int = 9) -> list[float]:
    return [round(float(v), digits) for v in values]


def _camera(camera: pycolmap.Camera) -> CameraDoc:
    names = [name.strip() for name in camera.params_info.split(",")]
    return CameraDoc(
        camera_id=int(camera.camera_id),
        model=camera.model.name,
        width=int(camera.width),
        height=int(camera.height),
        params=dict(zip(names, _floats(camera.params), strict=True)),
    )


def build_document(
    model: pycolmap.Reconstruction,
    images: list[PreparedImage],
    *,
    keypoints: dict[str, int],
    params: SparseParams,
    engine: dict[str, object],
    camera_mode: str,
    models_found: int,
) -> SparseDocument:
    """The `cameras` document of `model`: every input image, placed or not, in set order."""
    by_name = {image.name: image for image in model.images.values() if image.has_pose}
    registered: list[ImageDoc] = []
    unregistered: list[UnregisteredDoc] = []
    for item in images:
        image = by_name.get(item.name)
        if image is None:
            unregistered.append(
                UnregisteredDoc(
                    name=item.name,
                    index=item.index,
                    sha256=item.sha256,
                    keypoints=keypoints.get(item.name, 0),
                )
            )
            continue
        pose = image.cam_from_world()
        x, y, z, w = (float(v) for v in pose.rotation.quat)  # Eigen's order: x, y, z, w
        registered.append(
            ImageDoc(
                name=item.name,
                index=item.index,
                sha256=item.sha256,
                camera=_camera(image.camera),
                rotation_wxyz=_floats(np.array([w, x, y, z])),
                translation=_floats(pose.translation),
                centre=_floats(image.projection_center()),
                keypoints=int(image.num_points2D()),
                observations=int(image.num_points3D),
            )
        )
    counts = CountsDoc(
        input_images=len(images),
        registered_images=len(registered),
        points=int(model.num_points3D()),
        observations=int(model.compute_num_observations()),
        mean_reprojection_error_px=round(float(model.compute_mean_reprojection_error()), 6),
        mean_track_length=round(float(model.compute_mean_track_length()), 6),
        models_found=models_found,
    )
    return SparseDocument(
        format=SPARSE_FORMAT,
        engine=engine,
        params=params.model_dump(mode="json"),
        camera_mode=camera_mode,  # type: ignore[arg-type]
        conventions=CONVENTIONS,
        counts=counts,
        images=registered,
        unregistered=unregistered,
    )


def _write_atomically(path: Path, body: bytes) -> None:
    partial = path.with_name(f".{path.name}.part")
    partial.write_bytes(body)
    os.replace(partial, path)


def _zip_model(model: pycolmap.Reconstruction, path: Path, scratch: Path) -> None:
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        model.write_binary(folder)
        partial = path.with_name(f".{path.name}.part")
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for entry in sorted(Path(folder).iterdir()):
                info = zipfile.ZipInfo(entry.name, date_time=_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, entry.read_bytes())
        os.replace(partial, path)


def write_outputs(
    model: pycolmap.Reconstruction, document: SparseDocument, outputs: Path, scratch: Path
) -> dict[str, Path]:
    """Write the three files under `outputs`; their paths by stage output name."""
    outputs.mkdir(parents=True, exist_ok=True)
    ids = sorted(model.point3D_ids())
    xyz = np.array([model.points3D[i].xyz for i in ids], dtype=np.float64).reshape(-1, 3)
    rgb = np.array([model.points3D[i].color for i in ids], dtype=np.int64).reshape(-1, 3)
    paths = {name: outputs / file for name, file in OUTPUT_FILES.items()}
    comments = [
        f"{SPARSE_FORMAT} sparse point cloud, {len(ids)} points",
        f"engine colmap (pycolmap {document.engine.get('pycolmap')})",
    ]
    write_ply(paths["points"], xyz, rgb, comments)
    _write_atomically(paths["cameras"], document.model_dump_json(indent=2).encode("utf-8"))
    _zip_model(model, paths["model"], scratch)
    return paths
