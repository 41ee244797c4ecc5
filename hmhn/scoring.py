"""Batch scoring: new videos -> the model's preprocessing -> frame scores (Ray Data actors) -> one row per video.

    videos / manifest --run_preprocess (the config stored WITH the model)--> shard set in the workdir
        --its index: the videos' committed row groups (read tasks)--> face crops
        --map_batches(FrameScorer, actor pool)--> frame scores
        --driver: hmhn.video_scores--> scores.csv (video_id, score, frames_used, score_std, severity, status, reason)

Nothing here re-implements a step of training: preprocessing is pipeline.preprocess.run_preprocess
run with the model's own preprocess_config.json (so the preprocess_version hash equals training's;
a mismatch is an error, not a silent drift), pixels go through hmhn.image, frame scores come from
HMHNScorer (clamped 0..63 per frame, as in training's evaluation) and videos are aggregated by
hmhn.video_scores.

Face crops and per-video scores are health data: the only outputs are the CSV the user asked for
and, with explain_dir, attention-map pictures; stdout gets counts, never scores or faces. Printed
lines show URIs redacted (pipeline.storage.redact_uri); URIs with credentials are refused by
ScoringConfig.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from hmhn.config import BDI_MAX, BDI_MIN
from hmhn.metrics import AGGREGATIONS, video_scores
from pipeline.manifest import DATASETS
from pipeline.schema import STATUS_FAILED, STATUS_NO_FACE, STATUS_OK, severity_band

log = logging.getLogger(__name__)

INPUT_KINDS = ("auto", "videos", *DATASETS)
OUTPUT_COLUMNS = ["video_id", "score", "frames_used", "score_std", "severity", "status", "reason"]
FRAME_COLUMNS = ["video_id", "frame_index", "timestamp_s", "image"]


class ScoringError(ValueError):
    """Scoring cannot start (bad input, or a model whose preprocessing cannot be reproduced)."""


@dataclass(frozen=True)
class ScoringConfig:
    model: str = field(default="", metadata={"help": "model URI, e.g. models:/hmhn@champion (logged by "
                                                     "hmhn.serving.log_scoring_model)"})
    input: tuple[str, ...] = field(default=(), metadata={"help": "video files and/or folders of videos, or ONE "
                                                                 "manifest CSV / AVEC root (local paths or URIs)"})
    output: str = field(default="scores.csv", metadata={"help": "CSV to write, one row per video"})
    dataset: str = field(default="auto", metadata={
        "help": "what --input is: videos, csv (manifest), avec2013/avec2014 (dataset root); "
                "auto = csv for a single .csv file, else videos", "choices": INPUT_KINDS})
    workdir: str = field(default="", metadata={"help": "where preprocessing writes the face shards (kept, and "
                                                       "reused by video_id on a rerun; shared storage on a "
                                                       "cluster); default: a temporary folder, deleted after"})
    aggregate: str = field(default="mean", metadata={"help": "frame -> video aggregation",
                                                     "choices": AGGREGATIONS})
    batch_size: int = field(default=64, metadata={"help": "face crops per inference batch"})
    num_actors: int = field(default=0, metadata={"help": "inference actors (0 = one per GPU, else sized from "
                                                         "the cluster's CPUs)"})
    mlflow_uri: str = field(default="", metadata={"help": "MLflow tracking/registry URI (default: "
                                                          "$MLFLOW_TRACKING_URI, else MLflow's default)"})
    explain_dir: str = field(default="", metadata={"help": "write attention-map and frame-score pictures here "
                                                           "(they show faces: only where you ask)"})
    explain_videos: int = field(default=3, metadata={"help": "how many scored videos to explain"})
    explain_faces: int = field(default=4, metadata={"help": "faces per attention-map picture"})

    def __post_init__(self):
        if isinstance(self.input, str):  # a single path given programmatically
            object.__setattr__(self, "input", (self.input,))
        if not self.model:
            raise ValueError("model is required (--model models:/NAME@ALIAS)")
        if not self.input:
            raise ValueError("input is required (--input VIDEO_OR_FOLDER ... | MANIFEST.csv | AVEC_ROOT)")
        if not self.output:
            raise ValueError("output is required (--output scores.csv)")
        if self.dataset not in INPUT_KINDS:
            raise ValueError(f"dataset must be one of {INPUT_KINDS}, got {self.dataset!r}")
        if self.aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {self.aggregate!r}")
        if self.batch_size < 1 or self.num_actors < 0 or self.explain_videos < 0 or self.explain_faces < 1:
            raise ValueError("batch_size and explain_faces must be >= 1, num_actors and explain_videos >= 0")
        from pipeline.storage import check_no_credentials

        for name in ("model", "output", "workdir", "mlflow_uri", "explain_dir"):  # CredentialsInURIError: ValueError
            check_no_credentials(getattr(self, name), "--" + name.replace("_", "-"))
        for item in self.input:
            check_no_credentials(item, "--input")


# ----------------------------------------------------------------------------------------------
# Input -> manifest


def _video_files(inputs: tuple[str, ...]) -> list[str]:
    """Expand folders (recursively, known video extensions); files are taken as given, even if broken:
    a bad file becomes a failed row in the output, not an error here."""
    from pipeline.manifest import VIDEO_EXTENSIONS
    from pipeline.storage import file_info, uri_for

    found: list[str] = []
    for item in inputs:
        fs, path, info = file_info(item)
        if info.type == pafs.FileType.Directory:
            entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            videos = sorted(e.path for e in entries if e.type == pafs.FileType.File
                            and e.path.lower().endswith(VIDEO_EXTENSIONS))
            if not videos:
                raise ScoringError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) under {item}")
            found.extend(uri_for(item, v) for v in videos)
        elif info.type == pafs.FileType.File:
            found.append(item)
        else:
            raise ScoringError(f"input not found: {item}")
    return found


def build_manifest(config: ScoringConfig) -> tuple[pa.Table, str]:
    """(manifest, the PreprocessConfig.dataset it corresponds to) for the config's input."""
    from pipeline.manifest import load_manifest, manifest_from_videos

    kind = config.dataset
    if kind == "auto":
        kind = "csv" if len(config.input) == 1 and config.input[0].lower().endswith(".csv") else "videos"
    if kind == "videos":
        return manifest_from_videos(_video_files(config.input)), "csv"
    if len(config.input) != 1:
        raise ScoringError(f"--dataset {kind} takes exactly one --input (the manifest CSV or dataset root)")
    return load_manifest(kind, config.input[0]), kind


# ----------------------------------------------------------------------------------------------
# Inference (Ray Data actors)


class FrameScorer:
    """Ray Data actor: holds one HMHNScorer; JPEG crops in, clamped frame scores out."""

    def __init__(self, model_state: dict[str, Any], model_config: dict[str, Any], use_gpu: bool, threads: int):
        import torch

        from hmhn.inference import model_from_state, scorer_for

        torch.set_num_threads(max(1, threads))
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model = model_from_state(model_state, model_config, device)
        self.scorer = scorer_for(model)
        self.input_size = model.config.input_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # An inference error (an undecodable crop, a CUDA fault) fails this batch's videos with a
        # reason, never the run and never silently: the driver marks them failed (video_table).
        try:
            scores, error = self._score(batch["image"]), ""
        except Exception as exc:
            from pipeline.storage import redact

            scores = np.full(len(batch["video_id"]), np.nan)
            error = redact(f"inference failed ({type(exc).__name__}): {exc}")[:500]
        return {"video_id": batch["video_id"], "frame_index": batch["frame_index"],
                "timestamp_s": batch["timestamp_s"], "score": scores.astype(np.float64),
                "error": np.full(len(batch["video_id"]), error, dtype=object)}

    def _score(self, jpegs: np.ndarray) -> np.ndarray:
        from hmhn.inference import crops_to_input, score_input

        return score_input(self.scorer, crops_to_input(jpegs, self.input_size))


def read_committed_frames(batch: pa.Table, root: str) -> pa.Table:
    """Ray Data UDF: index rows of videos in, all their committed frames (FRAME_COLUMNS) out."""
    from pipeline.shardset import RowGroupReader, VideoEntry

    reader = RowGroupReader(root)
    try:
        tables = [reader.read(VideoEntry.from_row(row), None, FRAME_COLUMNS) for row in batch.to_pylist()]
    finally:
        reader.close()
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in FRAME_COLUMNS})


def score_frames(model, shard_uri: str, video_ids: list[str], batch_size: int = 64, num_actors: int = 0,
                 printer: Callable[[str], None] = print) -> pd.DataFrame:
    """Frame scores (video_id, frame_index, timestamp_s, score) of `video_ids` in the shard set, via Ray Data.

    Only committed rows are read (through the shard set's index: file + row groups per video), so
    rows a killed or retried preprocessing run left in a file are never scored."""
    from ray.data import ActorPoolStrategy

    from pipeline.ray_utils import dataset_of_slices, init_ray
    from pipeline.resources import alive_nodes, plan_inference_pool
    from pipeline.shardset import ShardIndex

    index = ShardIndex.load(shard_uri)
    entries = index.select(with_frames=True)
    entries = entries.filter(pc.is_in(entries.column("video_id"), pa.array(video_ids, pa.string())))
    if not entries.num_rows:
        return pd.DataFrame({"video_id": pd.Series(dtype=str), "frame_index": pd.Series(dtype="int64"),
                             "timestamp_s": pd.Series(dtype="float64"), "score": pd.Series(dtype="float64"),
                             "error": pd.Series(dtype=str)})
    init_ray()
    pool = plan_inference_pool(alive_nodes(), num_actors)
    printer(f"[predict] inference actors: {pool.size} x (CPU {pool.num_cpus:g}, GPU {pool.num_gpus:g}) "
            f"over {entries.num_rows} videos")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # Read tasks ask for a quarter CPU: with the actors' share they never exceed the cluster (no starvation).
    per_task = 8
    ds = dataset_of_slices(entries, per_task)
    ds = ds.map_batches(read_committed_frames, batch_size=None, batch_format="pyarrow", num_cpus=0.25,
                        fn_kwargs={"root": shard_uri})
    ds = ds.map_batches(
        FrameScorer, batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs={"model_state": state, "model_config": dataclasses.asdict(model.config),
                               "use_gpu": pool.use_gpu, "threads": pool.threads},
        compute=ActorPoolStrategy(size=pool.size), num_cpus=pool.num_cpus, num_gpus=pool.num_gpus or None,
    )
    # Every block must arrive: a read or inference task that fails for good fails the job (with Ray's
    # error) instead of leaving videos unscored. Per-batch inference errors come back as rows (above).
    ds.context.max_errored_blocks = 0
    frames = ds.to_pandas()
    return frames.sort_values(["video_id", "frame_index"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# Aggregation and output


def video_table(manifest: pa.Table, status: pd.DataFrame, frames: pd.DataFrame, how: str = "mean") -> pd.DataFrame:
    """One row per manifest video (manifest order) with OUTPUT_COLUMNS. A video with a frame whose
    inference failed (frames["error"]) is failed with that reason, not scored from its other frames."""
    failed_rows = frames["error"].fillna("") != "" if "error" in frames else pd.Series(False, index=frames.index)
    inference_error = frames[failed_rows].groupby("video_id")["error"].first().to_dict()
    frames = frames[~frames["video_id"].isin(list(inference_error))]
    per_video = video_scores(frames["video_id"].tolist(), frames["score"].to_numpy(), how) if len(frames) else {}
    grouped = frames.groupby("video_id")["score"]
    counts, spread = grouped.size().to_dict(), grouped.std(ddof=0).to_dict()
    status_of = status.set_index("video_id").to_dict("index") if len(status) else {}
    rows = []
    for video_id in manifest.column("video_id").to_pylist():
        state = status_of.get(video_id, {"status": STATUS_FAILED, "reason": "not preprocessed (no status row)"})
        row = {"video_id": video_id, "score": np.nan, "frames_used": 0, "score_std": np.nan, "severity": "",
               "status": state["status"], "reason": state["reason"] or ""}
        if video_id in inference_error:
            row.update(status=STATUS_FAILED, reason=inference_error[video_id])
        elif video_id in per_video:
            score = float(np.clip(per_video[video_id], BDI_MIN, BDI_MAX))
            row.update(score=score, frames_used=int(counts[video_id]), score_std=float(spread[video_id]),
                       severity=severity_band(score))
        elif state["status"] == STATUS_OK:  # status says faces were kept, but no frame reached the model
            row.update(status=STATUS_FAILED, reason="no face crops found in the shard set for this video")
        rows.append(row)
    return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


def write_csv(table: pd.DataFrame, uri: str) -> None:
    from pipeline.storage import write_bytes

    buffer = io.StringIO()
    table.to_csv(buffer, index=False, float_format="%.4f")
    write_bytes(uri, buffer.getvalue().encode())


def read_status(shard_uri: str) -> pd.DataFrame:
    """video_id, status, reason of every video committed in the shard set."""
    from pipeline.shardset import ShardIndex

    return ShardIndex.load(shard_uri, columns=["video_id", "status", "reason"]).table.to_pandas()


def read_video_frames(shard_uri: str, video_id: str) -> pd.DataFrame:
    """All committed rows of one video (images included), ordered by frame_index."""
    from pipeline.shardset import ShardIndex
    from pipeline.shardset import read_video_frames as read_rows

    index = ShardIndex.load(shard_uri)
    entry = [v for v in index.videos(with_frames=True) if v.video_id == video_id]
    if not entry:
        return pd.DataFrame(columns=FRAME_COLUMNS)
    return read_rows(shard_uri, entry[0], FRAME_COLUMNS).to_pandas()


# ----------------------------------------------------------------------------------------------
# The job


def model_preprocessing(stored: dict[str, Any], dataset: str, input: str, workdir: str):
    """The preprocessing a model was trained on (its stored config.json, also one written by older code:
    pipeline.preprocess.preprocess_config_from_dict reads those), with this run's input: not training's
    labels folder or split policy. ScoringError when this code cannot reproduce its preprocess_version."""
    from pipeline.preprocess import preprocess_config_from_dict, preprocess_version

    preprocess = preprocess_config_from_dict(stored, dataset=dataset, input=input, output=workdir,
                                             num_detect_actors=0, limit=0, labels="", split_policy="", split_seed=0)
    expected = stored.get("preprocess_version")
    if expected and preprocess_version(preprocess) != expected:
        raise ScoringError(f"the model's preprocessing (version {expected}) cannot be reproduced by this code "
                           f"(it gives {preprocess_version(preprocess)}): the preprocessing code changed since "
                           "the model was trained; score with the code version that trained it")
    return preprocess


def score_videos(config: ScoringConfig, printer: Callable[[str], None] = print) -> pd.DataFrame:
    """Score every video of config.input with config.model; writes config.output and returns the same table.

    Raises ScoringError / ManifestError / MlflowException before any work when the input or model is unusable.
    One bad video never stops the run: it gets status failed / no_face and a reason.
    """
    import mlflow

    from hmhn.serving import load_scoring_model
    from pipeline.preprocess import preprocess_version, run_preprocess
    from pipeline.storage import redacting_printer

    started = time.time()
    printer = redacting_printer(printer)
    if config.mlflow_uri:
        mlflow.set_tracking_uri(config.mlflow_uri)
        mlflow.set_registry_uri(config.mlflow_uri)
    model, stored, _ = load_scoring_model(config.model)
    manifest, dataset = build_manifest(config)
    workdir = config.workdir or tempfile.mkdtemp(prefix="hmhn-score-")
    try:
        preprocess = model_preprocessing(stored, dataset, ",".join(config.input), workdir)
        printer(f"[predict] model {config.model} (preprocess_version {preprocess_version(preprocess)}, "
                f"input {model.config.input_size} px); {manifest.num_rows} videos")
        summary = run_preprocess(preprocess, manifest=manifest, printer=printer)
        shard_uri = summary["shard_set"]
        status = read_status(shard_uri)
        ok_ids = status.loc[status["status"] == STATUS_OK, "video_id"].tolist()
        frames = score_frames(model, shard_uri, ok_ids, config.batch_size, config.num_actors, printer)
        table = video_table(manifest, status, frames, config.aggregate)
        failed = table[table["reason"].str.startswith("inference failed")]
        if len(failed):
            printer(f"[predict] inference failed for {len(failed)} video(s), marked failed: {failed['reason'].iloc[0]}")
        write_csv(table, config.output)
        if config.explain_dir and config.explain_videos:
            _explain(model, shard_uri, table, frames, config, printer)
    finally:
        if not config.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    counts = table["status"].value_counts().to_dict()
    printer(f"[predict] wrote {config.output}: {counts.get(STATUS_OK, 0)} scored, {counts.get(STATUS_NO_FACE, 0)} "
            f"without a face, {counts.get(STATUS_FAILED, 0)} failed of {len(table)} videos "
            f"in {time.time() - started:.1f} s")
    return table


def _explain(model, shard_uri: str, table: pd.DataFrame, frames: pd.DataFrame, config: ScoringConfig,
             printer: Callable[[str], None]) -> None:
    from hmhn.explain import explain_video

    scored = table.loc[table["frames_used"] > 0, "video_id"].tolist()[: config.explain_videos]
    for video_id in scored:
        rows = read_video_frames(shard_uri, video_id)
        explain_video(model, rows, frames[frames["video_id"] == video_id], config.explain_dir, video_id,
                      faces=config.explain_faces)
    printer(f"[predict] explanations of {len(scored)} videos in {config.explain_dir} (they show faces)")
