"""ComfyUI's wire protocol as the adapter reads it: answers, queue, history, websocket messages.

Everything a ComfyUI server sends is untrusted: it is parsed into these models (anything else is
"not ComfyUI"), and every text quoted from it goes through the caller's `clean` (which scrubs
credentials and bounds the length) before it reaches a message.

The shapes, from ComfyUI's server.py, execution.py and main.py (v0.3.x):

- `POST /prompt {"prompt", "client_id", "prompt_id"?}` answers `{"prompt_id", "number",
  "node_errors"}`, or 400 `{"error": {type, message, details, extra_info} | "text", "node_errors":
  {node_id: {"errors": [{type, message, details, extra_info: {input_name, ...}}],
  "dependent_outputs": [...], "class_type"}}}`. A 200 may still carry `node_errors`: the outputs
  that failed validation are then silently skipped.
- `GET /queue` answers `{"queue_running": [...], "queue_pending": [...]}`, each entry
  `[number, prompt_id, prompt, extra_data, outputs_to_execute]`.
- `GET /history/{id}` answers `{id: {"prompt": [...], "outputs": {node_id: {"images": [{filename,
  subfolder, type}], ...}}, "status": {status_str, completed, messages: [[event, data], ...]}}}`,
  or `{}` both for an unknown prompt and for one not finished yet.
- `/ws?clientId=` sends JSON text `{"type", "data"}` (`status`, `execution_start`,
  `execution_cached`, `executing`, `progress`, `executed`, `execution_success`, `execution_error`,
  `execution_interrupted`, and newer types such as `progress_state`) and binary preview frames.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ergot_dagster.resources.comfyui.graph import InputSlot, node_label

Clean = Callable[[str], str]
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("contains control characters")
    return value


class UploadAnswer(BaseModel):
    """The answer to `POST /upload/image`: where the server put the file."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=255)
    subfolder: str = Field(default="", max_length=255)
    type: str = Field(default="input", pattern=r"^[a-z]{1,16}$")

    _plain = field_validator("name", "subfolder")(_no_control)

    def reference(self) -> str:
        """The value a loader node's input takes: `subfolder/name`, annotated unless `input`."""
        value = f"{self.subfolder.strip('/')}/{self.name}" if self.subfolder else self.name
        return value if self.type == "input" else f"{value} [{self.type}]"


class PromptAnswer(BaseModel):
    """The answer to an accepted `POST /prompt`."""

    model_config = ConfigDict(extra="ignore")

    prompt_id: str = Field(min_length=1, max_length=128)
    number: float | None = None
    node_errors: dict[str, Any] = Field(default_factory=dict)

    _plain = field_validator("prompt_id")(_no_control)

    @field_validator("node_errors", mode="before")
    @classmethod
    def _empty_list(cls, value: Any) -> Any:
        # Some versions answer `[]` when there is nothing to report.
        return {} if value in ([], None) else value


class FileRef(BaseModel):
    """One file a node reported: the server's name for it, to ask `/view` for."""

    model_config = ConfigDict(extra="ignore")

    filename: str = Field(min_length=1, max_length=1024)
    subfolder: str = Field(default="", max_length=1024)
    type: str = Field(default="output", pattern=r"^[a-z]{1,16}$")

    _plain = field_validator("filename", "subfolder")(_no_control)


def files_in(node_output: Any) -> list[FileRef]:
    """Every file in one node's output (`images`, `gifs`, `audio`, `video`, ...), in order.

    Output nodes report files as lists of `{filename, subfolder, type}` under a key of their own
    choosing (SaveImage `images`, VideoHelperSuite `gifs`); other entries (`animated: [true]`,
    text) are not files.
    """
    found: list[FileRef] = []
    if not isinstance(node_output, dict):
        return found
    for value in node_output.values():
        if not isinstance(value, list):
            continue
        for item in value:
            if isinstance(item, dict) and isinstance(item.get("filename"), str):
                try:
                    found.append(FileRef.model_validate(item))
                except ValidationError:
                    continue
    return found


class HistoryStatus(BaseModel):
    """How a finished prompt ended, with the events it sent (`[[event, data], ...]`)."""

    model_config = ConfigDict(extra="ignore")

    status_str: str | None = None
    completed: bool | None = None
    messages: list[Any] = Field(default_factory=list)

    def message(self, event: str) -> dict[str, Any] | None:
        """The data of the last `event` among the messages, if any."""
        found = None
        for item in self.messages:
            if (
                isinstance(item, list | tuple)
                and len(item) == 2
                and item[0] == event
                and isinstance(item[1], dict)
            ):
                found = item[1]
        return found


class HistoryEntry(BaseModel):
    """A prompt the server has finished with (successfully or not)."""

    model_config = ConfigDict(extra="ignore")

    outputs: dict[str, Any] = Field(default_factory=dict)
    status: HistoryStatus | None = None


def history_entry(doc: Any, prompt_id: str) -> HistoryEntry | None:
    """The entry for `prompt_id` in a `/history/{id}` answer; None when it has none (yet).

    `ValueError` when the answer is not a history at all.
    """
    if not isinstance(doc, dict):
        raise ValueError("the history answer is not a JSON object")
    entry = doc.get(prompt_id)
    if entry is None:
        return None
    try:
        return HistoryEntry.model_validate(entry)
    except ValidationError as exc:
        raise ValueError(f"the history entry is malformed ({exc.error_count()} problems)") from exc


def queue_place(doc: Any, prompt_id: str) -> tuple[str | None, int | None]:
    """Where `prompt_id` is in a `/queue` answer: ("running", 0), ("pending", n ahead) or
    (None, None). `ValueError` when the answer is not a queue."""
    if not isinstance(doc, dict):
        raise ValueError("the queue answer is not a JSON object")
    lanes = {}
    for lane in ("queue_running", "queue_pending"):
        entries = doc.get(lane)
        if not isinstance(entries, list):
            raise ValueError(f"the queue answer has no {lane} list")
        lanes[lane] = entries
    for entry in lanes["queue_running"]:
        if _entry_id(entry) == prompt_id:
            return "running", 0
    # Pending entries are served lowest `number` first; the answer is not sorted.
    pending = sorted(
        (e for e in lanes["queue_pending"] if _entry_id(e) is not None),
        key=lambda e: e[0] if isinstance(e[0], int | float) else 0,
    )
    for position, entry in enumerate(pending):
        if _entry_id(entry) == prompt_id:
            return "pending", position + len(lanes["queue_running"])
    return None, None


def queue_counts(doc: Any) -> tuple[int, int]:
    """(running, pending) in a `/queue` answer; `ValueError` when it is not one."""
    if not isinstance(doc, dict):
        raise ValueError("the queue answer is not a JSON object")
    running, pending = doc.get("queue_running"), doc.get("queue_pending")
    if not isinstance(running, list) or not isinstance(pending, list):
        raise ValueError("the queue answer has no queue_running / queue_pending lists")
    return len(running), len(pending)


def _entry_id(entry: Any) -> str | None:
    if isinstance(entry, list) and len(entry) >= 2 and isinstance(entry[1], str):
        return entry[1]
    return None


def describe_prompt_error(error: Any, clean: Clean) -> str:
    """The top-level `error` of a refused prompt: `message: details`, or the text itself."""
    if isinstance(error, dict):
        message = clean(str(error.get("message") or error.get("type") or "refused"))
        details = error.get("details")
        if details:
            return f"{message} ({clean(str(details))})"
        return message
    return clean(str(error)) if error else "refused"


def describe_node_errors(
    node_errors: dict[str, Any],
    template: dict[str, Any],
    bound_by: dict[InputSlot, str],
    clean: Clean,
) -> list[str]:
    """One line per validation error, naming node, class and input: `node 3 (KSampler) input
    'steps': Value 0 smaller than min of 1 (set by params 'sampler.steps')`."""
    lines: list[str] = []
    for node_id, entry in node_errors.items():
        node_id = str(node_id)
        class_type = entry.get("class_type") if isinstance(entry, dict) else None
        label = (
            node_label(template, node_id)
            if node_id in template
            else f"node {clean(node_id)} ({clean(str(class_type or 'unknown class'))})"
        )
        errors = entry.get("errors") if isinstance(entry, dict) else None
        if not isinstance(errors, list) or not errors:
            lines.append(f"{label}: failed validation")
            continue
        for error in errors:
            if not isinstance(error, dict):
                lines.append(f"{label}: {clean(str(error))}")
                continue
            extra = error.get("extra_info") if isinstance(error.get("extra_info"), dict) else {}
            input_name = extra.get("input_name")
            message = clean(str(error.get("message") or error.get("type") or "invalid"))
            details = str(error.get("details") or "")
            where = label
            source = None
            if isinstance(input_name, str) and input_name:
                where += f" input {clean(input_name)!r}"
                source = bound_by.get(InputSlot(node_id, input_name))
                # Details usually repeat the input name; keep only what they add.
                for prefix in (f"{input_name}: ", f"{input_name}, ", f"{input_name} - "):
                    details = details.removeprefix(prefix)
                if details == input_name:
                    details = ""
            line = f"{where}: {message}"
            if details:
                line += f": {clean(details)}"
            if source:
                line += f" (set by {source})"
            lines.append(line)
    return lines


def describe_execution_error(data: dict[str, Any], template: dict[str, Any], clean: Clean) -> str:
    """`node 8 (VAEDecode) raised RuntimeError: boom` from an `execution_error` message."""
    node_id = str(data.get("node_id") or "?")
    class_type = data.get("node_type")
    label = (
        node_label(template, node_id)
        if node_id in template
        else f"node {clean(node_id)} ({clean(str(class_type or 'unknown class'))})"
    )
    exception_type = clean(str(data.get("exception_type") or "an error"))
    message = clean(str(data.get("exception_message") or "").strip()) or "no message"
    return f"{label} raised {exception_type}: {message}"


_OOM_TYPES = ("OutOfMemoryError",)
_OOM_TEXT = ("out of memory", "allocation on device", "oom when allocating")


def is_out_of_memory(data: dict[str, Any]) -> bool:
    """Whether an `execution_error` is the GPU (or host) running out of memory.

    Torch raises `torch.OutOfMemoryError` (`torch.cuda.OutOfMemoryError` before 2.5); ComfyUI
    words it "Allocation on device"; other backends say "out of memory".
    """
    exception_type = str(data.get("exception_type") or "")
    message = str(data.get("exception_message") or "").lower()
    return exception_type.endswith(_OOM_TYPES) or any(text in message for text in _OOM_TEXT)


class WsMessage(BaseModel):
    """One JSON message from `/ws`."""

    model_config = ConfigDict(extra="ignore")

    type: str
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("data", mode="before")
    @classmethod
    def _object(cls, value: Any) -> Any:
        return value if isinstance(value, dict) else {}


def parse_ws(raw: str | bytes) -> WsMessage | None:
    """The JSON message in a text frame; None for binary frames (previews) and anything else."""
    if not isinstance(raw, str):
        return None
    try:
        return WsMessage.model_validate(json.loads(raw))
    except (ValueError, ValidationError, TypeError, RecursionError):
        return None
