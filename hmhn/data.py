"""Face shards -> training and evaluation batches.

A shard set (what preprocessing writes under OUTPUT/<preprocess_version>/) is indexed once on the
driver from its small columns (video_id, split, label, frame_index; never the images), so that:

* training draws a FIXED number of frames per video each epoch (MODEL.md section 5): long
  AVEC2013 recordings and short AVEC2014 clips weigh the same. The draw is uniformly spaced with
  a random offset, re-drawn every epoch. It runs inside Ray Data on CPU: one task handles all the
  frames of a video (so its k positions are drawn consistently), reads only those rows' JPEGs,
  decodes and augments them. The training workers receive the frames through Ray Train's
  split of this dataset and `iter_torch_batches`.
* evaluation reads every frame (or a fixed, deterministic, uniform subset) of given videos in
  the calling process, in a stable order, so a distributed evaluation over disjoint video
  subsets adds up to exactly the single-process one.

Per-epoch randomness comes from fresh entropy in each Ray Data execution (like
`Dataset.random_shuffle()` without a seed): the epoch number is not visible inside a Ray Data
task and Ray's streaming split hands rows to workers dynamically, so the data order is not
bit-reproducible anyway; model initialisation is (TrainConfig.seed).
"""
from __future__ import annotations

import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from hmhn.image import decode_jpeg
from pipeline.schema import LABEL_MAX, LABEL_MIN, SPLITS
from pipeline.storage import resolve_filesystem

INDEX_COLUMNS = ["video_id", "subject_id", "split", "label", "frame_index"]


class ShardSetError(ValueError):
    """A shard set that cannot be trained on (missing, empty, inconsistent)."""


@dataclass(frozen=True)
class VideoInfo:
    video_id: str
    subject_id: str
    split: str
    label: float
    files: tuple[str, ...]           # parquet files (paths inside the shard set's filesystem) holding its frames
    frame_indices: tuple[int, ...]   # sorted frame_index of every kept frame


@dataclass(frozen=True)
class ShardSet:
    """Index of a shard set; small and picklable (it travels to Ray tasks and workers)."""

    root: str                                # as given: local path or filesystem URI
    preprocess_version: str
    preprocess_config: dict[str, Any]        # the whole config.json document
    videos: tuple[VideoInfo, ...]

    def split(self, name: str) -> list[VideoInfo]:
        return [v for v in self.videos if v.split == name]

    def labels(self, name: str) -> dict[str, float]:
        """video_id -> BDI-II of the split's labelled videos."""
        return {v.video_id: v.label for v in self.split(name) if not np.isnan(v.label)}

    def frame_count(self, name: str) -> int:
        return sum(len(v.frame_indices) for v in self.split(name))

    def train_mean(self) -> float:
        """Mean BDI-II over training VIDEOS (each video once): the baseline and the initial bias."""
        labels = list(self.labels("train").values())
        return float(np.mean(labels)) if labels else 0.0


def open_shardset(root: str) -> ShardSet:
    """Index the shard set at `root` (OUTPUT/<preprocess_version>/); ShardSetError if unusable."""
    fs, base = resolve_filesystem(root)
    base = base.rstrip("/")
    info = fs.get_file_info([f"{base}/config.json", f"{base}/shards"])
    if info[1].type != pafs.FileType.Directory:
        hint = ""
        if info[0].type == pafs.FileType.NotFound:
            hint = (" (and no config.json: --data must point at OUTPUT/<preprocess_version>/, "
                    "the folder preprocessing wrote config.json and shards/ into)")
        raise ShardSetError(f"no shards/ folder under {root}{hint}")
    doc: dict[str, Any] = {}
    if info[0].type == pafs.FileType.File:
        with fs.open_input_stream(f"{base}/config.json") as fh:
            doc = json.loads(fh.read().decode())
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(f"{base}/shards", recursive=True))
                   if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
    if not files:
        raise ShardSetError(f"{root}/shards holds no .parquet files: preprocessing kept no faces, or --data is wrong")
    table = (pads.dataset(files, filesystem=fs, format="parquet")
             .to_table(columns=INDEX_COLUMNS + ["__filename"]))
    frame = table.to_pandas()
    versions = {doc.get("preprocess_version")} - {None}
    videos = []
    for video_id, rows in frame.groupby("video_id", sort=True):
        splits, labels = rows["split"].unique(), rows["label"].unique()
        if len(splits) != 1 or len(labels) != 1:
            raise ShardSetError(f"video {video_id}: frames disagree on split {list(splits)} or label {list(labels)}")
        if splits[0] not in SPLITS:
            raise ShardSetError(f"video {video_id}: unknown split {splits[0]!r} (expected one of {SPLITS})")
        label = float(labels[0])
        if splits[0] != "test" or not np.isnan(label):
            if not LABEL_MIN <= label <= LABEL_MAX:
                raise ShardSetError(f"video {video_id}: label {label} outside BDI-II {LABEL_MIN}..{LABEL_MAX}")
        videos.append(VideoInfo(str(video_id), str(rows["subject_id"].iloc[0]), str(splits[0]), label,
                                tuple(sorted(rows["__filename"].unique())),
                                tuple(int(i) for i in np.sort(rows["frame_index"].to_numpy()))))
    version = doc.get("preprocess_version") or (versions.pop() if versions else "unknown")
    return ShardSet(root=root, preprocess_version=str(version), preprocess_config=doc, videos=tuple(videos))


def check_trainable(shardset: ShardSet, allow_no_dev: bool = False) -> None:
    """Clear errors for shard sets that cannot give a meaningful training run."""
    if not shardset.split("train"):
        raise ShardSetError(f"{shardset.root}: no training videos (split == 'train'); "
                            f"splits present: {sorted({v.split for v in shardset.videos})}")
    if not shardset.split("dev") and not allow_no_dev:
        raise ShardSetError(f"{shardset.root}: no dev videos, so there is nothing to select the best epoch on. "
                            "Add a dev split, or pass --allow-no-dev to select on the training videos instead")


def owner_rank(video_id: str, world_size: int) -> int:
    """Which worker evaluates a video: a stable hash (not Python's salted hash()) modulo world size."""
    return zlib.crc32(video_id.encode()) % world_size


def uniform_positions(n: int, k: int, offset: float) -> np.ndarray:
    """k positions in range(n), evenly spaced n/k apart starting at offset*n/k (offset in [0, 1)).

    For n < k positions repeat, so every video still contributes k samples.
    """
    stride = n / k
    return np.minimum((offset * stride + stride * np.arange(k)).astype(np.int64), n - 1)


# ----------------------------------------------------------------------------------------------
# Pixels


AUGMENTATIONS = ("full", "flip", "none")


def augment(image: np.ndarray, rng: np.random.Generator, mode: str = "full") -> np.ndarray:
    """DAN/RAF-DB-style augmentation of one aligned crop; nothing that changes the label.

    "full": horizontal flip; with p=0.5 a small affine (rotation +-10 deg, scale 0.9-1.05, shift
    +-6%); with p=0.25 random erasing of 2-20% of the image with noise. "flip": the flip only
    (on tiny data sets erasing can hide the very mouth/eye cue of a video's few frames).
    No colour jitter: lighting is roughly constant within a recording (MODEL.md section 5).
    """
    size = image.shape[0]
    if mode == "none":
        return image
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if mode == "flip":
        return np.ascontiguousarray(image)
    if rng.random() < 0.5:
        angle = rng.uniform(-10, 10)
        scale = rng.uniform(0.9, 1.05)
        matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
        matrix[:, 2] += rng.uniform(-0.06, 0.06, size=2) * size
        image = cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT_101)
    if rng.random() < 0.25:
        area = rng.uniform(0.02, 0.2) * size * size
        aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
        h = int(min(size, round(np.sqrt(area * aspect))))
        w = int(min(size, round(np.sqrt(area / aspect))))
        y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        image = np.array(image)
        image[y:y + h, x:x + w] = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return np.ascontiguousarray(image)


def _read_frames(root: str, files: tuple[str, ...], video_ids: list[str], frame_indices: list[int] | None,
                 columns: list[str]) -> pa.Table:
    """Rows of the given videos (optionally only the given frame_index values) from their files."""
    fs, _ = resolve_filesystem(root)
    expr = pc.field("video_id").isin(video_ids)
    if frame_indices is not None:
        expr = expr & pc.field("frame_index").isin(sorted(set(frame_indices)))
    return pads.dataset(list(files), filesystem=fs, format="parquet").to_table(columns=columns, filter=expr)


def sample_train_frames(batch: dict[str, np.ndarray], root: str, frames_per_video: int, input_size: int,
                        augmentation: str = "full") -> dict[str, np.ndarray]:
    """Ray Data UDF: rows of training videos in, `frames_per_video` decoded (augmented) crops out per video."""
    rng = np.random.default_rng()  # fresh entropy per execution = per epoch (see module doc)
    images, labels = [], []
    for video_id, label, files, indices in zip(batch["video_id"], batch["label"], batch["files"],
                                               batch["frame_indices"]):
        indices = np.asarray(indices)
        chosen = indices[uniform_positions(len(indices), frames_per_video, rng.random())].tolist()
        table = _read_frames(root, tuple(files), [str(video_id)], chosen, ["frame_index", "image"])
        by_index = dict(zip(table.column("frame_index").to_pylist(), table.column("image").to_pylist()))
        for index in chosen:  # repeats allowed: short videos still give k samples
            image = decode_jpeg(by_index[index], input_size)
            images.append(augment(image, rng, augmentation))
            labels.append(label)
    return {"image": np.stack(images), "label": np.asarray(labels, dtype=np.float32)}


def train_dataset(shardset: ShardSet, frames_per_video: int, input_size: int, augmentation: str = "full",
                  num_cpus: float = 1.0):
    """Ray Dataset of one epoch of training crops: {"image": uint8 (S,S,3), "label": float32}.

    Each execution (each epoch, each worker's share via Ray Train's split) re-draws the frames.
    """
    import ray.data

    items = [{"video_id": v.video_id, "label": np.float32(v.label), "files": list(v.files),
              "frame_indices": list(v.frame_indices)} for v in shardset.split("train")]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # A new block order every epoch (seedless), then one task per video; num_cpus < 1 so the data
    # pipeline keeps running next to training workers on a small machine (ENVIRONMENT.md).
    return ds.randomize_block_order().map_batches(
        sample_train_frames, batch_size=1, num_cpus=num_cpus,
        fn_kwargs={"root": shardset.root, "frames_per_video": frames_per_video, "input_size": input_size,
                   "augmentation": augmentation})


def eval_frame_plan(videos: list[VideoInfo], max_frames_per_video: int = 0) -> list[tuple[str, list[int]]]:
    """(video_id, frame indices) to evaluate: all frames, or a deterministic uniform subset."""
    plan = []
    for v in videos:
        indices = np.asarray(v.frame_indices)
        if max_frames_per_video and len(indices) > max_frames_per_video:
            indices = indices[uniform_positions(len(indices), max_frames_per_video, 0.5)]
        plan.append((v.video_id, indices.tolist()))
    return plan


def iter_eval_batches(shardset: ShardSet, videos: list[VideoInfo], input_size: int, batch_size: int = 64,
                      max_frames_per_video: int = 0, threads: int = 4
                      ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """(video_ids, uint8 images (B,S,S,3), labels) over the frames of `videos`, in a stable order.

    Runs in the calling process (a training worker or a plain script): evaluation sets are small
    next to training epochs, and a stable, complete pass is what makes per-video metrics exact.
    JPEG decoding uses a few threads (OpenCV releases the GIL).
    """
    by_id = {v.video_id: v for v in videos}
    pending: list[tuple[str, float, bytes]] = []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        def flush(items):
            ids = [i for i, _, _ in items]
            images = np.stack(list(pool.map(lambda item: decode_jpeg(item[2], input_size), items)))
            return ids, images, np.asarray([lbl for _, lbl, _ in items], dtype=np.float32)

        for video_id, indices in eval_frame_plan(videos, max_frames_per_video):
            video = by_id[video_id]
            table = _read_frames(shardset.root, video.files, [video_id], indices if max_frames_per_video else None,
                                 ["frame_index", "image"])
            order = np.argsort(table.column("frame_index").to_numpy(), kind="stable")
            images = table.column("image").to_pylist()
            pending.extend((video_id, video.label, images[i]) for i in order)
            while len(pending) >= batch_size:
                yield flush(pending[:batch_size])
                pending = pending[batch_size:]
        if pending:
            yield flush(pending)


# ----------------------------------------------------------------------------------------------
# A synthetic shard set for tests and benchmarks


def write_synthetic_shardset(root: str, splits: dict[str, int] | None = None, frames_per_video: int = 8,
                             size: int = 64, seed: int = 0, version: str = "synth000") -> str:
    """Write a tiny shard set in preprocessing's layout whose label is visible in every crop.

    Each frame is a noisy grey face-sized square whose brightness and a centred bar's width grow
    with the video's BDI-II label (flip/affine/erasing keep it readable), so a working training
    loop can learn it and a broken one cannot. Returns `root`.
    """
    import pyarrow.parquet as pq

    from hmhn.image import encode_jpeg
    from pipeline.schema import SHARD_SCHEMA, STATUS_SCHEMA

    splits = splits or {"train": 6, "dev": 2, "test": 2}
    rng = np.random.default_rng(seed)
    out = Path(root)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    status = []
    n = 0
    for split, count in splits.items():
        for i in range(count):
            video_id = f"{split}_{i:03d}"
            label = float(round(rng.uniform(0, 45), 1))
            rows = []
            for f in range(frames_per_video):
                image = rng.integers(0, 40, size=(size, size, 3), dtype=np.uint8)
                image += np.uint8(40 + 3 * label)
                half = int(2 + label / 45 * (size / 2 - 4))
                image[size // 2 - 4:size // 2 + 4, size // 2 - half:size // 2 + half] = 250
                rows.append({"video_id": video_id, "subject_id": f"s{n // 2:03d}", "split": split, "task": None,
                             "label": label, "frame_index": f * 10, "timestamp_s": f / 3.0, "det_score": 0.99,
                             "bbox": [0.0, 0.0, float(size), float(size)], "landmarks": [0.0] * 10,
                             "image": encode_jpeg(image), "preprocess_version": version})
            (out / "shards" / video_id).mkdir(exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA),
                           out / "shards" / video_id / "part-00000.parquet", compression="zstd")
            status.append({"video_id": video_id, "status": "ok", "reason": "", "frames_decoded": frames_per_video,
                           "faces_kept": frames_per_video, "subject_id": f"s{n // 2:03d}", "split": split,
                           "label": label, "seconds": 0.0})
            n += 1
    pq.write_table(pa.Table.from_pylist(status, schema=STATUS_SCHEMA), out / "status.parquet")
    (out / "config.json").write_text(json.dumps({"preprocess_version": version,
                                                 "config": {"synthetic": True, "align": {"size": size}}}))
    (out / "summary.json").write_text(json.dumps({"videos": n, "preprocess_version": version}))
    return str(root)
