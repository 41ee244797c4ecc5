"""Which frames of a video to keep: the sampling policy (`SamplingConfig`, `plan_frame_indices`) and
the one rule for "k evenly spaced frames of n" (`uniform_positions`), which preprocessing's
`max_frames` mode, training's per-epoch draw and evaluation's capped frame sets all use.

Frame index i is the i-th frame in presentation order, 0-based (see pipeline.decode).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

SAMPLING_MODES = ("fps", "every_n", "max_frames")
BACKENDS = ("auto", "decord", "pyav")


@dataclass(frozen=True)
class SamplingConfig:
    """Which frames to keep and how to decode them (pipeline.decode)."""

    mode: str = field(default="fps", metadata={
        "help": "fps: the frames nearest to an --sampling-fps grid (every frame of a slower video); every_n: "
                "frames 0, n, 2n, ...; max_frames: at most --sampling-max-frames frames, the middle one of each of "
                "that many equal segments of the video", "choices": SAMPLING_MODES})
    fps: float = field(default=5.0, metadata={"help": "frames kept per second of video (mode fps)"})
    every_n: int = field(default=10, metadata={"help": "keep every n-th frame (mode every_n)"})
    max_frames: int = field(default=64, metadata={"help": "frames kept per video (mode max_frames)"})
    chunk_frames: int = field(default=32, metadata={
        "help": "decoded frames held at once (the memory bound of a decoder); does not change which are kept"})
    backend: str = field(default="auto", metadata={
        "help": "decoder: decord (fast random access), pyav, or auto (decord when it opens the file, else PyAV); "
                "does not change the frames", "choices": BACKENDS})
    max_pixels: int = field(default=3840 * 2160, metadata={
        "help": "videos whose frames have more pixels (width*height) are refused with a reason, not downscaled"})

    # How frames are decoded, not which: the shard set's content hash (preprocess_version) leaves them out.
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("chunk_frames", "backend")

    def __post_init__(self) -> None:
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"SamplingConfig.mode must be one of {SAMPLING_MODES}, got {self.mode!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"SamplingConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not self.fps > 0:
            raise ValueError(f"SamplingConfig.fps must be > 0, got {self.fps}")
        for name in ("every_n", "max_frames", "chunk_frames", "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SamplingConfig.{name} must be >= 1, got {getattr(self, name)}")


class FrameCount(Protocol):
    """What planning needs of a video (pipeline.decode.VideoInfo has it)."""

    num_frames: int
    fps: float


def uniform_positions(n: int, k: int, offset: float = 0.5) -> np.ndarray:
    """k positions in range(n), n/k apart, the first at offset*n/k (offset in [0, 1)): position j is
    floor((j + offset) * n / k). offset 0.5 takes the middle of each of k equal segments.

    For n < k positions repeat, so every video still contributes k samples.
    """
    return np.minimum(np.floor((np.arange(k) + offset) * n / k).astype(np.int64), n - 1)


def plan_frame_indices(info: FrameCount, config: SamplingConfig) -> np.ndarray:
    """Frame indices to keep under `config`, sorted, unique, int64, all < info.num_frames."""
    n = int(info.num_frames)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if config.mode == "every_n":
        planned = np.arange(0, n, int(config.every_n), dtype=np.int64)
    elif config.mode == "max_frames":
        k = int(config.max_frames)
        # all frames, or the middle frame of each of k equal segments: uniform, symmetric, no duplicates (n > k)
        planned = np.arange(n, dtype=np.int64) if n <= k else uniform_positions(n, k, 0.5)
    else:  # "fps"
        if info.fps <= 0 or config.fps >= info.fps:
            planned = np.arange(n, dtype=np.int64)
        else:
            step = info.fps / config.fps  # source frames per kept frame
            count = int(np.ceil(n / step))
            planned = np.round(np.arange(count) * step).astype(np.int64)
    planned = planned[(planned >= 0) & (planned < n)]
    return np.unique(planned)
