"""A ComfyUI stage's graph: the template checked, bindings applied, output nodes and files found.

The stage's `template` is a graph in ComfyUI's *API format* (what "Save (API Format)" exports): a
mapping of node id to `{class_type, inputs, _meta: {title}}`, where an input is a literal or a
link `[source node id, output slot]`. The stage binds values into it without changing the model:

- `params` keys `"<node>.<input>"` set that node input to a literal or a `${settings.KEY}` value
  (the plane resolves `${settings.*}` before the adapter runs);
- `inputs` keys `"<node>.<input>"` bind a file (`${inputs.X}` or `${stages.S.O}`); the adapter
  uploads it and puts the name ComfyUI gave it into that node input;
- `outputs` keys are output nodes; every file the node produced becomes that stage output.

`<node>` is a node id, or a node's `_meta.title` when exactly one node carries it. The node input a
key names must already be in the template (a placeholder value), so that a misspelt input fails
when the definition is published instead of being silently ignored by ComfyUI.

One `params` key is not a node input: `for_each: "<node>.<input>"` names a key of the stage's
`inputs` whose files (an image set) the graph runs over, one prompt per file, in order.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from ergot_dagster.workflows.model import StageSpec, parse_binding

NODE_KEYS = frozenset({"class_type", "inputs", "_meta"})
# Real exports use digits, and "12:5" for nodes inside subgraphs; nothing else is needed.
_NODE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_:.-]{0,63}$")
# A local file name keeps only these characters of the server's name.
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_EXTENSION = re.compile(r"^\.[a-z0-9]{1,8}$")
_MAX_STEM = 80
# The one params key that is not a node input: which stage input the graph is mapped over.
FOR_EACH = "for_each"


@dataclass(frozen=True)
class InputSlot:
    """One node input that a stage key binds: the node's id and the input's name."""

    node: str
    input: str


def title_of(node: dict[str, Any]) -> str | None:
    """The node's `_meta.title`, if it has a non-empty one."""
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, dict) else None
    return title if isinstance(title, str) and title else None


def node_label(template: dict[str, Any], node_id: str) -> str:
    """`node 3 (KSampler)`: how messages name a node."""
    node = template.get(node_id)
    class_type = node.get("class_type") if isinstance(node, dict) else None
    return f"node {node_id} ({class_type or 'unknown class'})"


def check_template(template: Any) -> dict[str, dict[str, Any]]:
    """The template as a graph, or `ValueError` saying what makes it not an API-format graph."""
    if not isinstance(template, dict) or not template:
        raise ValueError(
            "a ComfyUI template is a non-empty mapping of node id to node (ComfyUI's API format)"
        )
    if {"nodes", "links"} <= set(template):
        raise ValueError(
            "the template is in ComfyUI's UI workflow format (it has `nodes` and `links`); "
            "export it with 'Save (API Format)' instead"
        )
    for node_id, node in template.items():
        if not isinstance(node_id, str) or not _NODE_ID.match(node_id):
            raise ValueError(
                f"node id {node_id!r} is not a string such as '3' or '12:5' (quote numeric ids "
                "in YAML)"
            )
        where = f"node {node_id}"
        if not isinstance(node, dict):
            raise ValueError(f"{where} is not a mapping with class_type and inputs")
        unknown = sorted(set(node) - NODE_KEYS)
        if unknown:
            raise ValueError(
                f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; an API-format node "
                "has class_type, inputs and _meta"
            )
        class_type = node.get("class_type")
        if not isinstance(class_type, str) or not class_type.strip():
            raise ValueError(f"{where} has no class_type")
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            raise ValueError(f"{where} ({class_type}) has no inputs mapping")
        meta = node.get("_meta", {})
        if not isinstance(meta, dict) or not isinstance(meta.get("title", ""), str):
            raise ValueError(f"{where} ({class_type}) has a _meta that is not {{title: text}}")
        for name, value in inputs.items():
            _check_input_value(template, f"{where} ({class_type}) input {name!r}", value)
    return template


def _check_input_value(template: dict[str, Any], where: str, value: Any) -> None:
    if isinstance(value, list):
        # ComfyUI reads every list in an input as a link, so every list must be one.
        if (
            len(value) != 2
            or not isinstance(value[0], str)
            or isinstance(value[1], bool)
            or not isinstance(value[1], int)
            or value[1] < 0
        ):
            raise ValueError(
                f"{where} is a list, which ComfyUI reads as a link; a link is "
                f"[source node id, output slot], not {value!r}"
            )
        if value[0] not in template:
            raise ValueError(f"{where} links to node {value[0]!r}, which is not in the template")
    elif isinstance(value, str) and "${" in value:
        raise ValueError(
            f"{where} holds {value!r}; bindings go in the stage's params or inputs as "
            "'<node>.<input>' keys, not in the template"
        )


def parse_key(key: str, where: str) -> tuple[str, str]:
    """`"sampler.steps"` -> (`"sampler"`, `"steps"`): the node reference and the input name."""
    node, dot, name = key.rpartition(".")
    if not dot or not node or not name:
        raise ValueError(
            f"{where} key {key!r} is not '<node>.<input>' (a node id or title, a dot, an input "
            "name)"
        )
    return node, name


def resolve_node(template: dict[str, Any], ref: str) -> str:
    """The id of the node `ref` names (an id, or a title exactly one node carries)."""
    titled = [node_id for node_id, node in template.items() if title_of(node) == ref]
    if ref in template:
        others = [node_id for node_id in titled if node_id != ref]
        if others:
            raise ValueError(
                f"{ref!r} is node {ref}'s id and also the title of node(s) "
                f"{', '.join(others)}; retitle one of them"
            )
        return ref
    if len(titled) == 1:
        return titled[0]
    if titled:
        raise ValueError(
            f"the title {ref!r} is carried by nodes {', '.join(titled)}; use a node id or give "
            "them distinct titles"
        )
    titles = sorted({t for t in (title_of(n) for n in template.values()) if t})
    raise ValueError(
        f"no node has the id or title {ref!r} (ids: {', '.join(template)}; titles: "
        f"{', '.join(map(repr, titles)) or 'none'})"
    )


def resolve_slot(template: dict[str, Any], key: str, where: str) -> InputSlot:
    """The node input a `params` or `inputs` key binds; `ValueError` naming what is wrong."""
    ref, name = parse_key(key, where)
    try:
        node_id = resolve_node(template, ref)
    except ValueError as exc:
        raise ValueError(f"{where} key {key!r}: {exc}") from None
    node = template[node_id]
    inputs = node["inputs"]
    if name not in inputs:
        known = ", ".join(map(repr, inputs)) or "none"
        raise ValueError(
            f"{where} key {key!r}: {node_label(template, node_id)} has no input {name!r} in the "
            f"template (its inputs: {known}); put a placeholder value there"
        )
    if isinstance(inputs[name], list):
        raise ValueError(
            f"{where} key {key!r}: {node_label(template, node_id)} input {name!r} is linked to "
            f"node {inputs[name][0]}; only literal inputs can be bound"
        )
    return InputSlot(node_id, name)


def is_literal(value: Any) -> bool:
    """A value ComfyUI takes as a widget value (a list would be read as a link)."""
    return isinstance(value, str | int | float | bool)


def for_each_input(stage: StageSpec) -> str | None:
    """The stage input key the graph runs over once per file (`params.for_each`), if any.

    `ValueError` unless it is a literal naming one of the stage's `inputs` keys: the template
    is one graph for one file, and the stage is that graph mapped over the input's files.
    """
    if FOR_EACH not in stage.params:
        return None
    value = stage.params[FOR_EACH]
    if not isinstance(value, str) or parse_binding(value) is not None:
        raise ValueError(
            f"params key {FOR_EACH!r} is {value!r}; it names one of the stage's `inputs` keys "
            "(such as 'load.image'), whose files the graph runs over one prompt at a time"
        )
    if value not in stage.inputs:
        known = ", ".join(map(repr, stage.inputs)) or "none"
        raise ValueError(
            f"params key {FOR_EACH!r} names {value!r}, which is not one of the stage's `inputs` "
            f"keys ({known})"
        )
    return value


def validate_stage(stage: StageSpec) -> None:
    """`ValueError` unless the stage is a runnable ComfyUI stage (checked at publish time)."""
    if stage.template is None:
        raise ValueError("comfyui stages carry their graph in `template` (ComfyUI's API format)")
    template = check_template(stage.template)
    bindings(stage, template)  # every key names one literal node input, once
    for_each_input(stage)
    for key, value in stage.params.items():
        if key == FOR_EACH:
            continue
        binding = parse_binding(value)
        if binding is not None and binding.scope != "settings":
            raise ValueError(
                f"params key {key!r} binds {value}; files are bound in `inputs`, which uploads "
                "them to the server"
            )
        if binding is None and not is_literal(value):
            raise ValueError(
                f"params key {key!r} is {type(value).__name__}; a node input takes text, a "
                "number or a boolean (ComfyUI would read a list as a link)"
            )
    if not stage.outputs:
        raise ValueError("a comfyui stage maps at least one output node in `outputs`")
    output_nodes(template, stage.outputs)


def bindings(stage: StageSpec, template: dict[str, Any]) -> dict[str, InputSlot]:
    """Every `params` and `inputs` key of the stage, with the node input it binds.

    Two keys binding the same node input (`3.seed` and `sampler.seed`) are refused: which one
    wins would depend on the order of the file.
    """
    slots: dict[str, InputSlot] = {}
    owners: dict[InputSlot, str] = {}
    for where, keys in (("params", stage.params), ("inputs", stage.inputs)):
        for key in keys:
            if where == "params" and key == FOR_EACH:
                continue  # not a node input: which input the graph is mapped over
            slot = resolve_slot(template, key, where)
            if slot in owners:
                raise ValueError(
                    f"{where} key {key!r} and {owners[slot]!r} both bind "
                    f"{node_label(template, slot.node)} input {slot.input!r}"
                )
            owners[slot] = f"{where} key {key!r}"
            slots[f"{where}:{key}"] = slot
    return slots


def output_nodes(template: dict[str, Any], outputs: dict[str, str | None]) -> dict[str, str]:
    """Stage output name -> the id of the node whose files it collects."""
    found: dict[str, str] = {}
    for key in outputs:
        try:
            node_id = resolve_node(template, key)
        except ValueError as exc:
            raise ValueError(f"outputs key {key!r}: {exc}") from None
        twin = next((other for other, seen in found.items() if seen == node_id), None)
        if twin is not None:
            raise ValueError(
                f"outputs keys {twin!r} and {key!r} both name {node_label(template, node_id)}"
            )
        found[key] = node_id
    return found


def build_prompt(
    template: dict[str, Any],
    stage: StageSpec,
    params: dict[str, Any],
    uploaded: dict[str, str],
) -> dict[str, Any]:
    """A deep copy of the template with `params` (resolved) and uploaded file names bound in.

    `uploaded` maps each stage input key to the value its node input takes (the name ComfyUI gave
    the upload). Raises `ValueError` for a key that names no node input or a value ComfyUI cannot
    take; the caller turns it into a permanent failure.
    """
    prompt = copy.deepcopy(template)
    slots = bindings(stage, template)
    for key, value in params.items():
        if key == FOR_EACH:
            continue
        if not is_literal(value):
            raise ValueError(
                f"params key {key!r} resolved to {type(value).__name__} {value!r:.60}; a node "
                "input takes text, a number or a boolean"
            )
        slot = slots.get(f"params:{key}") or resolve_slot(template, key, "params")
        prompt[slot.node]["inputs"][slot.input] = value
    for key, value in uploaded.items():
        slot = slots[f"inputs:{key}"]
        prompt[slot.node]["inputs"][slot.input] = value
    return prompt


def safe_file_name(name: str, fallback_extension: str, taken: set[str]) -> str:
    """A local file name for a file the server named `name`: no directories, no leading dot, only
    plain characters, bounded in length, and not one of `taken` (which it is added to).

    The server's name is never trusted: it only lends its stem and extension.
    """
    base = re.split(r"[\\/]", name)[-1]
    stem, dot, extension = base.rpartition(".")
    if not dot:
        stem, extension = base, ""
    extension = f".{extension.lower()}"
    if not _EXTENSION.match(extension):
        extension = fallback_extension if _EXTENSION.match(fallback_extension) else ""
    stem = _UNSAFE_CHARS.sub("_", stem).strip("._-")[:_MAX_STEM] or "output"
    candidate = f"{stem}{extension}"
    counter = 2
    while candidate in taken:
        candidate = f"{stem}-{counter}{extension}"
        counter += 1
    taken.add(candidate)
    return candidate
