"""The data contracts of ../shared/DESIGN.md as pyarrow schemas, shared by every stage.

Face shards must stay readable with plain pyarrow, so images are JPEG bytes (not Ray tensor
extension columns) and the small vectors are fixed-size lists of float32.
"""
from __future__ import annotations

import pyarrow as pa

SPLITS = ("train", "dev", "test")
LABEL_MIN, LABEL_MAX = 0, 63

MANIFEST_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("subject_id", pa.string()),
        ("split", pa.string()),
        ("label", pa.float32()),  # BDI-II total 0..63; null for videos to be scored
        ("uri", pa.string()),
        ("task", pa.string()),  # AVEC2014 Northwind / Freeform; null elsewhere
    ]
)

SHARD_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("subject_id", pa.string()),
        ("split", pa.string()),
        ("task", pa.string()),
        ("label", pa.float32()),
        ("frame_index", pa.int64()),
        ("timestamp_s", pa.float64()),
        ("det_score", pa.float32()),
        ("bbox", pa.list_(pa.float32(), 4)),  # x1, y1, x2, y2 in source-frame pixels
        ("landmarks", pa.list_(pa.float32(), 10)),  # 5 points (eyes, nose, mouth corners), x/y interleaved
        ("image", pa.binary()),  # JPEG of the aligned RGB crop
        ("preprocess_version", pa.string()),
    ]
)

STATUS_OK, STATUS_NO_FACE, STATUS_FAILED = "ok", "no_face", "failed"

STATUS_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("status", pa.string()),  # ok / no_face / failed
        ("reason", pa.string()),  # empty when ok
        ("frames_decoded", pa.int64()),
        ("faces_kept", pa.int64()),
        ("subject_id", pa.string()),
        ("split", pa.string()),
        ("label", pa.float32()),
        ("seconds", pa.float64()),  # wall time spent on this video
    ]
)


def severity_band(score: float) -> str:
    """BDI-II severity band of a total score (Beck et al. 1996 cut-offs)."""
    if score < 14:
        return "minimal"
    if score < 20:
        return "mild"
    if score < 29:
        return "moderate"
    return "severe"
