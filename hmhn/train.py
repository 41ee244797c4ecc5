"""Distributed HMHN training: the driver (`run_training`), Ray Train V2 (PyTorch DDP) over face
shards, tracked in MLflow.

    run_training(TrainConfig(data="data/faces/ab12cd34", workers=2, epochs=10))

`run_training` indexes the shard set, finds or creates the MLflow run, sizes the workers to the
cluster, fits a TorchTrainer running `hmhn.train_loop.train_loop_per_worker` on every worker,
then logs + registers the best model as `@candidate`. Moving `@champion` is its own step
(jobs/promote.py, hmhn.tracking.promote), or `--promote`.

Where the rest lives:
    hmhn/train_config.py      TrainConfig (every option, validated), TrainingResult
    hmhn/train_loop.py        the worker loop, train_step
    hmhn/epoch_batches.py     the worker's batch producer, running ahead of the loop
    hmhn/schedules.py         the optimiser and its learning-rate schedules
    hmhn/evaluation.py        per-video evaluation, the baseline, the evaluation artifacts
    hmhn/train_checkpoint.py  the checkpoint file: what it holds, reading it back
    hmhn/epoch_log.py         per-epoch metrics to MLflow once Ray Train has committed the epoch
Their public names are importable from here too, as before the split.

Nothing secret is stored: URIs in params, tags, the checkpoint's config and the registered model
are redacted (pipeline.storage.redact_uri), and a URI with credentials is refused at validation.

Resume = rerun with the same run name (Ray Train V2 restores from RunConfig(name, storage_path));
a worker that dies is restarted from the last checkpoint (FailureConfig.max_failures). Either way
each epoch's metrics are logged to MLflow once (hmhn.epoch_log).
"""
from __future__ import annotations

import json
import time

from hmhn.data import check_trainable, open_shardset, train_dataset
from hmhn.evaluation import baseline_metrics, evaluate_split, log_final_evaluation, video_score_sums
from hmhn.schedules import make_optimizer
from hmhn.train_checkpoint import CHECKPOINT_FILE, load_checkpoint_state, model_from_checkpoint
from hmhn.train_config import TrainConfig, TrainingResult, parse_worker_resources
from hmhn.train_loop import SHUFFLE_BUFFER_MAX_ROWS, build_model, train_loop_per_worker, train_step

__all__ = [  # the driver's own names, then what callers imported from here before the split
    "TrainingDiverged", "require_multi_node_ready", "run_training",
    "CHECKPOINT_FILE", "SHUFFLE_BUFFER_MAX_ROWS", "TrainConfig", "TrainingResult",
    "baseline_metrics", "build_model", "evaluate_split", "load_checkpoint_state", "log_final_evaluation",
    "make_optimizer", "model_from_checkpoint", "parse_worker_resources", "train_loop_per_worker", "train_step",
    "video_score_sums",
]


def require_multi_node_ready(config: TrainConfig, tracking_uri: str) -> None:
    """On a cluster of more than one node, refuse (before any work) what only works on one:
    checkpoints on a node-local path, and an MLflow store in a local file (rank 0, which logs, may
    run on another node and would write into its own empty database)."""
    from pipeline.ray_utils import alive_node_count
    from pipeline.storage import StorageError, require_shared_storage

    nodes = alive_node_count()
    if nodes <= 1:
        return
    if not config.storage_path:
        raise StorageError(f"the Ray cluster has {nodes} nodes: --storage-path is required (checkpoints would go to "
                           "each node's own ~/ray_results and the first upload from another node would fail). Use "
                           "s3://bucket/ray_results or a mount shared by every node (HMHN_SHARED_PATHS)")
    require_shared_storage(config.storage_path, "--storage-path", node_count=nodes)
    scheme = tracking_uri.split(":", 1)[0] if "://" in tracking_uri else "file"
    if scheme in ("sqlite", "file"):
        from pipeline.storage import redact_uri

        raise StorageError(f"the Ray cluster has {nodes} nodes but the MLflow store is a local {scheme} store "
                           f"({redact_uri(tracking_uri)}): rank 0 logs from whichever node it runs on and would see "
                           "its own empty database. Use an MLflow server: --mlflow-uri http://HOST:5000 "
                           "(cluster/mlflow) or set MLFLOW_TRACKING_URI")


def run_training(config: TrainConfig) -> TrainingResult:
    """Train (or resume) a run on the Ray cluster from pipeline.ray_utils.init_ray; see the module doc."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from hmhn import tracking
    from pipeline.ray_utils import init_ray
    from pipeline.resources import alive_nodes, plan_training, training_bundles, wait_for_resources
    from pipeline.storage import require_shared_storage

    if not config.data:
        raise ValueError("no shard set given (--data OUTPUT/<preprocess_version>/)")
    tracking_uri = tracking.resolve_tracking_uri(config.mlflow_uri)  # refuses credentials, also in the env
    # The driver reads only the index's small columns (columnar: cheap at 10^5 videos) for the checks,
    # the training mean and the sizes; workers and Ray Data read the index themselves.
    index = open_shardset(config.data)
    check_trainable(index, config.allow_no_dev)
    train_videos = index.count("train")
    per_worker = train_videos * config.frames_per_video // config.workers
    if per_worker < config.batch_size:
        raise ValueError(f"each of the {config.workers} workers gets ~{per_worker} training frames per epoch, fewer "
                         f"than --batch-size {config.batch_size}: no training step would run (lower --batch-size "
                         f"or --workers, or raise --frames-per-video)")
    init_ray()
    require_shared_storage(config.data, "--data")
    extra = parse_worker_resources(config.worker_resources)
    # GPUs (or labelled nodes) that are not up yet: ask the autoscaler and wait, not fail.
    wait_for_resources(training_bundles(config.workers, config.gpu, extra), f"{config.workers} training worker(s)",
                       config.resource_wait_s, printer=lambda line: print(line, flush=True))
    require_multi_node_ready(config, tracking_uri)
    plan = plan_training(alive_nodes(), config.workers, config.gpu, config.cpus_per_worker, extra)
    print(f"[hmhn] {plan.describe(config.workers, config.gpu)}", flush=True)
    run_name = config.run_name or time.strftime("hmhn-%Y%m%d-%H%M%S")

    run_id, resumed = tracking.start_or_resume_run(
        tracking_uri, config.experiment, run_name,
        {"preprocess_version": index.preprocess_version, "data": config.data})
    if resumed:
        known = tracking.run_tags(tracking_uri, run_id).get("preprocess_version")
        if known and known != index.preprocess_version:
            raise ValueError(f"run {run_name!r} was trained on preprocess_version {known}, --data has "
                             f"{index.preprocess_version}: use a new --run-name")
    _log_data_report(tracking.RunLogger(tracking_uri, run_id), config.data)
    train_mean = index.train_mean()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "data": config.data, "run_name": run_name,
                           "run_id": run_id, "tracking_uri": tracking_uri, "train_mean": train_mean,
                           "threads": plan.threads, "cpus_per_worker": plan.cpus_per_worker},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.gpu,
                                               resources_per_worker={"CPU": plan.cpus_per_worker,
                                                                     **plan.worker_resources}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=config.storage_path or None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.num_to_keep,
                                                         checkpoint_score_attribute="dev_rmse",
                                                         checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures)),
        datasets={"train": train_dataset(index, config.frames_per_video, config.model.input_size,
                                         augmentation=config.augmentation, num_cpus=plan.data_cpus)},
        # dev/test never go through Ray's split (equal=True may drop rows): workers evaluate disjoint videos.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
    except BaseException:
        tracking.end_run(tracking_uri, run_id, "FAILED")
        raise

    final = result.return_value or {}
    best_checkpoint = result.get_best_checkpoint(metric="dev_rmse", mode="min") or result.checkpoint
    history = final.get("history", [])
    diverged_at = final.get("diverged_at_epoch")
    if best_checkpoint is None:
        tracking.end_run(tracking_uri, run_id, "FAILED")
        if diverged_at:
            raise TrainingDiverged(f"training diverged at epoch {diverged_at} (NaN/inf loss or dev RMSE) before any "
                                   "good epoch: nothing to register. Lower --lr / --head-lr or check the data")
        raise RuntimeError("training reported no checkpoint")
    if diverged_at:
        print(f"[hmhn] training diverged at epoch {diverged_at}; registering the last good model "
              f"(best epoch {final.get('best_epoch')})", flush=True)

    model_uri, model_version, moved = None, None, False
    with best_checkpoint.as_directory() as folder:
        model, state = model_from_checkpoint(folder)
        best_epoch = int(state["epoch"])
        if config.register:
            version = tracking.log_and_register_model(
                tracking_uri, run_id, model, config.model_name,
                preprocess_config=index.preprocess_config or {"preprocess_version": index.preprocess_version,
                                                              "config": {}},
                version_tags={"best_epoch": best_epoch, "training_run": run_name,
                              "aggregation": "mean of frame scores per video"})
            # The new version becomes @candidate only; @champion moves in its own step (jobs/promote.py)
            # unless --promote asked for it here.
            # Its dev RMSE for promotion: the final every-frame evaluation of these weights.
            dev_rmse = float(final.get("best_dev_rmse", state["metrics"]["dev_rmse"]))
            tracking.register_candidate(tracking_uri, config.model_name, version, dev_rmse)
            if config.promote:
                promotion = tracking.promote(tracking_uri, config.model_name, version=version)
                moved = promotion.moved
                print(f"[hmhn] promotion of version {version}: {'champion moved' if moved else 'champion kept'} "
                      f"({promotion.reason})", flush=True)
            model_uri, model_version = f"models:/{config.model_name}/{version}", str(version)
    baseline = baseline_metrics(index, "test")
    baseline_dev = baseline_metrics(index, "dev")
    logger = tracking.RunLogger(tracking_uri, run_id)
    logger.log_metrics({f"baseline_{s}_{k}": v for s, b in (("test", baseline), ("dev", baseline_dev)) if b
                        for k, v in b.items() if k != "n_videos"})
    logger.set_tags({"champion_moved": moved, "model_uri": model_uri or ""})
    tracking.end_run(tracking_uri, run_id, "FINISHED")
    return TrainingResult(
        run_name=run_name, run_id=run_id, model_uri=model_uri, champion_moved=moved, best_epoch=best_epoch,
        best_dev_rmse=float(final.get("best_dev_rmse", state["metrics"]["dev_rmse"])),
        best_dev_mae=float(final.get("best_dev_mae", state["metrics"]["dev_mae"])),
        test_rmse=final.get("best_test_rmse"), test_mae=final.get("best_test_mae"),
        baseline_test_rmse=baseline["rmse"] if baseline else None,
        baseline_test_mae=baseline["mae"] if baseline else None,
        epochs_run=[int(m["epoch"]) for m in history], checkpoint_path=best_checkpoint.path,
        preprocess_version=index.preprocess_version, history=history, diverged_at_epoch=diverged_at,
        n_videos_fallback={k.removeprefix("n_videos_fallback_"): int(v) for k, v in final.items()
                           if k.startswith("n_videos_fallback_")}, model_version=model_version)


class TrainingDiverged(RuntimeError):
    """The loss or dev RMSE became NaN/inf before any good epoch."""


def _log_data_report(logger, data: str) -> None:
    """What preprocessing reported about the manifest (split sizes, subjects recurring across the
    official partitions, unlabelled videos) goes to the run: the protocol is part of the result."""
    from pipeline.shardset import SUMMARY_FILE, read_json

    report = (read_json(data, SUMMARY_FILE) or {}).get("manifest")
    if not report:
        return
    recurring = report.get("recurring_subjects") or {}
    logger.log_params({"recurring_subjects": int(recurring.get("count", 0)),
                       "unlabelled_videos": len(report.get("unlabelled_video_ids") or [])})
    logger.log_text(json.dumps(report, indent=2, default=str), "data/manifest_report.json")
