"""The Studio runtime: a media server behind the plane (TTS, voice prompts, ...) over JSON/HTTP.

The wire protocol is described in docs/studio-protocol.md; the adapter is `adapter.StudioRuntime`.
"""
