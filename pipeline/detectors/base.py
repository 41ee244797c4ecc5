"""What every face detector shares: the Face record, the FaceDetector interface, a base class, and
the geometry between a frame and a detection image (downscaling, mapping back, NMS).

Coordinates everywhere are continuous pixel coordinates of the frame that was passed in
(x to the right, y down, origin at the top-left corner of the top-left pixel).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence, runtime_checkable

import cv2
import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort

    from pipeline.detect import DetectorConfig


@dataclass(frozen=True, eq=False)  # eq=False: dataclass equality would compare numpy arrays and raise
class Face:
    bbox: np.ndarray  # (4,) float32 x1, y1, x2, y2 in image pixels
    score: float
    landmarks: np.ndarray  # (5, 2) float32: left eye, right eye, nose, left mouth corner, right mouth
    #                        corner, where left/right are as seen in the image (smaller x first)

    @property
    def area(self) -> float:
        return float(max(self.bbox[2] - self.bbox[0], 0.0) * max(self.bbox[3] - self.bbox[1], 0.0))

    @property
    def center(self) -> tuple[float, float]:
        return float(self.bbox[0] + self.bbox[2]) / 2, float(self.bbox[1] + self.bbox[3]) / 2


@runtime_checkable
class FaceDetector(Protocol):
    name: str

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """rgb: uint8 (H, W, 3). Faces sorted by score, highest first; [] when there is none."""
        ...

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[list[Face]]:
        ...

    def providers(self) -> list[str]:
        ...


class OnnxFaceDetector:
    """Base class of the detectors: built from a DetectorConfig (all onnxruntime sessions in the
    constructor, no file I/O afterwards), pickled as that config (sessions do not pickle; the other
    side rebuilds), `detect(f)` = `detect_batch([f])[0]`.

    A subclass sets `name` (its registry name = its DetectorConfig field), `Settings` (its frozen
    settings dataclass), `self._session` (the session whose providers `providers()` reports) and
    implements `_detect_frames` (frames already checked to be RGB uint8).
    """

    name: ClassVar[str]
    Settings: ClassVar[type]
    config: DetectorConfig
    _session: ort.InferenceSession

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.config,))

    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def detect(self, rgb: np.ndarray) -> list[Face]:
        return self.detect_batch([rgb])[0]

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[list[Face]]:
        for frame in frames:
            check_frame(frame)
        return self._detect_frames(frames)

    def _detect_frames(self, frames: Sequence[np.ndarray]) -> list[list[Face]]:
        raise NotImplementedError


def check_frame(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        desc = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"expected an RGB uint8 frame of shape (H, W, 3), got {desc}")


def detection_view(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float, float]:
    """The frame downscaled so its longer side is <= max_side, and the x/y scale factors used."""
    height, width = rgb.shape[:2]
    if max(height, width) <= max_side:
        return rgb, 1.0, 1.0
    factor = max_side / max(height, width)
    new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
    small = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)
    return small, new_w / width, new_h / height


def faces_from_arrays(boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray,
                      scale_x: float, scale_y: float, frame_shape: tuple[int, ...]) -> list[Face]:
    """Map detection-image results back to the frame, clip boxes to it, sort by score."""
    height, width = frame_shape[:2]
    scale = np.array([scale_x, scale_y], dtype=np.float64)
    boxes = boxes.reshape(-1, 2, 2) / scale
    boxes[..., 0] = np.clip(boxes[..., 0], 0, width)
    boxes[..., 1] = np.clip(boxes[..., 1], 0, height)
    landmarks = landmarks.reshape(-1, 5, 2) / scale
    order = np.argsort(-scores, kind="stable")
    return [Face(bbox=boxes[i].reshape(4).astype(np.float32), score=float(scores[i]),
                 landmarks=landmarks[i].astype(np.float32)) for i in order]


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best first.

    mode "union" = IoU; "min" = intersection over the smaller box (MTCNN's last stage uses it to drop
    a small box nested inside a bigger one).
    """
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        inter = (np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]))
                 * np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest])))
        if mode == "min":
            overlap = inter / np.maximum(np.minimum(areas[best], areas[rest]), 1e-9)
        else:
            overlap = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-9)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)
