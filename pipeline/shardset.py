"""The face shard set: the one module that knows how shards are laid out, committed and read.

Preprocessing writes through `ShardFileWriter` + `CommitLog`; training, scoring, explain and the
benchmarks read through `ShardIndex` and the `read_*` functions. Nothing else opens shard files.

Layout (format 2) under OUTPUT/<preprocess_version>/:

    config.json                      {"preprocess_version", "format_version": 2, "config": {...}}
    shards/part-<uuid>.parquet       SHARD_SCHEMA rows of MANY videos (one file per detector-actor
                                     task, rolled over at `target_file_mb`); no user text in names
    log/commit-<ns>-<uuid>.parquet   the commit log: LOG_SCHEMA rows, one object per BATCH of videos
    index.parquet                    the latest log row of every video (compacted at the end of a run)
    summary.json                     counts of the last run
    _lock.json                       the run lock while a preprocessing run writes here

Commit protocol. A detector actor writes a video's rows into its current shard file and closes the
file (parquet footer written) before it reports the video; the driver then appends one log row per
video (status, counts, where its rows are) and writes the log in batches. A video is committed when
its log row is in the log: readers go through the log / index only, so rows in files that no log row
points at (a killed run, a retried task, a failed video) are never read, and the next run deletes
files that nothing references. The log is append-only; for a video logged twice (a failed video
retried, or a task re-run after its actor died) the row with the larger `committed_ns` wins.

Row groups. A video's n rows are written as G = ceil(n / row_group_rows) row groups, STRIDED: group g
holds the video's frames at positions g, g+G, g+2G, ... (in frame order). One row group is then an
evenly spaced sample of the whole video with offset g: the training draw (k evenly spaced frames
with a random offset, MODEL.md section 5) reads one or a few row groups, never the video, and the
capped per-epoch evaluation reads one. Reading every frame reads all G groups.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.sampling import uniform_positions
from pipeline.schema import (LABEL_MAX, LABEL_MIN, SHARD_SCHEMA, SPLITS, STATUS_FAILED, STATUS_NO_FACE, STATUS_OK,
                             VIDEO_COLUMNS)
from pipeline.storage import resolve_filesystem

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
CONFIG_FILE, INDEX_FILE, SUMMARY_FILE, LOCK_FILE = "config.json", "index.parquet", "summary.json", "_lock.json"
SHARDS_DIR, LOG_DIR = "shards", "log"

# One row per committed video. `file` is relative to the shard set root; null unless status is ok.
LOG_SCHEMA = pa.schema([
    *VIDEO_COLUMNS,
    ("status", pa.string()),            # ok / no_face / failed
    ("reason", pa.string()),
    ("frames_decoded", pa.int64()),
    ("faces_kept", pa.int64()),          # = rows of the video in `file`
    ("seconds", pa.float64()),
    ("file", pa.string()),
    ("row_group_first", pa.int32()),
    ("row_group_count", pa.int32()),
    ("run_id", pa.string()),
    ("committed_ns", pa.int64()),
])
# What training and scoring need of a video; never the images.
INDEX_COLUMNS = ["video_id", "subject_id", "split", "task", "label", "status", "reason", "faces_kept", "file",
                 "row_group_first", "row_group_count"]


class ShardSetError(ValueError):
    """A shard set that cannot be read (missing, unfinished, older format, inconsistent)."""


class LockedError(RuntimeError):
    """Another run holds the run lock of this shard set."""


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def open_root(root: str) -> tuple[pafs.FileSystem, str]:
    fs, path = resolve_filesystem(root)
    return fs, path.rstrip("/")


# ----------------------------------------------------------------------------------------------
# Row groups: the strided layout


def strided_groups(n: int, row_group_rows: int) -> list[np.ndarray]:
    """Positions (0..n-1) of each row group of a video with n rows: group g = g, g+G, g+2G, ..."""
    groups = max(1, math.ceil(n / row_group_rows))
    return [np.arange(g, n, groups) for g in range(groups)]


def groups_for_draw(n: int, groups: int, k: int, offset: float) -> list[int]:
    """Which of a video's row groups to read for k evenly spaced frames with the given offset.

    Each group is already an evenly spaced sample of ~n/G frames; m = ceil(k / (n/G)) groups spread
    evenly over the G (starting at offset*G) together are one too. So a draw reads at most one
    group's worth of rows more than it keeps.
    """
    per_group = n / groups
    m = min(groups, max(1, math.ceil(k / per_group)))
    first = int(offset * groups) % groups
    return sorted({(first + (j * groups) // m) % groups for j in range(m)})


# ----------------------------------------------------------------------------------------------
# Writing (preprocessing's detector actors)


@dataclass(frozen=True)
class VideoLocation:
    file: str               # relative to the shard set root
    row_group_first: int
    row_group_count: int


class ShardFileWriter:
    """Appends whole videos to one big parquet file at a time, in strided row groups.

    `add_video` returns where the rows went; those locations become valid when `close()` has
    returned (the footer is written then). `full` says the file passed its target size.
    """

    def __init__(self, root: str, target_file_mb: float = 256.0, row_group_rows: int = 32,
                 compression: str = "zstd"):
        self.fs, self.root = open_root(root)
        self.target_bytes = int(target_file_mb * 2 ** 20)
        self.row_group_rows = row_group_rows
        self.compression = compression
        self._sink = self._writer = None
        self._relative = ""
        self._groups = 0

    def add_video(self, table: pa.Table) -> VideoLocation:
        """Write one video's rows (SHARD_SCHEMA, any order) as strided row groups."""
        if table.num_rows == 0:
            raise ValueError("a video with no rows has nothing to write")
        if self._writer is None:
            self._open()
        table = table.sort_by("frame_index")
        first = self._groups
        for positions in strided_groups(table.num_rows, self.row_group_rows):
            part = table.take(pa.array(positions))
            self._writer.write_table(part, row_group_size=part.num_rows)  # one call = one row group
            self._groups += 1
        return VideoLocation(self._relative, first, self._groups - first)

    @property
    def full(self) -> bool:
        return self._sink is not None and self._sink.tell() >= self.target_bytes

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
        self._sink = self._writer = None
        self._groups = 0

    def abort(self) -> None:
        """Close without caring whether the file is complete: it is never committed, so never read."""
        try:
            self.close()
        except Exception:  # the storage error that brought us here may fire again; nothing to save
            self._sink = self._writer = None
            self._groups = 0

    def _open(self) -> None:
        # Written in place, no tmp + rename (on S3 that is PUT + COPY + DELETE): a file counts only
        # once the commit log points at it.
        self._relative = f"{SHARDS_DIR}/part-{uuid.uuid4().hex}.parquet"
        self.fs.create_dir(_join(self.root, SHARDS_DIR), recursive=True)
        self._sink = self.fs.open_output_stream(_join(self.root, self._relative))
        self._writer = pq.ParquetWriter(self._sink, SHARD_SCHEMA, compression=self.compression,
                                        write_statistics=["video_id", "frame_index"])


# ----------------------------------------------------------------------------------------------
# The commit log (preprocessing's driver)


class CommitLog:
    """Buffers committed videos and writes them as one log object per batch or time window."""

    def __init__(self, root: str, run_id: str, every_videos: int = 500, every_s: float = 30.0):
        self.fs, self.root = open_root(root)
        self.run_id = run_id
        self.every_videos, self.every_s = every_videos, every_s
        self._tables: list[pa.Table] = []
        self._pending = 0
        self._last_flush = time.monotonic()
        self.objects_written = 0
        self.fs.create_dir(_join(self.root, LOG_DIR), recursive=True)

    def add(self, entry: dict[str, Any]) -> None:
        self.add_table(pa.Table.from_pylist([{n: entry.get(n) for n in LOG_SCHEMA.names}], schema=LOG_SCHEMA))

    def add_table(self, table: pa.Table) -> None:
        """Many committed videos at once (columns by LOG_SCHEMA name; extra columns ignored)."""
        now = time.time_ns()
        columns = [table.column(n).cast(f.type) if n in table.column_names else pa.nulls(table.num_rows, f.type)
                   for n, f in zip(LOG_SCHEMA.names, LOG_SCHEMA)]
        rows = pa.Table.from_arrays(columns, schema=LOG_SCHEMA)
        rows = rows.set_column(LOG_SCHEMA.get_field_index("run_id"), "run_id",
                               pa.array([self.run_id] * rows.num_rows, pa.string()))
        rows = rows.set_column(LOG_SCHEMA.get_field_index("committed_ns"), "committed_ns",
                               pa.array([now] * rows.num_rows, pa.int64()))
        self._tables.append(rows)
        self._pending += rows.num_rows
        if self._pending >= self.every_videos or time.monotonic() - self._last_flush >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        table = pa.concat_tables(self._tables)
        name = f"{LOG_DIR}/commit-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        with self.fs.open_output_stream(_join(self.root, name)) as sink:
            pq.write_table(table, sink, compression="zstd")
        self.objects_written += 1
        self._tables, self._pending = [], 0


def _latest_per_video(table: pa.Table) -> pa.Table:
    """Keep the newest row (largest committed_ns) of each video; columnar, no Python loop per video."""
    if table.num_rows == 0:
        return table
    table = table.sort_by([("video_id", "ascending"), ("committed_ns", "descending")])
    ids = table.column("video_id").to_numpy(zero_copy_only=False)
    keep = np.ones(len(ids), dtype=bool)
    keep[1:] = ids[1:] != ids[:-1]
    return table.filter(pa.array(keep))


def read_log(root: str, columns: list[str] | None = None) -> pa.Table:
    """The latest log row of every video committed at `root` (empty table if none)."""
    fs, base = open_root(root)
    folder = _join(base, LOG_DIR)
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return LOG_SCHEMA.empty_table() if columns is None else LOG_SCHEMA.empty_table().select(columns)
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(folder))
                   if i.is_file and i.base_name.startswith("commit-") and i.base_name.endswith(".parquet"))
    wanted = None if columns is None else sorted({*columns, "video_id", "committed_ns"}, key=LOG_SCHEMA.names.index)
    tables = [pq.read_table(f, filesystem=fs, columns=wanted, schema=LOG_SCHEMA if wanted is None else None)
              for f in files]
    table = pa.concat_tables(tables) if tables else LOG_SCHEMA.empty_table().select(wanted or LOG_SCHEMA.names)
    table = _latest_per_video(table)
    return table if columns is None else table.select(columns)


def write_index(root: str, table: pa.Table | None = None) -> pa.Table:
    """Compact the log into index.parquet (the latest row of every video) and return it."""
    fs, base = open_root(root)
    table = read_log(root) if table is None else table
    table = table.sort_by("video_id")
    tmp = _join(base, f".index-{uuid.uuid4().hex}.parquet")
    local = isinstance(fs, pafs.LocalFileSystem)
    # Readers must never see half an index: rename into place locally; an S3 PUT is atomic already.
    target = tmp if local else _join(base, INDEX_FILE)
    with fs.open_output_stream(target) as sink:
        pq.write_table(table, sink, compression="zstd", row_group_size=65536)
    if local:
        fs.move(tmp, _join(base, INDEX_FILE))
    return table


def referenced_files(index: pa.Table) -> set[str]:
    files = pc.unique(pc.drop_null(index.column("file"))).to_pylist() if index.num_rows else []
    return set(files)


def delete_unreferenced_files(root: str, referenced: set[str]) -> int:
    """Delete shard files no committed video points at (leftovers of killed runs); one listing."""
    fs, base = open_root(root)
    folder = _join(base, SHARDS_DIR)
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return 0
    deleted = 0
    for info in fs.get_file_info(pafs.FileSelector(folder, recursive=True)):
        if not info.is_file:
            continue
        relative = info.path[len(base) + 1:]
        if relative not in referenced:
            fs.delete_file(info.path)
            deleted += 1
    return deleted


def write_json(root: str, name: str, doc: dict[str, Any]) -> None:
    fs, base = open_root(root)
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(_join(base, name)) as fh:
        fh.write(json.dumps(doc, indent=2, default=str).encode())


def read_json(root: str, name: str) -> dict[str, Any] | None:
    fs, base = open_root(root)
    try:
        with fs.open_input_stream(_join(base, name)) as fh:
            return json.loads(fh.read().decode())
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------
# The run lock


def _dead_on_this_host(held: dict[str, Any]) -> bool:
    """The lock's run was on this machine and its process is gone (killed, crashed)."""
    if held.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(held.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OSError):
        return False
    return False


class RunLock:
    """`_lock.json` in the shard set: one preprocessing run writes a shard set at a time.

    Held while its heartbeat is fresh; a lock whose heartbeat is older than `stale_s`, or whose
    process is gone from this very host, belongs to a crashed run and is taken over with a warning;
    `force=True` takes any lock. Storage has no
    compare-and-swap here (pyarrow's S3 has no conditional PUT), so acquisition writes, waits a
    moment and reads back: two runs starting within that moment are the remaining race.
    """

    def __init__(self, root: str, stale_s: float = 600.0, force: bool = False, settle_s: float = 0.2,
                 heartbeat_s: float | None = None):
        self.fs, self.base = open_root(root)
        self.path = _join(self.base, LOCK_FILE)
        self.stale_s, self.force, self.settle_s = stale_s, force, settle_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(60.0, stale_s / 4)
        self.token = uuid.uuid4().hex
        self.took_over: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(self.path) as fh:
                return json.loads(fh.read().decode())
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            return None

    def _write(self) -> None:
        doc = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
               "heartbeat": time.time(), "stale_after_s": self.stale_s}
        with self.fs.open_output_stream(self.path) as fh:
            fh.write(json.dumps(doc).encode())

    def acquire(self) -> "RunLock":
        self.fs.create_dir(self.base, recursive=True)
        held = self._read()
        if held and held.get("token") != self.token:
            age = time.time() - float(held.get("heartbeat", 0))
            if not self.force and age < self.stale_s and not _dead_on_this_host(held):
                raise LockedError(
                    f"another preprocessing run is writing {self.base} (host {held.get('host')}, pid "
                    f"{held.get('pid')}, last heartbeat {age:.0f} s ago). Wait for it to finish; if it crashed, "
                    f"its lock goes stale after {self.stale_s:.0f} s, or rerun with --force-unlock")
            self.took_over = {**held, "age_s": round(age, 1)}
            log.warning("taking over the lock of %s from host %s pid %s (heartbeat %.0f s ago%s)", self.base,
                        held.get("host"), held.get("pid"), age, ", --force-unlock" if self.force else "")
        self._write()
        time.sleep(self.settle_s)
        if (self._read() or {}).get("token") != self.token:
            raise LockedError(f"another preprocessing run took the lock of {self.base} at the same moment")
        # The heartbeat runs on its own thread: a run that waits long for its first result (nodes
        # still starting, a long video) must not look crashed.
        self._beater = threading.Thread(target=self._beat, name="shardset-lock-heartbeat", daemon=True)
        self._beater.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if (self._read() or {}).get("token") != self.token:
                    log.warning("the lock of %s was taken over by another run", self.base)
                    return
                self._write()
            except Exception as exc:  # storage hiccup: try again next beat
                log.warning("lock heartbeat of %s failed: %s", self.base, exc)

    def release(self) -> None:
        self._stop.set()
        if self._beater is not None:
            self._beater.join(timeout=10)
        if (self._read() or {}).get("token") == self.token:
            self.fs.delete_file(self.path)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------
# Reading (training, scoring, explain, benchmarks)


@dataclass(frozen=True)
class VideoEntry:
    """One committed video as the index holds it (no frame list: positions come from row groups)."""
    video_id: str
    subject_id: str
    split: str
    task: str | None
    label: float                 # NaN when unlabelled
    status: str
    reason: str
    faces_kept: int
    file: str | None
    row_group_first: int
    row_group_count: int

    @property
    def has_frames(self) -> bool:
        return self.status == STATUS_OK and self.faces_kept > 0 and bool(self.file)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "VideoEntry":
        label = row.get("label")
        return cls(str(row["video_id"]), str(row.get("subject_id") or ""), str(row.get("split") or ""),
                   row.get("task"), math.nan if label is None else float(label), str(row.get("status") or ""),
                   str(row.get("reason") or ""), int(row.get("faces_kept") or 0), row.get("file"),
                   int(row.get("row_group_first") or 0), int(row.get("row_group_count") or 0))


def _old_format_hint(fs: pafs.FileSystem, base: str, root: str) -> str:
    doc = read_json(root, CONFIG_FILE) or {}
    version = doc.get("format_version", 1)
    if fs.get_file_info(_join(base, "status.parquet")).type == pafs.FileType.File or version != FORMAT_VERSION:
        return (f"{root} is a shard set of format {version} (one folder per video); this code reads format "
                f"{FORMAT_VERSION}. Rerun preprocessing with this version of the pipeline (it writes a new "
                "OUTPUT/<preprocess_version>/ folder)")
    return ""


@dataclass(frozen=True)
class ShardIndex:
    """The committed videos of a shard set. Built where it is used (each training worker reads it
    itself; the driver passes only `root`)."""

    root: str
    preprocess_version: str
    preprocess_config: dict[str, Any]        # the whole config.json document
    table: pa.Table                          # INDEX_COLUMNS, one row per video, sorted by video_id

    @classmethod
    def load(cls, root: str, columns: list[str] | None = None) -> "ShardIndex":
        """Read index.parquet at `root`; ShardSetError with a hint when it is not a usable shard set."""
        fs, base = open_root(root)
        info = fs.get_file_info([_join(base, INDEX_FILE), _join(base, CONFIG_FILE)])
        if info[0].type != pafs.FileType.File:
            hint = _old_format_hint(fs, base, root) if info[1].type == pafs.FileType.File else ""
            if not hint and fs.get_file_info(_join(base, LOG_DIR)).type == pafs.FileType.Directory:
                hint = (f"{root} has a commit log but no {INDEX_FILE}: its preprocessing run did not finish. "
                        "Rerun the same preprocessing command: it resumes and writes the index")
            if not hint:
                hint = (f"no {INDEX_FILE} under {root}: --data must point at OUTPUT/<preprocess_version>/, "
                        "the folder preprocessing wrote config.json, index.parquet and shards/ into")
            raise ShardSetError(hint)
        doc = read_json(root, CONFIG_FILE) or {}
        if doc.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ShardSetError(_old_format_hint(fs, base, root))
        table = pq.read_table(_join(base, INDEX_FILE), filesystem=fs, columns=columns or INDEX_COLUMNS)
        return cls(root=root, preprocess_version=str(doc.get("preprocess_version") or "unknown"),
                   preprocess_config=doc, table=table)

    # ---- columnar views (cheap on a driver at 10^5 videos: no Python object per video)

    def _mask(self, split: str | None = None, with_frames: bool = False) -> pa.ChunkedArray | None:
        mask = None
        if split is not None:
            mask = pc.equal(self.table.column("split"), split)
        if with_frames:
            ok = pc.and_(pc.equal(self.table.column("status"), STATUS_OK), pc.greater(self.table.column("faces_kept"), 0))
            mask = ok if mask is None else pc.and_(mask, ok)
        return mask

    def select(self, split: str | None = None, with_frames: bool = False) -> pa.Table:
        mask = self._mask(split, with_frames)
        return self.table if mask is None else self.table.filter(mask)

    def count(self, split: str | None = None, with_frames: bool = True) -> int:
        return self.select(split, with_frames).num_rows

    def train_mean(self) -> float:
        """Mean BDI-II over training videos with frames (each video once): the baseline and the initial bias."""
        labels = pc.drop_null(self.select("train", True).column("label"))
        return float(pc.mean(labels).as_py()) if len(labels) else 0.0

    def splits(self) -> list[str]:
        return sorted(pc.unique(self.table.column("split")).to_pylist())

    # ---- per-video views (for a worker's share, evaluation, tests)

    def videos(self, split: str | None = None, with_frames: bool = True) -> list[VideoEntry]:
        return [VideoEntry.from_row(r) for r in self.select(split, with_frames).to_pylist()]

    def labels(self, split: str) -> dict[str, float]:
        """video_id -> BDI-II of every labelled video of the split, with frames or without."""
        table = self.select(split).select(["video_id", "label"])
        return {v: float(lbl) for v, lbl in zip(table.column("video_id").to_pylist(),
                                                table.column("label").to_pylist()) if lbl is not None}

    def check_labels(self) -> None:
        """Labels of labelled videos in BDI-II range and splits known (cheap, columnar)."""
        unknown = set(self.splits()) - set(SPLITS)
        if unknown:
            raise ShardSetError(f"{self.root}: unknown split(s) {sorted(unknown)} (expected {SPLITS})")
        labels = self.table.column("label")
        bad = pc.or_(pc.less(labels, LABEL_MIN), pc.greater(labels, LABEL_MAX))
        bad_ids = self.table.filter(pc.fill_null(bad, False)).column("video_id").to_pylist()
        if bad_ids:
            raise ShardSetError(f"{self.root}: label outside BDI-II {LABEL_MIN}..{LABEL_MAX} for {bad_ids[:10]}")


class RowGroupReader:
    """Reads row groups of shard files, keeping a few files open (footers read once) and counting
    the bytes it reads (compressed column chunks), for the benchmark's bytes-read figure."""

    def __init__(self, root: str, max_open: int = 8):
        self.fs, self.base = open_root(root)
        self._open: dict[str, pq.ParquetFile] = {}
        self.max_open = max_open
        self.bytes_read = 0

    def _file(self, relative: str) -> pq.ParquetFile:
        handle = self._open.pop(relative, None)
        if handle is None:
            handle = pq.ParquetFile(self.fs.open_input_file(_join(self.base, relative)))
        self._open[relative] = handle  # most recently used last
        while len(self._open) > self.max_open:
            self._open.pop(next(iter(self._open))).close()
        return handle

    def read(self, entry: VideoEntry, groups: Iterable[int] | None = None,
             columns: list[str] | None = None) -> pa.Table:
        """Rows of `entry` in the given row groups (indices 0..G-1 of the video; None = all), by frame_index."""
        if not entry.has_frames:
            return SHARD_SCHEMA.empty_table() if columns is None else SHARD_SCHEMA.empty_table().select(columns)
        handle = self._file(entry.file)
        wanted = list(range(entry.row_group_count)) if groups is None else list(groups)
        absolute = [entry.row_group_first + g for g in wanted]
        columns_read = columns if columns is None or "frame_index" in columns else [*columns, "frame_index"]
        table = handle.read_row_groups(absolute, columns=columns_read)
        meta = handle.metadata
        names = set(columns_read or SHARD_SCHEMA.names)
        for index in absolute:
            group = meta.row_group(index)
            self.bytes_read += sum(group.column(c).total_compressed_size for c in range(group.num_columns)
                                   if group.column(c).path_in_schema.split(".")[0] in names)
        table = table.sort_by("frame_index")
        return table if columns is None else table.select(columns)

    def draw(self, entry: VideoEntry, k: int, offset: float, columns: list[str]) -> pa.Table:
        """k evenly spaced frames of the video with the given offset (repeats when it has fewer than k),
        reading only the row groups that hold them."""
        groups = groups_for_draw(entry.faces_kept, entry.row_group_count, k, offset)
        table = self.read(entry, groups, columns)
        return table.take(pa.array(uniform_positions(table.num_rows, k, offset)))

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()


def read_video_frames(root: str, entry: VideoEntry, columns: list[str] | None = None) -> pa.Table:
    """Every committed row of one video, in frame order."""
    reader = RowGroupReader(root)
    try:
        return reader.read(entry, None, columns)
    finally:
        reader.close()


def status_counts(table: pa.Table) -> dict[str, int]:
    counts = {STATUS_OK: 0, STATUS_NO_FACE: 0, STATUS_FAILED: 0}
    if table.num_rows:
        for item in pc.value_counts(table.column("status")).to_pylist():
            counts[item["values"]] = item["counts"]
    return counts
