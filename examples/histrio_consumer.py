"""Histrio's side of the plane: the episode-segment chain, using only `ergot_dagster.client`.

Run it against a running plane (`make dev` in another terminal):

    .venv/bin/python examples/histrio_consumer.py [--url http://127.0.0.1:3000] [--json]

It takes a recording and a portrait that Ergot has ingested (by default the demo media that
`make dev` ingests) and asks the plane, one request at a time, each naming the artifacts of the
ones before:

    recording -> voice_prompt_extraction -> clip, transcript
              clip promoted as voices/<name>                  (a library entry, immutable)
    voices/<name> -> tts_synthesis (the script)  -> speech
    speech -> transcribe                          -> what the speech says, to check it
    portrait -> face_embedding                    -> faces, crops, embeddings
    portrait -> seed_scene_prep (a prompt)        -> seed
    seed + speech -> motion_generation            -> clip (a talking-head segment)
    speech + segments -> segment_assembly         -> video (MP4), report
    video -> poster_extraction, media_qc          -> poster, poster_info, report

Request ids are derived from the inputs, so running the script again returns the same runs and
artifacts instead of doing the work twice; the voice is promoted once and reused after.
Histrio's editorial state stays in Histrio: all it keeps from here are artifact refs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import wave
from typing import Any

from ergot_dagster.client import ErgotClient, LineageNode, RunStatus, UnknownLibraryEntryError

RECORDING = "demo/voice/narrator take 1.wav"
PORTRAIT = "demo/people/astronaut.png"
SCRIPT = "Welcome back. Tonight the river reaches the sea, and the village gathers on the shore."
SCENE_PROMPT = "a narrator on a river bank at dusk, cinematic light"


def request_id(step: str, *parts: str) -> str:
    """A request id that names the step and the exact inputs: the same ask gets the same run."""
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return f"histrio-example.{step.replace('_', '-')}.{digest}"


class Chain:
    """Submits one request per step and keeps what each produced, by artifact name."""

    def __init__(self, plane: ErgotClient, timeout_s: float, quiet: bool) -> None:
        self.plane = plane
        self.timeout_s = timeout_s
        self.quiet = quiet
        self.runs: dict[str, RunStatus] = {}

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr)

    def run(
        self,
        step: str,
        workflow: str,
        primary: str,
        inputs: dict[str, str | list[str]] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> dict[str, str]:
        """Run `workflow` on `primary`; artifact name -> ref. Exits if the run did not succeed."""
        inputs = inputs or {}
        settings = settings or {}
        key = json.dumps([workflow, primary, inputs, settings], sort_keys=True)
        handle = self.plane.submit(
            {
                "request_id": request_id(step, key),
                "workflow": workflow,
                "sources": {"primary": primary, "inputs": inputs},
                "settings": settings,
                "context": {"histrio_step": step},
            }
        )
        status = self.plane.wait(handle.run_id, timeout_s=self.timeout_s)
        self.runs[step] = status
        if status.status != "SUCCESS":
            reason = status.error.message if status.error else status.status
            raise SystemExit(f"{step} ({workflow}) ended {status.status}: {reason}")
        refs = {a.name: a.ref for a in status.artifacts if a.ref}
        self.say(f"{step:<16} {workflow:<26} run {status.run_id}  {', '.join(sorted(refs))}")
        return refs


def speech_seconds(plane: ErgotClient, ref: str) -> float:
    """The length of a WAV artifact, read from its header as the bytes stream in."""
    with plane.open_artifact(ref) as handle, wave.open(handle) as audio:
        return audio.getnframes() / audio.getframerate()


def voice_entry(plane: ErgotClient, name: str, clip: str) -> str:
    """The library ref of the narrator's voice: promoted from `clip`, or reused if it is."""
    try:
        entry = plane.library_entry(f"voices/{name}")
    except UnknownLibraryEntryError:
        entry = plane.promote(clip, library="voices", name=name, note="episode narrator")
    return entry.ref


def lineage_sources(node: LineageNode) -> list[dict[str, str]]:
    """The ingested files at the roots of a lineage tree, with their sha256."""
    if node.kind == "source":
        return [{"ref": node.ref, "sha256": node.sha256, "status": node.status}]
    found: list[dict[str, str]] = []
    for parent in node.parents:
        for source in lineage_sources(parent):
            if source not in found:
                found.append(source)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the plane's webserver")
    parser.add_argument("--recording", default=RECORDING, help="an ingested speech recording")
    parser.add_argument("--portrait", default=PORTRAIT, help="an ingested portrait image")
    parser.add_argument("--voice-name", default="narrator-01", help="the voices library entry")
    parser.add_argument("--script", default=SCRIPT, help="what the narrator says")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per step")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)

    with ErgotClient(args.url) as plane:
        chain = Chain(plane, args.timeout, quiet=False)
        prompt = chain.run(
            "voice_prompt",
            "voice_prompt_extraction",
            args.recording,
            settings={"target_s": 6, "min_s": 2, "max_s": 12},
        )
        voice = voice_entry(plane, args.voice_name, prompt["clip"])
        chain.say(f"{'voice':<16} promoted {prompt['clip']} as {voice}")
        speech = chain.run(
            "tts",
            "tts_synthesis",
            voice,
            inputs={"voice_transcript": prompt["transcript"]},
            settings={"text": args.script},
        )
        heard = chain.run(
            "speech_check", "transcribe", speech["speech"], settings={"language": "en"}
        )
        faces = chain.run("faces", "face_embedding", args.portrait)
        seed = chain.run(
            "seed", "seed_scene_prep", args.portrait, settings={"prompt": SCENE_PROMPT}
        )
        # Enough frames to cover the speech: the clip then ends with it.
        fps = 8
        frames = math.ceil(speech_seconds(plane, speech["speech"]) * fps) + 1
        motion = chain.run(
            "motion",
            "motion_generation",
            seed["seed"],
            inputs={"audio": speech["speech"]},
            settings={"fps": fps, "frames": frames, "width": 768, "height": 432},
        )
        assembly = chain.run(
            "assembly",
            "segment_assembly",
            speech["speech"],
            inputs={"segments": [motion["clip"]]},
        )
        poster = chain.run("poster", "poster_extraction", assembly["video"])
        qc = chain.run("qc", "media_qc", assembly["video"])

        final = plane.lineage(assembly["video"])
        document = {
            "voice": voice,
            "artifacts": {
                "voice_prompt": prompt,
                "speech": speech,
                "speech_transcript": heard,
                "faces": faces,
                "seed": seed,
                "motion": motion,
                "assembly": assembly,
                "poster": poster,
                "qc": qc,
            },
            "runs": {step: status.run_id for step, status in chain.runs.items()},
            "lineage": final.model_dump(mode="json"),
            "sources": lineage_sources(final),
        }
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print(f"\nfinal segment {assembly['video']}  poster {poster['poster']}")
    print("its lineage, down to the ingested files:")
    print_tree(final)
    return 0


def print_tree(node: LineageNode, depth: int = 0) -> None:
    what = node.workflow or node.media_type or ""
    arrow = "<- " if depth else ""
    print(f"{'    ' * depth}{arrow}{node.kind} {node.ref}  {what}  {node.sha256[:16]}")
    for parent in node.parents:
        print_tree(parent, depth + 1)


if __name__ == "__main__":
    sys.exit(main())
