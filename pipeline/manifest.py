"""Manifests: one row per video (MANIFEST_SCHEMA), built from the AVEC2013 / AVEC2014 folder
layouts or a plain CSV, and validated before any work starts.

Validation collects EVERY problem and raises one ManifestError that names each offending row
("row N (video_id 'X'): what is wrong"), so a user fixes the whole manifest in one go. Whether
a video file exists or decodes is NOT checked here: that is found later, per video, and
recorded in the status table (one bad video must never stop a run).

Layouts (matching is case-insensitive and lenient, like real AVEC downloads):

AVEC2014  ROOT/{Training,Development,Testing}/{Freeform,Northwind}/{subject}_{session}_{Task}_video.mp4
          labels: **/{subject}_{session}_Depression.csv (one number: the BDI-II total), e.g.
          ROOT/Training/DepressionLabels/ or a top-level folder whose name contains "Label".
          video_id "{subject}_{session}_{Task}", subject_id "{subject}", task Freeform/Northwind.
AVEC2013  ROOT/{Training,Development,Testing}/{subject}_{session}_cut_video.mp4 (also *_video.mp4,
          *.mp4, *.avi); labels **/{subject}_{session}_Depression.csv; video_id
          "{subject}_{session}", subject_id "{subject}", task null.
CSV       header with video_id, subject_id, split, label, uri (task optional, extra columns
          ignored); relative uris are resolved against the CSV's folder; empty label = null.

Split folders: Training/Train -> train, Development/Dev -> dev, Testing/Test -> test.
A video without a label file gets a null label (allowed: it can still be scored).
Sources may be local paths or pyarrow filesystem URIs (file://, s3://, gs://).
"""
from __future__ import annotations

import csv
import io
import math
import os
import posixpath
import re
from collections import defaultdict
from typing import Callable, Sequence

import pyarrow as pa

from pipeline.schema import LABEL_MAX, LABEL_MIN, MANIFEST_SCHEMA, SPLITS
from pipeline.storage import resolve_filesystem

__all__ = [
    "ManifestError",
    "DATASETS",
    "load_manifest",
    "validate_manifest",
    "manifest_from_videos",
    "write_manifest_csv",
]

DATASETS = ("avec2013", "avec2014", "csv")
CSV_REQUIRED_COLUMNS = ("video_id", "subject_id", "split", "label", "uri")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm")

_SPLIT_FOLDERS = {
    "training": "train", "train": "train",
    "development": "dev", "dev": "dev", "devel": "dev", "validation": "dev",
    "testing": "test", "test": "test",
}
_AVEC2014_TASKS = {"freeform": "Freeform", "northwind": "Northwind"}
_AVEC2014_VIDEO = re.compile(
    r"^(?P<subject>[^_]+)_(?P<session>[^_]+)_(?P<task>freeform|northwind)(?:_video)?$", re.IGNORECASE)
_AVEC2013_SUFFIX = re.compile(r"(?:_cut)?(?:_video)?$", re.IGNORECASE)
_LABEL_FILE = re.compile(r"^(?P<key>.+)_depression\.csv$", re.IGNORECASE)


class ManifestError(ValueError):
    """The manifest is unusable; the message lists every offending row."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def load_manifest(dataset: str, source: str) -> pa.Table:
    """Build and validate the manifest of `dataset` ("avec2013" | "avec2014" | "csv") at `source`."""
    dataset = dataset.lower()
    if dataset == "avec2014":
        rows, problems = _rows_from_avec(source, _parse_avec2014_video)
    elif dataset == "avec2013":
        rows, problems = _rows_from_avec(source, _parse_avec2013_video)
    elif dataset == "csv":
        rows, problems = _rows_from_csv(source)
    else:
        raise ManifestError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if not rows and not problems:
        raise ManifestError(f"no videos found in {source} for dataset {dataset!r} "
                            f"(see pipeline/manifest.py for the expected layout)")
    table = _to_table(rows)
    row_name = _csv_row_name if dataset == "csv" else _table_row_name
    _raise_if_problems(problems + _find_problems(table, require_labels=False, row_name=row_name),
                       source)
    return table


def validate_manifest(table: pa.Table, require_labels: bool = False) -> None:
    """Raise one ManifestError naming every offending row; return None if the table is usable.

    Checks: schema columns present; non-empty video_id / subject_id / uri; split in SPLITS;
    unique video_id; label null or in LABEL_MIN..LABEL_MAX (null not allowed if require_labels);
    no subject in two splits.
    """
    missing = [name for name in ("video_id", "subject_id", "split", "label", "uri")
               if name not in table.column_names]
    if missing:
        raise ManifestError(f"manifest lacks column(s) {missing}; has {table.column_names}")
    _raise_if_problems(_find_problems(table, require_labels, _table_row_name), "manifest")


def manifest_from_videos(paths: Sequence[str]) -> pa.Table:
    """A manifest for scoring new videos: video_id = file stem, subject_id = video_id,
    split "test", label null. Two files with the same stem are a ManifestError."""
    rows = []
    for path in paths:
        path = os.fspath(path)
        stem = os.path.splitext(posixpath.basename(path.rstrip("/")))[0]
        rows.append({"video_id": stem, "subject_id": stem, "split": "test", "label": None,
                     "uri": path, "task": None})
    table = _to_table(rows)
    validate_manifest(table)
    return table


def write_manifest_csv(table: pa.Table, path: str) -> None:
    """Write a manifest as a CSV that `load_manifest("csv", path)` reads back unchanged."""
    columns = [field.name for field in MANIFEST_SCHEMA]
    rows = table.select([c for c in columns if c in table.column_names]).to_pylist()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        label = row.get("label")
        row["label"] = "" if label is None else (str(int(label)) if float(label).is_integer() else repr(label))
        writer.writerow({c: ("" if row.get(c) is None else row[c]) for c in columns})
    filesystem, fs_path = resolve_filesystem(path)
    parent = posixpath.dirname(fs_path)
    if parent:
        filesystem.create_dir(parent, recursive=True)
    with filesystem.open_output_stream(fs_path) as out:
        out.write(buffer.getvalue().encode("utf-8"))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _table_row_name(row_number: int) -> str:
    return f"row {row_number}"


def _csv_row_name(row_number: int) -> str:
    return f"row {row_number} (CSV line {row_number + 1})"  # line 1 is the header


def _find_problems(table: pa.Table, require_labels: bool,
                   row_name: Callable[[int], str]) -> list[str]:
    """Every problem as "row N (video_id 'X'): reason", N 1-based over data rows."""
    rows = table.to_pylist()
    found: list[tuple[int, str]] = []

    def add(i: int, reason: str) -> None:
        found.append((i, f"{row_name(i + 1)} (video_id {rows[i].get('video_id')!r}): {reason}"))

    rows_of_video: dict[str, list[int]] = defaultdict(list)
    splits_of_subject: dict[str, set[str]] = defaultdict(set)
    for i, row in enumerate(rows):
        video_id, subject_id = _text(row.get("video_id")), _text(row.get("subject_id"))
        split, uri, label = _text(row.get("split")), _text(row.get("uri")), row.get("label")
        if not video_id:
            add(i, "empty video_id")
        else:
            rows_of_video[video_id].append(i)
        if not subject_id:
            add(i, "empty subject_id")
        if not uri:
            add(i, "empty uri")
        if split not in SPLITS:
            add(i, f"split {split!r} is not one of {list(SPLITS)}")
        elif subject_id:
            splits_of_subject[subject_id].add(split)
        if label is None:
            if require_labels:
                add(i, "missing label (labels are required here)")
        elif not (isinstance(label, (int, float)) and math.isfinite(label)
                  and LABEL_MIN <= label <= LABEL_MAX):
            add(i, f"label {label!r} outside {LABEL_MIN}..{LABEL_MAX}")

    for video_id, indices in rows_of_video.items():
        if len(indices) > 1:
            where = ", ".join(str(i + 1) for i in indices)
            for i in indices:
                add(i, f"duplicate video_id (rows {where})")
    for i, row in enumerate(rows):
        subject_id = _text(row.get("subject_id"))
        if subject_id and len(splits_of_subject.get(subject_id, ())) > 1:
            add(i, f"subject {subject_id!r} appears in several splits "
                   f"({', '.join(sorted(splits_of_subject[subject_id]))})")
    found.sort(key=lambda item: item[0])
    return [message for _, message in found]


def _raise_if_problems(problems: list[str], source: str) -> None:
    if problems:
        message = (f"invalid manifest {source}: {len(problems)} problem(s)\n  "
                   + "\n  ".join(problems))
        raise ManifestError(message, problems)


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def _sorted_rows(rows: list[dict]) -> list[dict]:
    """Deterministic order for folder layouts: by split (train, dev, test), then video_id."""
    split_order = {s: i for i, s in enumerate(SPLITS)}
    return sorted(rows, key=lambda r: (split_order.get(r["split"], len(SPLITS)), r["video_id"] or ""))


def _to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts; unknown keys ignored) in the given order -> MANIFEST_SCHEMA table."""
    columns = {field.name: [row.get(field.name) for row in rows] for field in MANIFEST_SCHEMA}
    return pa.table(columns, schema=MANIFEST_SCHEMA)


# --------------------------------------------------------------------------------------------
# Filesystems
# --------------------------------------------------------------------------------------------

def _uri_for(source: str, fs_path: str) -> str:
    """Turn a path inside the source's filesystem back into a URI the decoder accepts."""
    if "://" not in source or source.startswith("file://"):
        return fs_path
    scheme = source.split("://", 1)[0]
    return f"{scheme}://{fs_path}"


def _read_text(filesystem, fs_path: str) -> str:
    with filesystem.open_input_stream(fs_path) as stream:
        return stream.read().decode("utf-8-sig", errors="replace")


# --------------------------------------------------------------------------------------------
# AVEC layouts
# --------------------------------------------------------------------------------------------

def _parse_avec2014_video(stem: str, folders: list[str]) -> dict | None:
    match = _AVEC2014_VIDEO.match(stem)
    if not match:
        return None
    task = _AVEC2014_TASKS[match["task"].lower()]
    if not any(folder.lower() == task.lower() for folder in folders):
        return None  # the task folder must agree with the name (skips stray copies)
    return {"video_id": f"{match['subject']}_{match['session']}_{task}",
            "subject_id": match["subject"], "task": task,
            "label_key": f"{match['subject']}_{match['session']}"}


def _parse_avec2013_video(stem: str, folders: list[str]) -> dict | None:
    key = _AVEC2013_SUFFIX.sub("", stem)
    if not key:
        return None
    return {"video_id": key, "subject_id": key.split("_", 1)[0], "task": None, "label_key": key}


def _rows_from_avec(source: str, parse_video) -> tuple[list[dict], list[str]]:
    import pyarrow.fs as pafs

    try:
        filesystem, root = resolve_filesystem(source)
        root_info = filesystem.get_file_info(root)
    except Exception as err:
        raise ManifestError(f"cannot open dataset root {source}: {err}") from err
    if root_info.type != pafs.FileType.Directory:
        raise ManifestError(f"dataset root {source} is not a folder")
    entries = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(e.path for e in entries if e.type == pafs.FileType.File)

    labels: dict[str, float | None] = {}
    label_files: dict[str, str] = {}
    label_problems: dict[str, str] = {}
    videos: list[tuple[str, str, dict]] = []  # (split, fs path, parsed)
    for fs_path in files:
        relative = posixpath.relpath(fs_path, root).split("/")
        name = relative[-1]
        label_match = _LABEL_FILE.match(name)
        if label_match:
            key = label_match["key"]
            value, problem = _parse_label_file(filesystem, fs_path)
            if key in labels and labels[key] != value:
                label_problems[key] = (f"conflicting label files {label_files[key]} and {fs_path}")
            labels[key], label_files[key] = value, fs_path
            if problem:
                label_problems[key] = problem
            continue
        stem, ext = posixpath.splitext(name)
        if ext.lower() not in VIDEO_EXTENSIONS or len(relative) < 2:
            continue
        split = _SPLIT_FOLDERS.get(relative[0].lower())
        if split is None:
            continue
        parsed = parse_video(stem, relative[1:-1])
        if parsed is not None:
            videos.append((split, fs_path, parsed))

    rows = _sorted_rows([
        {"video_id": parsed["video_id"], "subject_id": parsed["subject_id"], "split": split,
         "label": labels.get(parsed["label_key"]), "uri": _uri_for(source, fs_path),
         "task": parsed["task"], "label_key": parsed["label_key"]}
        for split, fs_path, parsed in videos])
    # unreadable/conflicting label files are reported with the rows they affect
    problems = [f"row {i + 1} (video_id {row['video_id']!r}): {label_problems[row['label_key']]}"
                for i, row in enumerate(rows) if row["label_key"] in label_problems]
    return rows, problems


def _parse_label_file(filesystem, fs_path: str) -> tuple[float | None, str | None]:
    """The BDI-II total in a *_Depression.csv (one number; a header line is tolerated)."""
    try:
        text = _read_text(filesystem, fs_path)
    except Exception as err:
        return None, f"label file {fs_path} unreadable: {err}"
    for token in re.split(r"[\s,;]+", text.strip()):
        try:
            return float(token), None
        except ValueError:
            continue
    return None, f"label file {fs_path} holds no number"


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------

def _rows_from_csv(source: str) -> tuple[list[dict], list[str]]:
    try:
        filesystem, fs_path = resolve_filesystem(source)
        text = _read_text(filesystem, fs_path)
    except FileNotFoundError as err:
        raise ManifestError(f"manifest CSV not found: {source}") from err
    except Exception as err:
        raise ManifestError(f"cannot read manifest CSV {source}: {err}") from err
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in (reader.fieldnames or [])]
    missing = [c for c in CSV_REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ManifestError(f"manifest CSV {source} must start with a header naming "
                            f"{list(CSV_REQUIRED_COLUMNS)} (task optional); missing {missing}, "
                            f"got {header}")
    reader.fieldnames = header
    base = posixpath.dirname(source.rstrip("/")) if "://" in source else os.path.dirname(os.path.abspath(source))

    rows, problems = [], []
    for i, record in enumerate(reader):
        video_id = _text(record.get("video_id"))
        label_text = _text(record.get("label"))
        label = None
        if label_text:
            try:
                label = float(label_text)
            except ValueError:
                problems.append(f"{_csv_row_name(i + 1)} (video_id {video_id!r}): "
                                f"label {label_text!r} is not a number")
        uri = _text(record.get("uri"))
        rows.append({"video_id": video_id, "subject_id": _text(record.get("subject_id")),
                     "split": _text(record.get("split")).lower(),
                     "label": label,
                     "uri": _resolve_uri(uri, base) if uri else "",
                     "task": _text(record.get("task")) or None})
    return rows, problems


def _resolve_uri(uri: str, base: str) -> str:
    if "://" in uri or os.path.isabs(uri):
        return uri
    if "://" in base:
        return posixpath.join(base, uri)
    return os.path.normpath(os.path.join(base, uri))
