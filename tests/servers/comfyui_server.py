"""A loopback ComfyUI server: ComfyUI's HTTP + websocket protocol on 127.0.0.1, making real files.

A GPU ComfyUI cannot run here, so tests talk to this one. It speaks the protocol of ComfyUI
v0.3.x (server.py, execution.py, main.py) faithfully where a client can tell: the routes (also
under the `/api` prefix), their JSON shapes, the 400 answer with `node_errors` from the same
validation rules (unknown class types, missing required inputs, wrong link types, values out of
range or not in a list, a loader's file missing), one worker so that prompts really queue, the
websocket message order routed by client id, `/interrupt` that only touches the prompt it names,
`/queue` delete of pending prompts, and a bounded history. It runs aiohttp, like ComfyUI.

There is no diffusion model. The nodes below do real work with ffmpeg, Pillow and numpy on real
files: a decoded "latent" is a gradient pattern seeded by the sampler's seed, at the latent's
size; an image batch is a list of PNG frames; SaveImage writes PNGs, VHS_VideoCombine an MP4.

Node types (class names, input names, types and ranges as ComfyUI or the named pack declares
them; optional inputs are checked when given, as ComfyUI does):

- core: CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage, KSampler (each step takes
  `step_seconds`, reports `progress` and a binary preview, and stops at an interrupt), VAEDecode,
  VAEEncode, SaveImage, PreviewImage, LoadImage (reads an uploaded file, as RGB), ImageScale
  (`crop: center` crops to the aspect; a 0 width or height keeps it);
- core video models (comfy_extras/nodes_video_model.py): ImageOnlyCheckpointLoader (MODEL,
  CLIP_VISION, VAE), SVD_img2vid_Conditioning (its latent is the init image; VAEDecode makes
  `video_frames` frames of it at width x height, zoomed by `motion_bucket_id` and panned in a
  direction the sampler's seed picks), VideoLinearCFGGuidance;
- core audio (comfy_extras/nodes_audio.py): LoadAudio (an uploaded file decoded with ffmpeg; a
  file without sound fails at run time with "No audio stream found in the file.", a missing one at
  validation with "Invalid audio file: ...");
- ComfyUI-VideoHelperSuite: VHS_VideoCombine (MP4/WebM/GIF reported under `gifs`; the format's
  widgets `pix_fmt` and `crf` reach the encoder; with the optional `audio` the sound is muxed
  into `<name>-audio.mp4` as AAC, padded to outlast the video unless `trim_to_audio`, then cut
  at the shorter stream, and that file is the one reported);
- ComfyUI-Inspyrenet-Rembg: InspyrenetRembgAdvanced (IMAGE, MASK). Without the network, the
  matte is the distance of each pixel's colour from the border's (the median of the outermost
  pixels), a pixel opaque when that is above `threshold`: RGBA out, RGB kept. Each image takes
  `step_seconds` and stops at an interrupt, like a model's inference.

Use it in-process:

    with ComfyUILoopbackServer(step_seconds=0.05) as server:
        server.url                            # http://127.0.0.1:<port>
        server.configure({"paused": True})
        server.state()["interrupts"]

or as a separate process (Dagster run workers elsewhere call it):

    python -m tests.servers.comfyui_server --port 0 [--step-seconds S] [--token T | --token-env V]

which prints its URL on stdout once listening and serves until SIGTERM or SIGINT. With a token,
every route but `/_loopback/*` wants `Authorization: Bearer <token>`: that stands in for an
authenticating proxy in front of ComfyUI (ComfyUI itself has no authentication).

Test-only control surface (NOT part of ComfyUI's protocol)
----------------------------------------------------------
`POST /_loopback/config` with a JSON object (`server.configure(dict)` in-process) changes:

- `reset: true` -- the defaults again (first).
- `step_seconds: 0.05` -- how long each KSampler step (and each InspyrenetRembg image) takes.
- `paused: true` -- the worker starts no new prompt (queued ones stay `queue_pending`).
- `fail_next: {"node": "8" | "class_type": "VAEDecode", "exception_type": "...",
  "exception_message": "...", "times": 1}` -- the next matching node executions raise, which
  ComfyUI reports as `execution_error`.
- `http_errors: {"/prompt": {"status": 503, "times": 1}}` -- the next `times` calls of that
  route answer that status (with a plain-text body) before anything else happens.
- `refuse_websockets: true` -- `/ws` answers 404 without upgrading (a proxy that does not pass
  websockets).
- `drop_websockets: true` -- close every open websocket now (once).
- `restart: true` -- act as if the server restarted: the running prompt stops without a word,
  the queue and the history are forgotten, websockets close (once).
- `forget: ["<prompt id>", ...]` -- forget these prompts (queue, history, or running) silently.
- `history_size: 10000` -- how many finished prompts the history keeps.
- `legacy: true` -- speak like ComfyUI of early 2024: no `execution_success` (a prompt ends with
  `executing` for node null only), no timestamps, no `progress_state`, and `progress` without
  `prompt_id` and `node`.
- `checkpoints: [...]` -- the file names CheckpointLoaderSimple and ImageOnlyCheckpointLoader
  accept.

`GET /_loopback/state` (`server.state()`) answers what the server saw: `prompts` (accepted ids in
order), `client_ids` (prompt id -> client id), `status` (prompt id -> queued / running / success /
error / interrupted / forgotten), `interrupts` (`{"prompt_id", "hit"}` per call: hit when it
stopped the running prompt), `queue_deletes` (ids asked for), `uploads`, `websockets` (open client
ids), `ws_connects`, `running`, `pending`, `history`, `request_log` (the last 500 "METHOD /path"),
`auth_failures`, and `config`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import heapq
import itertools
import json
import logging
import mimetypes
import os
import re
import shutil
import signal
import struct
import tempfile
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web
from PIL import Image

from ergot_dagster.media.process import run_process

LOG = logging.getLogger("comfyui_loopback")

FFMPEG_TIMEOUT_S = 120.0
MAX_UPLOAD_BYTES = 100 * 1024 * 1024  # ComfyUI's --max-upload-size default, 100 MB
PREVIEW_IMAGE = 1  # BinaryEventTypes.PREVIEW_IMAGE
CHECKPOINTS = [
    "v1-5-pruned-emaonly-fp16.safetensors",
    "sd_xl_base_1.0.safetensors",
    "dreamshaper_8.safetensors",
    "svd_xt_1_1.safetensors",
]
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_sde", "ddim", "lcm"]
SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"]
# VideoHelperSuite's formats: extension, main pass, its format widgets' defaults (pix_fmt, crf),
# and the audio pass (video_formats/*.json).
VIDEO_FORMATS: dict[str, tuple[str, list[str], dict[str, Any], list[str]]] = {
    "video/h264-mp4": (
        "mp4",
        ["-c:v", "libx264", "-pix_fmt", "{pix_fmt}", "-crf", "{crf}"],
        {"pix_fmt": "yuv420p", "crf": 19},
        ["-c:a", "aac"],
    ),
    "video/webm": (
        "webm",
        ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-pix_fmt", "{pix_fmt}", "-crf", "{crf}"],
        {"pix_fmt": "yuv420p", "crf": 20},
        ["-c:a", "libvorbis"],
    ),
    "image/gif": ("gif", [], {}, []),
}


# -- node types ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One input of a node type, as its INPUT_TYPES declares it."""

    type: str  # INT, FLOAT, STRING, BOOLEAN, COMBO, or a link type (MODEL, IMAGE, ...)
    default: Any = None
    min: float | None = None
    max: float | None = None
    choices: Callable[[ComfyUILoopbackServer], list[str]] | None = None

    def config(self, server: ComfyUILoopbackServer) -> list[Any]:
        """The input's INPUT_TYPES entry, as `input_config` in errors and /object_info."""
        if self.choices is not None:
            return [self.choices(server)]
        extra = {"default": self.default, "min": self.min, "max": self.max}
        return [self.type, {key: value for key, value in extra.items() if value is not None}]


@dataclass(frozen=True)
class NodeType:
    """A node class: its required (and optional) inputs, return types, whether it is an output
    node, its work."""

    required: dict[str, Spec]
    returns: tuple[str, ...]
    run: Callable[..., Any]
    output_node: bool = False
    validate: Callable[[ComfyUILoopbackServer, dict[str, Any]], bool | str] | None = None
    optional: dict[str, Spec] = field(default_factory=dict)


class Interrupted(Exception):
    """comfy.model_management.InterruptProcessingException."""


class Forgotten(Exception):
    """The prompt was forgotten (a simulated restart): it ends without a word."""


class InjectedError(Exception):
    """A failure injected through `fail_next`, reported with the configured exception type."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type


def _int(low: int, high: int, default: int) -> Spec:
    return Spec("INT", default, low, high)


def _float(low: float, high: float, default: float) -> Spec:
    return Spec("FLOAT", default, low, high)


def _combo(values: list[str] | Callable[[ComfyUILoopbackServer], list[str]]) -> Spec:
    return Spec("COMBO", choices=values if callable(values) else (lambda server: list(values)))


def _png_size(path: Path) -> tuple[int, int]:
    with open(path, "rb") as handle:
        head = handle.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path.name} is not a PNG")
    return struct.unpack(">II", head[16:24])


class Execution:
    """What a node's work can reach: the prompt's scratch directory, progress, interrupts."""

    def __init__(self, server: ComfyUILoopbackServer, job: Job, node_id: str) -> None:
        self.server = server
        self.job = job
        self.node_id = node_id

    @property
    def scratch(self) -> Path:
        path = self.server.root / "work" / self.job.prompt_id / self.node_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def ffmpeg(self, args: list[str]) -> None:
        run_process(
            ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
            timeout_s=FFMPEG_TIMEOUT_S,
            tool="ffmpeg",
        )

    def check(self) -> None:
        self.server.check_interrupt(self.job)

    def sleep(self, seconds: float) -> None:
        """Wait, stopping at once when interrupted (ComfyUI checks between sampler steps)."""
        end = time.monotonic() + seconds
        while True:
            self.check()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.02))

    def progress(self, value: int, maximum: int) -> None:
        self.check()
        self.server.progress(self.job, self.node_id, value, maximum)


def _checkpoint_loader(run: Execution, ckpt_name: str) -> tuple[Any, ...]:
    return {"model": ckpt_name}, {"clip": ckpt_name}, {"vae": ckpt_name}


def _clip_text_encode(run: Execution, text: str, clip: Any) -> tuple[Any, ...]:
    return ({"text": text},)


def _empty_latent(run: Execution, width: int, height: int, batch_size: int) -> tuple[Any, ...]:
    return ({"width": width, "height": height, "batch": batch_size, "frames": None},)


def _ksampler(run: Execution, **inputs: Any) -> tuple[Any, ...]:
    steps = int(inputs["steps"])
    for step in range(steps):
        run.sleep(run.server.config.step_seconds)
        run.progress(step + 1, steps)
    latent = dict(inputs["latent_image"])
    latent.update(seed=int(inputs["seed"]), denoise=float(inputs["denoise"]))
    return (latent,)


def _vae_decode(run: Execution, samples: dict[str, Any], vae: Any) -> tuple[Any, ...]:
    width, height = samples["width"], samples["height"]
    seed = int(samples.get("seed", 0)) % (2**32)
    out = run.scratch
    if samples.get("init_image"):
        return (_svd_frames(run, samples, seed),)
    if samples.get("frames"):
        # Image to image: the source frames at the latent's size, their hue turned by the seed
        # as far as `denoise` allows.
        frames = []
        for index, source in enumerate(samples["frames"]):
            frame = out / f"frame_{index:05d}.png"
            hue = (seed % 360) * float(samples.get("denoise", 1.0))
            run.ffmpeg(
                [
                    "-i",
                    str(source),
                    "-vf",
                    f"scale={width}:{height},hue=h={hue:.2f}",
                    "-frames:v",
                    "1",
                    "-update",
                    "1",
                    str(frame),
                ]
            )
            frames.append(frame)
        return (frames,)
    run.ffmpeg(
        [
            "-f",
            "lavfi",
            "-i",
            f"gradients=s={width}x{height}:seed={seed}:n=3:speed=0.08:r=8",
            "-frames:v",
            str(samples["batch"]),
            str(out / "frame_%05d.png"),
        ]
    )
    return (sorted(out.glob("frame_*.png")),)


def _vae_encode(run: Execution, pixels: list[Path], vae: Any) -> tuple[Any, ...]:
    width, height = _png_size(pixels[0])
    return ({"width": width, "height": height, "batch": len(pixels), "frames": list(pixels)},)


def _save_path(base: Path, prefix: str) -> tuple[Path, str, str, int]:
    """ComfyUI's get_save_image_path: (folder, subfolder, name, next counter)."""
    subfolder, _, name = prefix.replace("\\", "/").rpartition("/")
    folder = (base / subfolder).resolve()
    if os.path.commonpath([folder, base.resolve()]) != str(base.resolve()):
        raise ValueError(
            "**** ERROR: Saving image outside the output folder is not allowed.\n"
            f" full_output_folder: {folder}\n output_dir: {base}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"^{re.escape(name)}_(\d+)_?\.")
    counters = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return folder, subfolder, name, max(counters, default=0) + 1


def _save_images(run: Execution, images: list[Path], prefix: str, kind: str) -> dict[str, Any]:
    base = run.server.root / kind
    folder, subfolder, name, counter = _save_path(base, prefix)
    results = []
    for frame in images:
        file = f"{name}_{counter:05}_.png"
        shutil.copyfile(frame, folder / file)
        results.append({"filename": file, "subfolder": subfolder, "type": kind})
        counter += 1
    return {"ui": {"images": results}}


def _save_image(run: Execution, images: list[Path], filename_prefix: str) -> dict[str, Any]:
    return _save_images(run, images, filename_prefix, "output")


def _preview_image(run: Execution, images: list[Path]) -> dict[str, Any]:
    return _save_images(run, images, f"ComfyUI_temp_{uuid.uuid4().hex[:5]}", "temp")


def _annotated(server: ComfyUILoopbackServer, name: str) -> Path | None:
    """An input file named as LoadImage takes it (`sub/name.png`, optionally `[input]` etc.)."""
    kind = "input"
    match = re.match(r"^(.*) \[(input|output|temp)\]$", name)
    if match:
        name, kind = match.group(1), match.group(2)
    base = (server.root / kind).resolve()
    path = (base / name).resolve()
    if os.path.commonpath([path, base]) != str(base) or not path.is_file():
        return None
    return path


def _load_image_valid(server: ComfyUILoopbackServer, inputs: dict[str, Any]) -> bool | str:
    image = inputs.get("image")
    if not isinstance(image, str) or _annotated(server, image) is None:
        return f"Invalid image file: {image}"
    return True


def _load_image(run: Execution, image: str, upload: str = "image") -> tuple[Any, ...]:
    source = _annotated(run.server, image)
    if source is None:
        raise FileNotFoundError(image)
    frame = run.scratch / "frame_00000.png"
    # ComfyUI's LoadImage converts to RGB (an alpha channel becomes the MASK output).
    run.ffmpeg(
        ["-i", str(source), "-frames:v", "1", "-update", "1", "-pix_fmt", "rgb24", str(frame)]
    )
    return [frame], {"mask": image}


def _image_scale(run: Execution, **inputs: Any) -> tuple[Any, ...]:
    width, height = int(inputs["width"]), int(inputs["height"])
    frames = []
    for index, source in enumerate(inputs["image"]):
        src_w, src_h = _png_size(source)
        w = width or max(1, round(src_w * height / src_h))
        h = height or max(1, round(src_h * width / src_w))
        if inputs["crop"] == "center":
            scale = f"scale={w}:{h}:force_original_aspect_ratio=increase,crop={w}:{h}"
        else:
            scale = f"scale={w}:{h}"
        frame = run.scratch / f"frame_{index:05d}.png"
        run.ffmpeg(["-i", str(source), "-vf", scale, "-frames:v", "1", "-update", "1", str(frame)])
        frames.append(frame)
    return (frames,)


def _video_combine(run: Execution, **inputs: Any) -> dict[str, Any]:
    frames: list[Path] = list(inputs["images"])
    if inputs["pingpong"]:
        frames += frames[-2:0:-1]
    save_output = bool(inputs["save_output"])
    kind = "output" if save_output else "temp"
    folder, subfolder, name, counter = _save_path(run.server.root / kind, inputs["filename_prefix"])
    extension, main_pass, widgets, audio_pass = VIDEO_FORMATS[inputs["format"]]
    # The format's own widgets (pix_fmt, crf, ...) arrive as extra inputs, defaults if absent.
    values = {key: inputs.get(key, default) for key, default in widgets.items()}
    codec = [arg.format(**values) for arg in main_pass]
    sequence = run.scratch / "sequence"
    sequence.mkdir(exist_ok=True)
    for index, frame in enumerate(frames):
        shutil.copyfile(frame, sequence / f"{index:05d}.png")
    # Like VideoHelperSuite: the first frame is saved beside the video (it carries the workflow).
    first = f"{name}_{counter:05}.png"
    shutil.copyfile(frames[0], folder / first)
    file = f"{name}_{counter:05}.{extension}"
    run.ffmpeg(
        [
            "-framerate",
            f"{float(inputs['frame_rate']):g}",
            "-i",
            str(sequence / "%05d.png"),
            *codec,
            str(folder / file),
        ]
    )
    files = [str(folder / first), str(folder / file)]
    audio = inputs.get("audio")
    if audio is not None and audio_pass:
        # Like VideoHelperSuite: the audio is muxed into a second file, `<name>-audio.<ext>`,
        # padded to outlast the video unless `trim_to_audio`, then cut at the shorter stream.
        with_audio = f"{name}_{counter:05}-audio.{extension}"
        seconds = len(frames) / float(inputs["frame_rate"]) + 1
        pad = [] if inputs.get("trim_to_audio") else ["-af", f"apad=whole_dur={seconds:g}"]
        run.ffmpeg(
            [
                "-i",
                str(folder / file),
                "-i",
                str(audio["path"]),
                "-map",
                "0:v:0",
                "-map",
                "1:a:0",
                "-c:v",
                "copy",
                *audio_pass,
                *pad,
                "-shortest",
                str(folder / with_audio),
            ]
        )
        files.append(str(folder / with_audio))
        file = with_audio
    preview = {
        "filename": file,
        "subfolder": subfolder,
        "type": kind,
        "format": inputs["format"],
        "frame_rate": float(inputs["frame_rate"]),
        "workflow": first,
        "fullpath": files[-1],
    }
    return {"ui": {"gifs": [preview]}, "result": ((save_output, files),)}


def _image_only_checkpoint_loader(run: Execution, ckpt_name: str) -> tuple[Any, ...]:
    return {"model": ckpt_name}, {"clip_vision": ckpt_name}, {"vae": ckpt_name}


def _svd_conditioning(run: Execution, **inputs: Any) -> tuple[Any, ...]:
    init = list(inputs["init_image"])
    conditioning = {key: inputs[key] for key in ("motion_bucket_id", "fps", "augmentation_level")}
    latent = {
        "width": int(inputs["width"]),
        "height": int(inputs["height"]),
        "batch": int(inputs["video_frames"]),
        "frames": None,
        "init_image": init[0],
        "motion_bucket_id": int(inputs["motion_bucket_id"]),
    }
    return {"positive": conditioning}, {"negative": conditioning}, latent


def _svd_frames(run: Execution, samples: dict[str, Any], seed: int) -> list[Path]:
    """SVD's decoded frames: the init image, cropped to the latent's size, slowly zoomed and
    panned (more for a higher motion bucket; the direction from the seed)."""
    width, height, count = samples["width"], samples["height"], samples["batch"]
    zoom = 0.5 * int(samples.get("motion_bucket_id", 127)) / 1023
    x, y = (seed % 3) / 2, (seed // 3 % 3) / 2
    out = run.scratch
    run.ffmpeg(
        [
            "-i",
            str(samples["init_image"]),
            "-vf",
            f"scale={width}:{height}:force_original_aspect_ratio=increase,crop={width}:{height},"
            f"zoompan=z='1+{zoom:.4f}*on/{max(count - 1, 1)}':"
            f"x='(iw-iw/zoom)*{x:g}':y='(ih-ih/zoom)*{y:g}':d={count}:s={width}x{height}",
            "-frames:v",
            str(count),
            str(out / "frame_%05d.png"),
        ]
    )
    frames = sorted(out.glob("frame_*.png"))
    if len(frames) != count:
        raise RuntimeError(f"decoded {len(frames)} frames, expected {count}")
    return frames


def _video_linear_cfg(run: Execution, model: Any, min_cfg: float) -> tuple[Any, ...]:
    return ({**model, "min_cfg": min_cfg},)


def _load_audio_valid(server: ComfyUILoopbackServer, inputs: dict[str, Any]) -> bool | str:
    audio = inputs.get("audio")
    if not isinstance(audio, str) or _annotated(server, audio) is None:
        return f"Invalid audio file: {audio}"
    return True


def _load_audio(run: Execution, audio: str) -> tuple[Any, ...]:
    """Core LoadAudio: the uploaded file decoded (here to a float WAV beside the prompt)."""
    source = _annotated(run.server, audio)
    if source is None:
        raise FileNotFoundError(audio)
    decoded = run.scratch / "audio.wav"
    try:
        run.ffmpeg(["-i", str(source), "-map", "0:a:0", "-c:a", "pcm_f32le", str(decoded)])
    except Exception:
        raise ValueError("No audio stream found in the file.") from None
    return ({"path": decoded},)


def _rembg(run: Execution, image: list[Path], threshold: float, torchscript_jit: str) -> Any:
    """InspyrenetRembgAdvanced's matte, without the network: a pixel is foreground as far as its
    colour is from the border's (the median of the outermost pixels), thresholded like the node
    does its prediction. RGB is kept; alpha is 255 or 0. Each image takes `step_seconds`."""
    images, masks = [], []
    for index, source in enumerate(image):
        run.sleep(run.server.config.step_seconds)  # the model's inference, interruptible
        rgb = np.asarray(Image.open(source).convert("RGB"), dtype=np.float32)
        border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
        distance = np.linalg.norm(rgb - np.median(border, axis=0), axis=-1) / (255 * 3**0.5)
        confidence = np.clip(distance * 4, 0.0, 1.0)
        alpha = np.where(confidence > float(threshold), 255, 0).astype(np.uint8)
        rgba = np.dstack([rgb.astype(np.uint8), alpha])
        matte = run.scratch / f"matte_{index:05d}.png"
        Image.fromarray(rgba, "RGBA").save(matte)
        mask = run.scratch / f"mask_{index:05d}.png"
        Image.fromarray(alpha, "L").save(mask)
        images.append(matte)
        masks.append(mask)
    return images, masks


NODE_TYPES: dict[str, NodeType] = {
    "CheckpointLoaderSimple": NodeType(
        {"ckpt_name": _combo(lambda server: list(server.config.checkpoints))},
        ("MODEL", "CLIP", "VAE"),
        _checkpoint_loader,
    ),
    "CLIPTextEncode": NodeType(
        {"text": Spec("STRING", ""), "clip": Spec("CLIP")}, ("CONDITIONING",), _clip_text_encode
    ),
    "EmptyLatentImage": NodeType(
        {
            "width": _int(16, 16384, 512),
            "height": _int(16, 16384, 512),
            "batch_size": _int(1, 4096, 1),
        },
        ("LATENT",),
        _empty_latent,
    ),
    "KSampler": NodeType(
        {
            "model": Spec("MODEL"),
            "seed": _int(0, 0xFFFFFFFFFFFFFFFF, 0),
            "steps": _int(1, 10000, 20),
            "cfg": _float(0.0, 100.0, 8.0),
            "sampler_name": _combo(SAMPLERS),
            "scheduler": _combo(SCHEDULERS),
            "positive": Spec("CONDITIONING"),
            "negative": Spec("CONDITIONING"),
            "latent_image": Spec("LATENT"),
            "denoise": _float(0.0, 1.0, 1.0),
        },
        ("LATENT",),
        _ksampler,
    ),
    "VAEDecode": NodeType({"samples": Spec("LATENT"), "vae": Spec("VAE")}, ("IMAGE",), _vae_decode),
    "VAEEncode": NodeType({"pixels": Spec("IMAGE"), "vae": Spec("VAE")}, ("LATENT",), _vae_encode),
    "SaveImage": NodeType(
        {"images": Spec("IMAGE"), "filename_prefix": Spec("STRING", "ComfyUI")},
        (),
        _save_image,
        output_node=True,
    ),
    "PreviewImage": NodeType({"images": Spec("IMAGE")}, (), _preview_image, output_node=True),
    "LoadImage": NodeType(
        {"image": Spec("COMBO")}, ("IMAGE", "MASK"), _load_image, validate=_load_image_valid
    ),
    "ImageScale": NodeType(
        {
            "image": Spec("IMAGE"),
            "upscale_method": _combo(["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]),
            "width": _int(0, 16384, 512),
            "height": _int(0, 16384, 512),
            "crop": _combo(["disabled", "center"]),
        },
        ("IMAGE",),
        _image_scale,
    ),
    "VHS_VideoCombine": NodeType(
        {
            "images": Spec("IMAGE"),
            "frame_rate": _float(1.0, 240.0, 8.0),
            "loop_count": _int(0, 100, 0),
            "filename_prefix": Spec("STRING", "AnimateDiff"),
            "format": _combo(list(VIDEO_FORMATS)),
            "pingpong": Spec("BOOLEAN", False),
            "save_output": Spec("BOOLEAN", True),
        },
        ("VHS_FILENAMES",),
        _video_combine,
        output_node=True,
        optional={
            "audio": Spec("AUDIO"),
            "meta_batch": Spec("VHS_BatchManager"),
            "vae": Spec("VAE"),
        },
    ),
    "ImageOnlyCheckpointLoader": NodeType(
        {"ckpt_name": _combo(lambda server: list(server.config.checkpoints))},
        ("MODEL", "CLIP_VISION", "VAE"),
        _image_only_checkpoint_loader,
    ),
    "SVD_img2vid_Conditioning": NodeType(
        {
            "clip_vision": Spec("CLIP_VISION"),
            "init_image": Spec("IMAGE"),
            "vae": Spec("VAE"),
            "width": _int(16, 16384, 1024),
            "height": _int(16, 16384, 576),
            "video_frames": _int(1, 4096, 14),
            "motion_bucket_id": _int(1, 1023, 127),
            "fps": _int(1, 1024, 6),
            "augmentation_level": _float(0.0, 10.0, 0.0),
        },
        ("CONDITIONING", "CONDITIONING", "LATENT"),
        _svd_conditioning,
    ),
    "VideoLinearCFGGuidance": NodeType(
        {"model": Spec("MODEL"), "min_cfg": _float(0.0, 100.0, 1.0)}, ("MODEL",), _video_linear_cfg
    ),
    "LoadAudio": NodeType(
        {"audio": Spec("COMBO")}, ("AUDIO",), _load_audio, validate=_load_audio_valid
    ),
    "InspyrenetRembgAdvanced": NodeType(
        {
            "image": Spec("IMAGE"),
            "threshold": _float(0.0, 1.0, 0.5),
            "torchscript_jit": _combo(["default", "on"]),
        },
        ("IMAGE", "MASK"),
        _rembg,
    ),
}


# -- validation (execution.validate_prompt / validate_inputs) -----------------------------------


def _error(kind: str, message: str, details: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _convert(kind: str, value: Any) -> Any:
    if kind == "INT":
        return int(value)
    if kind == "FLOAT":
        return float(value)
    if kind == "STRING":
        return str(value)
    if kind == "BOOLEAN":
        return bool(value)
    return value


def validate_inputs(
    server: ComfyUILoopbackServer,
    prompt: dict[str, Any],
    node_id: str,
    validated: dict[str, tuple[bool, list[dict[str, Any]]]],
) -> tuple[bool, list[dict[str, Any]]]:
    """(valid, errors) of one node and, through its links, the nodes it depends on."""
    if node_id in validated:
        return validated[node_id]
    node = prompt[node_id]
    inputs = node.get("inputs", {})
    node_type = NODE_TYPES[node["class_type"]]
    errors: list[dict[str, Any]] = []
    valid = True
    # Like ComfyUI: required inputs must be there; optional ones are checked when given.
    declared = [(n, s, True) for n, s in node_type.required.items()] + [
        (n, s, False) for n, s in node_type.optional.items()
    ]
    for name, spec, required in declared:
        if name not in inputs:
            if required:
                errors.append(
                    _error(
                        "required_input_missing", "Required input is missing", name, input_name=name
                    )
                )
            continue
        value = inputs[name]
        config = spec.config(server)
        if isinstance(value, list):
            if len(value) != 2:
                errors.append(
                    _error(
                        "bad_linked_input",
                        "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        name,
                        input_name=name,
                        input_config=config,
                        received_value=value,
                    )
                )
                continue
            source_id, slot = value
            # Like ComfyUI, a link to a node that is not there raises, and is reported as an
            # exception during validation of the output.
            returns = NODE_TYPES[prompt[source_id]["class_type"]].returns
            received = returns[slot]
            if received != spec.type:
                errors.append(
                    _error(
                        "return_type_mismatch",
                        "Return type mismatch between linked nodes",
                        f"{name}, received_type({received}) mismatch input_type({spec.type})",
                        input_name=name,
                        input_config=config,
                        received_type=received,
                        linked_node=value,
                    )
                )
                continue
            ok, _ = validate_inputs(server, prompt, source_id, validated)
            if not ok:
                valid = False
            continue
        try:
            value = _convert(spec.type, value)
            inputs[name] = value
        except (TypeError, ValueError) as exc:
            errors.append(
                _error(
                    "invalid_input_type",
                    f"Failed to convert an input value to a {spec.type} value",
                    f"{name}, {value}, {exc}",
                    input_name=name,
                    input_config=config,
                    received_value=value,
                    exception_message=str(exc),
                )
            )
            continue
        if spec.min is not None and value < spec.min:
            errors.append(
                _error(
                    "value_smaller_than_min",
                    f"Value {value} smaller than min of {spec.min}",
                    name,
                    input_name=name,
                    input_config=config,
                    received_value=value,
                )
            )
            continue
        if spec.max is not None and value > spec.max:
            errors.append(
                _error(
                    "value_bigger_than_max",
                    f"Value {value} bigger than max of {spec.max}",
                    name,
                    input_name=name,
                    input_config=config,
                    received_value=value,
                )
            )
            continue
        if node_type.validate is None and spec.choices is not None:
            options = spec.choices(server)
            if value not in options:
                listing = f"(list of length {len(options)})" if len(options) > 20 else str(options)
                errors.append(
                    _error(
                        "value_not_in_list",
                        "Value not in list",
                        f"{name}: '{value}' not in {listing}",
                        input_name=name,
                        input_config=config,
                        received_value=value,
                    )
                )
                continue
    if node_type.validate is not None:
        outcome = node_type.validate(server, inputs)
        if outcome is not True:
            name = next(iter(node_type.required))
            errors.append(
                _error(
                    "custom_validation_failed",
                    "Custom validation failed for node",
                    f"{name} - {outcome}",
                    input_name=name,
                )
            )
    result = (not errors and valid, errors)
    validated[node_id] = result
    return result


def validate_prompt(
    server: ComfyUILoopbackServer, prompt: Any
) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
    """(valid, error, outputs to execute, node_errors), as execution.validate_prompt answers."""
    if not isinstance(prompt, dict):
        return False, _error("invalid_prompt", "Prompt is not an object", ""), [], {}
    outputs = set()
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            error = _error(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            )
            return False, error, [], {}
        class_type = node["class_type"]
        if class_type not in NODE_TYPES:
            error = _error(
                "invalid_prompt",
                f"Cannot execute because node {class_type} does not exist.",
                f"Node ID '#{node_id}'",
            )
            return False, error, [], {}
        if NODE_TYPES[class_type].output_node:
            outputs.add(node_id)
    if not outputs:
        return False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}
    good: list[str] = []
    failed: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
    for output in sorted(outputs):
        try:
            ok, reasons = validate_inputs(server, prompt, output, validated)
        except Exception as exc:
            ok = False
            reasons = [
                _error(
                    "exception_during_validation",
                    "Exception when validating node",
                    str(exc),
                    exception_type=type(exc).__name__,
                    traceback=traceback.format_tb(exc.__traceback__),
                )
            ]
            validated[output] = (False, reasons)
        if ok:
            good.append(output)
            continue
        failed.append((output, reasons))
        for node_id, (node_ok, node_reasons) in validated.items():
            if node_ok or not node_reasons:
                continue
            entry = node_errors.setdefault(
                node_id,
                {
                    "errors": node_reasons,
                    "dependent_outputs": [],
                    "class_type": prompt[node_id]["class_type"],
                },
            )
            entry["dependent_outputs"].append(output)
    if not good:
        details = "\n".join(
            f"{reason['message']}: {reason['details']}" for _, rs in failed for reason in rs
        )
        error = _error(
            "prompt_outputs_failed_validation", "Prompt outputs failed validation", details
        )
        return False, error, [], node_errors
    return True, None, good, node_errors


# -- the queue and the worker ---------------------------------------------------------------------


@dataclass
class Job:
    """A queued prompt, ComfyUI's queue item `[number, prompt_id, prompt, extra_data, outputs]`."""

    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    forgotten: bool = False
    messages: list[list[Any]] = field(default_factory=list)

    def item(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]

    @property
    def client_id(self) -> str | None:
        value = self.extra_data.get("client_id")
        return value if isinstance(value, str) else None


@dataclass
class LoopbackConfig:
    """The pacing and fault settings, changed through `/_loopback/config`."""

    step_seconds: float = 0.05
    paused: bool = False
    fail_next: dict[str, Any] | None = None
    http_errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    refuse_websockets: bool = False
    history_size: int = 10000
    legacy: bool = False
    checkpoints: list[str] = field(default_factory=lambda: list(CHECKPOINTS))


class ComfyUILoopbackServer:
    """ComfyUI's protocol on 127.0.0.1: aiohttp in a thread, one prompt worker thread."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        step_seconds: float = 0.05,
        token: str | None = None,
        root: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="comfyui-loopback-")) if root is None else root
        for kind in ("input", "output", "temp", "work"):
            (self.root / kind).mkdir(parents=True, exist_ok=True)
        self.config = LoopbackConfig(step_seconds=step_seconds)
        self.lock = threading.Condition()
        self.pending: list[tuple[float, int, Job]] = []
        self.running: dict[str, Job] = {}
        self.history: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.number = 0
        self._order = itertools.count()
        self.interrupt_requested = False
        self.current_client: str | None = None
        self.last_node_id: str | None = None
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self._seen: dict[str, Any] = {
            "prompts": [],
            "client_ids": {},
            "status": {},
            "interrupts": [],
            "queue_deletes": [],
            "uploads": [],
            "ws_connects": 0,
            "auth_failures": 0,
        }
        self._request_log: deque[str] = deque(maxlen=500)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._messages: asyncio.Queue[tuple[Any, Any, str | None]] | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._stopping = False
        self._preview = b""
        self._publisher: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ComfyUILoopbackServer:
        """Serve (HTTP in one thread, the prompt worker in another); returns once listening."""
        self._preview = self._make_preview()
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self._start_site())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown_site())
            loop.close()

        self._thread = threading.Thread(target=serve, name="comfyui-loopback-http", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        self._worker = threading.Thread(
            target=self._work, name="comfyui-loopback-worker", daemon=True
        )
        self._worker.start()
        return self

    def stop(self) -> None:
        """Stop serving and working; the running prompt ends without a word."""
        with self.lock:
            self._stopping = True
            for job in self.running.values():
                job.forgotten = True
            self.lock.notify_all()
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._worker is not None:
            self._worker.join(timeout=30)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ComfyUILoopbackServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def _start_site(self) -> None:
        self._messages = asyncio.Queue()
        app = web.Application(client_max_size=MAX_UPLOAD_BYTES, middlewares=[self._middleware])
        routes = [
            web.get("/ws", self._ws),
            web.get("/prompt", self._get_prompt),
            web.post("/prompt", self._post_prompt),
            web.get("/queue", self._get_queue),
            web.post("/queue", self._post_queue),
            web.post("/interrupt", self._post_interrupt),
            web.get("/history", self._get_history),
            web.get("/history/{prompt_id}", self._get_history_one),
            web.post("/history", self._post_history),
            web.post("/upload/image", self._upload_image),
            web.get("/view", self._view),
            web.get("/system_stats", self._system_stats),
            web.get("/object_info", self._object_info),
        ]
        # ComfyUI serves every route under /api too, for its frontend's dev server.
        app.add_routes([web.route(r.method, "/api" + r.path, r.handler) for r in routes] + routes)
        app.add_routes(
            [
                web.get("/_loopback/state", self._control_state),
                web.post("/_loopback/config", self._control_config),
            ]
        )
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._publisher = asyncio.get_running_loop().create_task(self._publish())

    async def _shutdown_site(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
        for ws in list(self.sockets.values()):
            with contextlib.suppress(Exception):
                await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def _make_preview(self) -> bytes:
        result = run_process(
            [
                "ffmpeg",
                "-hide_banner",
                "-nostdin",
                "-loglevel",
                "error",
                "-f",
                "lavfi",
                "-i",
                "color=c=gray:s=32x32:d=1",
                "-frames:v",
                "1",
                "-f",
                "mjpeg",
                "pipe:1",
            ],
            timeout_s=FFMPEG_TIMEOUT_S,
            tool="ffmpeg",
        )
        return result.stdout

    # -- messages (PromptServer.send / send_sync and its publish loop) --------------------------

    def send_sync(self, event: Any, data: Any, sid: str | None) -> None:
        """Queue a message from a worker thread; the event loop publishes them in order."""
        loop = self._loop
        if loop is None or self._messages is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._messages.put_nowait, (event, data, sid))

    async def _publish(self) -> None:
        assert self._messages is not None
        while True:
            event, data, sid = await self._messages.get()
            targets = list(self.sockets.values()) if sid is None else [self.sockets.get(sid)]
            for ws in targets:
                if ws is None or ws.closed:
                    continue
                try:
                    if isinstance(data, bytes | bytearray):
                        await ws.send_bytes(struct.pack(">I", event) + bytes(data))
                    else:
                        await ws.send_str(json.dumps({"type": event, "data": data}))
                except (ConnectionError, RuntimeError) as exc:
                    LOG.debug("send error: %s", exc)

    def queue_updated(self) -> None:
        """Tell every socket the queue changed (`status`), as ComfyUI does."""
        self.send_sync("status", {"status": self.queue_info()}, None)

    def queue_info(self) -> dict[str, Any]:
        with self.lock:
            remaining = len(self.pending) + len(self.running)
        return {"exec_info": {"queue_remaining": remaining}}

    def add_message(self, job: Job, event: str, data: dict[str, Any], broadcast: bool) -> None:
        """PromptExecutor.add_message: timestamped, to the prompt's client (or everyone)."""
        if self.config.legacy:
            if event == "execution_success":
                return
        else:
            data = {**data, "timestamp": int(time.time() * 1000)}
        job.messages.append([event, data])
        if job.client_id is not None or broadcast:
            self.send_sync(event, data, job.client_id)

    def progress(self, job: Job, node_id: str, value: int, maximum: int) -> None:
        """The progress hook: `progress`, newer servers' `progress_state`, a binary preview."""
        if self.config.legacy:
            self.send_sync("progress", {"value": value, "max": maximum}, job.client_id)
            self.send_sync(PREVIEW_IMAGE, struct.pack(">I", 1) + self._preview, job.client_id)
            return
        self.send_sync(
            "progress",
            {"value": value, "max": maximum, "prompt_id": job.prompt_id, "node": node_id},
            job.client_id,
        )
        state = {
            "value": value,
            "max": maximum,
            "state": "running",
            "node_id": node_id,
            "prompt_id": job.prompt_id,
            "display_node_id": node_id,
            "parent_node_id": None,
            "real_node_id": node_id,
        }
        self.send_sync(
            "progress_state", {"prompt_id": job.prompt_id, "nodes": {node_id: state}}, job.client_id
        )
        # A preview frame: event PREVIEW_IMAGE, then the image type (1 = JPEG), then the bytes.
        self.send_sync(PREVIEW_IMAGE, struct.pack(">I", 1) + self._preview, job.client_id)

    # -- the worker (main.prompt_worker and PromptExecutor.execute) -----------------------------

    def check_interrupt(self, job: Job) -> None:
        """Raise if the prompt was forgotten, or (once) if an interrupt was asked for."""
        if job.forgotten:
            raise Forgotten
        if self.interrupt_requested:
            self.interrupt_requested = False
            raise Interrupted("Processing interrupted")

    def _next_job(self) -> Job | None:
        with self.lock:
            while not self._stopping and (not self.pending or self.config.paused):
                self.lock.wait(0.5)
            if self._stopping:
                return None
            _, _, job = heapq.heappop(self.pending)
            self.running[job.prompt_id] = job
            self._seen["status"][job.prompt_id] = "running"
        self.queue_updated()
        return job

    def _work(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            try:
                self._execute(job)
            finally:
                shutil.rmtree(self.root / "work" / job.prompt_id, ignore_errors=True)

    def _execute(self, job: Job) -> None:
        self.interrupt_requested = False  # nodes.interrupt_processing(False)
        self.current_client = job.client_id
        job.messages = []
        outputs: dict[str, Any] = {}
        ui: dict[str, Any] = {}
        executed: list[str] = []
        self.add_message(job, "execution_start", {"prompt_id": job.prompt_id}, broadcast=False)
        self.add_message(
            job, "execution_cached", {"nodes": [], "prompt_id": job.prompt_id}, broadcast=False
        )
        success = True
        try:
            for output in job.outputs:
                self._run_node(job, output, outputs, ui, executed)
        except Forgotten:
            self._forget_running(job)
            return
        except Interrupted:
            success = False
            node = self.last_node_id or ""
            self.add_message(
                job,
                "execution_interrupted",
                {
                    "prompt_id": job.prompt_id,
                    "node_id": node,
                    "node_type": job.prompt.get(node, {}).get("class_type"),
                    "executed": list(executed),
                },
                broadcast=True,
            )
        except _NodeFailed as failed:
            success = False
            self.add_message(job, "execution_error", failed.message, broadcast=False)
        else:
            self.add_message(
                job, "execution_success", {"prompt_id": job.prompt_id}, broadcast=False
            )
        self.last_node_id = None
        messages = job.messages
        with self.lock:
            if job.forgotten or self.running.get(job.prompt_id) is not job:
                self._forget_running(job)
                return
            status = "success" if success else "error"
            self.history[job.prompt_id] = {
                "prompt": job.item(),
                "outputs": ui,
                "status": {"status_str": status, "completed": success, "messages": messages},
                "meta": {
                    node: {
                        "node_id": node,
                        "display_node": node,
                        "parent_node": None,
                        "real_node_id": node,
                    }
                    for node in ui
                },
            }
            while len(self.history) > max(self.config.history_size, 1):
                self.history.popitem(last=False)
            self.running.pop(job.prompt_id, None)
            interrupted = any(m[0] == "execution_interrupted" for m in messages)
            self._seen["status"][job.prompt_id] = "interrupted" if interrupted else status
        self.queue_updated()
        if job.client_id is not None:
            self.send_sync("executing", {"node": None, "prompt_id": job.prompt_id}, job.client_id)

    def _forget_running(self, job: Job) -> None:
        with self.lock:
            if self.running.get(job.prompt_id) is job:
                self.running.pop(job.prompt_id)
            self._seen["status"][job.prompt_id] = "forgotten"
        self.last_node_id = None

    def _run_node(
        self,
        job: Job,
        node_id: str,
        outputs: dict[str, Any],
        ui: dict[str, Any],
        executed: list[str],
    ) -> None:
        if node_id in outputs:
            return
        node = job.prompt[node_id]
        inputs = node["inputs"]
        for value in inputs.values():
            if isinstance(value, list):
                self._run_node(job, value[0], outputs, ui, executed)
        node_type = NODE_TYPES[node["class_type"]]
        self.check_interrupt(job)  # before_node_execution
        self.last_node_id = node_id
        if job.client_id is not None:
            self.send_sync(
                "executing",
                {"node": node_id, "display_node": node_id, "prompt_id": job.prompt_id},
                job.client_id,
            )
        arguments = {
            name: outputs[value[0]][value[1]] if isinstance(value, list) else value
            for name, value in inputs.items()
        }
        try:
            self._maybe_fail(node_id, node["class_type"])
            result = node_type.run(Execution(self, job, node_id), **arguments)
        except (Interrupted, Forgotten):
            raise
        except Exception as exc:
            exception_type = getattr(exc, "exception_type", None) or (
                type(exc).__qualname__
                if type(exc).__module__ == "builtins"
                else f"{type(exc).__module__}.{type(exc).__qualname__}"
            )
            raise _NodeFailed(
                {
                    "prompt_id": job.prompt_id,
                    "node_id": node_id,
                    "node_type": node["class_type"],
                    "executed": list(executed),
                    "exception_message": str(exc),
                    "exception_type": exception_type,
                    "traceback": traceback.format_tb(exc.__traceback__),
                    "current_inputs": {
                        k: [v if isinstance(v, int | float | str | bool) else str(v)]
                        for k, v in arguments.items()
                    },
                    "current_outputs": list(outputs),
                }
            ) from exc
        if isinstance(result, dict):
            outputs[node_id] = result.get("result", ())
            if result.get("ui"):
                ui[node_id] = result["ui"]
                if job.client_id is not None:
                    self.send_sync(
                        "executed",
                        {
                            "node": node_id,
                            "display_node": node_id,
                            "output": result["ui"],
                            "prompt_id": job.prompt_id,
                        },
                        job.client_id,
                    )
        else:
            outputs[node_id] = result
        executed.append(node_id)

    def _maybe_fail(self, node_id: str, class_type: str) -> None:
        with self.lock:
            fault = self.config.fail_next
            if not fault:
                return
            if fault.get("node") not in (None, node_id):
                return
            if fault.get("class_type") not in (None, class_type):
                return
            times = int(fault.get("times", 1))
            if times <= 1:
                self.config.fail_next = None
            else:
                fault["times"] = times - 1
        raise InjectedError(
            str(fault.get("exception_type") or "RuntimeError"),
            str(fault.get("exception_message") or "injected failure"),
        )

    # -- HTTP -----------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        self._request_log.append(f"{request.method} {path}")
        if path.startswith("/_loopback/"):
            return await handler(request)
        if self.token is not None:
            expected = f"Bearer {self.token}"
            if request.headers.get("Authorization") != expected:
                with self.lock:
                    self._seen["auth_failures"] += 1
                return web.Response(status=401, text="401: Unauthorized (proxy)")
        route = path.removeprefix("/api") or "/"
        with self.lock:
            fault = self.config.http_errors.get(route)
            if fault is not None:
                times = int(fault.get("times", 1))
                if times <= 1:
                    self.config.http_errors.pop(route)
                else:
                    fault["times"] = times - 1
        if fault is not None:
            status = int(fault["status"])
            return web.Response(status=status, text=f"{status}: injected by the loopback")
        return await handler(request)

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        if self.config.refuse_websockets:
            return web.Response(status=404, text="404: Not Found")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId", "")
        if sid:
            self.sockets.pop(sid, None)  # reusing an existing session
        else:
            sid = uuid.uuid4().hex
        self.sockets[sid] = ws
        with self.lock:
            self._seen["ws_connects"] += 1
        try:
            await ws.send_str(
                json.dumps({"type": "status", "data": {"status": self.queue_info(), "sid": sid}})
            )
            if self.current_client == sid and self.last_node_id is not None:
                await ws.send_str(
                    json.dumps({"type": "executing", "data": {"node": self.last_node_id}})
                )
            async for message in ws:
                if message.type == WSMsgType.ERROR:
                    LOG.debug("ws closed with exception %s", ws.exception())
        finally:
            if self.sockets.get(sid) is ws:
                self.sockets.pop(sid, None)
        return ws

    async def _get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self.queue_info())

    async def _post_prompt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.Response(status=400, text="the body is not JSON")
        if not isinstance(body, dict):
            return web.Response(status=400, text="the body is not a JSON object")
        with self.lock:
            if "number" in body:
                number = float(body["number"])
            else:
                number = self.number
                if body.get("front"):
                    number = -number
                self.number += 1
        if "prompt" not in body:
            error = _error("no_prompt", "No prompt provided", "No prompt provided")
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt = copy.deepcopy(body["prompt"])
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        valid, error, outputs, node_errors = validate_prompt(self, prompt)
        if not valid:
            LOG.info("invalid prompt: %s", error)
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        extra_data = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        job = Job(number, prompt_id, prompt, extra_data, outputs)
        with self.lock:
            heapq.heappush(self.pending, (number, next(self._order), job))
            self._seen["prompts"].append(prompt_id)
            self._seen["client_ids"][prompt_id] = job.client_id
            self._seen["status"][prompt_id] = "queued"
            self.lock.notify_all()
        self.queue_updated()
        return web.json_response(
            {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}
        )

    async def _get_queue(self, request: web.Request) -> web.Response:
        with self.lock:
            running = [job.item() for job in self.running.values()]
            pending = [job.item() for _, _, job in self.pending]
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def _post_queue(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self.lock:
            if body.get("clear"):
                for _, _, job in self.pending:
                    self._seen["status"][job.prompt_id] = "deleted"
                self.pending = []
            for prompt_id in body.get("delete", []) or []:
                self._seen["queue_deletes"].append(prompt_id)
                kept = [entry for entry in self.pending if entry[2].prompt_id != prompt_id]
                if len(kept) != len(self.pending):
                    self._seen["status"][prompt_id] = "deleted"
                self.pending = kept
            heapq.heapify(self.pending)
        self.queue_updated()
        return web.Response(status=200)

    async def _post_interrupt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        with self.lock:
            hit = bool(self.running) and (not prompt_id or prompt_id in self.running)
            self._seen["interrupts"].append({"prompt_id": prompt_id, "hit": hit})
            if hit or not prompt_id:
                # Without a prompt id, ComfyUI interrupts whatever runs (or nothing).
                self.interrupt_requested = True
        return web.Response(status=200)

    async def _get_history(self, request: web.Request) -> web.Response:
        max_items = request.rel_url.query.get("max_items")
        with self.lock:
            items = list(self.history.items())
        if max_items is not None:
            items = items[-int(max_items) :] if int(max_items) > 0 else []
        return web.json_response(dict(items))

    async def _get_history_one(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        with self.lock:
            entry = self.history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def _post_history(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self.lock:
            if body.get("clear"):
                self.history.clear()
            for prompt_id in body.get("delete", []) or []:
                self.history.pop(prompt_id, None)
        return web.Response(status=200)

    async def _upload_image(self, request: web.Request) -> web.Response:
        post = await request.post()
        image = post.get("image")
        kind = str(post.get("type") or "input")
        if kind not in ("input", "temp", "output"):
            kind = "input"
        if not isinstance(image, web.FileField) or not image.filename:
            return web.Response(status=400)
        base = (self.root / kind).resolve()
        subfolder = str(post.get("subfolder", ""))
        folder = (base / os.path.normpath(subfolder)).resolve() if subfolder else base
        filename = image.filename
        path = (folder / filename).resolve()
        if os.path.commonpath([base, path]) != str(base):
            return web.Response(status=400)
        folder.mkdir(parents=True, exist_ok=True)
        data = image.file.read()
        if str(post.get("overwrite", "")) not in ("true", "1"):
            stem, suffix = os.path.splitext(filename)
            counter = 1
            while path.exists():
                if path.read_bytes() == data:  # the same bytes: reuse the file
                    break
                filename = f"{stem} ({counter}){suffix}"
                path = folder / filename
                counter += 1
        path.write_bytes(data)
        answer = {"name": filename, "subfolder": subfolder, "type": kind}
        with self.lock:
            self._seen["uploads"].append(answer)
        return web.json_response(answer)

    async def _view(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        filename = query.get("filename")
        if not filename:
            return web.Response(status=400) if filename == "" else web.Response(status=404)
        if filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        kind = query.get("type", "output")
        if kind not in ("input", "temp", "output"):
            return web.Response(status=400)
        base = (self.root / kind).resolve()
        folder = base
        if "subfolder" in query:
            folder = (base / query["subfolder"]).resolve()
            if os.path.commonpath([folder, base]) != str(base):
                return web.Response(status=403)
        file = folder / os.path.basename(filename)
        if not file.is_file():
            return web.Response(status=404)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        return web.FileResponse(
            file,
            headers={
                "Content-Disposition": f'filename="{file.name}"',
                "Content-Type": content_type,
            },
        )

    async def _system_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "system": {
                    "os": os.name,
                    "ram_total": 16 * 1024**3,
                    "ram_free": 12 * 1024**3,
                    "comfyui_version": "0.3.68-loopback",
                    "required_frontend_version": "1.28.8",
                    "python_version": "3.11.2 (main, loopback) [GCC 12.2.0]",
                    "pytorch_version": "2.8.0+loopback",
                    "embedded_python": False,
                    "argv": ["main.py", "--listen", self.host, "--port", str(self.port)],
                },
                "devices": [
                    {
                        "name": "cpu (loopback)",
                        "type": "cpu",
                        "index": None,
                        "vram_total": 16 * 1024**3,
                        "vram_free": 12 * 1024**3,
                        "torch_vram_total": 16 * 1024**3,
                        "torch_vram_free": 12 * 1024**3,
                    }
                ],
            }
        )

    async def _object_info(self, request: web.Request) -> web.Response:
        info = {}
        widgets = ("INT", "FLOAT", "STRING", "BOOLEAN")
        for name, node_type in NODE_TYPES.items():
            required, optional = (
                {
                    key: spec.config(self) if spec.choices or spec.type in widgets else [spec.type]
                    for key, spec in specs.items()
                }
                for specs in (node_type.required, node_type.optional)
            )
            info[name] = {
                "input": {"required": required, **({"optional": optional} if optional else {})},
                "input_order": {
                    "required": list(required),
                    **({"optional": list(optional)} if optional else {}),
                },
                "output": list(node_type.returns),
                "output_is_list": [False] * len(node_type.returns),
                "output_name": list(node_type.returns),
                "name": name,
                "display_name": name,
                "description": "",
                "python_module": "nodes",
                "category": "loopback",
                "output_node": node_type.output_node,
            }
        return web.json_response(info)

    # -- control surface (not ComfyUI) ----------------------------------------------------------

    async def _control_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _control_config(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("the settings must be a JSON object")
            answer = self.configure(changes)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if changes.get("drop_websockets") or changes.get("restart"):
            for ws in list(self.sockets.values()):
                with contextlib.suppress(Exception):
                    await ws.close()
            self.sockets.clear()
        return web.json_response(answer)

    def configure(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge settings (see the module docstring); the resulting settings."""
        changes = dict(changes)
        with self.lock:
            if changes.pop("reset", False):
                self.config = LoopbackConfig()
            restart = changes.pop("restart", False)
            forget = changes.pop("forget", []) or []
            drop = changes.pop("drop_websockets", False)
            for key, value in changes.items():
                if not hasattr(self.config, key):
                    raise ValueError(f"unknown setting {key!r}")
                setattr(self.config, key, value)
            if restart:
                for job in self.running.values():
                    job.forgotten = True
                for _, _, job in self.pending:
                    self._seen["status"][job.prompt_id] = "forgotten"
                self.pending = []
                self.history.clear()
                self.number = 0
            for prompt_id in forget:
                self.history.pop(prompt_id, None)
                kept = [entry for entry in self.pending if entry[2].prompt_id != prompt_id]
                if len(kept) != len(self.pending):
                    self._seen["status"][prompt_id] = "forgotten"
                self.pending = kept
                heapq.heapify(self.pending)
                if prompt_id in self.running:
                    self.running[prompt_id].forgotten = True
            self.lock.notify_all()
        if (
            (drop or restart)
            and self._loop is not None
            and threading.current_thread() not in (self._thread,)
        ):
            # In-process callers: close the sockets on the event loop.
            asyncio.run_coroutine_threadsafe(self._close_sockets(), self._loop).result(10)
        return asdict(self.config)

    async def _close_sockets(self) -> None:
        for ws in list(self.sockets.values()):
            with contextlib.suppress(Exception):
                await ws.close()
        self.sockets.clear()

    def state(self) -> dict[str, Any]:
        """What the server saw (see the module docstring)."""
        with self.lock:
            return json.loads(
                json.dumps(
                    {
                        **self._seen,
                        "websockets": sorted(self.sockets),
                        "running": list(self.running),
                        "pending": [job.prompt_id for _, _, job in sorted(self.pending)],
                        "history": list(self.history),
                        "request_log": list(self._request_log),
                        "config": asdict(self.config),
                    },
                    default=str,
                )
            )


class _NodeFailed(Exception):
    """A node raised: the `execution_error` message to send."""

    def __init__(self, message: dict[str, Any]) -> None:
        super().__init__(message.get("exception_message"))
        self.message = message


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; print the URL on stdout once listening."""
    parser = argparse.ArgumentParser(description="A loopback ComfyUI server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--step-seconds", type=float, default=0.05)
    parser.add_argument("--token", help="require this bearer token (as a proxy in front would)")
    parser.add_argument("--token-env", help="read the bearer token from this variable instead")
    parser.add_argument(
        "--root", type=Path, help="keep input/output/temp here (default: a tmp dir)"
    )
    args = parser.parse_args(argv)
    token = args.token
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            parser.error(f"--token-env: {args.token_env} is not set")
    server = ComfyUILoopbackServer(
        host=args.host, port=args.port, step_seconds=args.step_seconds, token=token, root=args.root
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: done.set())
    server.start()
    try:
        print(server.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not done.wait(0.5):
                pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
