"""SCRFD (Guo et al. 2021) from an insightface model pack, with our own decoding of its outputs."""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np

from pipeline import onnx_sessions
from pipeline.detectors.base import Face, OnnxFaceDetector, detection_view, faces_from_arrays, nms

if TYPE_CHECKING:
    from pipeline.detect import DetectorConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScrfdSettings:
    model_path: str | None = field(default=None, metadata={
        "help": "a det_*.onnx file or a model-pack folder holding one (e.g. ~/.insightface/models/buffalo_l); "
                "needed with --detector-name scrfd (nothing is downloaded)"})
    det_size: int = field(default=640, metadata={"help": "network input (square, letterboxed); a multiple of 32"})
    nms_threshold: float = field(default=0.4, metadata={"help": "IoU of non-maximum suppression"})

    def __post_init__(self) -> None:
        if self.det_size < 32 or self.det_size % 32:
            raise ValueError(f"det_size must be a positive multiple of 32, got {self.det_size}")
        if not 0.0 < self.nms_threshold <= 1.0:
            raise ValueError(f"nms_threshold must be in (0, 1], got {self.nms_threshold}")


def resolve_scrfd_model(model_path: str | None) -> str:
    """A det_*.onnx file, or the one inside a model-pack folder (insightface's ~/.insightface/models/<pack>)."""
    if not model_path:
        raise ValueError("scrfd needs a model (--detector-scrfd-model-path, ScrfdSettings(model_path=...)): a "
                         "det_*.onnx file or an insightface model-pack folder such as "
                         "~/.insightface/models/buffalo_l (nothing is downloaded)")
    path = os.path.expanduser(model_path)
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "det_*.onnx")))
        if not found:
            raise ValueError(f"scrfd model folder {path!r} holds no det_*.onnx "
                             f"(it has: {sorted(os.listdir(path))[:10]})")
        if len(found) > 1:
            log.warning("scrfd model folder %s holds several detectors %s; using %s", path, found, found[0])
        return found[0]
    if not os.path.isfile(path):
        raise ValueError(f"scrfd model file not found: {path!r}")
    return path


class ScrfdDetector(OnnxFaceDetector):
    """SCRFD with our own decoding. Model I/O (insightface's export):

    input (1, 3, S, S) float32 RGB, (x - 127.5) / 128, the frame letterboxed into the top-left corner;
    outputs, in this order, one per FPN stride (8, 16, 32 with 2 anchors per location, or
    8..128 with 1): scores (K, 1), box distances (K, 4) and landmark distances (K, 10), K = anchors
    per stride, optionally with a leading batch axis of 1. Distances are in units of the stride,
    measured from the anchor centre (column * stride, row * stride): box = left, top, right, bottom;
    landmarks = x, y offsets of the five points. Anchors are ordered row-major, anchors of one
    location consecutive. 9 or 15 outputs = with landmarks; 6 or 10 (no landmarks) are refused,
    because alignment needs them.

    Batching: one session.run on (B, 3, S, S) only when the model has a dynamic batch axis on its
    input AND a batch axis on every output (exports made with insightface's scrfd2onnx.py after its
    PR #1781). The detectors in insightface's model packs (buffalo_l's det_10g, buffalo_s's
    det_500m, ...) have batch 1 fixed inside the graph and 2-D outputs, so for them `detect_batch`
    runs one frame per call (insightface issue #2878; re-exporting from the PyTorch checkpoint is
    the only fix).

    Why not insightface's own `model_zoo.scrfd.SCRFD` (2.1) around our session (its constructor takes
    `session=`): its `forward` runs one image per call and reads only element 0 of batched outputs,
    so it cannot batch frames; given a model file and a model with dynamic input size it builds its
    own static-shape sessions per input size (our providers, threads and CUDA check would not be the
    session that runs), and without the file it detects at two default sizes (128 and 640) unless
    `prepare(input_size=...)` is called; its NMS uses the legacy "+1 pixel" box areas; boxes are not
    clipped to the frame; it maps results back with the letterbox scale of the height (truncated to
    whole pixels) where we use the longer side's; it wants BGR; and importing it loads insightface's
    whole package (~820 modules: scipy, scikit-image, the face-analysis app). On frames whose
    letterbox scale is exact its boxes, scores and landmarks equal ours (tests/test_detect.py checks
    this). docs/DETECTION.md has the details.
    """

    name = "scrfd"
    Settings = ScrfdSettings

    def __init__(self, config: DetectorConfig):
        self.config, self.settings = config, config.scrfd
        det_size = self.settings.det_size
        self.model_file = resolve_scrfd_model(self.settings.model_path)
        self._session = onnx_sessions.create_session(self.model_file, config)
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        if len(model_input.shape) != 4:
            raise ValueError(f"{self.model_file}: expected an NCHW input, got shape {model_input.shape}")
        fixed = [d for d in model_input.shape[2:] if isinstance(d, int)]
        if fixed and any(d != det_size for d in fixed):
            raise ValueError(f"{self.model_file} has a fixed input size {model_input.shape[2:]}; set "
                             f"--detector-scrfd-det-size (ScrfdSettings(det_size=...)) to match it (got {det_size})")
        outputs = self._session.get_outputs()
        n_outputs = len(outputs)
        if n_outputs == 9:
            self._strides, anchors_per_location = (8, 16, 32), 2
        elif n_outputs == 15:
            self._strides, anchors_per_location = (8, 16, 32, 64, 128), 1
        elif n_outputs in (6, 10):
            raise ValueError(f"{self.model_file} is an SCRFD model without landmark outputs; alignment "
                             "needs the 5 landmarks: use a *_kps model or a model pack's det_*.onnx")
        else:
            raise ValueError(f"{self.model_file}: {n_outputs} outputs, not an SCRFD detector (expected 9 or 15)")
        # Batch frames only where the graph keeps images apart: a dynamic input batch axis and a batch
        # axis on every output. (2-D outputs of a batched call would mix the anchors of all images.)
        self.batched = (not isinstance(model_input.shape[0], int)
                        and all(len(o.shape) == 3 for o in outputs))
        self.batch_frames = onnx_sessions.batch_frames(config, self._session) if self.batched else 1
        # Anchor centres depend only on det_size: compute them once, not per frame.
        self._anchor_centres = {}
        for stride in self._strides:
            cells = det_size // stride
            ys, xs = np.mgrid[:cells, :cells]
            centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
            self._anchor_centres[stride] = np.repeat(centres, anchors_per_location, axis=0)

    def _detect_frames(self, frames: Sequence[np.ndarray]) -> list[list[Face]]:
        step = self.batch_frames
        results: list[list[Face]] = []
        for start in range(0, len(frames), step):
            part = frames[start:start + step]
            prepared = []
            for frame in part:
                image, scale_x, scale_y = detection_view(frame, self.config.max_image_side)
                blob, letterbox_scale = self._letterbox(image)
                # the letterbox scale is uniform, so it folds into the per-axis frame scale
                prepared.append((blob, scale_x * letterbox_scale, scale_y * letterbox_scale))
            outputs = self._session.run(None, {self._input_name: np.concatenate([p[0] for p in prepared])})
            for b, (frame, (_, scale_x, scale_y)) in enumerate(zip(part, prepared)):
                boxes, scores, landmarks = self._decode([o[b] if self.batched else o for o in outputs])
                keep = nms(boxes, scores, self.settings.nms_threshold)
                results.append(faces_from_arrays(boxes[keep], scores[keep], landmarks[keep],
                                                 scale_x, scale_y, frame.shape))
        return results

    def _letterbox(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        size = self.settings.det_size
        height, width = image.shape[:2]
        factor = size / max(height, width)
        new_w, new_h = max(1, int(width * factor)), max(1, int(height * factor))
        canvas = np.zeros((size, size, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
        blob = (canvas.astype(np.float32) - 127.5) / 128.0
        return np.ascontiguousarray(blob.transpose(2, 0, 1)[None]), new_w / width

    def _decode(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n_levels = len(self._strides)
        all_boxes, all_scores, all_landmarks = [], [], []
        for level, stride in enumerate(self._strides):
            centres = self._anchor_centres[stride]
            scores = outputs[level].reshape(-1)
            distances = outputs[level + n_levels].reshape(-1, 4)
            point_offsets = outputs[level + 2 * n_levels].reshape(-1, 5, 2)
            if not len(scores) == len(distances) == len(point_offsets) == len(centres):
                raise ValueError(f"{self.model_file}: stride {stride} outputs have {len(scores)} anchors, "
                                 f"expected {len(centres)} for det_size {self.settings.det_size}")
            hit = scores >= self.config.score_threshold
            centres = centres[hit]
            all_scores.append(scores[hit])
            all_boxes.append(np.hstack([centres - distances[hit, :2] * stride, centres + distances[hit, 2:] * stride]))
            all_landmarks.append(centres[:, None, :] + point_offsets[hit] * stride)
        return np.vstack(all_boxes), np.concatenate(all_scores), np.vstack(all_landmarks)
