"""Face detectors on real photos (MTCNN) and on a self-built ONNX graph in SCRFD's output format
(no SCRFD weights exist offline)."""
from __future__ import annotations

import logging
import pickle

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from pipeline.detect import (CPU_PROVIDER, CUDA_PROVIDER, DetectorConfig, Face, FaceDetector, MtcnnDetector,
                             ScrfdDetector, make_detector, select_providers)

# Rough face boxes in t1.jpg (x1, y1, x2, y2), read off a visual check of the detections; used only
# to assert that each of the six faces is found once (centre match), not for box precision.
T1_FACE_CENTRES = [(960, 130), (111, 331), (518, 333), (319, 208), (795, 410), (1179, 336)]
ASTRONAUT_FACE_CENTRE = (220, 118)


@pytest.fixture(scope="module")
def mtcnn() -> MtcnnDetector:
    return make_detector(DetectorConfig())


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
    with pytest.raises(ValueError, match="needs DetectorConfig\\(model_path"):
        make_detector(DetectorConfig(name="scrfd"))
    with pytest.raises(ValueError, match="not found"):
        make_detector(DetectorConfig(name="scrfd", model_path=str(tmp_path / "nope.onnx")))
    with pytest.raises(ValueError, match="no det_\\*.onnx"):
        make_detector(DetectorConfig(name="scrfd", model_path=str(tmp_path)))
    with pytest.raises(ValueError, match="mtcnn model file"):
        make_detector(DetectorConfig(name="mtcnn", model_path=str(tmp_path)))
    with pytest.raises(ValueError, match="min_face_size"):
        DetectorConfig(min_face_size=5)


def test_select_providers_on_cpu_machine(caplog):
    if CUDA_PROVIDER in ort.get_available_providers():
        pytest.skip("this machine has CUDA; the test is about the CPU fallback")
    with caplog.at_level(logging.WARNING, logger="pipeline.detect"):
        assert select_providers(False) == [CPU_PROVIDER]
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="pipeline.detect"):
        assert select_providers(True) == [CPU_PROVIDER]
    assert any("use_gpu=True" in r.getMessage() and "will run on CPU" in r.getMessage() for r in caplog.records)


def test_gpu_request_falls_back_loudly(caplog, astronaut_rgb):
    if CUDA_PROVIDER in ort.get_available_providers():
        pytest.skip("this machine has CUDA; the test is about the CPU fallback")
    with caplog.at_level(logging.WARNING, logger="pipeline.detect"):
        detector = make_detector(DetectorConfig(use_gpu=True))
    assert detector.providers() == [CPU_PROVIDER]
    assert any(r.levelno == logging.WARNING and "CPU" in r.getMessage() for r in caplog.records)
    assert len(detector.detect(astronaut_rgb)) == 1


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

    detector = make_detector(DetectorConfig(name="scrfd", model_path=str(pack), det_size=det_size,
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
    strict = make_detector(DetectorConfig(name="scrfd", model_path=str(pack / "det_stub.onnx"),
                                          det_size=det_size, score_threshold=0.95))
    assert len(strict.detect(np.zeros((192, 256, 3), np.uint8))) == 1


def test_scrfd_large_frame_and_size_errors(tmp_path):
    det_size = 128
    path = tmp_path / "det_stub.onnx"
    _write_scrfd_onnx(path, det_size, _scrfd_outputs(det_size, _known_faces()))
    # 1280x960 frame: max_image_side 640 halves it, the letterbox halves again -> factor 10 overall.
    detector = make_detector(DetectorConfig(name="scrfd", model_path=str(path), det_size=det_size,
                                            score_threshold=0.5, max_image_side=640))
    faces = detector.detect(np.zeros((960, 1280, 3), np.uint8))
    np.testing.assert_allclose(faces[0].bbox, np.array(_known_faces()[0]["box"]) * 10, atol=1e-2)

    with pytest.raises(ValueError, match="fixed input size"):
        make_detector(DetectorConfig(name="scrfd", model_path=str(path), det_size=640))

    no_kps = tmp_path / "det_nokps.onnx"
    _write_scrfd_onnx(no_kps, det_size, _scrfd_outputs(det_size, [])[:6])
    with pytest.raises(ValueError, match="without landmark"):
        make_detector(DetectorConfig(name="scrfd", model_path=str(no_kps), det_size=det_size))
