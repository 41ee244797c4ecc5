"""Face detectors on real photos (MTCNN) and on a self-built ONNX graph in SCRFD's output format
(no SCRFD weights exist offline); GPU requests on this CPU-only machine; batched == per-frame."""
from __future__ import annotations

import logging
import pickle
import warnings

import cv2
import numpy as np
import onnxruntime as ort
import pytest

import pipeline.onnx_sessions as sessions_module
from pipeline.detect import (CPU_PROVIDER, CUDA_PROVIDER, DETECTORS, DetectorConfig, Face, FaceDetector,
                             GpuUnavailableError, MtcnnDetector, MtcnnSettings, ScrfdDetector, ScrfdSettings,
                             make_detector, select_providers)
from tests.conftest import face_frames

# Rough face boxes in t1.jpg (x1, y1, x2, y2), read off a visual check of the detections; used only
# to assert that each of the six faces is found once (centre match), not for box precision.
T1_FACE_CENTRES = [(960, 130), (111, 331), (518, 333), (319, 208), (795, 410), (1179, 336)]
ASTRONAUT_FACE_CENTRE = (220, 118)


def _scrfd(model_path: str | None = None, det_size: int = 640, **common) -> DetectorConfig:
    return DetectorConfig(name="scrfd", scrfd=ScrfdSettings(model_path=model_path, det_size=det_size), **common)


@pytest.fixture(scope="module")
def mtcnn() -> MtcnnDetector:
    return make_detector(DetectorConfig())


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """pipeline.onnx_sessions says each CPU-fallback warning once per process; every test starts afresh."""
    monkeypatch.setattr(sessions_module, "_warned", set())


def _assert_sane(faces: list[Face], threshold: float) -> None:
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    for face in faces:
        assert face.bbox.shape == (4,) and face.bbox.dtype == np.float32
        assert face.landmarks.shape == (5, 2) and face.landmarks.dtype == np.float32
        assert face.score >= threshold
        x1, y1, x2, y2 = face.bbox
        assert x2 > x1 and y2 > y1
        assert np.all((face.landmarks[:, 0] > x1) & (face.landmarks[:, 0] < x2)), "landmark outside its box"
        assert np.all((face.landmarks[:, 1] > y1) & (face.landmarks[:, 1] < y2)), "landmark outside its box"
        left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
        assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0], "left/right are image left/right"
        assert max(left_eye[1], right_eye[1]) < min(mouth_left[1], mouth_right[1]), "eyes above the mouth"


def _match_centres(faces: list[Face], centres, tolerance: float) -> None:
    """Each expected face centre is matched by exactly one detection and no detection is left over."""
    assert len(faces) == len(centres), [f.bbox.round() for f in faces]
    for cx, cy in centres:
        hits = [f for f in faces if abs(f.center[0] - cx) < tolerance and abs(f.center[1] - cy) < tolerance]
        assert len(hits) == 1, f"face at {(cx, cy)} matched {len(hits)} detections"


def test_mtcnn_finds_six_faces_in_t1(mtcnn, t1_rgb):
    faces = mtcnn.detect(t1_rgb)
    _assert_sane(faces, 0.9)
    _match_centres(faces, T1_FACE_CENTRES, tolerance=30)
    assert all(f.score > 0.99 for f in faces)


def test_mtcnn_finds_astronaut(mtcnn, astronaut_rgb):
    faces = mtcnn.detect(astronaut_rgb)
    _assert_sane(faces, 0.9)
    _match_centres(faces, [ASTRONAUT_FACE_CENTRE], tolerance=20)
    width = faces[0].bbox[2] - faces[0].bbox[0]
    assert 70 < width < 110


def test_mtcnn_no_faces_in_blank_frames(mtcnn):
    assert mtcnn.detect(np.zeros((480, 640, 3), np.uint8)) == []
    assert mtcnn.detect(np.full((480, 640, 3), 255, np.uint8)) == []
    assert mtcnn.detect(np.zeros((8, 8, 3), np.uint8)) == []  # smaller than one P-Net cell
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    assert mtcnn.detect(noise) == []


def test_mtcnn_huge_frame_is_downscaled_and_mapped_back(mtcnn, astronaut_rgb):
    # 4000x3000 frame: the astronaut scaled to 3000x3000 and pasted at x = 700.
    factor, offset_x = 3000 / 512, 700
    frame = np.zeros((3000, 4000, 3), np.uint8)
    frame[:, offset_x:offset_x + 3000] = cv2.resize(astronaut_rgb, (3000, 3000), interpolation=cv2.INTER_CUBIC)
    faces = mtcnn.detect(frame)
    _assert_sane(faces, 0.9)
    reference = mtcnn.detect(astronaut_rgb)[0]
    expected_box = reference.bbox * factor + np.array([offset_x, 0, offset_x, 0])
    expected_landmarks = reference.landmarks * factor + np.array([offset_x, 0])
    assert len(faces) == 1
    face_width = expected_box[2] - expected_box[0]  # ~500 px at full resolution
    assert np.abs(faces[0].bbox - expected_box).max() < 0.1 * face_width
    assert np.abs(faces[0].landmarks - expected_landmarks).max() < 0.06 * face_width


def test_mtcnn_rejects_non_rgb_input(mtcnn):
    with pytest.raises(ValueError, match="RGB uint8"):
        mtcnn.detect(np.zeros((100, 100), np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        mtcnn.detect(np.zeros((100, 100, 3), np.float32))


def test_detector_interface_batch_and_pickle(mtcnn, astronaut_rgb):
    assert isinstance(mtcnn, FaceDetector) and mtcnn.name == "mtcnn"
    assert mtcnn.providers() == [CPU_PROVIDER]
    batch = mtcnn.detect_batch([astronaut_rgb, np.zeros_like(astronaut_rgb)])
    assert len(batch) == 2 and len(batch[0]) == 1 and batch[1] == []
    # Ray ships configs (and may ship detectors) to actors: both must survive pickling.
    config = pickle.loads(pickle.dumps(mtcnn.config))
    assert config == mtcnn.config
    clone = pickle.loads(pickle.dumps(mtcnn))
    np.testing.assert_allclose(clone.detect(astronaut_rgb)[0].bbox, batch[0][0].bbox)


def test_make_detector_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown face detector 'retinaface'"):
        make_detector(DetectorConfig(name="retinaface"))
    with pytest.raises(ValueError, match="scrfd needs a model \\(--detector-scrfd-model-path"):
        make_detector(DetectorConfig(name="scrfd"))
    with pytest.raises(ValueError, match="not found"):
        make_detector(_scrfd(model_path=str(tmp_path / "nope.onnx")))
    with pytest.raises(ValueError, match="no det_\\*.onnx"):
        make_detector(_scrfd(model_path=str(tmp_path)))
    with pytest.raises(ValueError, match="mtcnn model file"):
        make_detector(DetectorConfig(name="mtcnn", mtcnn=MtcnnSettings(model_path=str(tmp_path))))
    with pytest.raises(ValueError, match="min_face_size"):
        MtcnnSettings(min_face_size=5)
    with pytest.raises(ValueError, match="det_size"):
        ScrfdSettings(det_size=100)
    with pytest.raises(ValueError, match="must be a ScrfdSettings"):
        DetectorConfig(scrfd={"det_size": 640})


needs_cpu_only_onnxruntime = pytest.mark.skipif(
    CUDA_PROVIDER in ort.get_available_providers(), reason="this machine has CUDA; the test is about its absence")


@needs_cpu_only_onnxruntime
def test_select_providers_on_cpu_machine(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.onnx_sessions"):
        assert select_providers(False) == [CPU_PROVIDER]
    assert not caplog.records
    with pytest.raises(GpuUnavailableError, match="offers no CUDAExecutionProvider"):
        select_providers(True)
    with caplog.at_level(logging.WARNING, logger="pipeline.onnx_sessions"):
        assert select_providers(True, allow_cpu_fallback=True) == [CPU_PROVIDER]
    assert any("use_gpu=True" in r.getMessage() and "will run on CPU" in r.getMessage() for r in caplog.records)


@needs_cpu_only_onnxruntime
@pytest.mark.parametrize("name", ["mtcnn", "scrfd"])
def test_gpu_request_without_cuda_provider_is_refused(tmp_path, name):
    model_path = None
    if name == "scrfd":
        model_path = str(tmp_path / "det_stub.onnx")
        _write_scrfd_onnx(model_path, 128, _scrfd_outputs(128, _known_faces()))
    with pytest.raises(GpuUnavailableError) as error:
        make_detector(DetectorConfig(name=name, scrfd=ScrfdSettings(model_path=model_path, det_size=128),
                                     use_gpu=True))
    message = str(error.value)
    assert isinstance(error.value, RuntimeError)
    for needed in ("CUDAExecutionProvider", "make gpu-install", "onnxruntime-gpu", "--detector-allow-cpu-fallback"):
        assert needed in message, needed


@needs_cpu_only_onnxruntime
def test_gpu_request_with_cpu_fallback_allowed_warns_and_runs_on_cpu(caplog, astronaut_rgb):
    with caplog.at_level(logging.WARNING, logger="pipeline.onnx_sessions"):
        detector = make_detector(DetectorConfig(use_gpu=True, allow_cpu_fallback=True))
    assert detector.providers() == [CPU_PROVIDER]
    assert any(r.levelno == logging.WARNING and "will run on CPU" in r.getMessage() for r in caplog.records)
    reference = make_detector(DetectorConfig()).detect(astronaut_rgb)
    faces = detector.detect(astronaut_rgb)
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].bbox, reference[0].bbox)


@needs_cpu_only_onnxruntime
def test_session_that_silently_falls_back_to_cpu_is_refused(monkeypatch, caplog):
    """onnxruntime offers CUDA but the session comes up on CPU (what a missing libcudnn does): refused,
    after trying to preload the CUDA libraries. Simulated on the CPU package: the provider list is made
    to claim CUDA, and the real InferenceSession then drops the provider it cannot load."""
    calls = []
    monkeypatch.setattr(sessions_module.ort, "get_available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    monkeypatch.setattr(sessions_module.ort, "preload_dlls", lambda: (calls.append(1), print("Failed to load libcudnn.so.9"))[0],
                        raising=False)
    monkeypatch.setattr(sessions_module, "_preload_report", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # onnxruntime: "Specified provider ... is not in available"
        with pytest.raises(GpuUnavailableError, match="FELL BACK TO CPU") as error:
            make_detector(DetectorConfig(use_gpu=True))
        assert calls == [1], "preload_dlls must run before the CUDA session is created"
        assert "Failed to load libcudnn.so.9" in str(error.value)  # what preload_dlls printed is in the error
        assert "make gpu-install" in str(error.value)
        with caplog.at_level(logging.WARNING, logger="pipeline.onnx_sessions"):
            detector = make_detector(DetectorConfig(use_gpu=True, allow_cpu_fallback=True))
    assert detector.providers() == [CPU_PROVIDER]
    assert calls == [1], "preloading happens once per process"
    assert any("FELL BACK TO CPU" in r.getMessage() for r in caplog.records)


def test_runtime_fields_and_cli_help():
    """RUNTIME_FIELDS name real fields that only choose the device / speed, and every field has help text,
    the detectors' own settings too (jobs/preprocess.py exposes them as --detector-<name>[-<detector>]-<field>)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(DetectorConfig)}
    assert set(DetectorConfig.RUNTIME_FIELDS) <= names
    assert set(DetectorConfig.RUNTIME_FIELDS) == {"use_gpu", "allow_cpu_fallback", "intra_op_threads", "batch_frames"}
    assert "RUNTIME_FIELDS" not in names  # a ClassVar, not a field: not in configs, hashes, or argv
    assert all(f.metadata.get("help") for f in dataclasses.fields(DetectorConfig))
    for settings in (MtcnnSettings, ScrfdSettings):
        assert all(f.metadata.get("help") for f in dataclasses.fields(settings)), settings
        with pytest.raises(dataclasses.FrozenInstanceError):
            settings().model_path = "x"  # type: ignore[misc]
    with pytest.raises(ValueError, match="batch_frames"):
        DetectorConfig(batch_frames=-1)


def test_the_registry_is_detector_config_s_detector_fields():
    """One line per detector: the DetectorConfig field names it, holds its settings and names its class."""
    import dataclasses

    assert DETECTORS == {"mtcnn": MtcnnDetector, "scrfd": ScrfdDetector}
    fields = {f.name: f for f in dataclasses.fields(DetectorConfig)}
    assert tuple(fields["name"].metadata["choices"]) == ("mtcnn", "scrfd")  # --detector-name's choices
    assert fields["scrfd"].metadata["detector"] is ScrfdDetector
    config = DetectorConfig(name="scrfd", scrfd=ScrfdSettings(det_size=320))
    assert config.settings == ScrfdSettings(det_size=320) and config.mtcnn == MtcnnSettings()


def test_configs_stored_before_the_detectors_had_their_own_settings_still_load():
    """config.json of older shard sets and older registered models hold one flat DetectorConfig."""
    import dataclasses

    flat = {"name": "scrfd", "model_path": "/models/buffalo_l", "det_size": 320, "min_face_size": 20,
            "score_threshold": 0.5, "max_image_side": 640, "use_gpu": True, "nms_threshold": 0.3,
            "intra_op_threads": 1, "allow_cpu_fallback": False, "batch_frames": 0}
    config = DetectorConfig.from_dict(flat)
    assert config == DetectorConfig(name="scrfd", score_threshold=0.5, use_gpu=True, mtcnn=MtcnnSettings(min_face_size=20),
                                    scrfd=ScrfdSettings(model_path="/models/buffalo_l", det_size=320, nms_threshold=0.3))
    assert DetectorConfig.from_dict(dataclasses.asdict(config)) == config  # today's nested form
    # model_path belonged to the chosen detector
    assert DetectorConfig.from_dict({"name": "mtcnn", "model_path": "/w"}).mtcnn.model_path == "/w"
    # what the content hash sees is the flat dict of old (without the runtime fields)
    assert config.content() == {k: v for k, v in flat.items() if k not in DetectorConfig.RUNTIME_FIELDS}


# ---------------------------------------------------------------------------------------------
# Batched detection gives the per-frame results


def _assert_same_faces(batched: list[list[Face]], single: list[list[Face]]) -> None:
    assert [len(f) for f in batched] == [len(f) for f in single]
    for frame_batched, frame_single in zip(batched, single):
        for a, b in zip(frame_batched, frame_single):
            np.testing.assert_allclose(a.bbox, b.bbox, atol=1e-2)
            np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-2)
            assert a.score == pytest.approx(b.score, abs=1e-5)


def test_mtcnn_batch_equals_per_frame(make_video, t1_rgb, astronaut_rgb):
    """Frames of a real H.264 clip (one decoded chunk: one size, the batched P-Net path) plus photos of
    other sizes, a blank frame and a frame smaller than a P-Net cell, all in one call."""
    from pipeline.decode import SamplingConfig, iter_frame_chunks

    clip = make_video("face.mp4", n_frames=12, width=320, height=240, frames=list(face_frames(astronaut_rgb, 12)))
    chunk = next(iter_frame_chunks(str(clip), SamplingConfig(mode="every_n", every_n=1, chunk_frames=12)))
    frames = list(chunk.frames) + [t1_rgb, astronaut_rgb, np.zeros((240, 320, 3), np.uint8),
                                   np.zeros((8, 8, 3), np.uint8), list(face_frames(t1_rgb, 1, 640, 480))[0]]
    one_by_one = make_detector(DetectorConfig(batch_frames=1))
    single = [one_by_one.detect(f) for f in frames]
    assert sum(len(f) > 0 for f in single[:12]) == 12 and len(single[12]) == 6 and single[15] == []
    for batch_frames in (32, 5):  # one batch; batches that split the chunk
        batched = make_detector(DetectorConfig(batch_frames=batch_frames)).detect_batch(frames)
        _assert_same_faces(batched, single)
    assert make_detector(DetectorConfig()).batch_frames == 1  # auto on CPU: frame by frame (measured no faster)


# ---------------------------------------------------------------------------------------------
# SCRFD: a constant-output ONNX graph in det_10g.onnx's layout encodes known faces.

SCRFD_STRIDES = (8, 16, 32)
SCRFD_ANCHORS = 2


def _scrfd_outputs(det_size: int, faces: list[dict]) -> list[np.ndarray]:
    """Raw SCRFD outputs (scores, box distances, landmark distances per stride) encoding `faces`.

    Each face dict: stride, col, row, anchor, score, box (x1, y1, x2, y2), landmarks (5, 2), all in
    detection-input pixels.
    """
    scores, boxes, points = [], [], []
    for stride in SCRFD_STRIDES:
        count = (det_size // stride) ** 2 * SCRFD_ANCHORS
        scores.append(np.full((count, 1), 0.01, np.float32))
        boxes.append(np.ones((count, 4), np.float32))
        points.append(np.zeros((count, 10), np.float32))
    for face in faces:
        level = SCRFD_STRIDES.index(face["stride"])
        stride, cells = face["stride"], det_size // face["stride"]
        index = (face["row"] * cells + face["col"]) * SCRFD_ANCHORS + face["anchor"]
        centre = np.array([face["col"] * stride, face["row"] * stride], np.float32)
        x1, y1, x2, y2 = face["box"]
        scores[level][index] = face["score"]
        boxes[level][index] = np.array([centre[0] - x1, centre[1] - y1, x2 - centre[0], y2 - centre[1]]) / stride
        points[level][index] = ((np.asarray(face["landmarks"], np.float32) - centre) / stride).reshape(10)
    return scores + boxes + points


def _write_scrfd_onnx(path, det_size: int, outputs: list[np.ndarray], batched: bool = False) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, graph_outputs = [], []
    for i, value in enumerate(outputs):
        value = value[None] if batched else value
        name = f"out_{i}"
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_value")))
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph_input = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, det_size, det_size])
    graph = helper.make_graph(nodes, "scrfd_stub", [graph_input], graph_outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _known_faces():
    """Two faces in 128x128 detection-input pixels, plus a weaker duplicate that NMS must drop.

    All lie above y = 96: the tests letterbox 4:3 frames, so rows 96..128 are padding."""
    big = dict(stride=16, col=4, row=3, anchor=0, score=0.97, box=(40.0, 20.0, 90.0, 80.0),
               landmarks=[[52, 42], [78, 42], [65, 55], [55, 68], [75, 68]])
    duplicate = dict(big, anchor=1, score=0.93, box=(42.0, 22.0, 91.0, 81.0))
    small = dict(stride=8, col=12, row=9, anchor=1, score=0.92, box=(88.0, 60.0, 108.0, 84.0),
                 landmarks=[[93, 68], [103, 68], [98, 73], [94, 78], [102, 78]])
    return [big, duplicate, small]


@pytest.mark.parametrize("batched", [False, True])
def test_scrfd_decodes_known_faces(tmp_path, batched):
    det_size = 128
    pack = tmp_path / "stub_pack"
    pack.mkdir()
    _write_scrfd_onnx(pack / "det_stub.onnx", det_size, _scrfd_outputs(det_size, _known_faces()), batched)

    detector = make_detector(_scrfd(model_path=str(pack), det_size=det_size,
                                            score_threshold=0.5))
    assert isinstance(detector, ScrfdDetector) and detector.providers() == [CPU_PROVIDER]
    # A 256x192 frame is letterboxed into 128x128 at scale 0.5, so frame coords = input coords * 2.
    faces = detector.detect(np.zeros((192, 256, 3), np.uint8))
    assert [round(f.score, 2) for f in faces] == [0.97, 0.92]
    big, _, small = _known_faces()
    for face, expected in zip(faces, (big, small)):
        np.testing.assert_allclose(face.bbox, np.array(expected["box"]) * 2, atol=1e-3)
        np.testing.assert_allclose(face.landmarks, np.array(expected["landmarks"]) * 2, atol=1e-3)

    # score_threshold drops the smaller face
    strict = make_detector(_scrfd(model_path=str(pack / "det_stub.onnx"),
                                          det_size=det_size, score_threshold=0.95))
    assert len(strict.detect(np.zeros((192, 256, 3), np.uint8))) == 1


def test_scrfd_large_frame_and_size_errors(tmp_path):
    det_size = 128
    path = tmp_path / "det_stub.onnx"
    _write_scrfd_onnx(path, det_size, _scrfd_outputs(det_size, _known_faces()))
    # 1280x960 frame: max_image_side 640 halves it, the letterbox halves again -> factor 10 overall.
    detector = make_detector(_scrfd(model_path=str(path), det_size=det_size,
                                            score_threshold=0.5, max_image_side=640))
    faces = detector.detect(np.zeros((960, 1280, 3), np.uint8))
    np.testing.assert_allclose(faces[0].bbox, np.array(_known_faces()[0]["box"]) * 10, atol=1e-2)

    with pytest.raises(ValueError, match="fixed input size"):
        make_detector(_scrfd(model_path=str(path), det_size=640))

    no_kps = tmp_path / "det_nokps.onnx"
    _write_scrfd_onnx(no_kps, det_size, _scrfd_outputs(det_size, [])[:6])
    with pytest.raises(ValueError, match="without landmark"):
        make_detector(_scrfd(model_path=str(no_kps), det_size=det_size))


def _write_scrfd_onnx_gated(path, det_size: int, outputs: list[np.ndarray], batch_axis: bool = True) -> None:
    """SCRFD-format graph whose scores depend on the picture: every score of `outputs` is multiplied by
    (mean of the input's channel 0 + 1) / 2, i.e. ~1 for a red frame filling the letterbox and ~0 for a
    frame without red. Input (N, 3, S, S) with a dynamic N and outputs (N, K, C) when batch_axis (the
    layout of SCRFD exports with a batch axis); else input (1, 3, S, S) and 2-D outputs (K, C) (the
    layout of the detectors in insightface's model packs)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name + "_v"))

    nodes = [const("starts", np.array([0], np.int64)), const("ends", np.array([1], np.int64)),
             const("axes", np.array([1], np.int64)), const("one", np.array(1.0, np.float32)),
             const("half", np.array(0.5, np.float32)), const("zero", np.array(0.0, np.float32)),
             const("gain_shape", np.array([-1, 1, 1], np.int64)),
             helper.make_node("Slice", ["input.1", "starts", "ends", "axes"], ["red"]),
             helper.make_node("ReduceMean", ["red"], ["red_mean"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Reshape", ["red_mean", "gain_shape"], ["red_n11"]),
             helper.make_node("Add", ["red_n11", "one"], ["red_plus"]),
             helper.make_node("Mul", ["red_plus", "half"], ["gain"]),
             helper.make_node("Mul", ["red_n11", "zero"], ["nothing"])]
    n_levels = len(outputs) // 3
    graph_outputs = []
    for i, value in enumerate(outputs):
        nodes.append(const(f"base_{i}", value[None]))
        name = f"out_{i}" if batch_axis else f"out3_{i}"
        op_inputs = ["gain", f"base_{i}"] if i < n_levels else ["nothing", f"base_{i}"]
        nodes.append(helper.make_node("Mul" if i < n_levels else "Add", op_inputs, [name]))
        if batch_axis:
            shape = ["N", *value.shape]
        else:
            nodes.append(const(f"flat_{i}", np.array(value.shape, np.int64)))
            nodes.append(helper.make_node("Reshape", [name, f"flat_{i}"], [f"out_{i}"]))
            shape = list(value.shape)
        graph_outputs.append(helper.make_tensor_value_info(f"out_{i}", TensorProto.FLOAT, shape))
    graph_input = helper.make_tensor_value_info("input.1", TensorProto.FLOAT,
                                                ["N" if batch_axis else 1, 3, det_size, det_size])
    model = helper.make_model(helper.make_graph(nodes, "scrfd_gated_stub", [graph_input], graph_outputs),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _gated_frames(t1_rgb, astronaut_rgb) -> list[np.ndarray]:
    """Real photos plus plain red / blue frames, all with an exact letterbox scale at det_size 128
    (256x192 -> 128x96, 256x256 -> 128x128), so insightface's and our mapping back agree exactly."""
    red, blue = np.zeros((192, 256, 3), np.uint8), np.zeros((192, 256, 3), np.uint8)
    red[..., 0], blue[..., 2] = 250, 250
    return [cv2.resize(t1_rgb, (256, 192), interpolation=cv2.INTER_AREA), red, blue,
            cv2.resize(astronaut_rgb, (256, 256), interpolation=cv2.INTER_AREA), red.copy()]


@pytest.mark.parametrize("batch_axis", [True, False])
def test_scrfd_batch_equals_per_frame(tmp_path, t1_rgb, astronaut_rgb, batch_axis):
    det_size = 128
    path = tmp_path / "det_gated.onnx"
    _write_scrfd_onnx_gated(path, det_size, _scrfd_outputs(det_size, _known_faces()), batch_axis)
    detector = make_detector(_scrfd(model_path=str(path), det_size=det_size,
                                            score_threshold=0.5, batch_frames=4))
    # Batched only with a batch axis; model-pack layouts (batch 1, 2-D outputs) run frame by frame.
    assert detector.batched is batch_axis and detector.batch_frames == (4 if batch_axis else 1)
    frames = _gated_frames(t1_rgb, astronaut_rgb)
    single = [detector.detect(f) for f in frames]
    assert [len(f) for f in single] == [0, 2, 0, 2, 2], "red(dish) frames have faces, the others do not"
    big = _known_faces()[0]
    np.testing.assert_allclose(single[1][0].bbox, np.array(big["box"]) * 2, atol=1e-3)
    assert single[1][0].score == pytest.approx(0.97 * (1 + (0.75 * 122.5 - 0.25 * 127.5) / 128) / 2, abs=1e-4)
    _assert_same_faces(detector.detect_batch(frames), single)  # batches of 4 + 1 (or 5 single runs)


def test_scrfd_matches_insightface_scrfd_on_our_session(tmp_path, t1_rgb, astronaut_rgb):
    """insightface's own SCRFD class (2.1), given our onnxruntime session, finds the same boxes, scores
    and landmarks as our decoder. No SCRFD weights exist offline, so the model is the picture-dependent
    stub above (in the model-pack layout, batch 1 and 2-D outputs); the frames are real photos."""
    from insightface.model_zoo.scrfd import SCRFD

    det_size = 128
    path = tmp_path / "det_gated.onnx"
    _write_scrfd_onnx_gated(path, det_size, _scrfd_outputs(det_size, _known_faces()), batch_axis=False)
    ours = make_detector(_scrfd(model_path=str(path), det_size=det_size, score_threshold=0.5))
    theirs = SCRFD(session=ours._session)  # shares our session: no model file, so no session of its own
    theirs.prepare(0, det_thresh=0.5, nms_thresh=ours.settings.nms_threshold, input_size=(det_size, det_size))
    found = 0
    for frame in _gated_frames(t1_rgb, astronaut_rgb):
        faces = ours.detect(frame)
        boxes, landmarks = theirs.detect(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))  # insightface wants BGR
        assert len(boxes) == len(faces)
        for face, box, points in zip(faces, boxes, landmarks):
            np.testing.assert_allclose(face.bbox, box[:4], atol=1e-3)
            assert face.score == pytest.approx(float(box[4]), abs=1e-6)
            np.testing.assert_allclose(face.landmarks, points, atol=1e-3)
        found += len(faces)
    assert found == 6
