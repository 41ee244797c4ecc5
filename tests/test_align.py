"""5-point alignment: exact geometry on synthetic landmarks, template fit on real MTCNN landmarks,
and the one-face-per-frame choice."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.align import (ARCFACE_TEMPLATE_112, AlignConfig, align_face, alignment_matrix, pick_face,
                            template_points)
from pipeline.detect import DetectorConfig, Face, make_detector


@pytest.fixture(scope="module")
def mtcnn():
    return make_detector(DetectorConfig())


def _to_crop(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


def _face(x1, y1, x2, y2, score=0.99) -> Face:
    centre_x, centre_y, w = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1
    landmarks = np.array([[-0.2, -0.1], [0.2, -0.1], [0, 0.05], [-0.15, 0.25], [0.15, 0.25]]) * w
    return Face(bbox=np.array([x1, y1, x2, y2], np.float32), score=score,
                landmarks=(landmarks + [centre_x, centre_y]).astype(np.float32))


def test_every_align_field_has_help():
    """jobs/preprocess.py shows them as --align-<field> flags."""
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(AlignConfig))
    with pytest.raises(ValueError, match="face_selection"):
        AlignConfig(face_selection="random")


def test_template_margin():
    arcface_224 = template_points(AlignConfig(size=224, margin=0.0))
    np.testing.assert_allclose(arcface_224, ARCFACE_TEMPLATE_112 * 2)
    loose = template_points(AlignConfig(size=224, margin=0.3))
    eye_distance = lambda t: np.linalg.norm(t[1] - t[0])  # noqa: E731
    assert eye_distance(loose) == pytest.approx(eye_distance(arcface_224) / 1.3)
    assert np.all((loose > 0.2 * 224) & (loose < 0.8 * 224)), "looser crop keeps the 5 points central"


def test_exact_similarity_is_recovered():
    config = AlignConfig(size=160, margin=0.25)
    template = template_points(config)
    # landmarks = template rotated by 20 deg, scaled 1.7x and shifted: the inverse must be exact.
    angle = np.deg2rad(20)
    rotation = 1.7 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = template @ rotation.T + [300.0, 120.0]
    matrix = alignment_matrix(landmarks, config)
    assert matrix.shape == (2, 3)
    np.testing.assert_allclose(_to_crop(landmarks, matrix), template, atol=1e-6)
    # cv2.transform agrees with the documented way of applying the matrix
    np.testing.assert_allclose(cv2.transform(landmarks[None], matrix)[0], template, atol=1e-6)


def test_align_face_moves_pixels_to_template():
    config = AlignConfig(size=128)
    template = template_points(config)
    landmarks = template * 2.5 + [40.0, 10.0]  # scaled + shifted copy of the template in a big frame
    frame = np.zeros((480, 640, 3), np.uint8)
    left_eye = np.round(landmarks[0]).astype(int)
    cv2.circle(frame, tuple(int(v) for v in left_eye), 6, (255, 0, 0), -1)
    crop = align_face(frame, landmarks, config)
    assert crop.shape == (128, 128, 3) and crop.dtype == np.uint8
    ys, xs = np.nonzero(crop[:, :, 0] > 128)
    assert abs(xs.mean() - template[0, 0]) < 1.0 and abs(ys.mean() - template[0, 1]) < 1.0


@pytest.mark.parametrize("size", [224, 112])
def test_real_faces_align_to_template(mtcnn, astronaut_rgb, t1_rgb, size):
    config = AlignConfig(size=size)
    template = template_points(config)
    faces = mtcnn.detect(astronaut_rgb)
    crop = align_face(astronaut_rgb, faces[0].landmarks, config)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    assert crop.mean() > 40, "crop holds the face, not the black border"
    eyes = _to_crop(faces[0].landmarks, alignment_matrix(faces[0].landmarks, config))[:2]
    # frontal face: the least-squares fit puts the eyes within ~2% of the crop side of the template
    assert np.linalg.norm(eyes - template[:2], axis=1).max() < 0.025 * size
    # group photo, some faces turned: still within ~6% of the crop side
    for face in mtcnn.detect(t1_rgb):
        mapped = _to_crop(face.landmarks, alignment_matrix(face.landmarks, config))
        assert np.linalg.norm(mapped[:2] - template[:2], axis=1).max() < 0.065 * size
        assert np.all((mapped > 0) & (mapped < size))


def test_alignment_rejects_bad_landmarks():
    with pytest.raises(ValueError, match="5 finite"):
        alignment_matrix(np.zeros((4, 2)), AlignConfig())
    with pytest.raises(ValueError, match="degenerate"):
        alignment_matrix(np.ones((5, 2)), AlignConfig())
    with pytest.raises(ValueError, match="face_selection"):
        AlignConfig(face_selection="biggest")


def test_pick_face_largest_vs_central():
    frame_shape = (480, 640)
    big_corner = _face(0, 0, 200, 200, score=0.95)
    small_central = _face(300, 220, 340, 260, score=0.99)
    faces = [small_central, big_corner]
    assert pick_face(faces, frame_shape, "largest") is big_corner
    assert pick_face(faces, frame_shape, "central") is small_central
    assert pick_face([], frame_shape, "largest") is None
    with pytest.raises(ValueError):
        pick_face(faces, frame_shape, "random")


def test_pick_face_then_align_one_face_per_frame(mtcnn, t1_rgb):
    faces = mtcnn.detect(t1_rgb)
    largest = pick_face(faces, t1_rgb.shape[:2], "largest")
    central = pick_face(faces, t1_rgb.shape[:2], "central")
    assert largest.area == max(f.area for f in faces)
    # frame centre (640, 443): the face at ~(795, 410) is 157 px away, the next (518, 333) 164 px
    assert abs(central.center[0] - 795) < 30 and abs(central.center[1] - 410) < 30
    assert central is not largest
    assert align_face(t1_rgb, central.landmarks).shape == (224, 224, 3)
