"""The FFmpeg recipes. Importing this package registers every one of them."""

from ergot_dagster.resources.ffmpeg.recipes import frames, poster, proxy, qc

__all__ = ["frames", "poster", "proxy", "qc"]
