"""The FFmpeg recipes. Importing this package registers every one of them."""

from ergot_dagster.resources.ffmpeg.recipes import assembly, frames, poster, proxy, qc

__all__ = ["assembly", "frames", "poster", "proxy", "qc"]
