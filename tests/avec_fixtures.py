"""AVEC2013 / AVEC2014 folder trees in the layouts of the official distributions, for tests.

    expected = build_avec2014_tree(tmp_path / "AVEC2014", make_clip)
    expected = build_avec2013_tree(tmp_path / "AVEC2013", make_clip)

`make_clip(path)` is called with the absolute Path of each video and must create that file.
Pass `placeholder_clip` (a few bytes; enough for manifest tests, which never open videos),
`tiny_mp4_clip` (a real 8-frame H.264 video), or the `make_video` fixture of tests/conftest.py
itself (it writes `tmp_path / name`, and an absolute name stays as it is).

Both trees have subjects that recur across Training/Development/Testing (like the real
partitions, which are per recording), label files where each distribution puts them, one test
recording without any label file, and files a loader must ignore (audio, features, README, macOS
"__MACOSX/._*" copies). The functions return {video_id: (split, label, task)}: the manifest the
official partitions must give. With `test_labels_dir`, the test-set labels are written there
instead (as a separate download would be) and can be passed as `labels=`.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable

import numpy as np

# (split folder, subject, session, BDI-II label or None). Recurring subjects: 203 (train, dev,
# test), 205 (train, dev), 206 (dev, test); 207 only train, 208 only test. 206_2 has no label.
RECORDINGS = [
    ("Training", "203", "1", 17), ("Training", "205", "1", 3), ("Training", "207", "2", 25),
    ("Development", "203", "2", 20), ("Development", "205", "2", 5), ("Development", "206", "1", 9),
    ("Testing", "203", "3", 22), ("Testing", "206", "2", None), ("Testing", "208", "1", 40),
]
SPLIT_OF_FOLDER = {"Training": "train", "Development": "dev", "Testing": "test"}
RECURRING_SUBJECTS = {"203": ["train", "dev", "test"], "205": ["train", "dev"], "206": ["dev", "test"]}
AVEC2014_TASKS = ("Freeform", "Northwind")

MakeClip = Callable[[Path], object]


def placeholder_clip(path: Path) -> None:
    """A stand-in video file (not decodable): the manifest never opens videos."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42placeholder")


def tiny_mp4_clip(path: Path, n_frames: int = 8) -> None:
    """A real, decodable 64x48 H.264 video (the container follows the extension: .mp4 / .avi)."""
    from pipeline.video_io import write_mp4

    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    base = rng.integers(0, 200, size=(48, 64, 3), dtype=np.uint8)
    frames = (np.roll(base, 2 * i, axis=1) for i in range(n_frames))
    write_mp4(path, frames, fps=10)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _clip(make_clip: MakeClip, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_clip(path)
    assert path.is_file(), f"make_clip did not create {path}"


def build_avec2014_tree(root: Path, make_clip: MakeClip = placeholder_clip,
                        test_labels_dir: Path | None = None) -> dict[str, tuple[str, float | None, str]]:
    """The AVEC2014 distribution as unpacked into `root`:

    root/AVEC2014_AudioVisual/Video/{Training,Development,Testing}/{Freeform,Northwind}/NNN_S_<Task>_video.mp4
    root/AVEC2014_AudioVisual/Audio/...                                  (ignored: .wav)
    root/AVEC2014_DepressionLabels/{Training,Development}_DepressionLabels/NNN_S_Depression.csv
    root/AVEC2014_Labels_Testset/Testing/DepressionLabels/NNN_S_Depression.csv
        (or test_labels_dir/Testing/DepressionLabels/ when given)
    """
    root = Path(root)
    expected = {}
    for folder, subject, session, label in RECORDINGS:
        recording = f"{subject}_{session}"
        for task in AVEC2014_TASKS:
            _clip(make_clip, root / "AVEC2014_AudioVisual" / "Video" / folder / task / f"{recording}_{task}_video.mp4")
            _write(root / "AVEC2014_AudioVisual" / "Audio" / folder / task / f"{recording}_{task}_audio.wav", "RIFF")
            expected[f"{recording}_{task}"] = (SPLIT_OF_FOLDER[folder], None if label is None else float(label), task)
        if label is None:
            continue
        if folder == "Testing":
            labels_root = Path(test_labels_dir) if test_labels_dir is not None else root / "AVEC2014_Labels_Testset"
            label_dir = labels_root / "Testing" / "DepressionLabels"
        else:
            label_dir = root / "AVEC2014_DepressionLabels" / f"{folder}_DepressionLabels"
        _write(label_dir / f"{recording}_Depression.csv", f"{label}\n")
    _write(root / "README.txt", "AVEC2014 audio-visual depression sub-challenge\n")
    _write(root / "__MACOSX" / "AVEC2014_AudioVisual" / "Video" / "Training" / "Freeform"
           / "._203_1_Freeform_video.mp4", "mac resource fork")
    _write(root / "AVEC2014_DepressionLabels" / "Training_DepressionLabels" / "._203_1_Depression.csv",
           "mac resource fork")
    return expected


def build_avec2013_tree(root: Path, make_clip: MakeClip = placeholder_clip,
                        test_labels_dir: Path | None = None) -> dict[str, tuple[str, float | None, None]]:
    """The AVEC2013 distribution as unpacked into `root`:

    root/Training_AudioVisual/Training/NNN_S_cut_combined.mp4        (one as NNN_S_cut_video.mp4)
    root/Development_AudioVisual/Development/NNN_S_cut_combined.mp4  (one as NNN_S_video.avi)
    root/Testing_AudioVisual/NNN_S_cut_combined.mp4                  (no exact split folder; one bare NNN_S.mp4)
    root/AVEC2013_DepressionLabels/{Training,Development}_DepressionLabels/NNN_S_Depression.csv
    root/AVEC2013_DepressionLabels/Testing_DepressionLabels/NNN_S_Depression.csv
        (or test_labels_dir/Testing_DepressionLabels/ when given)
    root/Features/{Training,...}/LGBP-TOP/NNN_S.mat                  (ignored)
    """
    root = Path(root)
    names = {"207_2": "207_2_cut_video.mp4", "205_2": "205_2_video.avi", "206_2": "206_2.mp4"}
    expected = {}
    for folder, subject, session, label in RECORDINGS:
        recording = f"{subject}_{session}"
        name = names.get(recording, f"{recording}_cut_combined.mp4")
        video_dir = root / f"{folder}_AudioVisual"
        if folder != "Testing":
            video_dir = video_dir / folder
        _clip(make_clip, video_dir / name)
        _write(root / "Features" / folder / "LGBP-TOP" / f"{recording}.mat", "features")
        expected[recording] = (SPLIT_OF_FOLDER[folder], None if label is None else float(label), None)
        if label is None:
            continue
        if folder == "Testing" and test_labels_dir is not None:
            label_dir = Path(test_labels_dir) / "Testing_DepressionLabels"
        else:
            label_dir = root / "AVEC2013_DepressionLabels" / f"{folder}_DepressionLabels"
        _write(label_dir / f"{recording}_Depression.csv", f"{label}\n")
    _write(root / "Training_AudioVisual" / "readme.txt", "AVEC2013\n")
    return expected
