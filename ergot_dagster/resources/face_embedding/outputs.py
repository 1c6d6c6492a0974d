"""From protocol answers to the stage's outputs: the `faces` document, the crops, the embeddings.

The same code serves the local engine and a remote service, so both give the same files for the
same answers. Per picture, faces are scaled back to source pixels, filtered (`min_face_px`) and
kept largest first (`max_faces`; ties: higher score, then top-left first); pictures stay in time
order. Embeddings are L2-normalised (the engine's own length is kept as `norm`), so a dot product
is the cosine similarity whatever the engine.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ergot_dagster.errors import PermanentRuntimeError
from ergot_dagster.resources.face_embedding.frames import PreparedFrame, PreparedInput
from ergot_dagster.resources.face_embedding.model import (
    Box,
    EmbedAnswer,
    Face,
    FaceParams,
    FacesDocument,
    FrameEntry,
    WireFace,
)

# Crop formats by the media type the workflow asks for: (extension, Pillow save arguments).
_CROP_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    "image/jpeg": (".jpg", {"format": "JPEG", "quality": 92}),
    "image/png": (".png", {"format": "PNG", "compress_level": 6}),
    "image/webp": (".webp", {"format": "WEBP", "quality": 90}),
}
EMBEDDINGS_TYPE = "application/x-npy"


@dataclass(frozen=True)
class FaceOutputs:
    """The written outputs (crops only when there is a face) and a summary for the event log."""

    outputs: dict[str, Path | list[Path]]
    document: FacesDocument


def crop_format(media_type: str | None) -> tuple[str, dict[str, Any]]:
    """How to write crops for the media type the workflow maps `crops` to (JPEG by default)."""
    if media_type is None:
        return _CROP_FORMATS["image/jpeg"]
    if media_type not in _CROP_FORMATS:
        raise PermanentRuntimeError(
            f"crops can be written as {', '.join(_CROP_FORMATS)}, not {media_type}"
        )
    return _CROP_FORMATS[media_type]


def _scaled_face(face: WireFace, frame: PreparedFrame) -> tuple[Box, dict[str, Any]]:
    """The face's box (clamped to the picture) and landmarks in source pixels."""
    fx, fy = frame.width / frame.detect_width, frame.height / frame.detect_height
    left = min(max(face.box.x * fx, 0.0), float(frame.width))
    top = min(max(face.box.y * fy, 0.0), float(frame.height))
    right = min(max((face.box.x + face.box.w) * fx, 0.0), float(frame.width))
    bottom = min(max((face.box.y + face.box.h) * fy, 0.0), float(frame.height))
    box = Box(x=round(left, 2), y=round(top, 2), w=round(right - left, 2), h=round(bottom - top, 2))
    landmarks = {
        name: [(round(x * fx, 2), round(y * fy, 2)) for x, y in points]
        for name, points in sorted(face.landmarks.items())
    }
    return box, landmarks


def _crop(source: Image.Image, box: Box, params: FaceParams) -> Image.Image:
    """A square around the box, `crop_margin` of its longer side added on each side, resized.

    Pillow fills the part of a crop outside the picture with black, so faces at the edge keep
    their place in the square.
    """
    side = max(box.w, box.h) * (1.0 + 2.0 * params.crop_margin)
    cx, cy = box.x + box.w / 2, box.y + box.h / 2
    area = (
        round(cx - side / 2),
        round(cy - side / 2),
        round(cx + side / 2),
        round(cy + side / 2),
    )
    return source.crop(area).resize((params.crop_size, params.crop_size), Image.Resampling.LANCZOS)


def _unit(embedding: list[float], where: str) -> tuple[np.ndarray, float]:
    vector = np.asarray(embedding, dtype=np.float64)
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm) or norm <= 0:
        raise PermanentRuntimeError(f"{where} has an embedding of length 0")
    return vector / norm, norm


def write_outputs(
    prepared: PreparedInput,
    answers: list[EmbedAnswer],
    params: FaceParams,
    *,
    engine: dict[str, Any],
    who: str,
    workdir: Path,
    crops_type: str | None,
) -> FaceOutputs:
    """Check the answers against what was sent and write `faces`, `embeddings` and `crops`.

    `who` names the answering side in errors (a target, the local engine).
    """
    if len(answers) != len(prepared.frames):
        raise PermanentRuntimeError(
            f"{who} answered for {len(answers)} pictures, {len(prepared.frames)} were sent"
        )
    models = {(a.model, a.dims) for a in answers}
    if len(models) > 1:
        raise PermanentRuntimeError(
            f"{who} answered with several embedding models: {sorted(models)}"
        )
    model, dims = answers[0].model, answers[0].dims
    extension, save_args = crop_format(crops_type)
    crops_dir = workdir / "crops"
    crops_dir.mkdir(parents=True, exist_ok=True)

    faces: list[Face] = []
    vectors: list[np.ndarray] = []
    crops: list[Path] = []
    entries: list[FrameEntry] = []
    for frame, answer in zip(prepared.frames, answers, strict=True):
        where = f"{who}'s answer for picture {frame.index + 1}"
        sent = (frame.detect_width, frame.detect_height)
        if (answer.image.width, answer.image.height) != sent:
            raise PermanentRuntimeError(
                f"{where} describes a {answer.image.width}x{answer.image.height} image, but a "
                f"{sent[0]}x{sent[1]} one was sent"
            )
        kept = []
        for face in answer.faces:
            box, landmarks = _scaled_face(face, frame)
            if min(box.w, box.h) >= params.min_face_px:
                kept.append((box, landmarks, face))
        kept.sort(key=lambda k: (-k[0].w * k[0].h, -k[2].score, k[0].y, k[0].x))
        kept = kept[: params.max_faces]
        source = Image.open(frame.source).convert("RGB") if kept else None
        try:
            for box, landmarks, face in kept:
                number = len(faces) + 1
                unit, norm = _unit(face.embedding, where)
                crop_name = f"face_{number:04d}{extension}"
                assert source is not None
                _crop(source, box, params).save(crops_dir / crop_name, **save_args)
                crops.append(crops_dir / crop_name)
                vectors.append(unit)
                faces.append(
                    Face(
                        id=f"face_{number:04d}",
                        frame=frame.index,
                        time_s=frame.time_s,
                        box=box,
                        score=round(face.score, 4),
                        landmarks=landmarks,
                        # float32 is what the .npy holds; 8 decimals keep every digit of it.
                        embedding=[round(float(v), 8) for v in unit.astype(np.float32)],
                        norm=round(norm, 6),
                        crop=crop_name,
                    )
                )
        finally:
            if source is not None:
                source.close()
        entries.append(
            FrameEntry(
                index=frame.index,
                time_s=frame.time_s,
                width=frame.width,
                height=frame.height,
                detect_scale=round(frame.scale, 6),
                faces=len(kept),
            )
        )

    document = FacesDocument(
        model=model,
        dims=dims,
        engine=engine,
        source={
            "name": prepared.name,
            "media_type": prepared.media_type,
            "kind": prepared.kind,
            "duration_s": prepared.duration_s,
        },
        params=params.model_dump(),
        frames=entries,
        faces=faces,
        count=len(faces),
    )
    faces_path = workdir / "faces.json"
    faces_path.write_text(
        # Compact: a face carries a few hundred numbers, one per line would bury the boxes.
        json.dumps(document.model_dump(mode="json"), separators=(",", ":"), allow_nan=False) + "\n",
        encoding="utf-8",
    )
    matrix = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dims), np.float32)
    embeddings_path = workdir / "embeddings.npy"
    np.save(embeddings_path, matrix, allow_pickle=False)
    outputs: dict[str, Path | list[Path]] = {"faces": faces_path, "embeddings": embeddings_path}
    if crops:
        # An empty image set is not an artifact: no face means no `crops` output at all.
        outputs["crops"] = crops
    return FaceOutputs(outputs=outputs, document=document)
