"""The Ray Data graph: manifest -> (decode, detect, align, JPEG, write) per video -> a shard set.

    manifest rows, B videos per block --map_batches(VideoFaceCropper, actor pool)--> receipts
        each actor decodes its videos chunk by chunk, detects, aligns and JPEG-encodes the faces,
        appends each finished video to its current big shard file (pipeline.shardset), closes the
        file after its B videos (or at the target size) and only then reports those videos;
    driver: receipts -> batched commit log -> index.parquet + summary.json at the end.

The format and the commit protocol live in pipeline.shardset; this module only produces rows.
The driver's work per video is constant and small (counters and one log row, written in batches):
resuming reads the log once and anti-joins it with the manifest; no per-video storage call.

Exactly-once: a video counts only once its log row exists, and its log row is written only after
the file holding its rows was closed. A killed run leaves files no log row points at; the rerun
deletes them (one listing) and redoes every video that has no final status (ok / no_face). Failed
videos are retried by a rerun (the file may have been fixed).

Output layout: see pipeline.shardset (config.json, shards/, log/, index.parquet, summary.json).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.align import AlignConfig, align_face, pick_face
from pipeline.decode import FrameChunk, SamplingConfig, VideoDecodeError, iter_frame_chunks
from pipeline.detect import DetectorConfig
from pipeline.jpeg import encode_jpeg
from pipeline.manifest import DATASETS
from pipeline.manifest import SPLIT_POLICIES as MANIFEST_SPLIT_POLICIES
from pipeline.schema import SHARD_SCHEMA, STATUS_FAILED, STATUS_NO_FACE, STATUS_OK
from pipeline.storage import redact, redact_uri, redacting_printer
from pipeline.shardset import (CONFIG_FILE, FORMAT_VERSION, LOG_SCHEMA, SUMMARY_FILE, CommitLog, RunLock,
                               ShardFileWriter, delete_unreferenced_files, read_json, read_log, referenced_files,
                               ShardSetError, status_counts, write_index, write_json)

if TYPE_CHECKING:
    from pipeline.resources import DetectPoolPlan

log = logging.getLogger(__name__)

SPLIT_POLICIES = ("", *MANIFEST_SPLIT_POLICIES)


@dataclass(frozen=True)
class PreprocessConfig:
    dataset: str = field(default="csv", metadata={"help": "input layout", "choices": DATASETS})
    input: str = field(default="", metadata={"help": "dataset root (avec2013/avec2014) or manifest CSV; local path or URI"})
    output: str = field(default="data/faces", metadata={"help": "output root; shards go to OUTPUT/<preprocess_version>/"})
    labels: str = field(default="", metadata={"help": "folder (or URI) holding *_Depression.csv label files kept "
                                                      "apart from the videos (avec2013/avec2014)"})
    split_policy: str = field(default="", metadata={
        "help": "official: AVEC's per-recording partitions as shipped (subjects recur across them; the default "
                "for avec2013/avec2014); subject-disjoint: re-split by subject with --split-seed; strict: refuse "
                "a subject in several splits (the default for csv)", "choices": SPLIT_POLICIES})
    split_seed: int = field(default=0, metadata={"help": "seed of --split-policy subject-disjoint"})
    jpeg_quality: int = field(default=92, metadata={"help": "JPEG quality of the stored face crops"})
    num_detect_actors: int = field(default=0, metadata={"help": "a fixed number of decode+detect actors (0 = an "
                                                                "autoscaling pool: starts with what fits on the "
                                                                "nodes, grows as nodes join)"})
    max_detect_actors: int = field(default=0, metadata={"help": "upper bound of the autoscaling pool (0 = one actor "
                                                                "per task)"})
    video_timeout_s: float = field(default=3600.0, metadata={"help": "a video still decoding after this many seconds "
                                                                     "fails with a reason and the run goes on "
                                                                     "(0 = no deadline)"})
    resource_wait_s: float = field(default=600.0, metadata={"help": "with --detector-use-gpu, seconds to wait for "
                                                                    "GPU nodes an autoscaler adds before failing"})
    gpu_per_actor: float = field(default=0.25, metadata={"help": "GPU fraction per detector actor when --detector-use-gpu"})
    limit: int = field(default=0, metadata={"help": "process only the first N videos of the manifest (0 = all)"})
    progress_every_s: float = field(default=10.0, metadata={"help": "seconds between progress lines"})
    target_file_mb: float = field(default=256.0, metadata={"help": "a shard file is closed once it passes this size"})
    row_group_rows: int = field(default=32, metadata={"help": "at most this many frames of a video per parquet row "
                                                            "group (the unit a training draw reads)"})
    videos_per_task: int = field(default=0, metadata={"help": "videos per detector-actor task, written to one shard "
                                                            "file (0 = auto: ~4 tasks per actor, at most 64)"})
    commit_every: int = field(default=500, metadata={"help": "commit-log object every this many videos ..."})
    commit_interval_s: float = field(default=30.0, metadata={"help": "... or after this many seconds"})
    lock_stale_s: float = field(default=600.0, metadata={"help": "a run lock without heartbeat for this long "
                                                                 "belongs to a crashed run and is taken over"})
    force_unlock: bool = field(default=False, metadata={"help": "take the output's run lock even if another run "
                                                                "seems to hold it"})
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
        if min(self.num_detect_actors, self.max_detect_actors, self.limit, self.videos_per_task) < 0 \
                or min(self.video_timeout_s, self.resource_wait_s) < 0:
            raise ValueError("num_detect_actors, max_detect_actors, limit, videos_per_task, video_timeout_s and "
                             "resource_wait_s must be >= 0")
        if not 0 < self.gpu_per_actor <= 1:
            raise ValueError(f"gpu_per_actor must be in (0, 1], got {self.gpu_per_actor}")
        if self.split_policy not in SPLIT_POLICIES:
            raise ValueError(f"split_policy must be one of {SPLIT_POLICIES[1:]}, got {self.split_policy!r}")
        if self.target_file_mb <= 0 or self.row_group_rows < 1 or self.commit_every < 1:
            raise ValueError("target_file_mb must be > 0, row_group_rows and commit_every >= 1")
        from pipeline.storage import check_no_credentials

        for name in ("input", "output", "labels"):  # CredentialsInURIError is a ValueError
            check_no_credentials(getattr(self, name), f"--{name}")


def preprocess_version(config: PreprocessConfig) -> str:
    """Short hash of everything that changes the content of the shards (not where they go, how they
    are split into files, nor how many actors or which device made them)."""
    # Options that do not change a shard's content stay out, so that e.g. adding a device option never
    # orphans the registered models trained on existing shard sets.
    content = {
        "sampling": {k: v for k, v in dataclasses.asdict(config.sampling).items()
                     if k not in SamplingConfig.RUNTIME_FIELDS},
        "detector": config.detector.content(),
        "align": dataclasses.asdict(config.align),
        "jpeg_quality": config.jpeg_quality,
        "schema": FORMAT_VERSION,
    }
    return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:10]


def shard_set_path(config: PreprocessConfig) -> str:
    return config.output.rstrip("/") + "/" + preprocess_version(config)


# ----------------------------------------------------------------------------------------------
# The detector actors

_VIDEO_META = ("video_id", "subject_id", "split", "task", "label")
# What an actor reports: "progress" rows per chunk (counters for the progress line) and one "video"
# row per finished video (a LOG_SCHEMA row less run_id / committed_ns, which the driver adds).
RECEIPT_SCHEMA = pa.schema([pa.field("kind", pa.string()),
                            *[LOG_SCHEMA.field(n) for n in LOG_SCHEMA.names if n not in ("run_id", "committed_ns")],
                            pa.field("multi_face_frames", pa.int64())])


def _receipts(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{n: r.get(n) for n in RECEIPT_SCHEMA.names} for r in rows], schema=RECEIPT_SCHEMA)


def _decode_guarded(uri: str, sampling: SamplingConfig, deadline_s: float = 0.0,
                    started: float | None = None) -> Iterator[tuple[FrameChunk | None, str]]:
    """(chunk, "") per chunk, then on failure one (None, reason): decoding errors become data,
    never exceptions, because one bad video must not stop the run.

    Decoding runs in a thread, one chunk ahead of the caller (the next chunk decodes while this one
    is detected). With `deadline_s` > 0 a video whose chunks stop coming before `started + deadline_s`
    (a hung decoder, a stalled remote read) fails with a reason; the stuck thread is abandoned (a
    thread cannot be killed; it stops at its next chunk if the call ever returns) and the actor goes
    on with its next video. The deadline is checked between chunks, so it also bounds detection time,
    but a detector call that itself never returns is not cut off.
    """
    import queue
    import threading

    started = time.time() if started is None else started
    chunks: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def decode() -> None:
        try:
            for chunk in iter_frame_chunks(uri, sampling):  # looked up at call time: tests patch it
                if stop.is_set():
                    return
                chunks.put((chunk, ""))
            chunks.put((None, None))
        except VideoDecodeError as exc:  # reasons repeat the uri: stored redacted (index, log, summary)
            chunks.put((None, redact_uri(str(exc))))
        except Exception as exc:  # a decoder bug must not stop the run either; keep the type for triage
            chunks.put((None, redact_uri(f"unexpected decoder error ({type(exc).__name__}): {exc}")))

    threading.Thread(target=decode, name="hmhn-decode", daemon=True).start()
    try:
        while True:
            left = deadline_s - (time.time() - started) if deadline_s > 0 else None
            try:
                if left is not None and left <= 0:
                    raise queue.Empty
                chunk, error = chunks.get(timeout=left)
            except queue.Empty:
                yield None, (f"deadline exceeded: no result after {deadline_s:g} s (--video-timeout-s); "
                             "the decoder hung or the video is too long for the deadline")
                return
            if chunk is None:
                if error:
                    yield None, error
                return
            yield chunk, ""
    finally:
        stop.set()
        while not chunks.empty():  # unblock a decoder waiting to put its next chunk
            try:
                chunks.get_nowait()
            except queue.Empty:
                break


class VideoFaceCropper:
    """Ray Data actor: a block of manifest rows in, receipts out; ONNX sessions built once per actor.

    Decoding happens here, not in separate tasks: a 32-frame chunk of 640x480 RGB is ~30 MB and its
    face crops ~0.5 MB, and a video's rows must all reach one writer for the strided row groups.
    A video's crops are held until it ends (~12 KB per crop at 224 px: 180 MB for a 50-minute video
    at 5 fps) and then written to the actor's current shard file.
    """

    def __init__(self, sampling: SamplingConfig, detector: DetectorConfig, align: AlignConfig, root: str,
                 version: str, jpeg_quality: int, target_file_mb: float, row_group_rows: int,
                 video_timeout_s: float = 0.0):
        import cv2

        from pipeline.detect import make_detector

        cv2.setNumThreads(1)  # parallelism comes from the actor pool; OpenCV's own threads oversubscribe
        self.detector = make_detector(detector)
        self.sampling, self.align = sampling, align
        self.version, self.jpeg_quality = version, jpeg_quality
        self.video_timeout_s = video_timeout_s
        self.writer = ShardFileWriter(root, target_file_mb, row_group_rows)

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        # A generator: progress reaches the driver per chunk, commits per closed file.
        pending: list[dict[str, Any]] = []  # written to the open file, reported once it is closed
        for row in batch.to_pylist():
            result: dict[str, Any] = {}
            yield from self._crop_video(row, result)
            entry, table = result["entry"], result["table"]
            if table is None:
                yield _receipts([entry])  # nothing written: final at once
                continue
            try:
                location = self.writer.add_video(table)
            except Exception as exc:
                self.writer.abort()
                yield _receipts(_failed_all([*pending, entry], f"writing the shard file failed ({type(exc).__name__}): {exc}"))
                pending = []
                continue
            pending.append({**entry, "file": location.file, "row_group_first": location.row_group_first,
                            "row_group_count": location.row_group_count})
            if self.writer.full:
                yield self._close(pending)
                pending = []
        # One file per task at most (or per target size): a task's videos commit when it ends.
        yield self._close(pending)

    def _close(self, pending: list[dict[str, Any]]) -> pa.Table:
        try:
            self.writer.close()
        except Exception as exc:
            self.writer.abort()
            return _receipts(_failed_all(pending, f"closing the shard file failed ({type(exc).__name__}): {exc}"))
        return _receipts(pending)

    def _crop_video(self, row: dict[str, Any], result: dict[str, Any]) -> Iterator[pa.Table]:
        """Yields progress receipts; leaves {"entry": video receipt, "table": its rows or None} in result."""
        meta = {k: row.get(k) for k in _VIDEO_META}
        started = time.time()
        counts = {"frames_decoded": 0, "faces_kept": 0, "multi_face_frames": 0}
        columns: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
        error = ""
        for chunk, error in _decode_guarded(str(row["uri"]), self.sampling, self.video_timeout_s, started):
            if chunk is None:
                break
            try:
                kept, multi = self._crop_chunk(meta, chunk, columns)
            except Exception as exc:  # e.g. onnxruntime on a degenerate frame: this video fails, the run goes on
                error = redact_uri(f"face crop stage failed ({type(exc).__name__}): {exc}")
                break
            counts["frames_decoded"] += len(chunk.frames)
            counts["faces_kept"] += kept
            counts["multi_face_frames"] += multi
            yield _receipts([{**meta, "kind": "progress", "frames_decoded": len(chunk.frames), "faces_kept": kept}])
        entry = {**meta, **counts, "kind": "video", "seconds": round(time.time() - started, 3), "reason": ""}
        table = None
        if error:
            entry.update(status=STATUS_FAILED, reason=error, faces_kept=0)
        elif counts["faces_kept"] == 0:
            entry.update(status=STATUS_NO_FACE,
                         reason=f"no face above score threshold in {counts['frames_decoded']} sampled frames")
        else:
            entry["status"] = STATUS_OK
            if counts["multi_face_frames"]:
                entry["reason"] = f"several faces in {counts['multi_face_frames']} frames: kept one per frame"
            table = pa.table(columns, schema=SHARD_SCHEMA)
        result.update(entry=entry, table=table)

    def _crop_chunk(self, meta: dict[str, Any], chunk: FrameChunk, columns: dict[str, list]) -> tuple[int, int]:
        detections = self.detector.detect_batch(list(chunk.frames))  # faces >= score_threshold
        kept = multi = 0
        for frame, idx, ts, faces in zip(chunk.frames, chunk.indices, chunk.timestamps_s, detections):
            multi += len(faces) > 1
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
            kept += 1
        return kept, multi


def _failed_all(entries: list[dict[str, Any]], reason: str) -> list[dict[str, Any]]:
    reason = redact_uri(reason)
    return [{**e, "status": STATUS_FAILED, "reason": reason, "faces_kept": 0, "file": None,
             "row_group_first": None, "row_group_count": None} for e in entries]


# ----------------------------------------------------------------------------------------------
# The driver


CRASHED_REASON = ("worker process died while processing this video (decoder crash or out of memory); retried once "
                  "with its task and once alone")


def _plan_pool(config: PreprocessConfig, n_videos: int, printer) -> "DetectPoolPlan":
    """The detector actor pool (pipeline.resources). GPU detection asked for on a cluster without
    GPUs waits for the autoscaler to add them; it runs on CPU only with --detector-allow-cpu-fallback."""
    from pipeline.resources import alive_nodes, plan_detect_pool, wait_for_resources

    on_gpu = config.detector.use_gpu
    if on_gpu and not any(n.gpus > 0 for n in alive_nodes()):
        if config.detector.allow_cpu_fallback:
            printer("[preprocess] WARNING: --detector-use-gpu but the cluster has no GPU; detecting on CPU "
                    "(--detector-allow-cpu-fallback)")
            on_gpu = False
        else:
            wait_for_resources([{"GPU": config.gpu_per_actor, "CPU": 1.0}], "GPU face detection",
                               config.resource_wait_s, printer)
    return plan_detect_pool(alive_nodes(), n_videos, on_gpu, config.gpu_per_actor, config.num_detect_actors,
                            config.max_detect_actors, config.videos_per_task)


def _check_inputs_shared(config: PreprocessConfig, todo: pa.Table) -> None:
    """On a multi-node cluster, every video a task opens must be on shared storage (one check per
    folder; --output was checked before anything was written)."""
    from pipeline.ray_utils import alive_node_count
    from pipeline.storage import is_remote_uri, require_shared_storage

    nodes = alive_node_count()
    if nodes > 1:
        uris = pc.unique(todo.column("uri")).to_pylist()
        folders = {os.path.dirname(u) for u in uris if not is_remote_uri(u)}
        for folder in sorted({config.input, *folders}):
            require_shared_storage(folder, "--input (and the manifest's video uris)", node_count=nodes)


def _check_split_policy(out_uri: str, config: PreprocessConfig) -> None:
    previous = (read_json(out_uri, CONFIG_FILE) or {}).get("config") or {}
    if not previous:
        return
    for key in ("split_policy", "split_seed"):
        if key in previous and previous[key] != getattr(config, key):
            raise ShardSetError(f"{out_uri} was written with {key}={previous[key]!r}; this run asks for "
                             f"{getattr(config, key)!r}. The videos already done keep their split, so use another "
                             "--output for another split")


def refuse_credentials_in_manifest(manifest: pa.Table) -> None:
    """ManifestError naming the videos whose uri embeds credentials (uris shown redacted)."""
    from pipeline.manifest import ManifestError
    from pipeline.storage import CREDENTIALS_HINT, embedded_credentials

    uris = manifest.column("uri")
    suspect = manifest.filter(pc.fill_null(pc.match_substring_regex(uris, "[@?#]"), False))  # cheap pre-filter
    bad = [(row["video_id"], row["uri"]) for row in suspect.select(["video_id", "uri"]).to_pylist()
           if embedded_credentials(row["uri"])]
    if bad:
        shown = "; ".join(f"{vid!r}: {redact_uri(uri)}" for vid, uri in bad[:10])
        more = f" ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ManifestError(f"{len(bad)} manifest uri(s) embed credentials: {shown}{more}. {CREDENTIALS_HINT}")


def run_preprocess(config: PreprocessConfig, manifest: pa.Table | None = None,
                   printer=print) -> dict[str, Any]:
    """Run (or resume) preprocessing; returns the summary dict (also written to summary.json).

    Raises ManifestError for an invalid manifest (also one whose video uris embed credentials) and
    LockedError when another run writes the same output (nothing is processed then).
    config.json, summary.json, the failure reasons and the printed lines hold URIs redacted
    (pipeline.storage.redact_uri); the returned summary keeps the real shard-set location.
    """
    from pipeline.manifest import format_manifest_report, load_manifest, manifest_report

    started = time.time()
    printer = redacting_printer(printer)  # an output or video uri may carry a token in its query string
    if manifest is None:
        manifest = load_manifest(config.dataset, config.input, labels=config.labels or None,
                                 split_policy=config.split_policy or None, split_seed=config.split_seed)
    refuse_credentials_in_manifest(manifest)
    if config.limit:
        manifest = manifest.slice(0, config.limit)
    report = manifest_report(manifest)
    for line in format_manifest_report(report):
        printer(f"[preprocess] {line}")
    # Before anything is written: on a multi-node cluster (we were submitted to one) a node-local
    # output would scatter the shards over the nodes' disks. A private local Ray is one node.
    from pipeline.storage import require_shared_storage

    require_shared_storage(config.output, "--output")
    out_uri = shard_set_path(config)
    config_doc = {"preprocess_version": preprocess_version(config), "format_version": FORMAT_VERSION,
                  "config": dataclasses.asdict(config)}
    with RunLock(out_uri, stale_s=config.lock_stale_s, force=config.force_unlock):
        _check_split_policy(out_uri, config)
        write_json(out_uri, CONFIG_FILE, redact(config_doc))
        committed = read_log(out_uri, ["video_id", "status", "file"])
        final = committed.filter(pc.is_in(committed.column("status"), pa.array([STATUS_OK, STATUS_NO_FACE])))
        todo = manifest.filter(pc.invert(pc.is_in(manifest.column("video_id"), final.column("video_id"))))
        # Leftovers of killed runs: files no committed video points at. Nothing else writes here now.
        removed = delete_unreferenced_files(out_uri, referenced_files(committed))
        printer(f"[preprocess] {manifest.num_rows} videos in manifest, {manifest.num_rows - todo.num_rows} already "
                f"done, {todo.num_rows} to process -> {out_uri}"
                + (f" ({removed} unreferenced shard files of an earlier run deleted)" if removed else ""))
        run_id = uuid.uuid4().hex[:12]
        stats = _run_graph(config, todo, out_uri, run_id, printer, started) if todo.num_rows else {}
        index = write_index(out_uri)
        summary = _summary(out_uri, config_doc, manifest, index, run_id, report, stats, time.time() - started)
        write_json(out_uri, SUMMARY_FILE, redact(summary))
    printer(_summary_text(summary))
    return summary


def _run_graph(config: PreprocessConfig, todo: pa.Table, out_uri: str, run_id: str, printer,
               started: float) -> dict[str, Any]:
    """Every video of `todo` through the actor pool; then the videos lost with a dead worker or node
    (their task died twice: a crash, OOM, or a node lost before Ray noticed) once more, each in a
    task of its own, so that a video only fails for what it does itself, not for a task-mate or a node."""
    from pipeline.ray_utils import describe_connection, init_ray

    init_ray()
    printer(f"[preprocess] Ray: {describe_connection()}")
    _check_inputs_shared(config, todo)
    pool = _plan_pool(config, todo.num_rows, printer)
    printer(f"[preprocess] {pool.describe()}; {pool.tasks} tasks of up to {pool.videos_per_task} videos, one shard "
            f"file each (<= {config.target_file_mb:g} MB)")
    commit = CommitLog(out_uri, run_id, config.commit_every, config.commit_interval_s)
    progress = {"frames": 0, "faces": 0, "videos": 0, "total": todo.num_rows}
    _run_pass(config, todo, out_uri, pool, commit, progress, printer, started, max_task_retries=1)
    lost = _lost_videos(out_uri, run_id, todo)
    if lost.num_rows:
        printer(f"[preprocess] {lost.num_rows} video(s) lost with a dead worker or node; retrying each alone once")
        alone = dataclasses.replace(pool, videos_per_task=1, tasks=lost.num_rows, min_size=min(pool.min_size, lost.num_rows),
                                    max_size=min(pool.max_size, lost.num_rows),
                                    initial_size=min(pool.initial_size, lost.num_rows))
        _run_pass(config, lost, out_uri, alone, commit, progress, printer, started, max_task_retries=0)
        lost = _lost_videos(out_uri, run_id, lost)
    if lost.num_rows:
        commit.add_table(_receipts(_failed_all(
            [{**r, "kind": "video", "frames_decoded": 0, "seconds": 0.0} for r in lost.select(list(_VIDEO_META)).to_pylist()],
            CRASHED_REASON)))
        commit.flush()
    return {"log_objects_written": commit.objects_written}


def _lost_videos(out_uri: str, run_id: str, todo: pa.Table) -> pa.Table:
    """Videos of `todo` this run has not logged: one anti-join, not a lookup per video."""
    logged = read_log(out_uri, ["video_id", "run_id"])
    this_run = logged.filter(pc.equal(logged.column("run_id"), run_id)).column("video_id")
    return todo.filter(pc.invert(pc.is_in(todo.column("video_id"), this_run)))


def _run_pass(config: PreprocessConfig, todo: pa.Table, out_uri: str, pool: "DetectPoolPlan", commit: CommitLog,
              progress: dict[str, int], printer, started: float, max_task_retries: int) -> None:
    from ray.data import ActorPoolStrategy

    from pipeline.ray_utils import dataset_of_slices

    per_task = pool.videos_per_task
    ds = dataset_of_slices(todo, per_task)
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for max_task_retries yet; the **ray_remote_args route
        # works but warns that it is deprecated.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map_batches(
            VideoFaceCropper, batch_size=per_task, batch_format="pyarrow",
            fn_constructor_kwargs={"sampling": config.sampling, "detector": config.detector, "align": config.align,
                                   "root": out_uri, "version": preprocess_version(config),
                                   "jpeg_quality": config.jpeg_quality, "target_file_mb": config.target_file_mb,
                                   "row_group_rows": config.row_group_rows, "video_timeout_s": config.video_timeout_s},
            # An autoscaling pool: starts with what fits, grows onto nodes that join. One task in
            # flight per actor: a task queued on an actor dies with the actor when another video
            # kills it, and would spend its retry on someone else's crash.
            compute=ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size,
                                      initial_size=pool.initial_size, max_tasks_in_flight_per_actor=1),
            num_cpus=pool.num_cpus, num_gpus=pool.num_gpus or None,
            # Ray Data retries actor tasks for ever by default, so a video that kills its actor
            # would never end. One retry covers a lost node; the pass for lost videos gets none.
            max_task_retries=max_task_retries,
        )
    # A task whose actor dies for good fails only its block; its videos are then retried alone or
    # recorded as failed (above) instead of losing the whole run. Set on this dataset's own context,
    # not the process-wide one: batch scoring in the same process must not inherit the tolerance.
    ds.context.max_errored_blocks = pool.tasks
    # Ray Data grows an actor pool when tasks in flight / (actors x tasks per actor) passes 1.75 (it
    # expects 4 queued tasks per actor); with one task per actor a fully busy pool is at 1.0 and would
    # never grow onto nodes that join.
    ds.context.autoscaling_config = dataclasses.replace(ds.context.autoscaling_config,
                                                        actor_pool_util_upscaling_threshold=0.99)
    last_print = time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        is_video = pc.equal(batch.column("kind"), "video")
        chunks = batch.filter(pc.invert(is_video))
        progress["frames"] += int(pc.sum(chunks.column("frames_decoded")).as_py() or 0)
        progress["faces"] += int(pc.sum(chunks.column("faces_kept")).as_py() or 0)
        done = batch.filter(is_video)
        if done.num_rows:
            commit.add_table(done)
            progress["videos"] += done.num_rows
        if time.time() - last_print >= config.progress_every_s:
            last_print = time.time()
            printer(f"[preprocess] {progress['videos']}/{progress['total']} videos | {progress['frames']} frames "
                    f"decoded | {progress['faces']} faces | "
                    f"{progress['frames'] / max(1e-9, time.time() - started):.1f} frames/s")
    commit.flush()


def _summary(out_uri: str, config_doc: dict[str, Any], manifest: pa.Table, index: pa.Table, run_id: str,
             report: dict[str, Any], stats: dict[str, Any], seconds: float) -> dict[str, Any]:
    ids = manifest.column("video_id")
    statuses = index.filter(pc.is_in(index.column("video_id"), ids))
    counts = status_counts(statuses)
    problems = statuses.filter(pc.not_equal(statuses.column("status"), STATUS_OK)).select(["video_id", "status", "reason"])
    this_run = index.filter(pc.equal(index.column("run_id"), run_id))
    frames = int(pc.sum(this_run.column("frames_decoded")).as_py() or 0)
    return {
        "shard_set": out_uri,
        "preprocess_version": config_doc["preprocess_version"],
        "format_version": FORMAT_VERSION,
        "videos": manifest.num_rows,
        "ok": counts[STATUS_OK],
        "no_face": counts[STATUS_NO_FACE],
        "failed": counts[STATUS_FAILED],
        "faces_total": int(pc.sum(statuses.column("faces_kept")).as_py() or 0),
        "problems": {r["video_id"]: f"{r['status']}: {r['reason']}" for r in problems.to_pylist()},
        "manifest": report,
        "this_run": {
            "videos_processed": this_run.num_rows,
            "frames_decoded": frames,
            "faces_kept": int(pc.sum(this_run.column("faces_kept")).as_py() or 0),
            "shard_files_written": len(pc.unique(pc.drop_null(this_run.column("file")))) if this_run.num_rows else 0,
            "log_objects_written": stats.get("log_objects_written", 0),
            "seconds": round(seconds, 2),
            "frames_per_s": round(frames / max(seconds, 1e-9), 2),
        },
        "config": config_doc["config"],
    }


def _summary_text(summary: dict[str, Any], max_listed: int = 20) -> str:
    run = summary["this_run"]
    lines = [f"[preprocess] done: {summary['ok']} ok, {summary['no_face']} no_face, {summary['failed']} failed "
             f"of {summary['videos']} videos; {summary['faces_total']} face crops; "
             f"this run {run['videos_processed']} videos, {run['frames_decoded']} frames in {run['seconds']} s "
             f"({run['frames_per_s']} frames/s), {run['shard_files_written']} shard files"]
    problems = sorted(summary["problems"].items())
    for vid, problem in problems[:max_listed]:
        lines.append(f"[preprocess]   {vid}: {problem}")
    if len(problems) > max_listed:
        lines.append(f"[preprocess]   ... and {len(problems) - max_listed} more (all in summary.json and index.parquet)")
    lines.append(f"shard_set: {summary['shard_set']}")
    return "\n".join(lines)


def preprocess_config_from_dict(data: dict[str, Any], **overrides: Any) -> PreprocessConfig:
    """Rebuild a PreprocessConfig from `config.json` (`{"config": {...}}` or the inner dict), e.g.
    to score new videos with exactly the preprocessing a model was trained on."""
    inner = dict(data.get("config", data))
    nested = {"sampling": lambda d: SamplingConfig(**d), "detector": DetectorConfig.from_dict,  # also older forms
              "align": lambda d: AlignConfig(**d)}
    for key, build in nested.items():
        if isinstance(inner.get(key), dict):
            inner[key] = build(inner[key])
    inner.update(overrides)
    names = {f.name for f in dataclasses.fields(PreprocessConfig)}
    return PreprocessConfig(**{k: v for k, v in inner.items() if k in names})
