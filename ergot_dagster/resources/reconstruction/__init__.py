"""The reconstruction runtime: camera poses and a sparse point cloud from a set of images.

A local target runs COLMAP (the `pycolmap` wheel, on CPU): SIFT features, exhaustive or
sequential matching with geometric verification, incremental mapping. The engine runs in a worker
process of its own process group, killed at once when the run is cancelled or the stage deadline
passes. The adapter is `adapter.ReconstructionRuntime`; the formats are in docs/photogrammetry.md.
"""
