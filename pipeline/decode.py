"""Video decoding: probe a file, and decode the frames the sampling policy keeps in bounded chunks.

Which frames are kept is pipeline.sampling's (`SamplingConfig`, `plan_frame_indices`; re-exported
here); staging a remote file on local disk is pipeline.storage's (`local_copy`).

Two interchangeable backends sit behind one small interface (`_FrameReader`):

* **decord** (default): fast random access via `get_batch`; one reader per call, created inside
  the (Ray) task that uses it, with `num_threads=1` because Ray already gives every task its CPU.
* **PyAV** (fallback, or chosen with `backend="pyav"`): sequential decoding that keeps only the
  wanted frames; it seeks only across long gaps (sparse plans on long videos), never per frame.

`backend="auto"` uses decord when it is importable and opens the file, and PyAV otherwise.

Every file is probed with PyAV first (container open, video-stream check, a demux pass over the
packets and one decoded frame). decord is known to crash or hang on some broken files; the probe
makes sure such files never reach it, and turns every kind of bad input into a
`VideoDecodeError` whose message says what is wrong.

Frame numbering and timestamps:
  * frame index i is the i-th frame in presentation order (what a player shows), 0-based;
  * `timestamps_s` are the frame's real presentation time, `pts * time_base`, in seconds since
    the first frame (for constant-frame-rate files this equals `index / fps`).

Memory: `iter_frame_chunks` never holds more than one chunk (`chunk_frames` frames) of decoded
RGB frames, so 20-50 minute interviews decode in bounded memory.

Oversized frames are REFUSED (not downscaled): a stream whose width*height exceeds
`SamplingConfig.max_pixels` raises `VideoDecodeError("frame size WxH exceeds max_pixels ...")`.
Refusing keeps the face-detection geometry honest; a user who really wants such files raises
`max_pixels`.

Inputs are local paths or any pyarrow filesystem URI (file://, s3://, gs://, ...). Remote files
are copied to a local temporary file first (decord needs a path) and removed afterwards
(`local_video_path`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import numpy as np

from pipeline.sampling import BACKENDS, SAMPLING_MODES, SamplingConfig, plan_frame_indices
from pipeline.storage import StorageError, local_copy

__all__ = [
    "VideoDecodeError",
    "VideoNotFoundError",
    "SamplingConfig",
    "VideoInfo",
    "FrameChunk",
    "probe_video",
    "plan_frame_indices",
    "iter_frame_chunks",
    "decord_available",
    "local_video_path",
    "SAMPLING_MODES",
    "BACKENDS",
]

# PyAV seeks (to the keyframe before the next wanted frame) only when the next wanted frame is
# further ahead than this; shorter gaps are cheaper to decode through than to seek across.
_PYAV_SEEK_GAP_FRAMES = 300

# First bytes of the containers we expect. A file that starts like a video container but does not
# open is reported as truncated/corrupt; anything else as "not a video file".
_CONTAINER_SIGNATURES = (
    (4, b"ftyp"),  # mp4 / mov / m4v / 3gp
    (4, b"moov"),
    (4, b"mdat"),
    (4, b"free"),
    (4, b"wide"),
    (0, b"RIFF"),  # avi
    (0, b"\x1a\x45\xdf\xa3"),  # matroska / webm
    (0, b"FLV"),
    (0, b"\x00\x00\x01\xba"),  # mpeg-ps
)
_TS_PACKET_BYTES = 188  # mpeg-ts: sync byte 0x47 at the start of every 188-byte packet


class VideoDecodeError(Exception):
    """A video could not be decoded; `str(err)` is a short human reason (recorded per video)."""


class VideoNotFoundError(VideoDecodeError, FileNotFoundError):
    """The video file does not exist (also catchable as FileNotFoundError)."""

    def __init__(self, uri: str):
        super().__init__(f"file not found: {uri}")
        self.uri = uri

    def __str__(self) -> str:  # OSError would otherwise format "[Errno None] ..."
        return f"file not found: {self.uri}"


@dataclass(frozen=True)
class VideoInfo:
    """What the probe found out about a video stream."""

    num_frames: int
    fps: float
    width: int
    height: int
    duration_s: float
    backend: str  # the backend that decodes (or would decode) this file: "decord" | "pyav"


@dataclass
class FrameChunk:
    indices: np.ndarray  # int64 (n,): frame numbers in presentation order
    timestamps_s: np.ndarray  # float64 (n,): presentation time, seconds since the first frame
    frames: np.ndarray  # uint8 (n, H, W, 3), RGB
    is_last: bool


def decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except Exception:  # ImportError, or a broken native library
        return False
    return True


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def probe_video(uri: str, config: SamplingConfig = SamplingConfig()) -> VideoInfo:
    """Check that `uri` is a decodable video and describe it; raises VideoDecodeError."""
    with local_video_path(uri) as path:
        index = _probe_with_pyav(path, config)
        reader = _open_reader(path, index, config)
        try:
            return reader.info
        finally:
            reader.close()


def iter_frame_chunks(uri: str, config: SamplingConfig = SamplingConfig()) -> Iterator[FrameChunk]:
    """Decode the planned frames of `uri` as chunks of at most `config.chunk_frames` RGB frames.

    Yields at least one chunk for a valid video; the last one has is_last=True. Raises
    VideoDecodeError (before the first chunk for bad files; mid-way if the file turns out to be
    corrupt further in).
    """
    with local_video_path(uri) as path:
        index = _probe_with_pyav(path, config)
        reader = _open_reader(path, index, config)
        try:
            planned = plan_frame_indices(reader.info, config)
            if len(planned) == 0:  # cannot happen for a probed video, kept as a guard
                raise VideoDecodeError("no frames to decode")
            batches = [planned[i:i + config.chunk_frames]
                       for i in range(0, len(planned), config.chunk_frames)]
            for number, (indices, timestamps, frames) in enumerate(reader.read(batches)):
                yield FrameChunk(indices=indices, timestamps_s=timestamps, frames=frames,
                                 is_last=number == len(batches) - 1)
        finally:
            reader.close()


# --------------------------------------------------------------------------------------------
# Local paths and remote URIs
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def local_video_path(uri: str) -> Iterator[str]:
    """A local path for `uri`: the file itself, or a temporary copy of a remote object deleted when the
    context exits (pipeline.storage.local_copy); its failures as VideoNotFoundError / VideoDecodeError."""
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(local_copy(uri, prefix="video_", default_suffix=".mp4"))
        except FileNotFoundError as err:
            raise VideoNotFoundError(err.filename or uri) from err
        except StorageError as err:
            raise VideoDecodeError(str(err)) from err
        yield path


# --------------------------------------------------------------------------------------------
# Probe (PyAV): the gatekeeper that keeps broken files away from decord
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _StreamIndex:
    """What the PyAV probe learnt: the stream's description and every frame's pts, in order."""

    info: VideoInfo
    frame_pts: np.ndarray  # int64 (num_frames,), presentation order, in time_base units
    time_base: Fraction

    def timestamps_s(self, indices: np.ndarray) -> np.ndarray:
        origin = int(self.frame_pts[0])
        return (self.frame_pts[indices] - origin).astype(np.float64) * float(self.time_base)


def _looks_like_container(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(_TS_PACKET_BYTES + 1)
    if len(head) > _TS_PACKET_BYTES and head[0] == head[_TS_PACKET_BYTES] == 0x47:
        return True
    return any(head[offset:offset + len(sig)] == sig for offset, sig in _CONTAINER_SIGNATURES)


def _probe_with_pyav(path: str, config: SamplingConfig) -> _StreamIndex:
    import av

    if os.path.getsize(path) == 0:
        raise VideoDecodeError("zero-byte file")
    try:
        container = av.open(path, metadata_errors="ignore")
    except av.error.FFmpegError as err:
        if _looks_like_container(path):
            raise VideoDecodeError(f"truncated or corrupt: container does not open ({_reason(err)})") from err
        raise VideoDecodeError("not a video file (no decodable container)") from err
    except Exception as err:  # PyAV sometimes raises plain Python errors on odd inputs
        raise VideoDecodeError(f"not a video file (no decodable container): {_reason(err)}") from err

    with container:
        if not container.streams.video:
            if container.streams.audio:
                raise VideoDecodeError("no video stream (audio only)")
            raise VideoDecodeError("no video stream")
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        if width <= 0 or height <= 0:
            raise VideoDecodeError(f"invalid frame size {width}x{height}")
        if width * height > config.max_pixels:
            raise VideoDecodeError(
                f"frame size {width}x{height} exceeds max_pixels {config.max_pixels} "
                f"({width * height} pixels); raise SamplingConfig.max_pixels to accept it")
        stream.codec_context.thread_count = 1
        declared_frames = int(stream.frames or 0)

        # One demux pass (no decoding, cheap): every packet's pts gives the exact frame count and
        # presentation order; a missing tail shows up as fewer packets than the container declares.
        # The first packets are also decoded, to prove that the codec really produces pictures.
        pts_list: list[int] = []
        first_frame_decoded = False
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the flush packet at end of stream
                    continue
                pts = packet.pts if packet.pts is not None else packet.dts
                pts_list.append(-1 if pts is None else int(pts))
                if not first_frame_decoded:
                    first_frame_decoded = bool(stream.decode(packet))
            if not first_frame_decoded:
                first_frame_decoded = bool(stream.decode(None))  # drain delayed frames
        except av.error.FFmpegError as err:
            raise VideoDecodeError(f"truncated or corrupt: {_reason(err)}") from err

    if not pts_list or not first_frame_decoded:
        raise VideoDecodeError("truncated or corrupt: the video stream has no decodable frames")
    if declared_frames > 0 and len(pts_list) < declared_frames:
        raise VideoDecodeError(
            f"truncated or corrupt: container declares {declared_frames} frames but only "
            f"{len(pts_list)} are present in the file")

    frame_rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    time_base = stream.time_base or Fraction(1, 1000)
    frame_pts = np.asarray(pts_list, dtype=np.int64)
    if (frame_pts < 0).any():  # no timestamps at all (rare raw streams): assume constant rate
        rate = frame_rate or Fraction(25)
        time_base = 1 / Fraction(rate)
        frame_pts = np.arange(len(pts_list), dtype=np.int64)
    frame_pts = np.sort(frame_pts)  # decode order -> presentation order (B-frames)
    fps = float(frame_rate) if frame_rate else _fps_from_pts(frame_pts, time_base)
    duration_s = float((frame_pts[-1] - frame_pts[0]) * time_base) + (1.0 / fps if fps > 0 else 0.0)
    info = VideoInfo(num_frames=len(frame_pts), fps=fps, width=width, height=height,
                     duration_s=duration_s, backend="pyav")
    return _StreamIndex(info=info, frame_pts=frame_pts, time_base=Fraction(time_base))


def _fps_from_pts(frame_pts: np.ndarray, time_base: Fraction) -> float:
    span = float((frame_pts[-1] - frame_pts[0]) * time_base)
    return (len(frame_pts) - 1) / span if span > 0 else 0.0


def _reason(err: BaseException) -> str:
    """FFmpeg errors carry '[Errno N] text: filename'; keep the text only."""
    text = getattr(err, "strerror", None) or str(err)
    return str(text).strip()


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------

class _FrameReader:
    """Backend interface: `info`, `read(batches)` and `close()`.

    `read` gets the planned indices already split into chunks and yields, per chunk,
    (indices int64, timestamps_s float64, frames uint8 (n,H,W,3) RGB).
    """

    info: VideoInfo

    def read(self, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _open_reader(path: str, index: _StreamIndex, config: SamplingConfig) -> _FrameReader:
    if config.backend == "pyav":
        return _PyAVReader(path, index)
    if config.backend == "decord":
        if not decord_available():
            raise VideoDecodeError("decord backend requested but decord is not importable")
        return _DecordReader(path, index)
    # auto: decord when it works for this file, else PyAV (which already opened it in the probe)
    if decord_available():
        try:
            return _DecordReader(path, index)
        except VideoDecodeError:
            pass
    return _PyAVReader(path, index)


class _DecordReader(_FrameReader):
    def __init__(self, path: str, index: _StreamIndex):
        import decord

        try:
            self._reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
            num_frames = len(self._reader)
            fps = float(self._reader.get_avg_fps())
        except Exception as err:  # decord raises DECORDError / RuntimeError with C++ traces
            raise VideoDecodeError(f"decord cannot open the file: {_first_line(err)}") from err
        if num_frames <= 0:
            raise VideoDecodeError("decord found no frames")
        self._origin_s = float(self._reader.get_frame_timestamp(0)[0])
        probed = index.info
        self.info = VideoInfo(num_frames=num_frames, fps=fps or probed.fps, width=probed.width,
                              height=probed.height, duration_s=probed.duration_s, backend="decord")

    def read(self, batches):
        for indices in batches:
            try:
                frames = self._reader.get_batch(indices.tolist()).asnumpy()
                starts = np.asarray(self._reader.get_frame_timestamp(indices.tolist()), dtype=np.float64)
            except Exception as err:
                raise VideoDecodeError(
                    f"truncated or corrupt: decord failed near frame {int(indices[0])}: "
                    f"{_first_line(err)}") from err
            timestamps = starts.reshape(-1, 2)[:, 0] - self._origin_s
            yield indices.astype(np.int64), timestamps, np.ascontiguousarray(frames, dtype=np.uint8)

    def close(self) -> None:
        self._reader = None  # decord frees its native handles when the object goes


class _PyAVReader(_FrameReader):
    """Sequential decode keeping only wanted frames; seeks only across gaps > _PYAV_SEEK_GAP_FRAMES."""

    def __init__(self, path: str, index: _StreamIndex):
        import av

        self._path = path
        self._index = index
        self.info = VideoInfo(**{**index.info.__dict__, "backend": "pyav"})
        try:
            self._container = av.open(path, metadata_errors="ignore")
        except av.error.FFmpegError as err:
            raise VideoDecodeError(f"truncated or corrupt: {_reason(err)}") from err
        self._stream = self._container.streams.video[0]
        self._stream.codec_context.thread_count = 1
        self._index_of_pts = {int(p): i for i, p in enumerate(index.frame_pts)}

    def read(self, batches):
        import av

        wanted = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
        chunk_sizes = [len(b) for b in batches]
        kept_indices: list[int] = []
        kept_frames: list[np.ndarray] = []
        position = 0  # next entry of `wanted`
        next_index = 0  # index of the next decoded frame when pts are missing
        try:
            if len(wanted) and int(wanted[0]) > _PYAV_SEEK_GAP_FRAMES:
                self._seek_to(int(wanted[0]))
            while position < len(wanted):
                seek_requested = False
                for frame in self._container.decode(self._stream):
                    index = self._index_of_pts.get(frame.pts) if frame.pts is not None else None
                    if index is None:
                        index = next_index
                    next_index = index + 1
                    target = int(wanted[position])
                    if index < target:  # decode through short gaps (and from a keyframe)
                        continue
                    if index > target:  # a seek overshot or the stream skipped a frame
                        raise VideoDecodeError(
                            f"truncated or corrupt: frame {target} could not be decoded")
                    kept_indices.append(index)
                    kept_frames.append(frame.to_ndarray(format="rgb24"))
                    position += 1
                    if len(kept_indices) == chunk_sizes[0]:
                        yield self._emit(kept_indices, kept_frames)
                        chunk_sizes.pop(0)
                        kept_indices, kept_frames = [], []
                    if position == len(wanted):
                        break
                    if int(wanted[position]) - index > _PYAV_SEEK_GAP_FRAMES:
                        self._seek_to(int(wanted[position]))
                        seek_requested = True
                        break
                if not seek_requested and position < len(wanted):
                    raise VideoDecodeError(
                        f"truncated or corrupt: stream ended before frame {int(wanted[position])} "
                        f"of {self.info.num_frames}")
        except av.error.FFmpegError as err:
            raise VideoDecodeError(f"truncated or corrupt: {_reason(err)}") from err

    def _seek_to(self, index: int) -> None:
        # backward=True lands on the keyframe at or before the target; frames are then decoded
        # forward and matched by pts, so the index stays exact.
        self._container.seek(int(self._index.frame_pts[index]), stream=self._stream,
                             backward=True, any_frame=False)

    def _emit(self, indices: list[int], frames: list[np.ndarray]):
        idx = np.asarray(indices, dtype=np.int64)
        return idx, self._index.timestamps_s(idx), np.stack(frames).astype(np.uint8, copy=False)

    def close(self) -> None:
        self._container.close()


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # decord prefixes C++ source locations; its last meaningful line is the reason
    return lines[-1][:300] if lines else type(err).__name__
