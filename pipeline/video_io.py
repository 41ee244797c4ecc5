"""Writing real H.264 mp4 files with PyAV (its wheel bundles FFmpeg with libx264).

Used by the demo-data generator and by tests that synthesise tiny real videos.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np


def write_mp4(path: str | Path, frames: Iterable[np.ndarray], fps: int = 30, crf: int = 23,
              audio_seconds: float = 0.0) -> int:
    """Encode RGB uint8 frames (H, W, 3; H and W even) as H.264/yuv420p; returns frames written.

    `audio_seconds` > 0 adds a sine-tone AAC track (interview videos have sound; the decoder must
    ignore it).
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with av.open(str(path), mode="w") as container:
        stream = audio = None
        for frame in frames:
            if stream is None:
                # Every stream must exist before the first packet is muxed.
                if audio_seconds > 0:
                    audio = _add_audio_stream(container)
                h, w = frame.shape[:2]
                stream = container.add_stream("libx264", rate=fps)
                stream.width, stream.height = w, h
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency"}
                stream.time_base = Fraction(1, fps)
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, dtype=np.uint8), format="rgb24")
            vf.pts = count
            for packet in stream.encode(vf):
                container.mux(packet)
            count += 1
        if stream is None:
            raise ValueError(f"write_mp4({path}): no frames given")
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            _encode_tone(container, audio, audio_seconds)
    return count


def _add_audio_stream(container, rate: int = 16000):
    stream = container.add_stream("aac", rate=rate)
    stream.layout = "mono"
    return stream


def _encode_tone(container, stream, seconds: float) -> None:
    import av

    rate = stream.rate
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    step = 1024
    for i in range(0, len(samples), step):
        chunk = samples[i:i + step][None, :]
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = i
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_audio_only(path: str | Path, seconds: float = 1.0) -> None:
    """An .mp4 with a sound track and no video stream (a real-world bad input)."""
    import av

    with av.open(str(path), mode="w", format="mp4") as container:
        _encode_tone(container, _add_audio_stream(container), seconds)
