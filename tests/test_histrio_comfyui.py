"""Histrio's ComfyUI workflows (seed_scene_prep, motion_generation) run by Dagster against the
loopback ComfyUI server, on a real portrait and a real WAV ingested as sources.

What a user sees is checked: the seed PNG at the scene's size, the clip's H.264 video and an AAC
stream as long as the driving audio (ffprobe), manifests naming the inputs' refs and sha256s, the
settings in the graph the server ran, and the errors (a bad template at publish time, a
checkpoint the server lacks, a missing driving audio) naming what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from dagster import AssetKey, DagsterInstance, materialize
from PIL import Image

from ergot_dagster.artifacts.store import open_store
from ergot_dagster.assets import build_assets
from ergot_dagster.definitions import build_definitions
from ergot_dagster.demo import make_portrait
from ergot_dagster.errors import DefinitionError
from ergot_dagster.media.probe import probe
from ergot_dagster.media.synth import make_audio
from ergot_dagster.refs import ref_to_partition_key
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from ergot_dagster.sources.ingest import ingest_refs
from ergot_dagster.sources.record import latest_source_record, record_sources
from ergot_dagster.workflows.loader import load_registry, publish
from ergot_dagster.workflows.run_config import run_config_for
from tests.servers.comfyui_server import ComfyUILoopbackServer

PORTRAIT = "people/astronaut.png"
SPEECH = "voice/line 01.wav"
SPEECH_S = 1.5


@pytest.fixture
def server() -> Iterator[ComfyUILoopbackServer]:
    with ComfyUILoopbackServer(step_seconds=0.01) as running:
        yield running


@pytest.fixture
def plane(
    server: ComfyUILoopbackServer,
    plane_settings: ErgotSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> ErgotSettings:
    """The repository's definitions, with a ComfyUI target at the loopback server.

    The root runtime_targets.yaml has no ComfyUI target (nothing serves one by default), so the
    test gives the plane its own targets file, as a deployment would.
    """
    targets = tmp_path / "runtime_targets.yaml"
    targets.write_text(
        yaml.safe_dump(
            {
                "targets": [
                    {
                        "name": "comfyui-loop",
                        "runtime": "comfyui",
                        "capabilities": ["image.edit", "video.generate", "gpu"],
                        "locality": {"kind": "local"},
                        "endpoint": server.url,
                        "concurrency": 1,
                    }
                ]
            }
        )
    )
    monkeypatch.setenv("ERGOT_RUNTIME_TARGETS", str(targets))
    return ErgotSettings.from_env()


@pytest.fixture
def sources(plane: ErgotSettings, instance: DagsterInstance) -> dict[str, str]:
    """A real portrait (PNG) and a driving audio (WAV) ingested as sources; ref -> sha256."""
    root = Path(plane.ingest_root)
    (root / PORTRAIT).parent.mkdir(parents=True)
    assert make_portrait(root / PORTRAIT), "scikit-image (a dev dependency) ships the portrait"
    make_audio(root / SPEECH, duration=SPEECH_S, tone_hz=220.0)
    outcomes = ingest_refs(
        root, [PORTRAIT, SPEECH], lambda key: latest_source_record(instance, key)
    )
    record_sources(instance, [o.record for o in outcomes if o.record])
    digests = {}
    for ref in (PORTRAIT, SPEECH):
        record = latest_source_record(instance, ref_to_partition_key(ref))
        assert record is not None
        digests[ref] = record.sha256
    return digests


def run(
    plane: ErgotSettings,
    instance: DagsterInstance,
    workflow: str,
    ref: str,
    settings: dict[str, Any],
    inputs: dict[str, str | list[str]] | None = None,
) -> Any:
    """Materialize every artifact of `workflow` for source `ref`, as `ergot run` would."""
    spec = load_registry(plane.workflow_defs).get(workflow)
    return materialize(
        build_assets(load_registry(plane.workflow_defs)),
        selection=[AssetKey([spec.family, spec.name, n]) for n in spec.outputs],
        partition_key=ref_to_partition_key(ref),
        instance=instance,
        resources=build_definitions(plane).resources,
        run_config=run_config_for(spec, settings, inputs),
        raise_on_error=False,
    )


def failure_of(result: Any) -> str:
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data
    return str(failure.user_failure_data.description)


def ran_graph(server: ComfyUILoopbackServer, prompt_id: str) -> dict[str, Any]:
    """The graph the server ran for `prompt_id`, from its history."""
    entry = httpx.get(f"{server.url}/history/{prompt_id}", timeout=5).json()[prompt_id]
    assert entry["status"]["status_str"] == "success"
    return entry["prompt"][2]


def test_seed_scene_prep_makes_the_scene_seed_from_the_portrait(
    server: ComfyUILoopbackServer,
    plane: ErgotSettings,
    instance: DagsterInstance,
    sources: dict[str, str],
) -> None:
    settings = {
        "prompt": "an astronaut on a windswept cliff at dusk",
        "negative_prompt": "text, logo",
        "width": 320,
        "height": 184,
        "steps": 3,
        "seed": 11,
        "denoise": 0.3,
        "sampler_name": "euler",
        "scheduler": "normal",
    }
    result = run(plane, instance, "seed_scene_prep", PORTRAIT, settings)
    assert result.success

    store = open_store(plane.storage)
    manifest = {m.name: m for m in store.list_run(result.run_id)}["seed"]
    assert manifest.media_type == "image/png"
    assert manifest.workflow == "histrio/seed_scene_prep@1"
    with Image.open(store.local_path(manifest.uri)) as seed:
        assert seed.format == "PNG"
        assert seed.size == (320, 184)  # the 512x512 portrait, centre-cropped to the frame
    assert [(p.kind, p.ref, p.sha256, p.input) for p in manifest.parents] == [
        ("source", PORTRAIT, sources[PORTRAIT], "image")
    ]
    prompt_id = server.state()["prompts"][-1]
    assert (manifest.runtime.type, manifest.runtime.target, manifest.runtime.job_id) == (
        "comfyui",
        "comfyui-loop",
        prompt_id,
    )
    # The settings reached the nodes ComfyUI ran, under ComfyUI's own input names.
    graph = ran_graph(server, prompt_id)
    assert graph["2"]["class_type"] == "ImageScale"
    assert (graph["2"]["inputs"]["width"], graph["2"]["inputs"]["height"]) == (320, 184)
    assert graph["2"]["inputs"]["crop"] == "center"
    assert graph["4"]["inputs"]["text"] == settings["prompt"]
    assert graph["5"]["inputs"]["text"] == "text, logo"
    sampler = graph["7"]["inputs"]
    assert (sampler["seed"], sampler["steps"], sampler["denoise"]) == (11, 3, 0.3)
    assert (sampler["sampler_name"], sampler["scheduler"]) == ("euler", "normal")
    assert graph["3"]["inputs"]["ckpt_name"] == "sd_xl_base_1.0.safetensors"
    assert graph["1"]["inputs"]["image"].startswith("ergot/")  # the uploaded portrait


def test_motion_generation_animates_the_image_with_the_driving_audio(
    server: ComfyUILoopbackServer,
    plane: ErgotSettings,
    instance: DagsterInstance,
    sources: dict[str, str],
) -> None:
    settings = {"width": 256, "height": 144, "frames": 16, "fps": 8, "steps": 2, "seed": 5}
    result = run(plane, instance, "motion_generation", PORTRAIT, settings, {"audio": SPEECH})
    assert result.success

    store = open_store(plane.storage)
    manifest = {m.name: m for m in store.list_run(result.run_id)}["clip"]
    assert manifest.media_type == "video/mp4"
    clip = probe(store.local_path(manifest.uri))
    (video,) = clip.video_streams
    (audio,) = clip.audio_streams
    assert (video.codec, video.width, video.height) == ("h264", 256, 144)
    assert audio.codec == "aac"
    # 16 frames at 8 fps outlast the 1.5 s of speech; the clip ends with the audio.
    assert audio.duration_s is not None and abs(audio.duration_s - SPEECH_S) < 0.05
    assert [(p.kind, p.ref, p.sha256, p.input) for p in manifest.parents] == [
        ("source", PORTRAIT, sources[PORTRAIT], "image"),
        ("source", SPEECH, sources[SPEECH], "audio"),
    ]
    prompt_id = server.state()["prompts"][-1]
    assert manifest.runtime.job_id == prompt_id
    graph = ran_graph(server, prompt_id)
    conditioning = graph["3"]["inputs"]
    assert graph["3"]["class_type"] == "SVD_img2vid_Conditioning"
    assert (conditioning["width"], conditioning["height"]) == (256, 144)
    assert (conditioning["video_frames"], conditioning["fps"]) == (16, 8)
    assert graph["7"]["class_type"] == "LoadAudio"
    assert graph["7"]["inputs"]["audio"].endswith(".wav")
    combine = graph["8"]["inputs"]
    assert (combine["format"], combine["frame_rate"], combine["trim_to_audio"]) == (
        "video/h264-mp4",
        8,
        True,
    )
    assert combine["audio"] == ["7", 0]


def test_motion_generation_needs_its_driving_audio(
    server: ComfyUILoopbackServer,
    plane: ErgotSettings,
    instance: DagsterInstance,
    sources: dict[str, str],
) -> None:
    # No audio in the request and no tts_synthesis speech for this portrait: refused before any
    # prompt, naming the input and the asset it would come from.
    result = run(plane, instance, "motion_generation", PORTRAIT, {"steps": 1})
    assert not result.success
    message = failure_of(result)
    assert "'audio'" in message and "histrio/tts_synthesis/speech" in message
    assert server.state()["prompts"] == []


def test_a_checkpoint_the_server_lacks_is_refused_naming_node_and_input(
    server: ComfyUILoopbackServer,
    plane: ErgotSettings,
    instance: DagsterInstance,
    sources: dict[str, str],
) -> None:
    result = run(
        plane,
        instance,
        "motion_generation",
        PORTRAIT,
        {"checkpoint": "svd_missing.safetensors", "steps": 1},
        {"audio": SPEECH},
    )
    assert not result.success
    message = failure_of(result)
    assert "node 2 (ImageOnlyCheckpointLoader) input 'ckpt_name': Value not in list" in message
    assert "set by params 'checkpoint.ckpt_name'" in message


def _definition_into(root: Path, relpath: str, change: Any = None) -> None:
    """The repository's definition `relpath` written under `root`, after `change(data)`."""
    data = yaml.safe_load((PROJECT_ROOT / "workflow_defs" / relpath).read_text())
    if change is not None:
        change(data)
    (root / relpath).parent.mkdir(parents=True, exist_ok=True)
    (root / relpath).write_text(yaml.safe_dump(data))


def test_a_bad_template_is_refused_at_publish_naming_the_node(tmp_path: Path) -> None:

    def misspell(data: dict[str, Any]) -> None:
        # SVD_img2vid_Conditioning's input is `video_frames`; ComfyUI would run a template that
        # misspells it with the default instead, so publishing refuses it.
        inputs = data["plan"][0]["template"]["3"]["inputs"]
        inputs["frames"] = inputs.pop("video_frames")

    _definition_into(tmp_path, "histrio/motion_generation.v1.yaml", misspell)
    with pytest.raises(DefinitionError) as caught:
        publish(tmp_path)
    message = str(caught.value)
    assert "histrio/motion_generation.v1.yaml" in message
    assert "node 3 (SVD_img2vid_Conditioning) has no input 'video_frames'" in message


def test_motion_generation_loads_before_tts_synthesis_exists(
    plane: ErgotSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The audio edge names tts_synthesis's speech; the definitions load without it (Dagster
    # shows the key as an upstream asset no workflow defines yet).
    defs_root = tmp_path / "defs"
    _definition_into(defs_root, "histrio/motion_generation.v1.yaml")
    assert [d.spec for d in publish(defs_root)] == ["motion_generation@1"]
    monkeypatch.setenv("ERGOT_WORKFLOW_DEFS", str(defs_root))
    graph = build_definitions(ErgotSettings.from_env()).resolve_asset_graph()
    clip = graph.get(AssetKey(["histrio", "motion_generation", "clip"]))
    assert AssetKey(["histrio", "tts_synthesis", "speech"]) in clip.parent_keys
