"""The ComfyUI runtime adapter against the loopback ComfyUI server, over real HTTP and websocket.

The server speaks ComfyUI's protocol and makes real files with ffmpeg; the stages are the example
workflows' own templates (examples/comfyui). Each test checks one thing the plane relies on: the
files that come back, how a failure is classified, that every wait is bounded, and that a prompt
the run gave up on is deleted from the queue or interrupted on the server. Waits poll with
deadlines; nothing sleeps and hopes.
"""

from __future__ import annotations

import copy
import json
import logging
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dagster import AssetKey, DagsterEventType, DagsterInstance, materialize

from ergot_dagster.assets import build_assets
from ergot_dagster.client import ErgotClient
from ergot_dagster.definitions import build_definitions
from ergot_dagster.errors import (
    PermanentRuntimeError,
    RuntimeTimeoutError,
    TransientRuntimeError,
)
from ergot_dagster.media.probe import probe
from ergot_dagster.media.sniff import verify_media_type
from ergot_dagster.media.synth import make_clip, make_image
from ergot_dagster.refs import ref_to_partition_key
from ergot_dagster.resources.adapters import BUILTIN_ADAPTERS
from ergot_dagster.resources.comfyui.adapter import ComfyUIRuntime
from ergot_dagster.resources.comfyui.graph import safe_file_name
from ergot_dagster.resources.runtime import (
    ProgressReporter,
    StageFile,
    StageRequest,
    adapter_class,
    no_progress,
)
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from ergot_dagster.sources.ingest import ingest_refs
from ergot_dagster.sources.record import latest_source_record, record_sources
from ergot_dagster.targets.model import RuntimeTarget, TargetAuth
from ergot_dagster.workflows.execute import WorkflowInput, resolve_params
from ergot_dagster.workflows.loader import load_registry
from ergot_dagster.workflows.model import StageSpec, WorkflowDefinition
from ergot_dagster.workflows.run_config import run_config_for
from ergot_dagster.workflows.settings_schema import apply_defaults
from tests.conftest import subprocess_env
from tests.servers.comfyui_server import ComfyUILoopbackServer
from tests.support import dagster_dev, stop, until

LOG = logging.getLogger("test.comfyui")
EXAMPLES = PROJECT_ROOT / "examples" / "comfyui"
DEFS = EXAMPLES / "workflow_defs"
TOKEN_ENV = "ERGOT_TEST_COMFYUI_TOKEN"
SERVER_TOKEN = "right-comfy-proxy-token-8d2e41"
WRONG_TOKEN = "wrong-comfy-proxy-token-19c0aa"


def definition(name: str) -> WorkflowDefinition:
    return load_registry(DEFS).get(name)


@pytest.fixture
def server() -> Iterator[ComfyUILoopbackServer]:
    with ComfyUILoopbackServer(step_seconds=0.01) as running:
        yield running


@pytest.fixture
def adapter() -> ComfyUIRuntime:
    # Short bounds so that the failure paths take a second or two, not the production values.
    return ComfyUIRuntime(
        poll_interval_s=0.1,
        quiet_check_s=0.5,
        lost_grace_s=0.6,
        history_wait_s=3.0,
        request_timeout_s=5.0,
        ws_open_timeout_s=3.0,
        cancel_timeout_s=2.0,
    )


def target_for(url: str, auth: TargetAuth | None = None) -> RuntimeTarget:
    return RuntimeTarget(
        name="comfyui-test", runtime="comfyui", endpoint=url, auth=auth or TargetAuth()
    )


def stage_request(
    workdir: Path,
    url: str,
    workflow: str = "image_from_prompt",
    settings: dict[str, Any] | None = None,
    *,
    inputs: dict[str, StageFile] | None = None,
    timeout_s: float = 30.0,
    progress: ProgressReporter = no_progress,
    auth: TargetAuth | None = None,
    stage: StageSpec | None = None,
) -> StageRequest:
    """A request for the example workflow's stage, its params resolved by the plane's own code
    from the settings (defaults filled, the schema not enforced, so tests can pass bad values)."""
    spec = definition(workflow)
    stage = stage or spec.plan[0]
    filled = apply_defaults(spec.settings, settings or {})
    bound = {
        name: WorkflowInput(name=name, files=file, parents=[])
        for name, file in (inputs or {}).items()
    }
    stage_inputs: dict[str, StageFile | list[StageFile]] = {
        key: (inputs or {})["source"] for key in stage.inputs if inputs
    }
    return StageRequest(
        workflow=spec.ref,
        stage=stage,
        run_id="r1",
        inputs=stage_inputs,
        params=resolve_params(stage, filled, bound),
        output_types={
            out: spec.outputs[art].media_type for out, art in stage.outputs.items() if art
        },
        workdir=workdir,
        timeout_s=timeout_s,
        target=target_for(url, auth),
        progress=progress,
    )


def prompt_status(server: ComfyUILoopbackServer, prompt_id: str) -> str | None:
    return server.state()["status"].get(prompt_id)


def only_prompt(server: ComfyUILoopbackServer) -> str:
    prompts = server.state()["prompts"]
    assert len(prompts) == 1, prompts
    return prompts[0]


# -- success ------------------------------------------------------------------------------------


def test_text_to_image_bound_from_settings_makes_a_real_png(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    workdir = tmp_path / "w"
    request = stage_request(
        workdir, server.url, settings={"width": 320, "height": 192, "steps": 4, "seed": 99}
    )
    result = adapter.run_stage(request, LOG)

    prompt_id = only_prompt(server)
    assert result.job_id == prompt_id
    assert result.target == "comfyui-test"
    image = result.outputs["save"]
    assert isinstance(image, Path) and image.parent == workdir
    verify_media_type(image, "image/png", "image")
    summary = probe(image)
    assert (summary.width, summary.height) == (320, 192)
    # Downloads go through temporary names: nothing else is left in the workdir.
    assert [p.name for p in workdir.iterdir()] == [image.name]
    metadata = result.metadata
    assert metadata["comfyui_server"] == server.url
    assert metadata["comfyui_prompt_id"] == prompt_id
    assert metadata["followed_by"] == "websocket"
    files = metadata["comfyui_outputs"]["save"]["files"]
    assert [(f["subfolder"], f["type"]) for f in files] == [("ergot", "output")]
    assert files[0]["size"] == image.stat().st_size
    assert set(metadata["node_seconds"]) == {"3", "4", "5", "6", "7", "8", "9"}
    # The settings really reached the graph the server ran.
    ran = httpx.get(f"{server.url}/history/{prompt_id}", timeout=5).json()[prompt_id]
    graph = ran["prompt"][2]
    assert graph["3"]["inputs"]["seed"] == 99 and graph["3"]["inputs"]["steps"] == 4
    assert graph["6"]["inputs"]["text"] == "a lighthouse on a cliff at dawn, film grain"
    assert ran["status"] == {
        "status_str": "success",
        "completed": True,
        "messages": ran["status"]["messages"],
    }


def test_image_to_image_uploads_its_input(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    source = make_image(tmp_path / "take 01.jpg", size="640x480")
    request = stage_request(
        tmp_path / "w",
        server.url,
        "restyle_image",
        {"width": 256, "height": 128, "steps": 3},
        inputs={"source": StageFile(path=source, media_type="image/jpeg")},
    )
    result = adapter.run_stage(request, LOG)

    uploads = server.state()["uploads"]
    assert len(uploads) == 1
    upload = uploads[0]
    assert upload["subfolder"] == "ergot" and upload["type"] == "input"
    assert upload["name"].endswith(".jpg") and "take" not in upload["name"]
    prompt_id = only_prompt(server)
    graph = httpx.get(f"{server.url}/history/{prompt_id}", timeout=5).json()[prompt_id]["prompt"][2]
    assert graph["1"]["inputs"]["image"] == f"ergot/{upload['name']}"
    restyled = result.outputs["save"]
    assert isinstance(restyled, Path)
    summary = probe(restyled)
    assert (summary.width, summary.height) == (256, 128)

    # The same file again is the same upload (named by content), not a second copy.
    adapter.run_stage(
        stage_request(
            tmp_path / "w2",
            server.url,
            "restyle_image",
            {"steps": 1},
            inputs={"source": StageFile(path=source, media_type="image/jpeg")},
        ),
        LOG,
    )
    assert {u["name"] for u in server.state()["uploads"]} == {upload["name"]}


def test_a_video_graph_makes_a_real_mp4(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    request = stage_request(
        tmp_path / "w",
        server.url,
        "clip_from_prompt",
        {"width": 128, "height": 96, "frames": 8, "frame_rate": 8, "steps": 2},
    )
    result = adapter.run_stage(request, LOG)

    clip = result.outputs["combine"]
    assert isinstance(clip, Path) and clip.suffix == ".mp4"
    verify_media_type(clip, "video/mp4", "clip")
    summary = probe(clip)
    stream = summary.video_streams[0]
    assert (stream.width, stream.height) == (128, 96)
    assert stream.codec == "h264"
    assert summary.duration_s == pytest.approx(1.0, abs=0.15)
    # VideoHelperSuite reports the video under `gifs`, with the server's own path beside it.
    reported = result.metadata["comfyui_outputs"]["combine"]
    assert reported["class_type"] == "VHS_VideoCombine"
    assert [f["filename"].rsplit(".", 1)[-1] for f in reported["files"]] == ["mp4"]


def test_several_files_of_one_node_become_a_list(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    spec = definition("image_from_prompt")
    stage = spec.plan[0].model_copy(deep=True)
    assert stage.template is not None
    stage.template["5"]["inputs"]["batch_size"] = 3
    request = stage_request(
        tmp_path / "w", server.url, settings={"width": 64, "height": 64, "steps": 1}, stage=stage
    )
    result = adapter.run_stage(request, LOG)
    images = result.outputs["save"]
    assert isinstance(images, list) and len(images) == 3
    assert len({p.name for p in images}) == 3
    for path in images:
        verify_media_type(path, "image/png", path.name)


def test_progress_is_reported_per_node_and_step(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    calls: list[tuple[float | None, str]] = []
    request = stage_request(
        tmp_path / "w",
        server.url,
        settings={"steps": 6, "width": 64, "height": 64},
        progress=lambda f, m: calls.append((f, m)),
    )
    result = adapter.run_stage(request, LOG)

    prompt_id = result.job_id
    assert calls[0] == (0.0, f"prompt {prompt_id} queued on comfyui-test")
    messages = [m for _, m in calls]
    assert f"prompt {prompt_id}: node 3 (KSampler) step 3/6" in messages
    assert f"prompt {prompt_id}: node 8 (VAEDecode) running" in messages
    fractions = [f for f, _ in calls if f is not None]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0 and calls[-1][1] == f"prompt {prompt_id} succeeded"
    assert len(set(fractions)) >= 8


def test_a_prompt_queued_behind_another_waits_and_ignores_its_messages(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    server.configure({"step_seconds": 0.05})
    # Posted without a client id, the other prompt's progress goes to every socket, ours too.
    other = stage_request(tmp_path / "o", server.url).stage.template
    assert other is not None
    graph = copy.deepcopy(other)
    graph["3"]["inputs"]["steps"] = 30
    other_id = httpx.post(f"{server.url}/prompt", json={"prompt": graph}, timeout=5).json()[
        "prompt_id"
    ]
    until("the other prompt to run", lambda: server.state()["running"] == [other_id], 5)
    calls: list[tuple[float | None, str]] = []
    request = stage_request(
        tmp_path / "w",
        server.url,
        settings={"steps": 2, "width": 64, "height": 64},
        progress=lambda f, m: calls.append((f, m)),
    )
    result = adapter.run_stage(request, LOG)

    assert isinstance(result.outputs["save"], Path)
    assert prompt_status(server, other_id) == "success"
    messages = [m for _, m in calls]
    assert f"prompt {result.job_id} queued on comfyui-test (1 ahead of it)" in messages
    assert not any(other_id in m for m in messages)
    fractions = [f for f, _ in calls if f is not None]
    assert fractions == sorted(fractions)
    assert result.metadata["queued_s"] > 0.3


def test_an_older_server_without_execution_success_is_followed_to_the_end(
    server: ComfyUILoopbackServer, tmp_path: Path
) -> None:
    # Before `execution_success`, a prompt ended with `executing` for node null, and progress
    # came without a prompt id: the adapter must not wait for a quiet check to find out.
    server.configure({"legacy": True})
    adapter = ComfyUIRuntime(quiet_check_s=30.0, request_timeout_s=5.0)
    calls: list[tuple[float | None, str]] = []
    request = stage_request(
        tmp_path / "w",
        server.url,
        settings={"steps": 5, "width": 64, "height": 64},
        progress=lambda f, m: calls.append((f, m)),
    )
    started = time.monotonic()
    result = adapter.run_stage(request, LOG)
    assert time.monotonic() - started < 5.0
    assert isinstance(result.outputs["save"], Path)
    assert f"prompt {result.job_id}: node 3 (KSampler) step 4/5" in [m for _, m in calls]
    assert "server_execution_s" not in result.metadata


# -- refused prompts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"steps": 0},
            "node 3 (KSampler) input 'steps': Value 0 smaller than min of 1 "
            "(set by params 'sampler.steps')",
        ),
        (
            {"checkpoint": "nope.safetensors"},
            "node 4 (CheckpointLoaderSimple) input 'ckpt_name': Value not in list: 'nope."
            "safetensors' not in",
        ),
        (
            {"width": 8},
            "node 5 (EmptyLatentImage) input 'width': Value 8 smaller than min of 16",
        ),
    ],
)
def test_node_errors_are_permanent_and_name_node_and_input(
    server: ComfyUILoopbackServer,
    adapter: ComfyUIRuntime,
    tmp_path: Path,
    settings: dict[str, Any],
    expected: str,
) -> None:
    with pytest.raises(PermanentRuntimeError) as caught:
        adapter.run_stage(stage_request(tmp_path / "w", server.url, settings=settings), LOG)
    message = str(caught.value)
    assert "comfyui-test refused the prompt: " in message
    assert expected in message
    state = server.state()
    assert state["prompts"] == []
    # Sent once: a permanent refusal is not the adapter's to retry.
    assert state["request_log"].count("POST /prompt") == 1


def test_an_unknown_node_class_is_refused_permanently(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    stage = definition("image_from_prompt").plan[0].model_copy(deep=True)
    assert stage.template is not None
    stage.template["8"]["class_type"] = "VAEDecodeTiledTypo"
    with pytest.raises(PermanentRuntimeError) as caught:
        adapter.run_stage(stage_request(tmp_path / "w", server.url, stage=stage), LOG)
    assert "Cannot execute because node VAEDecodeTiledTypo does not exist." in str(caught.value)
    assert "Node ID '#8'" in str(caught.value)


def test_a_prompt_accepted_with_node_errors_is_withdrawn_and_refused(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    # ComfyUI accepts a prompt when some of its outputs pass validation, and silently skips the
    # others (200 with node_errors): the adapter does not take half a graph for a result.
    stage = definition("image_from_prompt").plan[0].model_copy(deep=True)
    assert stage.template is not None
    stage.template["10"] = {
        "class_type": "SaveImage",
        "inputs": {"filename_prefix": "broken", "images": ["3", 0]},
        "_meta": {"title": "save latent"},
    }
    server.configure({"paused": True})
    with pytest.raises(PermanentRuntimeError) as caught:
        adapter.run_stage(stage_request(tmp_path / "w", server.url, stage=stage), LOG)
    prompt_id = only_prompt(server)
    assert caught.value.job_id == prompt_id
    assert (
        "comfyui-test refused part of the prompt: node 10 (SaveImage) input 'images': Return "
        "type mismatch between linked nodes: received_type(LATENT) mismatch input_type(IMAGE)"
    ) in str(caught.value)
    assert f"deleted queued prompt {prompt_id}" in str(caught.value)
    assert server.state()["queue_deletes"] == [prompt_id]
    assert server.state()["pending"] == []


def test_an_upload_the_loader_cannot_find_is_named(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    # Without the input bound, the template's placeholder file name reaches LoadImage.
    request = stage_request(tmp_path / "w", server.url, "restyle_image")
    assert request.inputs == {}
    with pytest.raises(PermanentRuntimeError) as caught:
        adapter.run_stage(request, LOG)
    assert (
        "node 1 (LoadImage) input 'image': Custom validation failed for node: "
        "Invalid image file: placeholder.png"
    ) in str(caught.value)


def test_a_503_is_transient_and_not_retried_by_the_adapter(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    server.configure({"http_errors": {"/prompt": {"status": 503, "times": 1}}})
    with pytest.raises(TransientRuntimeError) as caught:
        adapter.run_stage(stage_request(tmp_path / "w", server.url), LOG)
    assert not isinstance(caught.value, RuntimeTimeoutError)
    assert "503" in str(caught.value)
    assert server.state()["request_log"].count("POST /prompt") == 1
    result = adapter.run_stage(stage_request(tmp_path / "w2", server.url), LOG)
    assert server.state()["prompts"] == [result.job_id]


def test_connection_refused_is_transient(adapter: ComfyUIRuntime, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(TransientRuntimeError) as caught:
            adapter.run_stage(stage_request(tmp_path / "w", url), LOG)
    assert "ConnectError" in str(caught.value) and "comfyui-test" in str(caught.value)
    assert time.monotonic() - started < 3.0


def test_a_missing_endpoint_is_permanent(adapter: ComfyUIRuntime, tmp_path: Path) -> None:
    request = stage_request(tmp_path / "w", "http://127.0.0.1:9")
    request.target = RuntimeTarget(name="comfyui-test", runtime="comfyui")
    with pytest.raises(PermanentRuntimeError, match="no endpoint"):
        adapter.run_stage(request, LOG)


# -- failures while running ---------------------------------------------------------------------


def test_an_execution_error_is_permanent_and_names_the_node(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    server.configure(
        {
            "fail_next": {
                "class_type": "VAEDecode",
                "exception_type": "RuntimeError",
                "exception_message": "the decoder exploded",
            }
        }
    )
    with pytest.raises(PermanentRuntimeError) as caught:
        adapter.run_stage(stage_request(tmp_path / "w", server.url), LOG)
    prompt_id = only_prompt(server)
    assert caught.value.job_id == prompt_id
    assert str(caught.value) == (
        f"comfyui-test prompt {prompt_id} failed: node 8 (VAEDecode) raised RuntimeError: "
        "the decoder exploded"
    )
    state = server.state()
    assert state["interrupts"] == [] and state["queue_deletes"] == []  # nothing left to cancel


def test_out_of_memory_is_transient(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    server.configure(
        {
            "fail_next": {
                "class_type": "KSampler",
                "exception_type": "torch.OutOfMemoryError",
                "exception_message": "Allocation on device",
            }
        }
    )
    with pytest.raises(TransientRuntimeError) as caught:
        adapter.run_stage(stage_request(tmp_path / "w", server.url), LOG)
    assert "ran out of memory: node 3 (KSampler) raised torch.OutOfMemoryError" in str(caught.value)


def test_a_prompt_interrupted_by_someone_else_is_transient(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    server.configure({"step_seconds": 0.1})
    interrupted = threading.Event()

    def operator_presses_cancel(fraction: float | None, message: str) -> None:
        # The UI's cancel button: a bare /interrupt, no prompt id.
        if "step" in message and not interrupted.is_set():
            interrupted.set()
            httpx.post(f"{server.url}/interrupt", timeout=5).raise_for_status()

    request = stage_request(
        tmp_path / "w", server.url, settings={"steps": 40}, progress=operator_presses_cancel
    )
    with pytest.raises(TransientRuntimeError) as caught:
        adapter.run_stage(request, LOG)
    prompt_id = only_prompt(server)
    assert str(caught.value) == (
        f"comfyui-test prompt {prompt_id} was interrupted on the server at node 3 (KSampler), "
        "not by this run"
    )
    assert server.state()["interrupts"] == [{"prompt_id": None, "hit": True}]


@pytest.mark.parametrize("how", ["restart", "forget"])
def test_a_prompt_the_server_lost_is_transient(
    server: ComfyUILoopbackServer,
    adapter: ComfyUIRuntime,
    tmp_path: Path,
    how: str,
) -> None:
    server.configure({"step_seconds": 0.1})
    lost = threading.Event()

    def lose_it(fraction: float | None, message: str) -> None:
        if "step" in message and not lost.is_set():
            lost.set()
            prompt_id = server.state()["prompts"][0]
            # A restart drops the websocket too; a forgotten prompt just goes quiet.
            server.configure({"restart": True} if how == "restart" else {"forget": [prompt_id]})

    request = stage_request(tmp_path / "w", server.url, settings={"steps": 50}, progress=lose_it)
    started = time.monotonic()
    with pytest.raises(TransientRuntimeError) as caught:
        adapter.run_stage(request, LOG)
    prompt_id = only_prompt(server)
    assert caught.value.job_id == prompt_id
    assert "the server lost the prompt (restarted?)" in str(caught.value)
    assert time.monotonic() - started < 6.0
    assert prompt_status(server, prompt_id) == "forgotten"


# -- following without a websocket --------------------------------------------------------------


def test_without_a_websocket_the_prompt_is_followed_by_polling(
    server: ComfyUILoopbackServer,
    adapter: ComfyUIRuntime,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.configure({"refuse_websockets": True, "step_seconds": 0.05})
    calls: list[tuple[float | None, str]] = []
    request = stage_request(
        tmp_path / "w",
        server.url,
        settings={"steps": 8, "width": 96, "height": 64},
        progress=lambda f, m: calls.append((f, m)),
    )
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        result = adapter.run_stage(request, LOG)
    assert probe(result.outputs["save"]).width == 96  # type: ignore[arg-type]
    assert result.metadata["followed_by"] == "polling"
    assert server.state()["ws_connects"] == 0
    assert "could not be opened (InvalidStatus)" in caplog.text
    assert f"prompt {result.job_id} running on comfyui-test" in [m for _, m in calls]
    assert calls[-1] == (1.0, f"prompt {result.job_id} succeeded")


def test_a_websocket_that_drops_mid_prompt_falls_back_to_polling(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    server.configure({"step_seconds": 0.05})
    dropped = threading.Event()

    def drop(fraction: float | None, message: str) -> None:
        if "step" in message and not dropped.is_set():
            dropped.set()
            server.configure({"drop_websockets": True})

    request = stage_request(tmp_path / "w", server.url, settings={"steps": 10}, progress=drop)
    result = adapter.run_stage(request, LOG)
    assert isinstance(result.outputs["save"], Path)
    assert result.metadata["followed_by"] == "websocket, then polling"


# -- cancellation and deadlines -----------------------------------------------------------------


def test_cancelling_mid_prompt_interrupts_it_by_its_id(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    server.configure({"step_seconds": 0.1})

    def cancel_the_run(fraction: float | None, message: str) -> None:
        # Dagster's run termination arrives the same way: a BaseException while waiting.
        if "step" in message:
            raise KeyboardInterrupt

    request = stage_request(
        tmp_path / "w", server.url, settings={"steps": 100}, progress=cancel_the_run
    )
    with pytest.raises(KeyboardInterrupt):
        adapter.run_stage(request, LOG)
    prompt_id = only_prompt(server)
    state = server.state()
    assert state["interrupts"] == [{"prompt_id": prompt_id, "hit": True}]
    assert state["queue_deletes"] == []
    until(
        "the prompt to be interrupted", lambda: prompt_status(server, prompt_id) == "interrupted", 5
    )


def test_cancelling_a_queued_prompt_deletes_it_from_the_queue(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    server.configure({"step_seconds": 0.05})
    # Another client's long prompt holds the server's one worker, so ours queues behind it.
    blocker = stage_request(tmp_path / "b", server.url, settings={"steps": 200})
    assert blocker.stage.template is not None
    graph = copy.deepcopy(blocker.stage.template)
    graph["3"]["inputs"]["steps"] = 200
    answer = httpx.post(
        f"{server.url}/prompt", json={"prompt": graph, "client_id": "someone-else"}, timeout=5
    )
    blocker_id = answer.json()["prompt_id"]
    until("the other prompt to run", lambda: server.state()["running"] == [blocker_id], 5)
    seen: list[str] = []

    def cancel_while_queued(fraction: float | None, message: str) -> None:
        seen.append(message)
        raise KeyboardInterrupt

    request = stage_request(tmp_path / "w", server.url, progress=cancel_while_queued)
    with pytest.raises(KeyboardInterrupt):
        adapter.run_stage(request, LOG)
    ours = next(p for p in server.state()["prompts"] if p != blocker_id)
    assert seen == [f"prompt {ours} queued on comfyui-test"]
    state = server.state()
    assert state["queue_deletes"] == [ours]
    assert state["interrupts"] == []
    assert state["pending"] == [] and state["running"] == [blocker_id]
    assert prompt_status(server, ours) == "deleted"
    httpx.post(f"{server.url}/interrupt", json={"prompt_id": blocker_id}, timeout=5)


def test_a_prompt_past_its_deadline_is_interrupted(
    server: ComfyUILoopbackServer, adapter: ComfyUIRuntime, tmp_path: Path
) -> None:
    server.configure({"step_seconds": 0.1})
    request = stage_request(tmp_path / "w", server.url, settings={"steps": 100}, timeout_s=1.5)
    started = time.monotonic()
    with pytest.raises(RuntimeTimeoutError) as caught:
        adapter.run_stage(request, LOG)
    elapsed = time.monotonic() - started
    prompt_id = only_prompt(server)
    assert 1.5 <= elapsed < 1.5 + adapter.cancel_timeout_s + 0.5
    assert caught.value.job_id == prompt_id
    assert "did not finish within 1.5 s" in str(caught.value)
    assert f"interrupted prompt {prompt_id} on comfyui-test" in str(caught.value)
    assert server.state()["interrupts"] == [{"prompt_id": prompt_id, "hit": True}]
    until(
        "the prompt to be interrupted", lambda: prompt_status(server, prompt_id) == "interrupted", 5
    )


# -- credentials for a proxy in front -----------------------------------------------------------


BEARER = TargetAuth(kind="bearer", token_env=TOKEN_ENV)


def test_a_proxy_token_is_sent_everywhere_and_never_shown(
    adapter: ComfyUIRuntime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    source = make_image(tmp_path / "in.png", size="320x240")
    with ComfyUILoopbackServer(step_seconds=0.01, token=SERVER_TOKEN) as server:
        monkeypatch.setenv(TOKEN_ENV, WRONG_TOKEN)
        with pytest.raises(PermanentRuntimeError) as caught:
            adapter.run_stage(stage_request(tmp_path / "w", server.url, auth=BEARER), LOG)
        refused = str(caught.value)
        assert "401" in refused and TOKEN_ENV in refused

        monkeypatch.setenv(TOKEN_ENV, SERVER_TOKEN)
        result = adapter.run_stage(
            stage_request(
                tmp_path / "w2",
                server.url,
                "restyle_image",
                {"steps": 2},
                inputs={"source": StageFile(path=source, media_type="image/png")},
                auth=BEARER,
            ),
            LOG,
        )
        # The websocket carried the token too (the proxy would have refused it otherwise).
        assert result.metadata["followed_by"] == "websocket"
        report = adapter.health(target_for(server.url, BEARER))
        assert report.healthy

        monkeypatch.delenv(TOKEN_ENV)
        with pytest.raises(PermanentRuntimeError, match=TOKEN_ENV):
            adapter.run_stage(stage_request(tmp_path / "w3", server.url, auth=BEARER), LOG)
    for secret in (WRONG_TOKEN, SERVER_TOKEN):
        assert secret not in refused
        assert secret not in caplog.text
        assert secret not in json.dumps(result.metadata)
        assert secret not in report.model_dump_json()


def test_credentials_in_the_endpoint_are_never_recorded(
    server: ComfyUILoopbackServer,
    adapter: ComfyUIRuntime,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = server.url.replace("http://", "http://ops:s3cret-pass@")
    result = adapter.run_stage(stage_request(tmp_path / "w", url, settings={"steps": 1}), LOG)
    assert result.metadata["comfyui_server"] == server.url
    assert "s3cret-pass" not in json.dumps(result.metadata)
    assert "s3cret-pass" not in adapter.health(target_for(url)).model_dump_json()
    assert "s3cret-pass" not in caplog.text


# -- health ---------------------------------------------------------------------------------------


def test_health_of_a_running_server(server: ComfyUILoopbackServer, adapter: ComfyUIRuntime) -> None:
    report = adapter.health(target_for(server.url))
    assert report.healthy
    assert report.latency_ms is not None and report.latency_ms >= 0
    info = report.info
    assert info["comfyui_version"] == "0.3.68-loopback"
    assert info["python_version"] == "3.11.2"
    assert info["devices"] == [
        {
            "name": "cpu (loopback)",
            "type": "cpu",
            "vram_total": 16 * 1024**3,
            "vram_free": 12 * 1024**3,
        }
    ]
    assert (info["queue_depth"], info["running"]) == (0, 0)
    assert report.detail == "ComfyUI 0.3.68-loopback: 0 running, 0 queued on cpu (loopback)"

    server.configure({"paused": True})
    for _ in range(2):
        httpx.post(
            f"{server.url}/prompt",
            json={"prompt": stage_request(Path("/unused"), server.url).stage.template},
            timeout=5,
        ).raise_for_status()
    assert adapter.health(target_for(server.url)).info["queue_depth"] == 2


def test_health_of_an_unreachable_or_foreign_server(adapter: ComfyUIRuntime) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        report = adapter.health(target_for(f"http://127.0.0.1:{sock.getsockname()[1]}"))
    assert not report.healthy and "ConnectError" in report.detail

    with ComfyUILoopbackServer(token=SERVER_TOKEN) as guarded:
        report = adapter.health(target_for(guarded.url))
    assert not report.healthy and report.detail.startswith("/system_stats answered 401")


# -- definitions ----------------------------------------------------------------------------------


def test_the_adapter_is_registered_and_the_examples_validate() -> None:
    assert adapter_class("comfyui") is ComfyUIRuntime
    assert ComfyUIRuntime in BUILTIN_ADAPTERS
    registry = load_registry(DEFS)
    assert sorted(d.spec for d in registry.all()) == [
        "clip_from_prompt@1",
        "image_from_prompt@1",
        "restyle_image@1",
    ]


def _stage(**changes: Any) -> StageSpec:
    stage = definition("image_from_prompt").plan[0]
    data = {**stage.model_dump(exclude_none=True), **changes}
    return StageSpec.model_validate(data)


def _template(mutate: Any) -> dict[str, Any]:
    template = copy.deepcopy(definition("image_from_prompt").plan[0].template)
    mutate(template)
    return template  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"template": {"nodes": [], "links": []}}, "UI workflow format"),
        ({"template": {}}, "non-empty mapping"),
        ({"params": {"sampler.stepz": 4}}, "has no input 'stepz'"),
        ({"params": {"sampler": 4}}, "is not '<node>.<input>'"),
        ({"params": {"smapler.steps": 4}}, "no node has the id or title 'smapler'"),
        ({"params": {"sampler.model": "x"}}, "is linked to node 4"),
        ({"params": {"sampler.steps": [1, 2]}}, "would read a list as a link"),
        ({"params": {"3.seed": 1, "sampler.seed": 2}}, "both bind node 3 (KSampler) input 'seed'"),
        ({"params": {"positive.text": "${inputs.source}"}}, "files are bound in `inputs`"),
        ({"outputs": {"savee": "image"}}, "outputs key 'savee'"),
        ({"outputs": {"save": "image", "9": None}}, "both name node 9 (SaveImage)"),
        ({"outputs": {}}, "at least one output node"),
        (
            {"template": _template(lambda t: t["6"]["inputs"].update(text="${settings.prompt}"))},
            "bindings go in the stage's params",
        ),
        (
            {"template": _template(lambda t: t["8"]["inputs"].update(samples=["99", 0]))},
            "links to node '99'",
        ),
        (
            {"template": _template(lambda t: t["8"]["inputs"].update(samples=["3", 0, 1]))},
            "a link is [source node id, output slot]",
        ),
        ({"template": _template(lambda t: t["8"].pop("class_type"))}, "node 8 has no class_type"),
        ({"template": _template(lambda t: t["8"].update(color="red"))}, "unknown key(s) 'color'"),
        (
            {"template": _template(lambda t: t["7"]["_meta"].update(title="positive"))},
            "the title 'positive' is carried by nodes 6, 7",
        ),
    ],
)
def test_validate_stage_refuses_what_cannot_run(changes: dict[str, Any], message: str) -> None:
    stage = _stage(**changes)
    with pytest.raises(ValueError) as caught:
        ComfyUIRuntime.validate_stage(stage)
    assert message in str(caught.value)


def test_validate_stage_refuses_an_operation() -> None:
    with pytest.raises(ValueError, match="template"):
        ComfyUIRuntime.validate_stage(StageSpec(id="x", runtime="comfyui", operation="txt2img"))


def test_local_names_never_come_from_the_server_unchecked() -> None:
    taken: set[str] = set()
    names = [
        safe_file_name(name, ".png", taken)
        for name in (
            "../../../etc/passwd",
            "..\\..\\boot.ini",
            ".hidden.png",
            "ComfyUI_00001_.png",
            "ComfyUI_00001_.png",
            "x" * 500 + ".PNG",
            "clip.mp4;rm -rf",
            "",
        )
    ]
    assert names[0] == "passwd.png"
    assert names[1] == "boot.ini"
    assert names[2] == "hidden.png"
    assert names[3:5] == ["ComfyUI_00001.png", "ComfyUI_00001-2.png"]
    assert names[5] == "x" * 80 + ".png"
    assert names[6] == "clip.png"
    assert names[7] == "output.png"
    for name in names:
        assert "/" not in name and "\\" not in name and not name.startswith(".")


# -- the server as a process, and a real Dagster run ---------------------------------------------


@pytest.fixture
def comfyui_process() -> Iterator[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.servers.comfyui_server",
            "--port",
            "0",
            "--step-seconds",
            "0.01",
        ],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30.0)
        assert ready, "the loopback ComfyUI printed no URL within 30 s"
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield url
    finally:
        stop(proc)
        assert proc.returncode == 0


def _ergot_events(instance: DagsterInstance, run_id: str, kind: str) -> list[dict[str, Any]]:
    found = []
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        data = entry.dagster_event.engine_event_data if entry.dagster_event else None
        if data is None or data.metadata.get("ergot_event") is None:
            continue
        fields = {k: getattr(v, "value", v) for k, v in data.metadata.items()}
        if fields["ergot_event"] == kind:
            found.append(fields)
    return found


@pytest.mark.slow
def test_the_example_workflows_materialize_in_dagster(
    comfyui_process: str,
    plane_settings: ErgotSettings,
    instance: DagsterInstance,
    ingest_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ERGOT_WORKFLOW_DEFS", str(DEFS))
    monkeypatch.setenv("ERGOT_RUNTIME_TARGETS", str(EXAMPLES / "runtime_targets.yaml"))
    monkeypatch.setenv("ERGOT_TARGET_COMFYUI_LOOP_ENDPOINT", comfyui_process)
    settings = ErgotSettings.from_env()
    make_clip(ingest_root / "cam" / "take 01.mov", duration=1.0, size="320x240")
    make_image(ingest_root / "stills" / "frame.png", size="320x240")
    outcomes = ingest_refs(
        ingest_root,
        ["cam/take 01.mov", "stills/frame.png"],
        lambda key: latest_source_record(instance, key),
    )
    record_sources(instance, [o.record for o in outcomes if o.record])
    registry = load_registry(settings.workflow_defs)
    defs = build_definitions(settings)
    assets = build_assets(registry)
    from ergot_dagster.artifacts.store import open_store

    store = open_store(settings.storage)

    def run(workflow: str, ref: str, values: dict[str, Any]) -> Any:
        spec = registry.get(workflow)
        return materialize(
            assets,
            selection=[AssetKey([spec.family, spec.name, n]) for n in spec.outputs],
            partition_key=ref_to_partition_key(ref),
            instance=instance,
            resources=defs.resources,
            run_config=run_config_for(spec, values, None),
            raise_on_error=False,
        )

    result = run("image_from_prompt", "cam/take 01.mov", {"width": 256, "height": 192, "steps": 3})
    assert result.success
    state = httpx.get(f"{comfyui_process}/_loopback/state", timeout=5).json()
    prompt_id = state["prompts"][-1]
    manifest = {m.name: m for m in store.list_run(result.run_id)}["image"]
    assert (manifest.runtime.type, manifest.runtime.target, manifest.runtime.job_id) == (
        "comfyui",
        "comfyui-loop",
        prompt_id,
    )
    # The manifest names the server that made it (contract 1.1.0).
    assert manifest.runtime.endpoint == comfyui_process
    assert manifest.media_type == "image/png"
    summary = probe(store.local_path(manifest.uri))
    assert (summary.width, summary.height) == (256, 192)
    finished = _ergot_events(instance, result.run_id, "stage_finished")
    assert [(e["job_id"], e["comfyui_prompt_id"], e["comfyui_server"]) for e in finished] == [
        (prompt_id, prompt_id, comfyui_process)
    ]
    progress = [e["detail"] for e in _ergot_events(instance, result.run_id, "stage_progress")]
    assert progress[0] == f"prompt {prompt_id} queued on comfyui-loop"
    materialization = result.get_asset_materialization_events()[0].materialization
    stage_metadata = materialization.metadata["stage_metadata"].value
    assert stage_metadata["comfyui_server"] == comfyui_process
    assert stage_metadata["job_id"] == prompt_id

    # Image to image: the source is uploaded, and the artifact descends from it.
    result = run("restyle_image", "stills/frame.png", {"width": 128, "height": 128, "steps": 2})
    assert result.success
    manifest = {m.name: m for m in store.list_run(result.run_id)}["restyled"]
    record = latest_source_record(instance, "stills/frame.png")
    assert record is not None
    assert [(p.kind, p.ref, p.sha256) for p in manifest.parents] == [
        ("source", "stills/frame.png", record.sha256)
    ]
    assert (
        manifest.runtime.job_id
        == httpx.get(f"{comfyui_process}/_loopback/state", timeout=5).json()["prompts"][-1]
    )

    # A refused prompt fails the run at once, naming node and input, and is not retried.
    result = run("image_from_prompt", "cam/take 01.mov", {"checkpoint": "missing.ckpt"})
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data
    description = failure.user_failure_data.description
    assert "node 4 (CheckpointLoaderSimple) input 'ckpt_name': Value not in list" in description
    assert failure.user_failure_data.metadata["retryable"].value is False


@pytest.mark.slow
def test_cancelling_a_dagster_run_interrupts_its_prompt(
    comfyui_process: str, plane_settings: ErgotSettings, ingest_root: Path, tmp_path: Path
) -> None:
    # The repository's instance config, as `make dev` uses it: queue, daemon, run termination.
    (plane_settings.dagster_home / "dagster.yaml").write_text(
        (PROJECT_ROOT / "dagster.yaml").read_text()
    )
    env = subprocess_env(plane_settings)
    env.update(
        {
            "ERGOT_WORKFLOW_DEFS": str(DEFS),
            "ERGOT_RUNTIME_TARGETS": str(EXAMPLES / "runtime_targets.yaml"),
            "ERGOT_TARGET_COMFYUI_LOOP_ENDPOINT": comfyui_process,
            "ERGOT_INGEST_INTERVAL_S": "3600",
        }
    )
    make_clip(ingest_root / "cam" / "take 02.mov", duration=1.0, size="320x240")
    with DagsterInstance.from_config(str(plane_settings.dagster_home)) as instance:
        outcomes = ingest_refs(
            ingest_root, ["cam/take 02.mov"], lambda key: latest_source_record(instance, key)
        )
        record_sources(instance, [o.record for o in outcomes if o.record])
    httpx.post(
        f"{comfyui_process}/_loopback/config", json={"step_seconds": 0.2}, timeout=5
    ).raise_for_status()

    def loopback() -> dict[str, Any]:
        return httpx.get(f"{comfyui_process}/_loopback/state", timeout=5).json()

    with dagster_dev(plane_settings.home, env, tmp_path / "dagster-dev.log") as url:
        client = ErgotClient(url)
        handle = client.submit(
            {
                "request_id": "comfy-cancel-1",
                "workflow": "image_from_prompt",
                "sources": {"primary": "cam/take 02.mov"},
                "settings": {"steps": 150, "width": 64, "height": 64},
            }
        )
        prompt_id = until("the prompt to run on ComfyUI", lambda: loopback()["running"])[0]
        client.cancel(handle.run_id)
        assert client.wait(handle.run_id, timeout_s=60).status == "CANCELED"
        assert {"prompt_id": prompt_id, "hit": True} in loopback()["interrupts"]
        until(
            "the prompt to end interrupted",
            lambda: loopback()["status"].get(prompt_id) == "interrupted",
            10,
        )
