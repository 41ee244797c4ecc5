"""The data contracts of ../shared/DESIGN.md as pyarrow schemas, shared by every stage.

Face shards must stay readable with plain pyarrow, so images are JPEG bytes (not Ray tensor
extension columns) and the small vectors are fixed-size lists of float32.
"""
from __future__ import annotations

import pyarrow as pa

SPLITS = ("train", "dev", "test")
# BDI-II totals (the label): 0..63, and the severity bands of Beck et al. 1996, each from its lowest
# total: minimal 0-13, mild 14-19, moderate 20-28, severe 29-63. The one copy (hmhn.config.BDI_MIN /
# BDI_MAX, scoring, plots and the demo data read these).
LABEL_MIN, LABEL_MAX = 0, 63
SEVERITY_BANDS = (("minimal", 0), ("mild", 14), ("moderate", 20), ("severe", 29))

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

# A video and its label: the first columns of the shard rows and of the commit log (pipeline.shardset).
VIDEO_COLUMNS = [
    ("video_id", pa.string()),
    ("subject_id", pa.string()),
    ("split", pa.string()),
    ("task", pa.string()),
    ("label", pa.float32()),
]

SHARD_SCHEMA = pa.schema(
    [
        *VIDEO_COLUMNS,
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


def severity_band(score: float) -> str:
    """BDI-II severity band of a total score (SEVERITY_BANDS; a fractional score belongs to the band
    its value falls in, e.g. 13.5 is minimal)."""
    for (name, _), (_, next_lowest) in zip(SEVERITY_BANDS, SEVERITY_BANDS[1:]):
        if score < next_lowest:
            return name
    return SEVERITY_BANDS[-1][0]
