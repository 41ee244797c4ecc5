"""The Ray Data graph: manifest -> (decode, detect, align, JPEG) per chunk of frames -> shards.

    videos (one block each) --map_batches(VideoFaceCropper, actor pool: decode inside)--> or
    videos --flat_map(decode_video_chunks, tasks)--> --map_batches(ChunkFaceCropper, actor pool)-->
        per chunk of frames: one parquet file + a small receipt
        --driver--> per-video status file once all of a video's chunks are in

Exactly-once without a database: a video counts as done only when its status file
`status/<video_id>.parquet` exists, and that file is written by the driver after every chunk
file of the video was renamed into place. A rerun skips done videos and deletes the leftovers
(chunk files without a status file) of any video it is about to redo, so a run killed at any
point and rerun ends with every video's frames exactly once.

Output layout (under OUTPUT/<preprocess_version>/):
    config.json                     the resolved config + preprocess_version
    shards/<video_id>/part-00000.parquet ...   SHARD_SCHEMA, <= sampling.chunk_frames rows each
    status/<video_id>.parquet       one row per video (commit marker)
    status.parquet                  all status rows, merged at the end of a run
    summary.json                    counts, failure reasons, throughput
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.align import AlignConfig, align_face, pick_face
from pipeline.decode import FrameChunk, SamplingConfig, VideoDecodeError, iter_frame_chunks
from pipeline.detect import DetectorConfig
from pipeline.jpeg import encode_jpeg
from pipeline.schema import (SHARD_SCHEMA, STATUS_FAILED, STATUS_NO_FACE, STATUS_OK, STATUS_SCHEMA)
from pipeline.storage import resolve_filesystem

log = logging.getLogger(__name__)

DATASETS = ("avec2013", "avec2014", "csv")
DECODE_IN = ("auto", "actor", "tasks")


@dataclass(frozen=True)
class PreprocessConfig:
    dataset: str = field(default="csv", metadata={"help": "input layout", "choices": DATASETS})
    input: str = field(default="", metadata={"help": "dataset root (avec2013/avec2014) or manifest CSV; local path or URI"})
    output: str = field(default="data/faces", metadata={"help": "output root; shards go to OUTPUT/<preprocess_version>/"})
    jpeg_quality: int = field(default=92, metadata={"help": "JPEG quality of the stored face crops"})
    num_detect_actors: int = field(default=0, metadata={"help": "detector actors (0 = sized from the cluster)"})
    gpu_per_actor: float = field(default=0.25, metadata={"help": "GPU fraction per detector actor when --detector-use-gpu"})
    decode_in: str = field(default="auto", metadata={
        "help": "where videos are decoded: 'actor' = inside the detector actors (no raw frames through the object "
                "store; auto on CPU), 'tasks' = separate CPU tasks feeding them (decoding scales with all the "
                "cluster's CPUs while GPUs detect; auto with --detector-use-gpu)", "choices": DECODE_IN})
    limit: int = field(default=0, metadata={"help": "process only the first N videos of the manifest (0 = all)"})
    progress_every_s: float = field(default=10.0, metadata={"help": "seconds between progress lines"})
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    align: AlignConfig = field(default_factory=AlignConfig)

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if not self.input:
            raise ValueError("input is required (--input PATH_OR_URI)")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be 1..100, got {self.jpeg_quality}")
        if self.num_detect_actors < 0 or self.limit < 0:
            raise ValueError("num_detect_actors and limit must be >= 0")
        if self.decode_in not in DECODE_IN:
            raise ValueError(f"decode_in must be one of {DECODE_IN}, got {self.decode_in!r}")
        if not 0 < self.gpu_per_actor <= 1:
            raise ValueError(f"gpu_per_actor must be in (0, 1], got {self.gpu_per_actor}")


def preprocess_version(config: PreprocessConfig) -> str:
    """Short hash of everything that changes the content of the shards (not where they go,
    nor how many actors or which device made them)."""
    content = {
        "sampling": {k: v for k, v in dataclasses.asdict(config.sampling).items() if k not in ("backend", "chunk_frames")},
        "detector": {k: v for k, v in dataclasses.asdict(config.detector).items() if k not in ("use_gpu", "intra_op_threads")},
        "align": dataclasses.asdict(config.align),
        "jpeg_quality": config.jpeg_quality,
        "schema": 1,
    }
    return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:10]


def shard_set_path(config: PreprocessConfig) -> str:
    return config.output.rstrip("/") + "/" + preprocess_version(config)


# ----------------------------------------------------------------------------------------------
# Two graphs, one per place decoding runs (PreprocessConfig.decode_in, "auto" picks by device):
#
#   "actor" (auto on CPU): videos --map_batches(VideoFaceCropper, actor pool)--> receipts
#       Each actor decodes a video chunk by chunk and detects in the same process. A 32-frame
#       chunk of 640x480 RGB is ~30 MB and its face crops ~0.5 MB: a separate decode stage would
#       push every raw frame through the object store. Measured 1.15-1.3x the throughput of
#       the "tasks" graph on 1-2 CPUs, with less memory (docs/PREPROCESSING.md).
#   "tasks" (auto on GPU): videos --flat_map(decode_video_chunks, CPU tasks)--> frame chunks
#       --map_batches(ChunkFaceCropper, GPU actor pool)--> receipts
#       Decoding scales with every CPU of the cluster (CPU-only nodes too) while the GPUs only
#       detect; the object-store traffic is the price.
#
# Both write one shard file per chunk and emit one small receipt per chunk.

_VIDEO_META = ("video_id", "subject_id", "split", "task", "label")
_RECEIPT_COLUMNS = (*_VIDEO_META, "chunk_index", "is_last", "error", "frames_decoded", "faces_kept",
                    "multi_face_frames")


def _decode_guarded(uri: str, sampling: SamplingConfig) -> Iterator[tuple[FrameChunk | None, str]]:
    """(chunk, "") per chunk, then on failure one (None, reason): decoding errors become data,
    never exceptions, because one bad video must not stop the run."""
    chunks = iter_frame_chunks(uri, sampling)
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except VideoDecodeError as exc:
            yield None, str(exc)
            return
        except Exception as exc:  # a decoder bug must not stop the run either; keep the type for triage
            yield None, f"unexpected decoder error ({type(exc).__name__}): {exc}"
            return
        yield chunk, ""


def decode_video_chunks(row: dict[str, Any], sampling: SamplingConfig) -> Iterator[dict[str, Any]]:
    """Ray task of the "tasks" graph: one row per chunk of decoded frames (raw RGB bytes)."""
    meta = {k: row.get(k) for k in _VIDEO_META}
    for chunk_index, (chunk, error) in enumerate(_decode_guarded(str(row["uri"]), sampling)):
        frames = np.zeros((0, 0, 0, 3), np.uint8) if chunk is None else np.ascontiguousarray(chunk.frames, np.uint8)
        yield {**meta, "chunk_index": chunk_index, "is_last": chunk is None or bool(chunk.is_last), "error": error,
               "frames": frames.tobytes(), "frames_shape": list(frames.shape),
               "frame_index": [] if chunk is None else chunk.indices.astype(np.int64).tolist(),
               "timestamp_s": [] if chunk is None else chunk.timestamps_s.astype(np.float64).tolist()}


def _failed_receipt(meta: dict[str, Any], chunk_index: int, error: str) -> dict[str, Any]:
    """The last receipt of a video that could not be decoded (further)."""
    return {**meta, "chunk_index": chunk_index, "is_last": True, "error": error,
            "frames_decoded": 0, "faces_kept": 0, "multi_face_frames": 0}


class FaceCropper:
    """Actor base: detect, pick one face, align, JPEG-encode, write one shard file per chunk.
    ONNX sessions are built once per actor."""

    def __init__(self, detector: DetectorConfig, align: AlignConfig, shard_root: str, version: str,
                 jpeg_quality: int):
        import cv2

        from pipeline.detect import make_detector

        cv2.setNumThreads(1)  # parallelism comes from the actor pool; OpenCV's own threads oversubscribe
        self.detector = make_detector(detector)
        self.align = align
        self.version = version
        self.jpeg_quality = jpeg_quality
        self.fs, self.shard_root = resolve_filesystem(shard_root)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, list]]:
        # A generator: each chunk's receipt reaches the driver as soon as its file is written,
        # so progress and per-video commit markers do not wait for the end of a long video.
        for i in range(len(batch["video_id"])):
            row = {k: batch[k][i] for k in batch}
            row.update({k: _clean_meta(k, row.get(k)) for k in _VIDEO_META})
            for receipt in self.receipts(row):
                yield {k: [receipt[k]] for k in _RECEIPT_COLUMNS}

    def receipts(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def crop_chunk(self, meta: dict[str, Any], frames: np.ndarray, indices, stamps, chunk_index: int,
                   is_last: bool) -> dict[str, Any]:
        """The chunk's receipt. A failure here (e.g. onnxruntime on a degenerate frame) is recorded
        against the video, and the run goes on."""
        receipt = {**meta, "chunk_index": chunk_index, "is_last": is_last, "error": "",
                   "frames_decoded": len(frames), "faces_kept": 0, "multi_face_frames": 0}
        try:
            detections = self.detector.detect_batch(list(frames))  # faces >= score_threshold
            columns: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
            for frame, idx, ts, faces in zip(frames, indices, stamps, detections):
                receipt["multi_face_frames"] += len(faces) > 1
                face = pick_face(faces, frame.shape[:2], self.align.face_selection)
                if face is None:
                    continue
                crop = align_face(frame, face.landmarks, self.align)
                for name, value in (
                    *meta.items(),
                    ("frame_index", int(idx)), ("timestamp_s", float(ts)), ("det_score", float(face.score)),
                    ("bbox", [float(v) for v in face.bbox]),
                    ("landmarks", [float(v) for v in np.asarray(face.landmarks).reshape(-1)]),
                    ("image", encode_jpeg(crop, self.jpeg_quality)), ("preprocess_version", self.version),
                ):
                    columns[name].append(value)
            if columns["frame_index"]:
                self._write_atomically(pa.table(columns, schema=SHARD_SCHEMA), meta["video_id"], chunk_index)
            receipt["faces_kept"] = len(columns["frame_index"])
        except Exception as exc:
            receipt["error"] = f"face crop stage failed ({type(exc).__name__}): {exc}"
        return receipt

    def _write_atomically(self, table: pa.Table, video_id: str, chunk_index: int) -> None:
        folder = f"{self.shard_root}/{video_id}"
        self.fs.create_dir(folder, recursive=True)
        final = f"{folder}/part-{chunk_index:05d}.parquet"
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}.parquet"
        with self.fs.open_output_stream(tmp) as sink:
            pq.write_table(table, sink, compression="zstd")
        self.fs.move(tmp, final)


class VideoFaceCropper(FaceCropper):
    """Actor of the "actor" graph: takes manifest rows, decodes each video itself."""

    def __init__(self, sampling: SamplingConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.sampling = sampling

    def receipts(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        meta = {k: row[k] for k in _VIDEO_META}
        for chunk_index, (chunk, error) in enumerate(_decode_guarded(str(row["uri"]), self.sampling)):
            if chunk is None:
                yield _failed_receipt(meta, chunk_index, error)
            else:
                yield self.crop_chunk(meta, chunk.frames, chunk.indices, chunk.timestamps_s, chunk_index,
                                      bool(chunk.is_last))


class ChunkFaceCropper(FaceCropper):
    """Actor of the "tasks" graph: takes the chunk rows of decode_video_chunks."""

    def receipts(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        meta = {k: row[k] for k in _VIDEO_META}
        if row["error"]:
            yield _failed_receipt(meta, int(row["chunk_index"]), str(row["error"]))
        else:
            shape = tuple(int(v) for v in row["frames_shape"])
            frames = np.frombuffer(row["frames"], dtype=np.uint8).reshape(shape)
            yield self.crop_chunk(meta, frames, list(row["frame_index"]), list(row["timestamp_s"]),
                                  int(row["chunk_index"]), bool(row["is_last"]))


def _clean_meta(key: str, value: Any) -> Any:
    """Manifest values come back from Ray's numpy batches as numpy scalars, and nulls as None or
    NaN depending on the column; normalise to str / float / None for the shard schema."""
    if value is None or (not isinstance(value, (str, bytes)) and _isnan(value)):
        return None
    if key == "label":
        return float(value)
    return value.decode() if isinstance(value, bytes) else str(value)


def _isnan(value: Any) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# The driver


@dataclass
class _VideoProgress:
    """Receipts of one video, keyed by chunk index: a retried video re-sends receipts for chunks
    it had already written (same file names, overwritten), and they must count once."""
    row: dict[str, Any]
    started: float = field(default_factory=time.time)
    chunks: dict[int, dict[str, Any]] = field(default_factory=dict)
    total_chunks: int | None = None

    def add(self, receipt: dict[str, Any]) -> None:
        index = int(receipt["chunk_index"])
        self.chunks[index] = receipt
        if receipt["is_last"]:
            self.total_chunks = index + 1

    def _sum(self, key: str) -> int:
        return sum(int(r[key]) for r in self.chunks.values())

    @property
    def frames_decoded(self) -> int:
        return self._sum("frames_decoded")

    @property
    def faces_kept(self) -> int:
        return self._sum("faces_kept")

    @property
    def multi_face_frames(self) -> int:
        return self._sum("multi_face_frames")

    @property
    def errors(self) -> list[str]:
        return [str(self.chunks[i]["error"]) for i in sorted(self.chunks) if self.chunks[i]["error"]]

    @property
    def complete(self) -> bool:
        return self.total_chunks is not None and len(self.chunks) == self.total_chunks


def _status_row(p: _VideoProgress, crashed: bool = False) -> dict[str, Any]:
    if crashed:
        status, reason = STATUS_FAILED, "worker process died while processing this video (decoder crash or out of memory)"
    elif p.errors:
        status, reason = STATUS_FAILED, p.errors[0]
    elif p.faces_kept == 0:
        status = STATUS_NO_FACE
        reason = f"no face above score threshold in {p.frames_decoded} sampled frames"
    else:
        status, reason = STATUS_OK, ""
        if p.multi_face_frames:
            reason = f"several faces in {p.multi_face_frames} frames: kept one per frame"
    label = p.row.get("label")
    return {"video_id": p.row["video_id"], "status": status, "reason": reason,
            "frames_decoded": p.frames_decoded, "faces_kept": p.faces_kept,
            "subject_id": p.row.get("subject_id"), "split": p.row.get("split"),
            "label": None if label is None or _isnan(label) else float(label),
            "seconds": round(time.time() - p.started, 3)}


def _plan_stages(config: PreprocessConfig) -> dict[str, Any]:
    """Which graph, how many detector actors, and what each stage reserves.

    On 2 cores whole-CPU actors starve any stage feeding them (the deadlock of ENVIRONMENT.md),
    so with decode tasks the actors reserve fractions that leave room for them."""
    from pipeline.ray_utils import cluster_cpus, cluster_gpus

    cpus, gpus = cluster_cpus(), cluster_gpus()
    on_gpu = config.detector.use_gpu and gpus > 0
    if config.detector.use_gpu and not on_gpu:
        log.warning("--detector-use-gpu was given but the cluster has no GPU: detecting on CPU")
    decode_in = config.decode_in if config.decode_in != "auto" else ("tasks" if on_gpu else "actor")
    if on_gpu:
        size = config.num_detect_actors or max(1, int(gpus / config.gpu_per_actor))
        actor_cpus = min(1.0, cpus / size) if decode_in == "actor" else (1.0 if cpus >= 2 * size else 0.5)
        return {"decode_in": decode_in, "size": size, "num_cpus": round(actor_cpus, 3),
                "num_gpus": config.gpu_per_actor, "decode_cpus": 0.5}
    size = config.num_detect_actors or max(1, int(cpus))
    share = 1.0 if decode_in == "actor" else 0.75  # the rest of the CPUs for decode tasks
    return {"decode_in": decode_in, "size": size, "num_cpus": round(min(1.0, share * cpus / size), 3),
            "num_gpus": 0.0, "decode_cpus": 0.25}


def _read_done(fs, status_dir: str) -> dict[str, dict]:
    from pyarrow.fs import FileSelector, FileType

    done: dict[str, dict] = {}
    if fs.get_file_info(status_dir).type != FileType.Directory:
        return done
    for info in fs.get_file_info(FileSelector(status_dir)):
        if info.is_file and info.path.endswith(".parquet"):
            for row in pq.read_table(info.path, filesystem=fs).to_pylist():
                done[row["video_id"]] = row
    return done


def _write_status(fs, status_dir: str, row: dict[str, Any]) -> None:
    table = pa.Table.from_pylist([row], schema=STATUS_SCHEMA)
    tmp = f"{status_dir}/.tmp-{uuid.uuid4().hex}.parquet"
    with fs.open_output_stream(tmp) as sink:
        pq.write_table(table, sink)
    fs.move(tmp, f"{status_dir}/{row['video_id']}.parquet")


def run_preprocess(config: PreprocessConfig, manifest: pa.Table | None = None,
                   printer=print) -> dict[str, Any]:
    """Run (or resume) preprocessing; returns the summary dict (also written to summary.json).

    Raises ManifestError for an invalid manifest (nothing is processed then).
    """
    import ray

    from pipeline.manifest import load_manifest
    from pipeline.ray_utils import alive_node_count, describe_connection, init_ray
    from pipeline.storage import require_shared_storage

    started = time.time()
    if manifest is None:
        manifest = load_manifest(config.dataset, config.input)
    rows = manifest.to_pylist()
    if config.limit:
        rows = rows[: config.limit]
    version = preprocess_version(config)
    out_uri = shard_set_path(config)
    init_ray()
    printer(f"[preprocess] Ray: {describe_connection()}")
    nodes = alive_node_count()
    require_shared_storage(config.output, "--output", node_count=nodes)
    # Videos are decoded on whichever node runs the task: local inputs must be visible everywhere too.
    for uri in {config.input, *(r["uri"] for r in rows)} if nodes > 1 else ():
        require_shared_storage(uri, "--input (and the manifest's video uris)", node_count=nodes)
    fs, out_path = resolve_filesystem(out_uri)
    for sub in ("shards", "status"):
        fs.create_dir(f"{out_path}/{sub}", recursive=True)
    config_doc = {"preprocess_version": version, "config": dataclasses.asdict(config)}
    with fs.open_output_stream(f"{out_path}/config.json") as fh:
        fh.write(json.dumps(config_doc, indent=2).encode())

    previous = _read_done(fs, f"{out_path}/status")
    # Failed videos are retried (the file may have been fixed); ok / no_face are final.
    done = {vid: r for vid, r in previous.items() if r["status"] in (STATUS_OK, STATUS_NO_FACE)}
    todo = [r for r in rows if r["video_id"] not in done]
    for r in todo:  # leftovers of a killed run: chunk files without a status file
        fs.delete_dir_contents(f"{out_path}/shards/{r['video_id']}", missing_dir_ok=True)
    printer(f"[preprocess] {len(rows)} videos in manifest, {len(done)} already done, {len(todo)} to process "
            f"-> {out_uri}")

    pool = _plan_stages(config)
    progress = {r["video_id"]: _VideoProgress(r) for r in todo}
    if todo:
        from ray.data import ActorPoolStrategy, DataContext

        ctx = DataContext.get_current()
        # A video whose actor dies (decoder crash, OOM) fails only its block; the driver then
        # records the video as failed instead of losing the whole run.
        ctx.max_errored_blocks = len(todo)
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        crop_kwargs = {"detector": config.detector, "align": config.align, "shard_root": f"{out_uri}/shards",
                       "version": version, "jpeg_quality": config.jpeg_quality}
        if pool["decode_in"] == "tasks":
            printer(f"[preprocess] decode tasks (CPU {pool['decode_cpus']} each) -> {pool['size']} detector actors "
                    f"(CPU {pool['num_cpus']}, GPU {pool['num_gpus']})")
            ds = ds.flat_map(decode_video_chunks, fn_kwargs={"sampling": config.sampling}, num_cpus=pool["decode_cpus"])
            cropper = ChunkFaceCropper
        else:
            printer(f"[preprocess] {pool['size']} decode+detect actors (CPU {pool['num_cpus']}, GPU {pool['num_gpus']})")
            cropper, crop_kwargs = VideoFaceCropper, {"sampling": config.sampling, **crop_kwargs}
        with warnings.catch_warnings():
            # Ray 2.60 has no named parameter for max_task_retries yet; the **ray_remote_args
            # route works but warns that it is deprecated.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ds.map_batches(
                cropper, batch_size=1, fn_constructor_kwargs=crop_kwargs,
                compute=ActorPoolStrategy(size=pool["size"]),
                num_cpus=pool["num_cpus"], num_gpus=pool["num_gpus"] or None,
                # Ray Data retries actor tasks for ever by default, so a video that kills its
                # actor (decoder segfault, OOM) would never end. One retry covers a lost node;
                # after that the video is recorded as failed and the run goes on.
                max_task_retries=1,
            )
        last_print = time.time()
        finished = 0
        for receipt in ds.iter_rows():
            p = progress[receipt["video_id"]]
            if p.row["video_id"] in done:  # a late duplicate from a retried task
                continue
            p.add(receipt)
            if p.complete:
                status = _status_row(p)
                if status["status"] == STATUS_FAILED:
                    # Keep shards consistent with the status table: a failed video contributes no frames.
                    fs.delete_dir_contents(f"{out_path}/shards/{p.row['video_id']}", missing_dir_ok=True)
                _write_status(fs, f"{out_path}/status", status)
                done[p.row["video_id"]] = status
                finished += 1
            if time.time() - last_print >= config.progress_every_s:
                last_print = time.time()
                frames = sum(q.frames_decoded for q in progress.values())
                printer(f"[preprocess] {finished}/{len(todo)} videos | {frames} frames decoded | "
                        f"{sum(q.faces_kept for q in progress.values())} faces | "
                        f"{frames / max(1e-9, time.time() - started):.1f} frames/s")
        for p in progress.values():
            if p.row["video_id"] not in done:  # its block was lost with a crashed worker
                status = _status_row(p, crashed=True)
                fs.delete_dir_contents(f"{out_path}/shards/{p.row['video_id']}", missing_dir_ok=True)
                _write_status(fs, f"{out_path}/status", status)
                done[p.row["video_id"]] = status

    summary = _write_summary(fs, out_path, out_uri, config_doc, rows, done, progress, time.time() - started)
    printer(_summary_text(summary))
    return summary


def _write_summary(fs, out_path, out_uri, config_doc, rows, done, progress, seconds) -> dict[str, Any]:
    manifest_ids = [r["video_id"] for r in rows]
    statuses = [done[v] for v in manifest_ids if v in done]
    table = pa.Table.from_pylist(statuses, schema=STATUS_SCHEMA)
    with fs.open_output_stream(f"{out_path}/status.parquet") as sink:
        pq.write_table(table, sink)
    counts = Counter(s["status"] for s in statuses)
    this_run_frames = sum(p.frames_decoded for p in progress.values())
    this_run_faces = sum(p.faces_kept for p in progress.values())
    summary = {
        "shard_set": out_uri,
        "preprocess_version": config_doc["preprocess_version"],
        "videos": len(manifest_ids),
        "ok": counts.get(STATUS_OK, 0),
        "no_face": counts.get(STATUS_NO_FACE, 0),
        "failed": counts.get(STATUS_FAILED, 0),
        "faces_total": int(sum(s["faces_kept"] for s in statuses)),
        "problems": {s["video_id"]: f"{s['status']}: {s['reason']}" for s in statuses if s["status"] != STATUS_OK},
        "this_run": {
            "videos_processed": len(progress),
            "frames_decoded": this_run_frames,
            "faces_kept": this_run_faces,
            "seconds": round(seconds, 2),
            "frames_per_s": round(this_run_frames / max(seconds, 1e-9), 2),
        },
        "config": config_doc["config"],
    }
    with fs.open_output_stream(f"{out_path}/summary.json") as fh:
        fh.write(json.dumps(summary, indent=2, default=str).encode())
    return summary


def _summary_text(summary: dict[str, Any]) -> str:
    lines = [f"[preprocess] done: {summary['ok']} ok, {summary['no_face']} no_face, {summary['failed']} failed "
             f"of {summary['videos']} videos; {summary['faces_total']} face crops; "
             f"this run {summary['this_run']['frames_decoded']} frames in {summary['this_run']['seconds']} s "
             f"({summary['this_run']['frames_per_s']} frames/s)"]
    for vid, problem in sorted(summary["problems"].items()):
        lines.append(f"[preprocess]   {vid}: {problem}")
    lines.append(f"shard_set: {summary['shard_set']}")
    return "\n".join(lines)


def preprocess_config_from_dict(data: dict[str, Any], **overrides: Any) -> PreprocessConfig:
    """Rebuild a PreprocessConfig from `config.json` (`{"config": {...}}` or the inner dict), e.g.
    to score new videos with exactly the preprocessing a model was trained on."""
    inner = dict(data.get("config", data))
    nested = {"sampling": SamplingConfig, "detector": DetectorConfig, "align": AlignConfig}
    for key, cls in nested.items():
        if isinstance(inner.get(key), dict):
            inner[key] = cls(**inner[key])
    inner.update(overrides)
    names = {f.name for f in dataclasses.fields(PreprocessConfig)}
    return PreprocessConfig(**{k: v for k, v in inner.items() if k in names})
