"""The point cloud file: binary little-endian PLY, one vertex per 3D point.

Each vertex is `float x, y, z` and `uchar red, green, blue` (15 bytes): what MeshLab, CloudCompare,
Open3D and Blender read. The header's vertex count is the number of points; `vertex_count` reads
it back, and checks that the body holds exactly that many vertices.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

VERTEX = np.dtype(
    [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
)
MAX_HEADER_BYTES = 4096


class PlyError(ValueError):
    """A file that is not the PLY this module writes."""


def write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray, comments: list[str]) -> None:
    """Write N points (`xyz` N x 3, `rgb` N x 3 in 0..255) to `path`, atomically."""
    if xyz.ndim != 2 or xyz.shape[1] != 3 or rgb.shape != xyz.shape:
        raise ValueError(f"points {xyz.shape} and colours {rgb.shape} must both be N x 3")
    vertices = np.empty(len(xyz), dtype=VERTEX)
    for axis, name in enumerate(("x", "y", "z")):
        vertices[name] = xyz[:, axis]
    for channel, name in enumerate(("red", "green", "blue")):
        vertices[name] = np.clip(rgb[:, channel], 0, 255)
    header = ["ply", "format binary_little_endian 1.0"]
    header += [f"comment {line}" for line in comments if "\n" not in line]
    header += [
        f"element vertex {len(vertices)}",
        "property float x",
        "property float y",
        "property float z",
        "property uchar red",
        "property uchar green",
        "property uchar blue",
        "end_header",
    ]
    partial = path.with_name(f".{path.name}.part")
    with open(partial, "wb") as handle:
        handle.write(("\n".join(header) + "\n").encode("ascii"))
        handle.write(vertices.tobytes())
    os.replace(partial, path)


def vertex_count(path: Path) -> int:
    """The vertex count of a PLY written by `write_ply`; `PlyError` if the file disagrees."""
    with open(path, "rb") as handle:
        head = handle.read(MAX_HEADER_BYTES)
    end = head.find(b"end_header\n")
    if not head.startswith(b"ply\n") or end < 0:
        raise PlyError(f"{path.name} is not a PLY file with a header under {MAX_HEADER_BYTES} B")
    lines = head[:end].decode("ascii", errors="replace").splitlines()
    counts = [line.split() for line in lines if line.startswith("element vertex ")]
    if len(counts) != 1 or len(counts[0]) != 3 or not counts[0][2].isdigit():
        raise PlyError(f"{path.name} has no single `element vertex N` line")
    count = int(counts[0][2])
    body = path.stat().st_size - (end + len(b"end_header\n"))
    if body != count * VERTEX.itemsize:
        raise PlyError(
            f"{path.name} announces {count} vertices but holds {body} bytes of them "
            f"({VERTEX.itemsize} per vertex)"
        )
    return count
