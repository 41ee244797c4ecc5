"""5-point face alignment to a square crop suited to facial EXPRESSION (not identity).

The reference is insightface's ArcFace template (five points in a 112x112 crop). That crop is tight:
it cuts through the brows' tops and the chin, which carry expression. We therefore shrink the
template toward the crop centre by 1 / (1 + margin): margin = 0 gives the ArcFace crop itself (at
any size), the default 0.3 makes the inter-ocular distance 77% of ArcFace's, so the whole face
(brows, chin, mouth) fits with a small border. A least-squares similarity transform (rotation,
uniform scale, translation; Umeyama 1991) maps the detected landmarks onto the template.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np

from pipeline.detectors.base import Face

# insightface.utils.face_align.arcface_dst: left eye, right eye, nose, left/right mouth corner
# (image left/right) in a 112x112 crop.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64)
FACE_SELECTIONS = ("largest", "central")


@dataclass(frozen=True)
class AlignConfig:
    size: int = field(default=224, metadata={"help": "side of the square face crop, pixels"})
    # The template is shrunk toward the crop centre by 1 / (1 + margin).
    margin: float = field(default=0.3, metadata={
        "help": "how much looser than ArcFace's crop: 0 = its tight recognition crop; 0.3 = the whole face with "
                "brows and chin and a thin border; larger values show more hair and background"})
    face_selection: str = field(default="largest", metadata={
        "help": "the face kept when a frame has several: largest (box area) or central (box centre nearest the "
                "frame centre)", "choices": FACE_SELECTIONS})

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"AlignConfig.size must be >= 16, got {self.size}")
        if self.margin <= -1.0:
            raise ValueError(f"AlignConfig.margin must be > -1, got {self.margin}")
        if self.face_selection not in FACE_SELECTIONS:
            raise ValueError(f"face_selection must be one of {FACE_SELECTIONS}, got {self.face_selection!r}")


def template_points(config: AlignConfig = AlignConfig()) -> np.ndarray:
    """(5, 2) float64 target landmark positions in the output crop."""
    unit = ARCFACE_TEMPLATE_112 / 112.0
    return (0.5 + (unit - 0.5) / (1.0 + config.margin)) * config.size


def _umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity transform mapping src points onto dst points (Umeyama 1991).

    Preferred over cv2.estimateAffinePartial2D, whose default RANSAC may ignore some of only five
    points and is not deterministic.
    """
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    reflection = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # keep a proper rotation, never a mirror image
        reflection[1, 1] = -1
    rotation = u @ reflection @ vt
    src_variance = (src_c ** 2).sum() / len(src)
    scale = (singular * np.diag(reflection)).sum() / src_variance
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def alignment_matrix(landmarks: np.ndarray, config: AlignConfig = AlignConfig()) -> np.ndarray:
    """2x3 float64 matrix mapping image coordinates to crop coordinates.

    Map points with `points @ M[:, :2].T + M[:, 2]` (or cv2.transform).
    """
    points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if points.shape != (5, 2) or not np.all(np.isfinite(points)):
        raise ValueError(f"expected 5 finite (x, y) landmarks, got array of shape {np.shape(landmarks)}")
    if np.ptp(points, axis=0).max() < 1e-6:
        raise ValueError("landmarks are degenerate (all at one point); cannot align")
    return _umeyama_similarity(points, template_points(config))


def align_face(rgb: np.ndarray, landmarks: np.ndarray, config: AlignConfig = AlignConfig()) -> np.ndarray:
    """(size, size, 3) uint8 crop of the face; areas outside the frame are black."""
    matrix = alignment_matrix(landmarks, config)
    return cv2.warpAffine(rgb, matrix, (config.size, config.size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def pick_face(faces: Sequence[Face], frame_shape: tuple[int, ...], selection: str = "largest") -> Face | None:
    """The one face to keep for a frame (interview videos show one subject), or None if there is none.

    "largest": biggest box area (the subject is usually closest to the camera);
    "central": box centre nearest the frame centre (when the interviewer is also visible and closer).
    Ties go to the higher score.
    """
    if selection not in FACE_SELECTIONS:
        raise ValueError(f"face selection must be one of {FACE_SELECTIONS}, got {selection!r}")
    if not faces:
        return None
    if selection == "largest":
        return max(faces, key=lambda f: (f.area, f.score))
    frame_cy, frame_cx = frame_shape[0] / 2, frame_shape[1] / 2

    def distance_sq(face: Face) -> float:
        cx, cy = face.center
        return (cx - frame_cx) ** 2 + (cy - frame_cy) ** 2

    return min(faces, key=lambda f: (distance_sq(f), -f.score))
