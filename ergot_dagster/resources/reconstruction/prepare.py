"""Input images made ready for the engine, in the worker: stable names, RGB pixels, masks.

Images arrive as files named by the store (`<sha256>.png`) in set order. Each becomes
`image_0001.<ext>` in the engine's image folder (a link when the engine reads the file as it is).
An image with an alpha channel (a background removed by `image_set_prep`) is flattened on grey and
gets a mask from its alpha, so that no feature is taken from the removed background.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from ergot_dagster.resources.reconstruction.model import WorkerImage

# Files COLMAP reads as they are; anything else is re-encoded as PNG.
_AS_IS = {"JPEG": ".jpg", "PNG": ".png"}
_AS_IS_MODES = {"RGB", "L"}
# Alpha at or above this keeps a pixel in the mask (COLMAP ignores features where the mask is 0).
_MASK_ALPHA = 128
_FLAT_GREY = (128, 128, 128)
_CHUNK = 1 << 20


class PreparedImage(BaseModel):
    """One input image as the engine sees it."""

    name: str
    index: int
    sha256: str
    width: int
    height: int
    masked: bool


class PrepareError(Exception):
    """An input image that cannot be used; the message names it by its place in the set."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def prepare_images(
    images: list[WorkerImage], image_dir: Path, mask_dir: Path
) -> list[PreparedImage]:
    """Put every input image in `image_dir` (and masks in `mask_dir`), in set order."""
    image_dir.mkdir(parents=True, exist_ok=True)
    prepared = []
    for item in images:
        what = f"image {item.index} of {len(images)}"
        try:
            with Image.open(item.path) as image:
                image.load()
                width, height = image.size
                stem = f"image_{item.index:04d}"
                masked = False
                if _has_alpha(image):
                    rgba = image.convert("RGBA")
                    alpha = np.asarray(rgba.getchannel("A"))
                    if not (alpha >= _MASK_ALPHA).any():
                        raise PrepareError(f"{what} is fully transparent")
                    name = f"{stem}.png"
                    flat = Image.new("RGB", rgba.size, _FLAT_GREY)
                    flat.paste(rgba, mask=rgba.getchannel("A"))
                    flat.save(image_dir / name)
                    mask_dir.mkdir(parents=True, exist_ok=True)
                    mask = Image.fromarray(np.where(alpha >= _MASK_ALPHA, 255, 0).astype(np.uint8))
                    # COLMAP looks for the mask of `name` at `<mask_path>/<name>.png`.
                    mask.save(mask_dir / f"{name}.png")
                    masked = True
                elif image.format in _AS_IS and image.mode in _AS_IS_MODES:
                    name = f"{stem}{_AS_IS[image.format]}"
                    os.symlink(item.path.resolve(), image_dir / name)
                else:
                    name = f"{stem}.png"
                    image.convert("RGB").save(image_dir / name)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise PrepareError(f"{what} cannot be decoded: {type(exc).__name__}: {exc}") from exc
        prepared.append(
            PreparedImage(
                name=name,
                index=item.index,
                sha256=_sha256(item.path),
                width=width,
                height=height,
                masked=masked,
            )
        )
    return prepared
