"""The `sample_frames` and `contact_sheet` recipes: stills spread over a clip, and a grid."""

from __future__ import annotations

import math

from ergot_dagster.errors import PermanentRuntimeError
from ergot_dagster.resources.ffmpeg.params import int_param
from ergot_dagster.resources.ffmpeg.recipe import RecipeContext, RecipeOutput, recipe
from ergot_dagster.resources.ffmpeg.stills import (
    FrameGrab,
    grab_frames,
    jpeg_args,
    last_frame_time,
    require_video,
    video_duration,
    video_map,
)
from ergot_dagster.resources.runtime import StageFile

# Baseline JPEG cannot describe an image wider or taller than this.
_JPEG_MAX_SIDE = 65535


@recipe("sample_frames")
def sample_frames(ctx: RecipeContext) -> RecipeOutput:
    """`count` stills evenly spread over input `video`, as JPEGs in time order.

    Frame i of N is taken at duration * (i + 0.5) / N, the middle of the i-th of N equal slices,
    so that the stills stay clear of the very first and very last frame. Each is cut by input
    seeking; the clip is never decoded end to end.

    Params: `count` (1..500, 12), `width` (640; height follows the display aspect ratio),
    `quality` (JPEG -q:v 2..31, 3). Output: `frames`, frame_0001.jpg, frame_0002.jpg, ...
    """
    count = int_param(ctx, "count", 12, low=1, high=500)
    width = int_param(ctx, "width", 640, low=16, high=8192)
    quality = int_param(ctx, "quality", 3, low=2, high=31)

    source = ctx.input("video").path
    summary = require_video(ctx, "video")
    duration = video_duration(summary)
    latest = last_frame_time(summary)
    if duration is None or latest is None:
        raise PermanentRuntimeError(
            f"{source.name} does not say how long it is, so frames cannot be spread over it"
        )
    timestamps = [min(duration * (i + 0.5) / count, latest) for i in range(count)]

    out_dir = ctx.workdir / "frames"
    out_dir.mkdir(parents=True, exist_ok=True)
    scale = f"scale={width}:trunc({width}/dar/2)*2,setsar=1"
    grabs = [
        FrameGrab(t, scale, out_dir / f"frame_{i + 1:04d}.jpg", jpeg_args(quality))
        for i, t in enumerate(timestamps)
    ]
    written = grab_frames(ctx, source, video_map(summary), grabs)
    missing = [f"{g.timestamp_s:.3f}" for g, ok in zip(grabs, written, strict=True) if not ok]
    if missing:
        raise PermanentRuntimeError(
            f"no frame could be decoded from {source.name} at {', '.join(missing)} s"
        )
    return RecipeOutput(
        outputs={"frames": [g.output for g in grabs]},
        metadata={"timestamps_s": [round(t, 3) for t in timestamps], "count": count},
    )


def _frame_files(ctx: RecipeContext, name: str) -> list[StageFile]:
    value = ctx.inputs.get(name)
    if value is None:
        raise PermanentRuntimeError(f"the stage has no input named {name!r}")
    files = value if isinstance(value, list) else [value]
    if not files:
        raise PermanentRuntimeError(f"input {name!r} holds no frames")
    return files


def _tile_height(ctx: RecipeContext, first: StageFile, tile_width: int) -> int:
    """Tile height from the first frame's shape; other shapes are letterboxed into it."""
    summary = first.probe or ctx.probe(first.path)
    width, height = summary.width, summary.height
    if not width or not height:
        raise PermanentRuntimeError(f"{first.path.name} is not an image")
    return max(2, round(tile_width * height / width / 2) * 2)


@recipe("contact_sheet")
def contact_sheet(ctx: RecipeContext) -> RecipeOutput:
    """One JPEG grid of every image in input `frames`, in the order given.

    Each image is fitted into a `tile_width`-wide tile (its aspect kept, letterboxed when it
    differs from the first image's) and the tiles are laid out `columns` to a row (fewer when
    there are fewer images); a short last row is filled with black.

    Params: `columns` (1..64, 4), `tile_width` (16..4096, 320), `quality` (JPEG -q:v, 3).
    Output: `sheet` (.jpg).
    """
    columns = int_param(ctx, "columns", 4, low=1, high=64)
    tile_width = int_param(ctx, "tile_width", 320, low=16, high=4096)
    quality = int_param(ctx, "quality", 3, low=2, high=31)

    files = _frame_files(ctx, "frames")
    columns = min(columns, len(files))
    rows = math.ceil(len(files) / columns)
    tile_height = _tile_height(ctx, files[0], tile_width)
    sheet_w, sheet_h = columns * tile_width, rows * tile_height
    if sheet_w > _JPEG_MAX_SIDE or sheet_h > _JPEG_MAX_SIDE:
        raise PermanentRuntimeError(
            f"a {columns}x{rows} sheet of {tile_width}x{tile_height} tiles would be "
            f"{sheet_w}x{sheet_h}, larger than a JPEG can be; use fewer frames or smaller tiles"
        )

    # Every image is its own input with its own scaler: the concat demuxer would push frames of
    # different sizes through one filter graph, and ffmpeg rebuilds the graph (losing the tiles
    # gathered so far) when the frame size changes.
    chains = []
    for index in range(len(files)):
        chains.append(
            f"[{index}:v]scale={tile_width}:{tile_height}:force_original_aspect_ratio=decrease,"
            f"pad={tile_width}:{tile_height}:(ow-iw)/2:(oh-ih)/2,setsar=1,format=yuvj420p"
            f"[t{index}]"
        )
    tiles = "".join(f"[t{index}]" for index in range(len(files)))
    graph = ";".join(
        [*chains, f"{tiles}concat=n={len(files)}:v=1:a=0,tile={columns}x{rows}:color=black[sheet]"]
    )
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    # Hundreds of inputs make a graph too long for one command-line argument; a script has no limit.
    script = ctx.workdir / "contact_sheet.filtergraph"
    script.write_text(graph, encoding="utf-8")

    sheet_path = ctx.workdir / "contact_sheet.jpg"
    args: list[str] = ["-loglevel", "error"]
    for stage_file in files:
        args += ["-i", str(stage_file.path)]
    args += [
        "-filter_complex_script",
        str(script),
        "-map",
        "[sheet]",
        "-frames:v",
        "1",
        *jpeg_args(quality),
        str(sheet_path),
    ]
    ctx.ffmpeg(args)
    script.unlink(missing_ok=True)
    if not sheet_path.is_file() or sheet_path.stat().st_size == 0:
        raise PermanentRuntimeError("ffmpeg wrote no contact sheet")
    return RecipeOutput(
        outputs={"sheet": sheet_path},
        metadata={
            "columns": columns,
            "rows": rows,
            "tile_width": tile_width,
            "tile_height": tile_height,
            "frames": len(files),
        },
    )
