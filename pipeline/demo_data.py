"""An AVEC2014-shaped demo data set made from real face photos that ship inside installed packages.

Nothing licensed can ship, so every test and the demo run on this. Each photo is a subject;
each subject gets several short interview-like videos (640x480, 30 fps, H.264) in which the face
moves, the lighting drifts and the face is sometimes hidden. Each video's BDI-II label is drawn
*into the face*: the mouth corners are pulled down and the upper eyelids droop and darken by an
amount that grows with the label. The warps are guided by the project's own MTCNN landmarks, so
a working pipeline and model can learn the label from mouth and eyes, and identity alone cannot
(every subject has videos with different labels, and subjects never cross splits).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from pipeline.schema import LABEL_MAX, LABEL_MIN
from pipeline.video_io import write_mp4

log = logging.getLogger(__name__)

SPLIT_FOLDERS = {"train": "Training", "dev": "Development", "test": "Testing"}
TASKS = ("Freeform", "Northwind")
PATCH_SIZE = 256  # side of the square face patch cut from each photo (face ~45% of it)


@dataclass(frozen=True)
class DemoDataConfig:
    output: str = field(default="data/demo", metadata={"help": "folder to write the data set into"})
    subjects: int = field(default=8, metadata={"help": "number of subjects (real face photos), at most 8"})
    videos_per_subject: int = field(default=4, metadata={"help": "videos per subject, each its own session and label"})
    seed: int = field(default=0, metadata={"help": "random seed; same seed -> same data set"})
    seconds: float = field(default=5.0, metadata={"help": "length of each video in seconds (5..20)"})
    fps: int = field(default=30, metadata={"help": "frame rate"})
    width: int = field(default=640, metadata={"help": "frame width"})
    height: int = field(default=480, metadata={"help": "frame height"})
    face_size: int = field(default=300, metadata={"help": "on-screen size of the face patch in pixels"})
    hidden_fraction: float = field(default=0.1, metadata={"help": "share of frames where the face is turned away or covered"})

    def __post_init__(self):
        if not 1 <= self.subjects <= 8:
            raise ValueError(f"subjects must be 1..8 (8 real face photos ship with the packages), got {self.subjects}")
        if self.videos_per_subject < 1:
            raise ValueError("videos_per_subject must be >= 1")
        if not 1.0 <= self.seconds <= 60.0:
            raise ValueError(f"seconds must be in 1..60, got {self.seconds}")
        if self.width % 2 or self.height % 2:
            raise ValueError("width and height must be even (H.264 yuv420p)")
        if not 0.0 <= self.hidden_fraction < 0.5:
            raise ValueError("hidden_fraction must be in [0, 0.5)")


@dataclass
class SubjectFace:
    """A face patch cut from a real photo, with its 5 MTCNN landmarks in patch coordinates."""

    name: str
    patch: np.ndarray  # (PATCH_SIZE, PATCH_SIZE, 3) uint8 RGB
    landmarks: np.ndarray  # (5, 2) float32: left eye, right eye, nose, left mouth, right mouth


# ----------------------------------------------------------------------------------------------
# Subjects: real photos from installed packages, landmarks from our own detector


def _photo_sources() -> list[tuple[str, np.ndarray]]:
    import importlib.util

    from skimage import data as skdata

    root = Path(importlib.util.find_spec("insightface").submodule_search_locations[0]) / "data" / "images"
    out = []
    for name in ("t1.jpg", "Tom_Hanks_54745.png"):
        bgr = cv2.imread(str(root / name))
        if bgr is None:
            raise FileNotFoundError(f"face photo {root / name} is missing: is insightface==2.1 installed?")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if name.startswith("Tom_Hanks"):
            # A tight 112x112 aligned crop: pad it so the detector sees a whole head.
            rgb = cv2.copyMakeBorder(cv2.resize(rgb, (224, 224)), 112, 112, 112, 112, cv2.BORDER_REPLICATE)
        out.append((name.split(".")[0], rgb))
    out.append(("astronaut", np.ascontiguousarray(skdata.astronaut())))
    return out


def load_subject_faces() -> list[SubjectFace]:
    """The 8 subjects: the six faces of t1.jpg (left to right), Tom Hanks, the astronaut."""
    from pipeline.detect import DetectorConfig, MtcnnSettings, make_detector

    detector = make_detector(DetectorConfig(mtcnn=MtcnnSettings(min_face_size=20), score_threshold=0.9,
                                            max_image_side=1280))
    subjects = []
    for name, rgb in _photo_sources():
        faces = detector.detect(rgb)
        if not faces:
            raise RuntimeError(f"the MTCNN detector found no face in {name}; the demo data needs it")
        faces = sorted(faces, key=lambda f: f.bbox[0])  # left to right, stable ids
        for i, face in enumerate(faces):
            label = f"{name}_{i}" if len(faces) > 1 else name
            subjects.append(_cut_patch(label, rgb, face.bbox, face.landmarks))
    return subjects


def _cut_patch(name: str, rgb: np.ndarray, bbox: np.ndarray, landmarks: np.ndarray) -> SubjectFace:
    # Size the patch from the landmarks, not the box: box conventions differ between crops of
    # different tightness, the eye-to-mouth distance does not.
    eyes, mouth = landmarks[:2].mean(0), landmarks[3:].mean(0)
    side = 4.2 * float(np.linalg.norm(mouth - eyes))
    cx, cy = (eyes + mouth) / 2
    scale = PATCH_SIZE / side
    matrix = np.array([[scale, 0, PATCH_SIZE / 2 - scale * cx], [0, scale, PATCH_SIZE / 2 - scale * cy]], np.float32)
    patch = cv2.warpAffine(rgb, matrix, (PATCH_SIZE, PATCH_SIZE), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    pts = landmarks.astype(np.float32) @ matrix[:, :2].T + matrix[:, 2]
    return SubjectFace(name, patch, pts.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# The label, drawn into the face


def _gaussian_pull(shape: tuple[int, int], centre: np.ndarray, shift: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Backward map that moves the pixels around `centre` by `shift` with a Gaussian falloff."""
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    target = centre + shift
    weight = np.exp(-((xs - target[0]) ** 2 + (ys - target[1]) ** 2) / (2 * sigma ** 2))
    return -shift[0] * weight, -shift[1] * weight


def render_label(subject: SubjectFace, label: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """The subject's face patch with the BDI-II label (0..63) drawn into mouth corners and eyelids.

    Strength s = label/63: mouth corners move down (and slightly inwards) by up to ~0.45 of the
    inter-ocular distance, upper eyelids droop by up to ~0.3 of it and are shaded darker.
    """
    s = float(np.clip(label, LABEL_MIN, LABEL_MAX) - LABEL_MIN) / (LABEL_MAX - LABEL_MIN)
    if rng is not None:
        s = float(np.clip(s + rng.normal(0, 0.02), 0, 1))  # label noise: the same label never renders identically
    lm = subject.landmarks
    eye_dist = float(np.linalg.norm(lm[1] - lm[0]))
    h, w = subject.patch.shape[:2]
    dx = np.zeros((h, w), np.float32)
    dy = np.zeros((h, w), np.float32)
    eye_axis = (lm[1] - lm[0]) / max(eye_dist, 1e-6)
    down = np.array([-eye_axis[1], eye_axis[0]], np.float32)  # perpendicular to the eye line, pointing chin-wards
    for corner, inward in ((lm[3], eye_axis), (lm[4], -eye_axis)):
        shift = (0.45 * down + 0.1 * inward) * eye_dist * s
        ddx, ddy = _gaussian_pull((h, w), corner, shift, 0.28 * eye_dist)
        dx += ddx
        dy += ddy
    for eye in (lm[0], lm[1]):
        lid = eye - down * 0.22 * eye_dist
        ddx, ddy = _gaussian_pull((h, w), lid, down * 0.3 * eye_dist * s, 0.2 * eye_dist)
        dx += ddx
        dy += ddy
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    warped = cv2.remap(subject.patch, xs + dx, ys + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    # Heavy, dark upper lids: a shaded half-ellipse over each eye whose depth follows the label.
    shade = np.zeros((h, w), np.float32)
    angle = float(np.degrees(np.arctan2(eye_axis[1], eye_axis[0])))
    for eye in (lm[0], lm[1]):
        centre = tuple(int(round(v)) for v in (eye - down * 0.12 * eye_dist))
        axes = (int(round(0.34 * eye_dist)), max(1, int(round(0.3 * eye_dist * s))))
        cv2.ellipse(shade, centre, axes, angle, 180, 360, 1.0, -1)
    shade = cv2.GaussianBlur(shade, (0, 0), max(1.0, 0.05 * eye_dist)) * (0.75 * s)
    out = warped.astype(np.float32) * (1 - shade[..., None])
    return np.clip(out, 0, 255).astype(np.uint8)


def label_region_mask(subject: SubjectFace) -> np.ndarray:
    """Boolean mask (patch coords) of the eye and mouth regions where the label is drawn."""
    lm = subject.landmarks
    eye_dist = float(np.linalg.norm(lm[1] - lm[0]))
    h, w = subject.patch.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    for p in (lm[0], lm[1], lm[3], lm[4]):
        cv2.circle(mask, (int(p[0]), int(p[1])), int(0.55 * eye_dist), 1, -1)
    return mask.astype(bool)


# ----------------------------------------------------------------------------------------------
# Video rendering: motion, lighting drift, hidden face


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """An office-like wall: a colour gradient plus a couple of furniture-ish blocks, blurred."""
    c1, c2 = rng.integers(60, 200, size=3), rng.integers(60, 200, size=3)
    t = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    bg = np.broadcast_to(c1 * (1 - t) + c2 * t, (height, width, 3)).astype(np.float32).copy()
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width - 80)), int(rng.integers(0, height - 80))
        x1, y1 = x0 + int(rng.integers(60, 220)), y0 + int(rng.integers(60, 220))
        cv2.rectangle(bg, (x0, y0), (x1, y1), rng.integers(20, 235, size=3).tolist(), -1)
    return cv2.GaussianBlur(bg, (0, 0), 3).astype(np.float32)


def _soft_mask(size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.float32)
    cv2.ellipse(mask, (size // 2, size // 2), (int(size * 0.38), int(size * 0.44)), 0, 0, 360, 1.0, -1)
    return cv2.GaussianBlur(mask, (0, 0), size * 0.04)


def _hidden_intervals(n_frames: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    hidden = np.zeros(n_frames, bool)
    budget = int(round(fraction * n_frames))
    while budget > 0:
        length = min(budget, int(rng.integers(8, 25)))
        start = int(rng.integers(0, max(1, n_frames - length)))
        hidden[start:start + length] = True
        budget -= length
    return hidden


def render_video_frames(subject: SubjectFace, label: float, config: DemoDataConfig,
                        rng: np.random.Generator, room_seed: int = 0) -> Iterator[np.ndarray]:
    """RGB frames of one interview-like clip. The face patch is rendered once per video (the label
    is a property of the recording) and then moved, re-lit, noised and sometimes hidden.

    The room (background, occluding hand) depends on `room_seed` only - one per subject, as a
    subject is recorded in the same room every session: otherwise a model could tell a video's
    label from its wallpaper instead of from the face."""
    face = render_label(subject, label, rng).astype(np.float32)
    size = config.face_size
    face = cv2.resize(face, (size, size), interpolation=cv2.INTER_CUBIC)
    alpha = _soft_mask(size)
    room = np.random.default_rng(room_seed)
    bg = _background(room, config.width, config.height)
    n_frames = int(round(config.seconds * config.fps))
    hidden = _hidden_intervals(n_frames, config.hidden_fraction, rng)
    occluder_colour = room.integers(90, 200, size=3).astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, size=6)
    periods = rng.uniform(2.0, 6.0, size=6)
    noise_bank = [rng.normal(0, 3.0, size=(config.height, config.width, 3)).astype(np.float32) for _ in range(4)]
    for i in range(n_frames):
        t = i / config.fps
        wave = np.sin(2 * np.pi * t / periods + phases)
        cx = config.width / 2 + 40 * wave[0]
        cy = config.height / 2 + 20 * wave[1]
        angle = 7 * wave[2]
        scale = 1.0 + 0.08 * wave[3]
        matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
        matrix[:, 2] += (cx - size / 2, cy - size / 2)
        frame = bg.copy()
        if hidden[i] and (i // 40) % 2 == 0:
            # Turned away: the back of a head (dark hair) where the face was.
            cv2.ellipse(frame, (int(cx), int(cy)), (int(size * 0.36), int(size * 0.45)), angle, 0, 360, (40, 30, 25), -1)
        else:
            warped = cv2.warpAffine(face, matrix, (config.width, config.height), flags=cv2.INTER_LINEAR)
            a = cv2.warpAffine(alpha, matrix, (config.width, config.height), flags=cv2.INTER_LINEAR)[..., None]
            frame = frame * (1 - a) + warped * a
            if hidden[i]:
                # Covered: a hand-coloured block over most of the face.
                w = int(size * 0.7)
                cv2.rectangle(frame, (int(cx - w / 2), int(cy - w / 2)), (int(cx + w / 2), int(cy + w / 2)),
                              occluder_colour.tolist(), -1)
        gain = 1.0 + 0.18 * wave[4]  # lighting drifts slowly
        tint = np.array([1.0 + 0.05 * wave[5], 1.0, 1.0 - 0.05 * wave[5]], np.float32)
        frame = frame * gain * tint + noise_bank[i % len(noise_bank)]
        yield np.clip(frame, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# The data set: AVEC2014 folder layout + a plain CSV manifest


@dataclass(frozen=True)
class DemoVideo:
    video_id: str
    subject_id: str
    session: str
    task: str
    split: str
    label: int
    relpath: str


def plan_dataset(config: DemoDataConfig, subject_names: list[str]) -> list[DemoVideo]:
    """Which subject goes to which split and which label each video gets (deterministic per seed)."""
    rng = np.random.default_rng(config.seed)
    n = config.subjects
    order = rng.permutation(n)
    # Most subjects train: with a handful of identities, a model learns the drawn label only when
    # it has seen it on several faces (AVEC's 1/3 per split would leave 2-3 training faces here).
    n_test = max(1, int(round(n / 8))) if n >= 3 else 0
    n_dev = max(1, int(round(n / 8))) if n >= 3 else 0
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[idx] = "test" if rank < n_test else "dev" if rank < n_test + n_dev else "train"
    # Labels spread over the whole BDI-II range so every split sees low and high scores.
    n_videos = n * config.videos_per_subject
    labels = np.round(np.linspace(LABEL_MIN + 2, LABEL_MAX - 2, n_videos) + rng.uniform(-2, 2, n_videos))
    labels = np.clip(labels, LABEL_MIN, LABEL_MAX).astype(int)
    labels = labels[rng.permutation(n_videos)]
    videos = []
    for s in range(n):
        subject_id = str(201 + s)
        for v in range(config.videos_per_subject):
            session = str(v + 1)
            task = TASKS[v % 2]
            split = split_of[s]
            video_id = f"{subject_id}_{session}_{task}"
            rel = f"{SPLIT_FOLDERS[split]}/{task}/{video_id}_video.mp4"
            videos.append(DemoVideo(video_id, subject_id, session, task, split,
                                    int(labels[s * config.videos_per_subject + v]), rel))
    return videos


def make_demo_dataset(config: DemoDataConfig, progress: bool = True) -> dict:
    """Write the data set; returns a summary dict (paths, counts, seconds)."""
    started = time.time()
    root = Path(config.output)
    root.mkdir(parents=True, exist_ok=True)
    subjects = load_subject_faces()[: config.subjects]
    videos = plan_dataset(config, [s.name for s in subjects])
    for k, video in enumerate(videos):
        subject = subjects[int(video.subject_id) - 201]
        # One generator per video, seeded from (seed, video index): videos can be regenerated alone.
        rng = np.random.default_rng([config.seed, k])
        path = root / video.relpath
        tic = time.time()
        room_seed = config.seed * 1000 + int(video.subject_id)
        write_mp4(path, render_video_frames(subject, video.label, config, rng, room_seed), fps=config.fps,
                  audio_seconds=0.0)
        label_dir = root / SPLIT_FOLDERS[video.split] / "DepressionLabels"
        label_dir.mkdir(parents=True, exist_ok=True)
        (label_dir / f"{video.subject_id}_{video.session}_Depression.csv").write_text(f"{video.label}\n")
        if progress and ((k + 1) % 8 == 0 or k + 1 == len(videos)):  # a line per 8 videos, not per video
            print(f"[demo-data] {k + 1}/{len(videos)} videos written (last: {video.relpath}, label {video.label}, "
                  f"{time.time() - tic:.1f} s)", flush=True)
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["video_id", "subject_id", "split", "label", "uri", "task"])
        for v in videos:
            writer.writerow([v.video_id, v.subject_id, v.split, v.label, v.relpath, v.task])
    summary = {
        "root": str(root),
        "manifest": str(manifest),
        "videos": len(videos),
        "subjects": {str(201 + i): s.name for i, s in enumerate(subjects)},
        "splits": {s: sum(v.split == s for v in videos) for s in ("train", "dev", "test")},
        "config": dataclasses.asdict(config),
        "seconds": round(time.time() - started, 1),
    }
    (root / "demo_data.json").write_text(json.dumps(summary, indent=2))
    return summary
