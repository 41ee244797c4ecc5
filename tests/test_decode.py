"""pipeline.decode on real H.264 clips written with PyAV.

Frames come from `moving_pattern_frames`: frame i has a bright bar at x = 2*i (mod width), so the
bar position read back from a decoded picture proves which frame it really is. Reference
timestamps come straight from PyAV (frame.pts * time_base).
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline import decode
from pipeline.decode import (FrameChunk, SamplingConfig, VideoDecodeError, VideoInfo,
                             VideoNotFoundError, iter_frame_chunks, plan_frame_indices,
                             probe_video)
from pipeline.sampling import uniform_positions
from pipeline.video_io import write_audio_only
from tests.conftest import moving_pattern_frames

BACKENDS = ["decord", "pyav"]
ALL_FRAMES = dict(mode="every_n", every_n=1)


def bar_index(frame: np.ndarray) -> int:
    """Frame number (mod width/2) encoded by the bright bar."""
    return int(np.argmax(frame.astype(np.float32).mean(axis=(0, 2)))) // 2


def decode_all(uri, **config) -> tuple[list[FrameChunk], np.ndarray, np.ndarray, np.ndarray]:
    chunks = list(iter_frame_chunks(str(uri), SamplingConfig(**config)))
    indices = np.concatenate([c.indices for c in chunks])
    timestamps = np.concatenate([c.timestamps_s for c in chunks])
    frames = np.concatenate([c.frames for c in chunks])
    return chunks, indices, timestamps, frames


def pyav_reference_timestamps(path) -> np.ndarray:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts = sorted(frame.pts for frame in container.decode(stream))
    return (np.asarray(pts, dtype=np.float64) - pts[0]) * float(stream.time_base)


def write_h264(path: Path, n_frames: int, width: int, height: int, fps: int = 30, gop: int = 10,
               faststart: bool = False, with_audio: bool = False) -> Path:
    """A clip with B-frames (real encoders use them: decode order != presentation order),
    optionally with the moov atom first (streamable mp4) and an AAC track."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"g": str(gop), "bf": "2", "preset": "veryfast"}
        video.time_base = Fraction(1, fps)
        audio = None
        if with_audio:
            audio = container.add_stream("aac", rate=16000)
            audio.layout = "mono"
        for i, frame in enumerate(moving_pattern_frames(n_frames, width, height)):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts = i
            container.mux(video.encode(picture))
        container.mux(video.encode())
        if audio is not None:
            samples = np.zeros((1, 1024), dtype=np.float32)
            for k in range(n_frames * 16000 // fps // 1024):
                sound = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                sound.sample_rate, sound.pts = 16000, k * 1024
                container.mux(audio.encode(sound))
            container.mux(audio.encode())
    return path


@pytest.fixture
def clip(make_video):
    """75 frames, 30 fps, 160x48: bar positions are unique over the clip."""
    return make_video("clip.mp4", n_frames=75, fps=30, width=160, height=48)


@pytest.fixture
def no_decord_allowed(monkeypatch):
    """Fail loudly if a file ever reaches decord (bad files must be stopped by the PyAV probe)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a bad file reached decord")
    monkeypatch.setattr(decode._DecordReader, "__init__", refuse)


# ---- exact frames and timestamps ----------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_full_decode_gives_every_frame_exactly(clip, backend):
    chunks, indices, timestamps, frames = decode_all(clip, backend=backend, chunk_frames=16, **ALL_FRAMES)
    assert indices.dtype == np.int64 and timestamps.dtype == np.float64
    assert frames.dtype == np.uint8 and frames.shape == (75, 48, 160, 3)
    np.testing.assert_array_equal(indices, np.arange(75))
    assert [bar_index(f) for f in frames] == list(range(75))
    np.testing.assert_allclose(timestamps, pyav_reference_timestamps(clip), atol=1e-3)
    np.testing.assert_allclose(timestamps, indices / 30.0, atol=1e-3)  # constant frame rate
    assert [len(c.indices) for c in chunks] == [16, 16, 16, 16, 11]
    assert [c.is_last for c in chunks] == [False] * 4 + [True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fps_sampling_with_b_frames_and_audio(tmp_path, backend):
    path = write_h264(tmp_path / "bframes.mp4", n_frames=70, width=160, height=32, with_audio=True)
    config = SamplingConfig(backend=backend, fps=5.0, chunk_frames=4)
    info = probe_video(str(path), config)
    assert (info.num_frames, info.fps, info.width, info.height, info.backend) == (70, 30.0, 160, 32, backend)
    _, indices, timestamps, frames = decode_all(path, backend=backend, fps=5.0, chunk_frames=4)
    np.testing.assert_array_equal(indices, np.arange(0, 70, 6))
    assert [bar_index(f) for f in frames] == indices.tolist()
    np.testing.assert_allclose(timestamps, pyav_reference_timestamps(path)[indices], atol=1e-3)


def test_pyav_seeks_across_long_gaps_and_stays_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "_PYAV_SEEK_GAP_FRAMES", 20)  # force the seek path on a short clip
    path = write_h264(tmp_path / "long.mp4", n_frames=160, width=320, height=16, gop=25)
    seeks = []
    original = decode._PyAVReader._seek_to
    monkeypatch.setattr(decode._PyAVReader, "_seek_to",
                        lambda self, index: (seeks.append(index), original(self, index)))
    _, indices, timestamps, frames = decode_all(path, backend="pyav", mode="max_frames", max_frames=4)
    np.testing.assert_array_equal(indices, [20, 60, 100, 140])
    assert [bar_index(f) for f in frames] == [20, 60, 100, 140]
    np.testing.assert_allclose(timestamps, indices / 30.0, atol=1e-3)
    assert seeks == [60, 100, 140]  # first wanted frame (20) is within the gap: no seek


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_frame_video_decodes_one_frame(make_video, backend):
    path = make_video("one.mp4", n_frames=1)
    chunks, indices, timestamps, frames = decode_all(path, backend=backend)
    assert len(chunks) == 1 and chunks[0].is_last
    assert indices.tolist() == [0] and timestamps.tolist() == [0.0] and frames.shape == (1, 48, 64, 3)


# ---- sampling plans -------------------------------------------------------------------------

def _info(num_frames: int, fps: float = 30.0) -> VideoInfo:
    return VideoInfo(num_frames=num_frames, fps=fps, width=64, height=48,
                     duration_s=num_frames / fps, backend="pyav")


def test_plan_frame_indices_policies():
    plan = plan_frame_indices
    np.testing.assert_array_equal(plan(_info(30), SamplingConfig(fps=5)), [0, 6, 12, 18, 24])
    np.testing.assert_array_equal(plan(_info(10, fps=25), SamplingConfig(fps=10)), [0, 2, 5, 8])  # 2.5 steps
    np.testing.assert_array_equal(plan(_info(10, fps=4), SamplingConfig(fps=5)), np.arange(10))
    np.testing.assert_array_equal(plan(_info(25), SamplingConfig(mode="every_n", every_n=10)), [0, 10, 20])
    uniform = plan(_info(1000), SamplingConfig(mode="max_frames", max_frames=4))
    np.testing.assert_array_equal(uniform, [125, 375, 625, 875])
    # max_frames is the one "k evenly spaced frames of n" rule that training's draw uses too
    np.testing.assert_array_equal(uniform, uniform_positions(1000, 4, 0.5))
    assert uniform_positions(100, 4, 0.0).tolist() == [0, 25, 50, 75]
    assert uniform_positions(3, 7, 0.5).tolist() == [0, 0, 1, 1, 1, 2, 2]  # fewer frames than k: repeats
    np.testing.assert_array_equal(plan(_info(3), SamplingConfig(mode="max_frames", max_frames=64)), [0, 1, 2])
    for config in (SamplingConfig(), SamplingConfig(mode="every_n"), SamplingConfig(mode="max_frames")):
        one = plan(_info(1), config)
        assert one.dtype == np.int64 and one.tolist() == [0]
    thirty_minutes = plan(_info(30 * 60 * 30), SamplingConfig(fps=5))
    assert len(thirty_minutes) == 9000 and np.all(np.diff(thirty_minutes) == 6)


def test_every_sampling_field_has_help():
    """jobs/preprocess.py shows them as --sampling-<field> flags."""
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(SamplingConfig))


def test_sampling_config_rejects_nonsense():
    with pytest.raises(ValueError, match="mode"):
        SamplingConfig(mode="random")
    with pytest.raises(ValueError, match="backend"):
        SamplingConfig(backend="opencv")
    with pytest.raises(ValueError, match="chunk_frames"):
        SamplingConfig(chunk_frames=0)


# ---- backend selection ------------------------------------------------------------------

def test_auto_prefers_decord(clip):
    assert probe_video(str(clip)).backend == "decord"


def test_auto_falls_back_to_pyav_without_decord(clip, monkeypatch):
    monkeypatch.setattr(decode, "decord_available", lambda: False)
    assert probe_video(str(clip)).backend == "pyav"
    _, indices, _, frames = decode_all(clip, **ALL_FRAMES)
    assert [bar_index(f) for f in frames] == indices.tolist() == list(range(75))
    with pytest.raises(VideoDecodeError, match="decord"):
        probe_video(str(clip), SamplingConfig(backend="decord"))


def test_auto_falls_back_to_pyav_when_decord_cannot_open(clip, monkeypatch):
    def cannot_open(self, path, index):
        raise VideoDecodeError("decord cannot open the file: simulated")
    monkeypatch.setattr(decode._DecordReader, "__init__", cannot_open)
    assert probe_video(str(clip)).backend == "pyav"
    assert sum(len(c.indices) for c in iter_frame_chunks(str(clip))) == 13  # 75 frames at 5 fps


# ---- inputs: URIs ------------------------------------------------------------------------

def test_file_uri(clip):
    assert probe_video(f"file://{clip}").num_frames == 75


def test_remote_uri_is_copied_to_a_temp_file_and_removed(clip, tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    from pipeline import storage

    bucket = pafs.SubTreeFileSystem(str(clip.parent), pafs.LocalFileSystem())
    monkeypatch.setattr(storage, "resolve_filesystem",
                        lambda uri: (bucket, uri.split("://", 1)[1].split("/", 1)[1]))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(storage.tempfile, "tempdir", str(scratch))

    chunks = iter_frame_chunks("s3://bucket/clip.mp4", SamplingConfig(chunk_frames=4))
    first = next(chunks)
    assert first.indices.tolist() == [0, 6, 12, 18] and len(list(scratch.iterdir())) == 1
    chunks.close()  # stopping early must still clean up
    assert list(scratch.iterdir()) == []
    assert probe_video("gs://bucket/clip.mp4").num_frames == 75
    assert list(scratch.iterdir()) == []
    with pytest.raises(VideoNotFoundError, match="s3://bucket/missing.mp4"):
        probe_video("s3://bucket/missing.mp4")


# ---- bad inputs: a clear VideoDecodeError, and decord never sees the file -----------------

def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    out = path.with_name("truncated_" + path.name)
    out.write_bytes(data[: len(data) // 2])
    return out


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _audio_only(path: Path) -> Path:
    write_audio_only(path)
    return path


BAD_INPUTS = {
    "zero_byte": (lambda d, mk: _write(d / "empty.mp4", b""), "zero-byte file"),
    "text_named_mp4": (lambda d, mk: _write(d / "notes.mp4", b"just some notes\n" * 50),
                       r"not a video file \(no decodable container\)"),
    "truncated_moov_at_end": (lambda d, mk: _truncated(mk("t.mp4", n_frames=60)), "truncated or corrupt"),
    "truncated_faststart": (lambda d, mk: _truncated(write_h264(d / "fs.mp4", 90, 64, 48, faststart=True)),
                            r"truncated or corrupt: container declares 90 frames but only \d+"),
    "audio_only": (lambda d, mk: _audio_only(d / "voice.mp4"),
                   r"no video stream \(audio only\)"),
}


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_clear_error(case, backend, tmp_path, make_video, no_decord_allowed):
    build, expected = BAD_INPUTS[case]
    path = build(tmp_path, make_video)
    config = SamplingConfig(backend=backend)
    with pytest.raises(VideoDecodeError, match=expected):
        probe_video(str(path), config)
    with pytest.raises(VideoDecodeError, match=expected):
        next(iter_frame_chunks(str(path), config))


def test_missing_file_names_the_path(tmp_path, no_decord_allowed):
    missing = tmp_path / "nowhere" / "gone.mp4"
    with pytest.raises(VideoNotFoundError) as caught:
        next(iter_frame_chunks(str(missing)))
    assert isinstance(caught.value, VideoDecodeError) and isinstance(caught.value, FileNotFoundError)
    assert str(caught.value) == f"file not found: {missing}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_oversized_frames_are_refused(clip, backend, no_decord_allowed):
    config = SamplingConfig(backend=backend, max_pixels=160 * 47)
    with pytest.raises(VideoDecodeError, match=r"frame size 160x48 exceeds max_pixels 7520"):
        list(iter_frame_chunks(str(clip), config))
