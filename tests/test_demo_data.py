"""The demo data set: deterministic, AVEC2014-shaped, decodable, and its label is really in the face."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from pipeline.demo_data import (DemoDataConfig, label_region_mask, load_subject_faces, make_demo_dataset,
                                plan_dataset, render_label)


@pytest.fixture(scope="module")
def subjects():
    return load_subject_faces()


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    config = DemoDataConfig(output=str(root), subjects=4, videos_per_subject=2, seconds=1.0, seed=3)
    return root, config, make_demo_dataset(config, progress=False)


def test_eight_real_subjects_with_landmarks(subjects):
    assert len(subjects) == 8
    assert len({s.name for s in subjects}) == 8
    for s in subjects:
        h, w = s.patch.shape[:2]
        assert ((s.landmarks >= 0) & (s.landmarks < [w, h])).all(), s.name
        assert s.landmarks[3:, 1].mean() > s.landmarks[:2, 1].mean(), f"{s.name}: mouth must be below the eyes"


def test_plan_is_deterministic_and_split_by_subject():
    config = DemoDataConfig(seed=7)
    names = [str(i) for i in range(8)]
    plan_a, plan_b = plan_dataset(config, names), plan_dataset(config, names)
    assert plan_a == plan_b
    assert plan_dataset(DemoDataConfig(seed=8), names) != plan_a
    assert len(plan_a) == 8 * config.videos_per_subject
    split_of = {}
    for v in plan_a:
        assert split_of.setdefault(v.subject_id, v.split) == v.split, "a subject is in two splits"
        assert 0 <= v.label <= 63
    assert set(split_of.values()) == {"train", "dev", "test"}
    # Identity alone cannot predict the label: each subject has several different labels.
    for subject in split_of:
        assert len({v.label for v in plan_a if v.subject_id == subject}) >= 2


def test_label_changes_mouth_and_eye_pixels_only(subjects):
    for s in subjects:
        low = render_label(s, 0).astype(np.float32)
        high = render_label(s, 63).astype(np.float32)
        diff = np.abs(high - low).mean(axis=2)
        region = label_region_mask(s)
        inside, outside = diff[region].mean(), diff[~region].mean()
        assert inside > 8.0, f"{s.name}: label barely visible in the mouth/eye region ({inside:.1f})"
        assert inside > 5 * outside, f"{s.name}: label leaks outside the face regions ({inside:.1f} vs {outside:.1f})"
        mid = render_label(s, 31).astype(np.float32)
        assert np.abs(mid - low).mean(axis=2)[region].mean() < inside, "strength must grow with the label"


def test_dataset_layout_manifest_and_labels(small_dataset):
    root, config, summary = small_dataset
    with open(root / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == summary["videos"] == 8
    assert {r["task"] for r in rows} == {"Freeform", "Northwind"}
    for r in rows:
        path = root / r["uri"]
        assert path.exists() and path.stat().st_size > 1000
        folder = {"train": "Training", "dev": "Development", "test": "Testing"}[r["split"]]
        assert r["uri"].startswith(f"{folder}/{r['task']}/")
        subject, session = r["video_id"].split("_")[:2]
        label_file = root / folder / "DepressionLabels" / f"{subject}_{session}_Depression.csv"
        assert int(label_file.read_text().strip()) == int(r["label"])
    # Same seed, same manifest (regenerating the plan is enough: videos derive from it).
    again = plan_dataset(config, [])
    assert [(v.video_id, v.label, v.split) for v in again] == [(r["video_id"], int(r["label"]), r["split"]) for r in rows]


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_videos_decode_with_both_backends(small_dataset, backend):
    from pipeline.decode import SamplingConfig, iter_frame_chunks, probe_video

    root, config, _ = small_dataset
    video = sorted(Path(root).rglob("*_video.mp4"))[0]
    sampling = SamplingConfig(mode="every_n", every_n=1, backend=backend)
    info = probe_video(str(video), sampling)
    assert (info.width, info.height) == (640, 480)
    assert info.num_frames == int(config.seconds * config.fps)
    assert abs(info.fps - 30) < 0.01
    frames = np.concatenate([c.frames for c in iter_frame_chunks(str(video), sampling)])
    assert frames.shape == (info.num_frames, 480, 640, 3)
