"""Face shard sets -> training and evaluation batches.

The shard set's format (files, commit log, index, strided row groups) belongs to pipeline.shardset;
this module turns it into what the model eats:

* training draws a FIXED number of frames per video each epoch (MODEL.md section 5): long
  AVEC2013 recordings and short AVEC2014 clips weigh the same. The draw is evenly spaced with
  a random offset, re-drawn every epoch, and reads only the row groups that hold those frames
  (pipeline.shardset.RowGroupReader.draw). It runs inside Ray Data on CPU: a task gets the index
  rows of a few videos (never frames), draws, decodes and augments their frames, and the training
  workers receive them through Ray Train's split of this dataset and `iter_torch_batches`.
* evaluation reads every frame (or a fixed, deterministic, evenly spaced subset) of given videos
  in the calling process, in a stable order, and reduces them per video (sum, count), so a
  distributed evaluation over disjoint video subsets adds up to exactly the single-process one.

Per-epoch randomness comes from fresh entropy in each Ray Data execution (like
`Dataset.random_shuffle()` without a seed): the epoch number is not visible inside a Ray Data
task and Ray's streaming split hands rows to workers dynamically, so the data order is not
bit-reproducible anyway; model initialisation is (TrainConfig.seed).
"""
from __future__ import annotations

import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pyarrow as pa

from hmhn.image import decode_jpeg
from pipeline.sampling import uniform_positions
from pipeline.shardset import RowGroupReader, ShardIndex, ShardSetError, VideoEntry

__all__ = ["ShardIndex", "ShardSetError", "VideoEntry", "open_shardset", "check_trainable", "owner_rank",
           "uniform_positions", "augment", "sample_train_frames", "train_dataset", "iter_eval_batches",
           "write_synthetic_shardset", "AUGMENTATIONS"]


def open_shardset(root: str) -> ShardIndex:
    """The committed videos of the shard set at `root` (OUTPUT/<preprocess_version>/); ShardSetError if unusable."""
    index = ShardIndex.load(root)
    if index.table.num_rows == 0:
        raise ShardSetError(f"{root}: the shard set's index lists no video")
    index.check_labels()
    return index


def check_trainable(index: ShardIndex, allow_no_dev: bool = False) -> None:
    """Clear errors for shard sets that cannot give a meaningful training run."""
    if not index.count("train"):
        raise ShardSetError(f"{index.root}: no training videos with faces (split == 'train'); "
                            f"splits present: {index.splits()}")
    if not index.count("dev") and not allow_no_dev:
        raise ShardSetError(f"{index.root}: no dev videos with faces, so there is nothing to select the best epoch "
                            "on. Add a dev split, or pass --allow-no-dev to select on the training videos instead")


def owner_rank(video_id: str, world_size: int) -> int:
    """Which worker evaluates a video: a stable hash (not Python's salted hash()) modulo world size."""
    return zlib.crc32(video_id.encode()) % world_size


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


def sample_train_frames(batch: dict[str, np.ndarray], root: str, frames_per_video: int, input_size: int,
                        augmentation: str = "full") -> dict[str, np.ndarray]:
    """Ray Data UDF: index rows of training videos in, `frames_per_video` decoded (augmented) crops out per video."""
    rng = np.random.default_rng()  # fresh entropy per execution = per epoch (see module doc)
    reader = RowGroupReader(root)
    images, labels = [], []
    try:
        for row in _rows(batch):
            entry = VideoEntry.from_row(row)
            table = reader.draw(entry, frames_per_video, rng.random(), ["image"])
            for data in table.column("image").to_pylist():  # repeats allowed: short videos still give k samples
                images.append(augment(decode_jpeg(data, input_size), rng, augmentation))
                labels.append(entry.label)
    finally:
        reader.close()
    return {"image": np.stack(images), "label": np.asarray(labels, dtype=np.float32)}


def _rows(batch: dict[str, np.ndarray]) -> list[dict]:
    names = list(batch)
    return [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]


FRAMES_PER_TASK = 512  # crops per task = per output block: 8 videos x 64 frames x 150 KB at 224 px ~ 77 MB
MIN_TASKS = 4          # per epoch, when the set is small: some parallelism for the first epoch


def train_dataset(index: ShardIndex, frames_per_video: int, input_size: int, augmentation: str = "full",
                  num_cpus: float = 1.0):
    """Ray Dataset of one epoch of training crops: {"image": uint8 (S,S,3), "label": float32}.

    The inputs are the training videos' index rows (~100 bytes each, no frames), in blocks of a few
    videos handed out once per fit, one block per task; each execution (each epoch, each worker's
    share via Ray Train's split) re-draws the frames. A task draws up to FRAMES_PER_TASK crops (8
    videos at the default 64 frames), fewer videos when the set is small so that an epoch still has
    MIN_TASKS tasks. Not one video per task: each Ray Data task costs ~15-20 ms of CPU in the
    executor, the split coordinator and the task's worker, ~20 times what drawing, decoding and
    augmenting 16 crops of 64 px costs; with one video per task the pipeline took ~0.5 CPU-s per
    epoch of 12 videos x 16 frames, away from the training step (docs/TRAINING.md, throughput).
    Not `read_parquet` on the index:
    Ray Data reads one file as one block, and the repartition and file-listing tasks that would split
    it ask for a whole CPU, which the training workers leave unavailable on small nodes (it hung on
    two 1-CPU nodes).
    """
    from pipeline.ray_utils import dataset_of_slices

    rows = index.select("train", with_frames=True)
    per_task = max(1, min(FRAMES_PER_TASK // frames_per_video, -(-rows.num_rows // MIN_TASKS)))
    # A new block order every epoch (seedless); num_cpus < 1 so the data pipeline keeps running
    # next to training workers on a small machine (ENVIRONMENT.md).
    return dataset_of_slices(rows, per_task).randomize_block_order().map_batches(
        sample_train_frames, batch_size=None, num_cpus=num_cpus,
        fn_kwargs={"root": index.root, "frames_per_video": frames_per_video, "input_size": input_size,
                   "augmentation": augmentation})


def iter_eval_batches(root: str, videos: list[VideoEntry], input_size: int, batch_size: int = 64,
                      max_frames_per_video: int = 0, threads: int = 4
                      ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """(video_ids, uint8 images (B,S,S,3), labels) over the frames of `videos`, in a stable order.

    All frames of each video, or (max_frames_per_video > 0) at most that many, evenly spaced,
    reading only their row groups. Runs in the calling process (a training worker or a plain
    script). JPEG decoding uses a few threads (OpenCV releases the GIL).
    """
    reader = RowGroupReader(root)
    pending: list[tuple[str, float, bytes]] = []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        def flush(items):
            ids = [i for i, _, _ in items]
            images = np.stack(list(pool.map(lambda item: decode_jpeg(item[2], input_size), items)))
            return ids, images, np.asarray([lbl for _, lbl, _ in items], dtype=np.float32)

        try:
            for video in videos:
                if max_frames_per_video and video.faces_kept > max_frames_per_video:
                    table = reader.draw(video, max_frames_per_video, 0.5, ["image"])
                else:
                    table = reader.read(video, None, ["image"])
                pending.extend((video.video_id, video.label, data) for data in table.column("image").to_pylist())
                while len(pending) >= batch_size:
                    yield flush(pending[:batch_size])
                    pending = pending[batch_size:]
            if pending:
                yield flush(pending)
        finally:
            reader.close()


# ----------------------------------------------------------------------------------------------
# A synthetic shard set for tests and benchmarks


def write_synthetic_shardset(root: str, splits: dict[str, int] | None = None, frames_per_video: int = 8,
                             size: int = 64, seed: int = 0, version: str = "synth000", row_group_rows: int = 4,
                             videos_per_file: int = 4, no_face: dict[str, int] | None = None) -> str:
    """Write a tiny shard set in preprocessing's format whose label is visible in every crop.

    Each frame is a noisy grey face-sized square whose brightness and a centred bar's width grow
    with the video's BDI-II label (flip/affine/erasing keep it readable), so a working training
    loop can learn it and a broken one cannot. `no_face` adds videos per split that were
    preprocessed without a usable face (status no_face, no rows). Returns `root`.
    """
    from hmhn.image import encode_jpeg
    from pipeline.schema import SHARD_SCHEMA, STATUS_NO_FACE, STATUS_OK
    from pipeline.shardset import CONFIG_FILE, FORMAT_VERSION, SUMMARY_FILE, CommitLog, ShardFileWriter, write_index

    splits = splits or {"train": 6, "dev": 2, "test": 2}
    rng = np.random.default_rng(seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    writer = ShardFileWriter(root, row_group_rows=row_group_rows)
    commit = CommitLog(root, run_id="synthetic")
    pending: list[dict] = []
    n = 0
    for split, count in splits.items():
        for i in range(count):
            video_id = f"{split}_{i:03d}"
            subject = f"s{n // 2:03d}"
            label = float(round(rng.uniform(0, 45), 1))
            rows = []
            for f in range(frames_per_video):
                image = rng.integers(0, 40, size=(size, size, 3), dtype=np.uint8)
                image += np.uint8(40 + 3 * label)
                half = int(2 + label / 45 * (size / 2 - 4))
                image[size // 2 - 4:size // 2 + 4, size // 2 - half:size // 2 + half] = 250
                rows.append({"video_id": video_id, "subject_id": subject, "split": split, "task": None,
                             "label": label, "frame_index": f * 10, "timestamp_s": f / 3.0, "det_score": 0.99,
                             "bbox": [0.0, 0.0, float(size), float(size)], "landmarks": [0.0] * 10,
                             "image": encode_jpeg(image), "preprocess_version": version})
            where = writer.add_video(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))
            pending.append({"video_id": video_id, "subject_id": subject, "split": split, "label": label,
                            "status": STATUS_OK, "reason": "", "frames_decoded": frames_per_video,
                            "faces_kept": frames_per_video, "seconds": 0.0, "file": where.file,
                            "row_group_first": where.row_group_first, "row_group_count": where.row_group_count})
            n += 1
            if len(pending) >= videos_per_file:
                writer.close()
                for entry in pending:
                    commit.add(entry)
                pending = []
    writer.close()
    for entry in pending:
        commit.add(entry)
    for split, count in (no_face or {}).items():
        for i in range(count):
            commit.add({"video_id": f"{split}_noface_{i:03d}", "subject_id": f"nf{i:03d}", "split": split,
                        "label": float(round(rng.uniform(0, 45), 1)), "status": STATUS_NO_FACE,
                        "reason": "no face above score threshold in 8 sampled frames", "frames_decoded": 8,
                        "faces_kept": 0, "seconds": 0.0})
    commit.flush()
    write_index(root)
    (Path(root) / CONFIG_FILE).write_text(json.dumps({"preprocess_version": version, "format_version": FORMAT_VERSION,
                                                      "config": {"synthetic": True, "align": {"size": size}}}))
    (Path(root) / SUMMARY_FILE).write_text(json.dumps({"videos": n, "preprocess_version": version}))
    return str(root)
