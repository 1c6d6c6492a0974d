"""The ComfyUI runtime: a stage is one prompt (an API-format graph) on a ComfyUI server."""

from ergot_dagster.resources.comfyui.adapter import ComfyUIRuntime

__all__ = ["ComfyUIRuntime"]
