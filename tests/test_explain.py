"""hmhn.explain: attention-map grid and frame-score plot of one video (no Ray, no MLflow)."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from hmhn.explain import explain_video, pick_faces
from hmhn.image import encode_jpeg
from tests.test_serving import small_scoring_model


def video_rows(astronaut_rgb: np.ndarray, frames: int = 6) -> pd.DataFrame:
    """Shard-like rows of a 'video' of slightly moving crops of the astronaut's face."""
    images = []
    for i in range(frames):
        y, x = 30 + 3 * i, 135 + 2 * i
        images.append(encode_jpeg(cv2.resize(astronaut_rgb[y:y + 200, x:x + 200], (224, 224))))
    return pd.DataFrame({"video_id": "v1", "frame_index": np.arange(frames) * 6,
                         "timestamp_s": np.arange(frames) * 0.2, "image": images})


def test_pick_faces_spreads_over_the_video():
    assert pick_faces(3, 4) == [0, 1, 2]
    assert pick_faces(100, 4) == [0, 33, 66, 99]


def test_attention_png_shows_distinct_heads(astronaut_rgb, tmp_path):
    model = small_scoring_model()
    rows = video_rows(astronaut_rgb)
    scores = pd.DataFrame({"timestamp_s": rows["timestamp_s"], "score": np.linspace(20, 30, len(rows))})
    result = explain_video(model, rows, scores, str(tmp_path / "explain"), "v1", faces=3)

    for key in ("attention_png", "scores_png"):
        picture = cv2.imread(result[key])
        assert picture is not None and picture.shape[0] > 100 and picture.shape[1] > 200, key
        assert picture.std() > 10, f"{key} is blank"
    maps = result["maps"]
    k = model.config.num_heads
    assert maps.shape == (3, k, 112, 112)
    assert result["frame_index"] == [0, 12, 30]
    # Every head's map has structure (not constant) and differs from every other head's.
    assert (maps.reshape(3, k, -1).std(axis=-1) > 0.05).all()
    for a in range(k):
        for b in range(a + 1, k):
            difference = np.abs(maps[:, a] - maps[:, b]).mean()
            assert difference > 0.02, f"heads {a + 1} and {b + 1} look the same ({difference:.4f})"
