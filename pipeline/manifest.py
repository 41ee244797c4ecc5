"""Manifests: one row per video (MANIFEST_SCHEMA), built from the AVEC2013 / AVEC2014
distributions as shipped or a plain CSV, and validated before any work starts.

Validation collects EVERY problem and raises one ManifestError that names each offending row
("row N (video_id 'X'): what is wrong"), so a user fixes the whole manifest in one go. Whether
a video file exists or decodes is NOT checked here: that is found later, per video, and
recorded in the status table (one bad video must never stop a run).

Layouts (matching is case-insensitive and lenient, like real AVEC downloads). ROOT is the folder
the user unpacked into; the folders below it are searched at any depth (docs/AVEC.md has trees):

AVEC2014  videos  .../{Training,Development,Testing}/.../{Freeform,Northwind}/{subject}_{session}_{Task}_video.mp4
                  e.g. ROOT/AVEC2014_AudioVisual/Video/Training/Freeform/203_1_Freeform_video.mp4
          labels  **/{subject}_{session}_Depression.csv (one number, the BDI-II total; one file per
                  recording, shared by its Freeform and Northwind videos), e.g.
                  ROOT/AVEC2014_DepressionLabels/Training_DepressionLabels/203_1_Depression.csv and
                  ROOT/AVEC2014_Labels_Testset/Testing/DepressionLabels/203_3_Depression.csv.
                  A per-task file {subject}_{session}_{Task}_Depression.csv wins if present.
          video_id "{subject}_{session}_{Task}", subject_id "{subject}", task Freeform/Northwind.
AVEC2013  videos  .../{Training,Development,Testing}/.../{subject}_{session}_cut_combined.mp4 (also
                  _cut_video, _video, _cut or bare {subject}_{session}; .mp4/.avi/...)
                  e.g. ROOT/Training_AudioVisual/Training/203_1_cut_combined.mp4
          labels  **/{subject}_{session}_Depression.csv; video_id "{subject}_{session}",
                  subject_id "{subject}", task null.
CSV       header with video_id, subject_id, split, label, uri (task optional, extra columns
          ignored); relative uris are resolved against the CSV's folder; empty label = null.

Split of a video: the path component below ROOT nearest to the file that names a split exactly
(Training/Train -> train, Development/Dev/Devel/Validation -> dev, Testing/Test -> test); only if
none does, the nearest component whose first word names one (Training_AudioVisual -> train).
Labels are matched by recording key wherever they lie (so Training_DepressionLabels, a separate
test-label download, or `labels=` elsewhere all work). Hidden files and __MACOSX are skipped.
A video without a label file gets a null label (allowed: it can still be scored).
Sources may be local paths or pyarrow filesystem URIs (file://, s3://, gs://).

Split policies (SPLIT_POLICIES):
  official          keep the partitions as shipped. The AVEC partitions are per recording and the
                    same subject recurs across train/dev/test; published results use them, so this
                    is the default for avec2013/avec2014. Recurrence is reported (manifest_report).
  strict            keep the partitions, refuse any subject in several splits (the CSV default).
  subject-disjoint  re-split by subject (deterministic per seed), keeping roughly the official
                    train/dev/test proportions by video count; test videos without a label stay in
                    test (with every other video of their subject). No subject is in two splits.

Every value that becomes part of a storage path (video_id: shard folders, status files) must be a
safe name: SAFE_VIDEO_ID (ASCII letters, digits, '.', '_', '-', not starting with '.', no '..',
at most 128 characters).
"""
from __future__ import annotations

import csv
import io
import math
import os
import posixpath
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import pyarrow as pa

from pipeline.schema import LABEL_MAX, LABEL_MIN, MANIFEST_SCHEMA, SPLITS
from pipeline.storage import StorageError, file_info, join_uri, parent_uri, resolve_filesystem, uri_for, write_bytes

__all__ = [
    "ManifestError",
    "DATASETS",
    "SPLIT_POLICIES",
    "SAFE_VIDEO_ID",
    "default_split_policy",
    "is_safe_video_id",
    "load_manifest",
    "validate_manifest",
    "subject_disjoint_split",
    "manifest_report",
    "format_manifest_report",
    "manifest_from_videos",
    "write_manifest_csv",
]

SPLIT_POLICIES = ("official", "subject-disjoint", "strict")
CSV_REQUIRED_COLUMNS = ("video_id", "subject_id", "split", "label", "uri")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm")
MAX_VIDEO_ID_LENGTH = 128
SAFE_VIDEO_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,%d}$" % (MAX_VIDEO_ID_LENGTH - 1))

_SPLIT_FOLDERS = {
    "training": "train", "train": "train",
    "development": "dev", "dev": "dev", "devel": "dev", "validation": "dev",
    "testing": "test", "test": "test",
}
_AVEC2014_TASKS = {"freeform": "Freeform", "northwind": "Northwind"}
_AVEC2014_VIDEO = re.compile(
    r"^(?P<subject>[^_]+)_(?P<session>[^_]+)_(?P<task>freeform|northwind)(?:_video)?$", re.IGNORECASE)
_AVEC2013_VIDEO = re.compile(
    r"^(?P<subject>[^_]+)_(?P<session>[^_]+)(?:_cut)?(?:_combined|_video)?$", re.IGNORECASE)
_LABEL_FILE = re.compile(r"^(?P<key>.+)_depression\.csv$", re.IGNORECASE)
_FIRST_WORD = re.compile(r"[_\-\s.]+")
_REPORT_LIST_LIMIT = 10


class ManifestError(ValueError):
    """The manifest is unusable; the message lists every offending row."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetLayout:
    """One input layout (a `--dataset` name): how its files become manifest rows.

    read(source, labels_folder) -> (rows, problems, unplaced): rows are MANIFEST_SCHEMA dicts,
    problems one message per bad entry, unplaced video files that match the layout's naming but
    no partition folder (for the "no videos found" message). To add a layout, write its reader
    here and add one line to DATASET_LAYOUTS (bottom of this module).
    """

    read: Callable[[str, str | None], tuple[list[dict], list[str], list[str]]]
    default_split_policy: str = "official"   # "official": partitions as shipped; "strict" for own splits
    takes_labels_folder: bool = True         # --labels DIR of label files kept apart from the videos
    row_name: Callable[[int], str] = lambda i: f"row {i}"   # how a problem names its entry


def default_split_policy(dataset: str) -> str:
    """"official" for the AVEC datasets (partitions as shipped), "strict" for CSV manifests."""
    return DATASET_LAYOUTS[dataset.lower()].default_split_policy


def is_safe_video_id(video_id) -> bool:
    """True if `video_id` may be used as one component of a storage path (see SAFE_VIDEO_ID)."""
    return (isinstance(video_id, str) and SAFE_VIDEO_ID.match(video_id) is not None
            and ".." not in video_id)


def load_manifest(dataset: str, source: str, labels: str | None = None,
                  split_policy: str | None = None, split_seed: int = 0) -> pa.Table:
    """Build and validate the manifest of `dataset` ("avec2013" | "avec2014" | "csv") at `source`.

    labels: optional folder or URI searched recursively for *_Depression.csv (AVEC only; None or
      "" = none), used together with the label files found under `source` (two files giving
      one recording different labels are an error).
    split_policy: one of SPLIT_POLICIES; None (or "") = default_split_policy(dataset)
      ("official" for AVEC, "strict" for CSV). split_seed: the seed of "subject-disjoint".
    """
    dataset = dataset.lower()
    if dataset not in DATASET_LAYOUTS:
        raise ManifestError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    layout = DATASET_LAYOUTS[dataset]
    labels = labels or None  # "" (an unset command-line option) = no labels folder
    policy = _check_policy(split_policy or layout.default_split_policy)
    if labels is not None and not layout.takes_labels_folder:
        raise ManifestError(f"labels= applies to the AVEC layouts only, not to --dataset {dataset}: its manifest "
                            "carries its labels in its label column")
    rows, problems, unplaced = layout.read(source, labels)
    if not rows and not problems and unplaced:
        raise ManifestError(
            f"no videos found in {source} for dataset {dataset!r}: {len(unplaced)} video file(s) "
            f"are named like {dataset} videos but lie under no Training/Development/Testing "
            f"folder, e.g. {unplaced[0]} (see docs/AVEC.md for the expected layout)")
    if not rows and not problems:
        raise ManifestError(f"no videos found in {source} for dataset {dataset!r} "
                            f"(see docs/AVEC.md / pipeline/manifest.py for the expected layout)")
    table = _to_table(rows)
    row_name = layout.row_name
    # subject-disjoint re-splits, so the shipped partitions may share subjects
    check = "official" if policy == "subject-disjoint" else policy
    _raise_if_problems(problems + _find_problems(table, require_labels=False, row_name=row_name,
                                                 split_policy=check), source)
    if policy == "subject-disjoint":
        table = subject_disjoint_split(table, split_seed)
    return table


def validate_manifest(table: pa.Table, require_labels: bool = False,
                      split_policy: str = "strict") -> None:
    """Raise one ManifestError naming every offending row; return None if the table is usable.

    Checks: schema columns present; non-empty video_id / subject_id / uri; video_id a safe
    path component (is_safe_video_id); split in SPLITS; unique video_id; label null or in
    LABEL_MIN..LABEL_MAX (null not allowed if require_labels); and, unless split_policy is
    "official", no subject in two splits. Pass split_policy="official" for an AVEC manifest
    loaded with the official partitions.
    """
    policy = _check_policy(split_policy)
    missing = [name for name in ("video_id", "subject_id", "split", "label", "uri")
               if name not in table.column_names]
    if missing:
        raise ManifestError(f"manifest lacks column(s) {missing}; has {table.column_names}")
    _raise_if_problems(_find_problems(table, require_labels, _table_row_name, policy), "manifest")


def subject_disjoint_split(table: pa.Table, seed: int = 0) -> pa.Table:
    """The same videos re-split so that no subject is in two splits (deterministic per seed).

    Targets are the table's own split sizes in videos (so roughly the official proportions).
    Subjects with a test video that has no label go to test whole (such a video can only be
    scored); the others are taken in a seeded random order and each goes, with all its videos,
    to the split that still misses the most videos. Rows come back ordered by split (train,
    dev, test), then video_id.
    """
    rows = table.to_pylist()
    target = Counter(row["split"] for row in rows)
    videos_of: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        videos_of[row["subject_id"]].append(i)
    pinned = {row["subject_id"] for row in rows if row["split"] == "test" and row["label"] is None}
    counts = dict.fromkeys(SPLITS, 0)
    split_of: dict[str, str] = {}
    for subject in sorted(pinned, key=_natural_key):
        split_of[subject] = "test"
        counts["test"] += len(videos_of[subject])
    free = sorted((s for s in videos_of if s not in pinned), key=_natural_key)
    random.Random(seed).shuffle(free)
    candidates = [s for s in SPLITS if target.get(s, 0) > 0] or ["test"]
    for subject in free:
        best = max(candidates, key=lambda s: (target.get(s, 0) - counts[s], -SPLITS.index(s)))
        split_of[subject] = best
        counts[best] += len(videos_of[subject])
    for row in rows:
        row["split"] = split_of[row["subject_id"]]
    rows = _sorted_rows(rows)
    splits_of_subject = defaultdict(set)
    for row in rows:
        splits_of_subject[row["subject_id"]].add(row["split"])
    shared = sorted(s for s, found in splits_of_subject.items() if len(found) > 1)
    if shared:  # cannot happen: each subject gets exactly one split above
        raise AssertionError(f"subject-disjoint split left subjects in several splits: {shared}")
    return _to_table(rows)


def manifest_report(table: pa.Table) -> dict:
    """A JSON-serialisable summary of a manifest, for logs, MLflow and summary.json.

    {"videos", "labelled", "subjects",
     "splits": {split: {"videos", "labelled", "subjects"}} (every split in SPLITS),
     "tasks": {split: {task: {"videos", "labelled"}}} (only splits with a non-null task; {} if none),
     "unlabelled_video_ids": [...] (manifest order),
     "recurring_subjects": {"count", "subject_ids": [...sorted], "by_subject": {sid: [splits]}}}
    """
    rows = table.to_pylist()
    splits = {s: {"videos": 0, "labelled": 0, "subjects": 0} for s in SPLITS}
    tasks: dict[str, dict[str, dict[str, int]]] = {}
    subjects_of_split: dict[str, set] = defaultdict(set)
    splits_of_subject: dict[str, set] = defaultdict(set)
    unlabelled = []
    for row in rows:
        split, labelled, task = row.get("split"), row.get("label") is not None, row.get("task")
        entry = splits.setdefault(split, {"videos": 0, "labelled": 0, "subjects": 0})
        entry["videos"] += 1
        entry["labelled"] += int(labelled)
        if task:
            cell = tasks.setdefault(split, {}).setdefault(task, {"videos": 0, "labelled": 0})
            cell["videos"] += 1
            cell["labelled"] += int(labelled)
        if not labelled:
            unlabelled.append(row.get("video_id"))
        subjects_of_split[split].add(row.get("subject_id"))
        splits_of_subject[row.get("subject_id")].add(split)
    for split, entry in splits.items():
        entry["subjects"] = len(subjects_of_split.get(split, ()))
    order = {s: i for i, s in enumerate(SPLITS)}

    def split_key(split):
        return (order.get(split, len(SPLITS)), str(split))

    recurring = sorted((s for s, found in splits_of_subject.items() if len(found) > 1), key=_natural_key)
    tasks = {split: {task: tasks[split][task] for task in sorted(tasks[split])}
             for split in sorted(tasks, key=split_key)}
    return {
        "videos": len(rows),
        "labelled": sum(e["labelled"] for e in splits.values()),
        "subjects": len(splits_of_subject),
        "splits": splits,
        "tasks": tasks,
        "unlabelled_video_ids": unlabelled,
        "recurring_subjects": {
            "count": len(recurring),
            "subject_ids": recurring,
            "by_subject": {s: sorted(splits_of_subject[s], key=split_key) for s in recurring},
        },
    }


def format_manifest_report(report: dict) -> list[str]:
    """Short human lines of a manifest_report(), for the job log."""
    lines = [f"{report['videos']} videos ({report['labelled']} labelled), "
             f"{_plural(report['subjects'], 'subject')}"]
    for split, entry in report["splits"].items():
        line = (f"{split}: {entry['videos']} videos ({entry['labelled']} labelled), "
                f"{_plural(entry['subjects'], 'subject')}")
        by_task = report.get("tasks", {}).get(split)
        if by_task:
            line += "; " + ", ".join(f"{task} {cell['videos']} ({cell['labelled']} labelled)"
                                     for task, cell in by_task.items())
        lines.append(line)
    recurring = report["recurring_subjects"]
    if recurring["count"]:
        lines.append(f"{recurring['count']} subject(s) recur across partitions: "
                     f"{_short_list(recurring['subject_ids'])} (official AVEC partitions; use "
                     f"--split-policy subject-disjoint for a subject-disjoint estimate)")
    else:
        lines.append("no subject recurs across partitions")
    unlabelled = report["unlabelled_video_ids"]
    if unlabelled:
        lines.append(f"{len(unlabelled)} video(s) have no label: {_short_list(unlabelled)}")
    return lines


def manifest_from_videos(paths: Sequence[str]) -> pa.Table:
    """A manifest for scoring new videos: video_id = file stem made safe (characters other than
    ASCII letters, digits, '.', '_', '-' become '_', leading dots dropped), subject_id =
    video_id, split "test", label null. Two files with the same id are a ManifestError."""
    rows = []
    for path in paths:
        path = os.fspath(path)
        stem = os.path.splitext(posixpath.basename(path.rstrip("/")))[0]
        video_id = _safe_stem(stem)
        rows.append({"video_id": video_id, "subject_id": video_id, "split": "test", "label": None,
                     "uri": path, "task": None})
    table = _to_table(rows)
    validate_manifest(table)
    return table


def write_manifest_csv(table: pa.Table, path: str) -> None:
    """Write a manifest as a CSV that `load_manifest("csv", path)` reads back unchanged
    (pass split_policy="official" when its partitions share subjects)."""
    columns = [field.name for field in MANIFEST_SCHEMA]
    rows = table.select([c for c in columns if c in table.column_names]).to_pylist()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        label = row.get("label")
        row["label"] = "" if label is None else (str(int(label)) if float(label).is_integer() else repr(label))
        writer.writerow({c: ("" if row.get(c) is None else row[c]) for c in columns})
    write_bytes(path, buffer.getvalue().encode("utf-8"))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _check_policy(policy: str) -> str:
    if policy not in SPLIT_POLICIES:
        raise ManifestError(f"unknown split policy {policy!r}; expected one of {SPLIT_POLICIES}")
    return policy


def _table_row_name(row_number: int) -> str:
    return f"row {row_number}"


def _csv_row_name(row_number: int) -> str:
    return f"row {row_number} (CSV line {row_number + 1})"  # line 1 is the header


def _find_problems(table: pa.Table, require_labels: bool,
                   row_name: Callable[[int], str], split_policy: str = "strict") -> list[str]:
    """Every problem as "row N (video_id 'X'): reason", N 1-based over data rows.
    Subjects in several splits are a problem unless split_policy is "official"."""
    rows = table.to_pylist()
    found: list[tuple[int, str]] = []

    def add(i: int, reason: str) -> None:
        found.append((i, f"{row_name(i + 1)} (video_id {_shown(rows[i].get('video_id'))}): {reason}"))

    rows_of_video: dict[str, list[int]] = defaultdict(list)
    splits_of_subject: dict[str, set[str]] = defaultdict(set)
    for i, row in enumerate(rows):
        video_id, subject_id = _text(row.get("video_id")), _text(row.get("subject_id"))
        split, uri, label = _text(row.get("split")), _text(row.get("uri")), row.get("label")
        if not video_id:
            add(i, "empty video_id")
        else:
            rows_of_video[video_id].append(i)
            if not is_safe_video_id(row.get("video_id")):
                add(i, f"video_id is not a safe name (it becomes part of storage paths): use "
                       f"ASCII letters, digits, '.', '_', '-', not starting with '.', no '..', "
                       f"at most {MAX_VIDEO_ID_LENGTH} characters")
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
    if split_policy != "official":
        for i, row in enumerate(rows):
            subject_id = _text(row.get("subject_id"))
            if subject_id and len(splits_of_subject.get(subject_id, ())) > 1:
                add(i, f"subject {subject_id!r} appears in several splits "
                       f"({', '.join(sorted(splits_of_subject[subject_id]))})")
    found.sort(key=lambda item: item[0])
    return [message for _, message in found]


def _shown(video_id) -> str:
    """A video_id for a message: repr, cut short (a hostile id may be very long)."""
    text = repr(video_id)
    return text if len(text) <= 80 else text[:60] + f"...' ({len(str(video_id))} characters)"


def _raise_if_problems(problems: list[str], source: str) -> None:
    if problems:
        message = (f"invalid manifest {source}: {len(problems)} problem(s)\n  "
                   + "\n  ".join(problems))
        raise ManifestError(message, problems)


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def _natural_key(value) -> tuple:
    """Sort "9" before "10" and numbers before words."""
    parts = re.split(r"(\d+)", str(value))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p)


def _short_list(values: Sequence, limit: int = _REPORT_LIST_LIMIT) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... (+{len(values) - limit} more)" if len(values) > limit else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _safe_stem(stem: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip(".")
    safe = re.sub(r"\.{2,}", ".", safe)
    return safe or stem


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

def _read_text(filesystem, fs_path: str) -> str:
    with filesystem.open_input_stream(fs_path) as stream:
        return stream.read().decode("utf-8-sig", errors="replace")


def _list_files(source: str, what: str) -> tuple[object, str, list[tuple[str, list[str]]]]:
    """(filesystem, root, [(fs path, components below root)]) of every visible file under source.
    Hidden files/folders (".*", e.g. macOS "._x" copies) and __MACOSX are skipped."""
    import pyarrow.fs as pafs

    try:
        filesystem, root, root_info = file_info(source)
    except StorageError as err:
        raise ManifestError(f"cannot open {what} {source}: {err}") from err
    if root_info.type != pafs.FileType.Directory:
        raise ManifestError(f"{what} {source} is not a folder")
    entries = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    files = []
    for fs_path in sorted(e.path for e in entries if e.type == pafs.FileType.File):
        relative = posixpath.relpath(fs_path, root).split("/")
        if any(part.startswith(".") or part.lower() == "__macosx" for part in relative):
            continue
        files.append((fs_path, relative))
    return filesystem, root, files


# --------------------------------------------------------------------------------------------
# AVEC layouts
# --------------------------------------------------------------------------------------------

def _split_of_folders(folders: Sequence[str]) -> str | None:
    """The split named by the folders below ROOT (outermost first): the nearest folder (to the
    file) named exactly Training/Development/Testing/...; else the nearest whose first word is
    one (Training_AudioVisual); else None."""
    for folder in reversed(folders):
        split = _SPLIT_FOLDERS.get(folder.lower())
        if split:
            return split
    for folder in reversed(folders):
        split = _SPLIT_FOLDERS.get(_FIRST_WORD.split(folder.lower(), 1)[0])
        if split:
            return split
    return None


def _parse_avec2014_video(stem: str, folders: list[str]) -> dict | None:
    match = _AVEC2014_VIDEO.match(stem)
    if not match:
        return None
    task = _AVEC2014_TASKS[match["task"].lower()]
    if not any(folder.lower() == task.lower() for folder in folders):
        return None  # a task folder must agree with the name (skips stray copies)
    recording = f"{match['subject']}_{match['session']}"
    return {"video_id": f"{recording}_{task}", "subject_id": match["subject"], "task": task,
            "label_keys": (f"{recording}_{task}".lower(), recording.lower())}


def _parse_avec2013_video(stem: str, folders: list[str]) -> dict | None:
    match = _AVEC2013_VIDEO.match(stem)
    if not match:
        return None
    recording = f"{match['subject']}_{match['session']}"
    return {"video_id": recording, "subject_id": match["subject"], "task": None,
            "label_keys": (recording.lower(),)}


class _Labels:
    """Label files by lower-cased key (what precedes _Depression.csv); conflicts remembered."""

    def __init__(self):
        self.values: dict[str, float | None] = {}
        self.files: dict[str, str] = {}
        self.problems: dict[str, str] = {}
        self.seen: set[tuple[str, str]] = set()

    def add(self, filesystem, fs_path: str, key: str) -> None:
        where = (filesystem.type_name, fs_path)
        if where in self.seen:
            return  # the labels folder may lie inside the dataset root
        self.seen.add(where)
        key = key.lower()
        value, problem = _parse_label_file(filesystem, fs_path)
        if key in self.values and self.values[key] != value:
            self.problems[key] = f"conflicting label files {self.files[key]} and {fs_path}"
        elif problem:
            self.problems[key] = problem
        if key not in self.values or problem is None:
            self.values[key], self.files[key] = value, fs_path

    def lookup(self, keys: Sequence[str]) -> str | None:
        return next((key for key in keys if key in self.values), None)


def _rows_from_avec(source: str, parse_video, labels_source: str | None
                    ) -> tuple[list[dict], list[str], list[str]]:
    """(rows, problems, video files named like the dataset's videos but under no split folder)."""
    filesystem, root, files = _list_files(source, "dataset root")
    labels = _Labels()
    videos: list[tuple[str, str, dict]] = []  # (split, fs path, parsed)
    unplaced: list[str] = []
    for fs_path, relative in files:
        name = relative[-1]
        label_match = _LABEL_FILE.match(name)
        if label_match:
            labels.add(filesystem, fs_path, label_match["key"])
            continue
        stem, ext = posixpath.splitext(name)
        if ext.lower() not in VIDEO_EXTENSIONS:
            continue
        parsed = parse_video(stem, relative[:-1])
        if parsed is None:
            continue
        split = _split_of_folders(relative[:-1])
        if split is None:
            unplaced.append(uri_for(source, fs_path))
        else:
            videos.append((split, fs_path, parsed))

    if labels_source is not None:
        label_fs, _, label_files = _list_files(labels_source, "labels folder")
        found = 0
        for fs_path, relative in label_files:
            label_match = _LABEL_FILE.match(relative[-1])
            if label_match:
                labels.add(label_fs, fs_path, label_match["key"])
                found += 1
        if not found:
            raise ManifestError(f"labels folder {labels_source} holds no *_Depression.csv file")

    rows = []
    for split, fs_path, parsed in videos:
        key = labels.lookup(parsed["label_keys"])
        rows.append({"video_id": parsed["video_id"], "subject_id": parsed["subject_id"],
                     "split": split, "label": labels.values.get(key) if key else None,
                     "uri": uri_for(source, fs_path), "task": parsed["task"], "label_key": key})
    rows = _sorted_rows(rows)
    # unreadable/conflicting label files are reported with the rows they affect
    problems = [f"row {i + 1} (video_id {row['video_id']!r}): {labels.problems[row['label_key']]}"
                for i, row in enumerate(rows) if row["label_key"] in labels.problems]
    return rows, problems, unplaced


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
    base = parent_uri(source)

    rows, problems = [], []
    for i, record in enumerate(reader):
        video_id = _text(record.get("video_id"))
        label_text = _text(record.get("label"))
        label = None
        if label_text:
            try:
                label = float(label_text)
            except ValueError:
                problems.append(f"{_csv_row_name(i + 1)} (video_id {_shown(video_id)}): "
                                f"label {label_text!r} is not a number")
        uri = _text(record.get("uri"))
        rows.append({"video_id": video_id, "subject_id": _text(record.get("subject_id")),
                     "split": _text(record.get("split")).lower(),
                     "label": label,
                     "uri": join_uri(base, uri) if uri else "",
                     "task": _text(record.get("task")) or None})
    return rows, problems


# --------------------------------------------------------------------------------------------
# The registry of input layouts (--dataset NAME)
# --------------------------------------------------------------------------------------------

def _read_csv(source: str, labels: str | None) -> tuple[list[dict], list[str], list[str]]:
    rows, problems = _rows_from_csv(source)
    return rows, problems, []


DATASET_LAYOUTS: dict[str, DatasetLayout] = {
    "avec2013": DatasetLayout(lambda source, labels: _rows_from_avec(source, _parse_avec2013_video, labels),
                              row_name=_table_row_name),
    "avec2014": DatasetLayout(lambda source, labels: _rows_from_avec(source, _parse_avec2014_video, labels),
                              row_name=_table_row_name),
    "csv": DatasetLayout(_read_csv, default_split_policy="strict", takes_labels_folder=False, row_name=_csv_row_name),
}
DATASETS = tuple(DATASET_LAYOUTS)
