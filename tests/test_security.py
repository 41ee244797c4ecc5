"""Secure by default: no credentials in URIs, nothing secret printed or stored, promotion as its own safe step,
per-video predictions kept out of MLflow on request.

Cheap on purpose (library calls, one tiny preprocessing run on the session's Ray, a throwaway MLflow store):
* every job refuses a URI with credentials with exit status 2, before Ray starts;
* a token in a URI's query string never reaches config.json / summary.json / failure reasons / printed
  lines (real preprocessing), nor MLflow params, tags, text artifacts or the registered model's config;
* `promote` moves champion only on improvement, and two concurrent promotions end as if serial;
* TrainConfig.log_predictions=False keeps per-video labels and predictions out of MLflow.
"""
from __future__ import annotations

import csv
import json
import os
import runpy
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.storage import (CredentialsInURIError, check_no_credentials, embedded_credentials, redact, redact_uri,
                              redacting_printer)
from tests.conftest import REPO

SECRET = "SECRET123"
BAIT = f"s3://bucket/faces?region=eu-west-1&token={SECRET}"  # harmless-looking, but the token is a secret


# ----------------------------------------------------------------------------------------------
# The rule


@pytest.mark.parametrize("uri", [
    f"s3://AKIAEXAMPLE:{SECRET}@bucket/faces",
    "s3://AKIAEXAMPLE@bucket/faces",                                     # pyarrow reads the user as access key
    f"s3://bucket/faces?access_key=AKIAEXAMPLE&secret_key={SECRET}",
    f"s3://bucket/faces?region=eu-west-1&session_token={SECRET}",
    f"http://admin:{SECRET}@mlflow:5000",
    f"https://bucket.s3.amazonaws.com/v.mp4?X-Amz-Credential=a&X-Amz-Signature={SECRET}",  # pre-signed URL
    f"file:///data/v.mp4?sig={SECRET}",                                  # Azure SAS signature
    f"abfss://account:{SECRET}@account.dfs.core.windows.net/c/x",
    f"s3://AKIA:abc/{SECRET}@bucket/x",                                  # a raw "/" in the secret
])
def test_credentials_in_uris_are_refused_without_echoing_them(uri):
    assert embedded_credentials(uri)
    with pytest.raises(CredentialsInURIError) as caught:
        check_no_credentials(uri, "--input")
    message = str(caught.value)
    assert SECRET not in message and "--input" in message and "***" in message
    assert "AWS_ACCESS_KEY_ID" in message and "MLFLOW_TRACKING_USERNAME" in message and "workload identity" in message


@pytest.mark.parametrize("uri", ["s3://bucket/faces/v1?region=eu-west-1", "/data/faces", "file:///data/x?y",
                                 "abfss://container@account.dfs.core.windows.net/x", "models:/hmhn@champion",
                                 "sqlite:////tmp/mlflow.db", "http://mlflow:5000", "", BAIT])
def test_uris_without_credentials_pass(uri):
    assert embedded_credentials(uri) == []
    check_no_credentials(uri, "--input")


def test_redaction_rule():
    assert redact_uri(BAIT) == "s3://bucket/faces?region=eu-west-1&token=***"          # allow-listed values kept
    assert redact_uri(f"file:///x/v.mp4?sig={SECRET}#frag") == "file:///x/v.mp4?sig=***#***"
    assert redact_uri(f"http://u:{SECRET}@mlflow:5000/api") == "http://***@mlflow:5000/api"
    line = f"error: cannot open '{BAIT}/x' (see /local/v.mp4?t={SECRET}) and s3://k:{SECRET}@b/y"
    redacted = redact_uri(line)
    assert SECRET not in redacted and redacted.startswith("error: cannot open 's3://bucket/faces?region=eu-west-1")
    assert redact_uri(redacted) == redacted                                                # idempotent
    for harmless in ("/data/faces/v1", "s3://b/x?region=us-east-1&endpoint_override=localhost:9000&scheme=http",
                     "abfss://c@acct.dfs.core.windows.net/x", "user@example.com asked why?", "models:/m@champion"):
        assert redact_uri(harmless) == harmless
    doc = {"config": {"input": BAIT, "inputs": [BAIT, "x"], "pair": (BAIT, 1), "n": 3}, "ok": True}
    assert SECRET not in json.dumps(redact(doc)) and redact(doc)["config"]["n"] == 3 and doc["config"]["input"] == BAIT
    lines = []
    redacting_printer(lines.append)(f"wrote {BAIT}")
    assert lines == ["wrote s3://bucket/faces?region=eu-west-1&token=***"]


# ----------------------------------------------------------------------------------------------
# Every job refuses a credentialed URI with exit status 2, before starting Ray


def _run_job(name: str, argv: list[str]) -> int:
    job = runpy.run_path(str(REPO / "jobs" / f"{name}.py"))
    try:
        return job["main"](argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


JOB_CASES = {
    "preprocess --input userinfo": ("preprocess", ["--dataset", "csv", "--input", f"s3://AK:{SECRET}@b/m.csv"]),
    "preprocess --output keys": ("preprocess", ["--input", "m.csv", "--output",
                                                f"s3://b/faces?access_key=AK&secret_key={SECRET}"]),
    "preprocess --labels token": ("preprocess", ["--dataset", "avec2014", "--input", "data",
                                                 "--labels", f"s3://b/l?session_token={SECRET}"]),
    "train --data": ("train_ddp", ["--data", f"s3://b/faces/v?secret_key={SECRET}"]),
    "train --storage-path": ("train_ddp", ["--data", "faces/v", "--storage-path", f"s3://AK:{SECRET}@b/rr"]),
    "train --mlflow-uri": ("train_ddp", ["--data", "faces/v", "--mlflow-uri", f"http://admin:{SECRET}@mlflow:5000"]),
    "predict --model": ("predict", ["--model", f"s3://AK:{SECRET}@b/model", "--input", "v.mp4"]),
    "predict --input": ("predict", ["--model", "models:/m@champion",
                                    "--input", f"s3://b/v.mp4?X-Amz-Signature={SECRET}"]),
    "predict --output": ("predict", ["--model", "models:/m@champion", "--input", "v.mp4",
                                     "--output", f"s3://b/s.csv?secret_key={SECRET}"]),
    "predict --workdir": ("predict", ["--model", "models:/m@champion", "--input", "v.mp4",
                                      "--workdir", f"s3://AK:{SECRET}@b/w"]),
    "predict --mlflow-uri": ("predict", ["--model", "models:/m@champion", "--input", "v.mp4",
                                         "--mlflow-uri", f"https://u:{SECRET}@mlflow"]),
    "promote --mlflow-uri": ("promote", ["--model-name", "m", "--mlflow-uri", f"http://admin:{SECRET}@mlflow:5000"]),
}


@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to start or join Ray fails the test."""
    import ray

    from pipeline import ray_utils

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid configuration")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray_utils, "init_ray", refuse)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # train_ddp edits it; restored after
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.mark.parametrize("case", list(JOB_CASES))
def test_every_job_refuses_credentials_in_uris_with_exit_2(case, no_ray, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job, argv = JOB_CASES[case]
    assert _run_job(job, argv) == 2
    out, err = capsys.readouterr()
    assert SECRET not in out + err, out + err
    assert "embeds credentials" in err and "AWS_ACCESS_KEY_ID" in err and "MLFLOW_TRACKING_USERNAME" in err, err
    assert not list(tmp_path.iterdir()), "nothing may be written"


def test_manifest_video_uri_with_credentials_is_refused(no_ray, capsys, tmp_path):
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["video_id", "subject_id", "split", "label", "uri"])
        writer.writerow(["v1", "s1", "train", "3", str(tmp_path / "ok.mp4")])
        writer.writerow(["v2", "s2", "train", "4", f"s3://bucket/v2.mp4?access_key=AK&secret_key={SECRET}"])
    code = _run_job("preprocess", ["--dataset", "csv", "--input", str(manifest), "--output", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 2 and "'v2'" in err and "embed credentials" in err and "'v1'" not in err, err
    assert SECRET not in out + err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Redaction bait: real preprocessing writes no secret, but still works with the real location


def test_preprocessing_stores_and_prints_no_uri_secret(ray_session, tmp_path, capsys):
    from pipeline.decode import SamplingConfig
    from pipeline.preprocess import PreprocessConfig, run_preprocess

    manifest = tmp_path / "m.csv"
    video = f"file://{tmp_path}/missing.mp4?region=eu-west-1&token={SECRET}"  # its failure reason repeats it
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["video_id", "subject_id", "split", "label", "uri"])
        writer.writerow(["v1", "s1", "train", "3", video])
    output = f"file://{tmp_path}/out?region=eu-west-1&token={SECRET}"
    config = PreprocessConfig(dataset="csv", input=str(manifest), output=output, num_detect_actors=1,
                              sampling=SamplingConfig(mode="fps", fps=2.0))
    summary = run_preprocess(config)
    printed = capsys.readouterr()
    assert summary["failed"] == 1 and "not found" in summary["problems"]["v1"]
    shard_set = Path(summary["shard_set"].removeprefix("file://"))
    assert SECRET in str(shard_set) and shard_set.is_dir()  # the job used the real location
    stored = {name: (shard_set / name).read_text() for name in ("config.json", "summary.json")}
    for name, text in stored.items():
        assert SECRET not in text, f"{name} holds the secret"
    assert "token=***" in stored["config.json"] and "token=***" in stored["summary.json"]
    reasons = pq.read_table(shard_set / "index.parquet").column("reason").to_pylist()
    logged = [r for f in (shard_set / "log").iterdir() for r in pq.read_table(f).column("reason").to_pylist()]
    assert reasons and all(SECRET not in r and "token=***" in r for r in reasons + logged), reasons + logged
    assert SECRET not in printed.out + printed.err and "token=***" in printed.out


# ----------------------------------------------------------------------------------------------
# Redaction bait: what training logs to MLflow (RunLogger, run tags, registration)


def test_mlflow_params_tags_text_and_registered_config_hold_no_secret(mlflow_store, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from hmhn import tracking
    from hmhn.train import TrainConfig
    from tests.test_serving import small_scoring_model, training_preprocess_doc

    config = TrainConfig(data=BAIT, storage_path=f"file:///rr?sig2={SECRET}", run_name="bait")
    run_id, _ = tracking.start_or_resume_run(mlflow_store, "bait", "bait", {"data": config.data})
    logger = tracking.RunLogger(mlflow_store, run_id)
    logger.log_params({**config.to_dict(), "extra": BAIT})
    logger.log_params({"data": BAIT + "&x=1"})                               # a changed value: a tag
    logger.set_tags({"model_uri": BAIT, "note": f"written to {BAIT}"})
    logger.log_text(f"split,video_id,reason\ndev,v1,failed: not found: {BAIT}\n", "evaluation/fallback_videos.csv")
    run = MlflowClient().get_run(run_id)
    stored = json.dumps([run.data.params, run.data.tags])
    assert SECRET not in stored and run.data.params["data"] == "s3://bucket/faces?region=eu-west-1&token=***"
    assert run.data.tags["data"] == run.data.params["data"]
    text = Path(MlflowClient().download_artifacts(run_id, "evaluation/fallback_videos.csv", str(tmp_path))).read_text()
    assert SECRET not in text and "token=***" in text

    # The registered model's stored preprocessing config and its tags.
    doc = training_preprocess_doc()
    doc["config"]["input"], doc["config"]["output"] = BAIT, BAIT
    with mlflow.start_run(run_id=run_id):
        from hmhn.serving import log_scoring_model

        info = log_scoring_model(small_scoring_model(), preprocess_config=doc, input_size=112,
                                 registered_model_name="bait", extra_tags={"data": BAIT})
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/bait/{info.registered_model_version}",
                                                         dst_path=str(tmp_path / "model")))
    stored = (model_dir / "artifacts" / "preprocess_config.json").read_text()
    assert SECRET not in stored and "token=***" in stored
    version = MlflowClient().get_model_version("bait", info.registered_model_version)
    assert SECRET not in json.dumps(version.tags) and version.tags["data"].endswith("token=***")
    assert not [p for p in model_dir.rglob("*") if p.is_file() and p.suffix in (".json", ".yaml", ".txt", "")
                and SECRET in p.read_text(errors="ignore")]


def test_tracking_uri_with_credentials_is_refused_also_from_the_environment(monkeypatch):
    from hmhn.tracking import resolve_tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://admin:{SECRET}@mlflow:5000")
    with pytest.raises(CredentialsInURIError) as caught:
        resolve_tracking_uri()
    assert "MLFLOW_TRACKING_URI" in str(caught.value) and SECRET not in str(caught.value)
    assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"


# ----------------------------------------------------------------------------------------------
# Promotion: its own step, champion moves only on improvement, concurrent promotions are serialised


def _versions(client, name: str, rmses: list[float], uri: str) -> list[str]:
    from hmhn.tracking import register_candidate

    versions = []
    for rmse in rmses:
        version = str(client.create_model_version(name, source="file:///nowhere").version)
        register_candidate(uri, name, version, rmse)
        versions.append(version)
    return versions


def test_concurrent_promotions_end_with_the_better_one_as_champion(mlflow_store):
    from mlflow import MlflowClient

    from hmhn.tracking import PROMOTION_LOCK_SUFFIX, promote

    client = MlflowClient()
    name = "race"
    client.create_registered_model(name)
    (first,) = _versions(client, name, [9.0], mlflow_store)
    assert promote(mlflow_store, name).moved
    for round_ in range(3):
        worse, better = _versions(client, name, [8.0 - 2 * round_, 7.0 - 2 * round_], mlflow_store)
        champion_before = str(client.get_model_version_by_alias(name, "champion").version)
        results, errors = {}, []
        start = threading.Barrier(2)

        def run(version: str) -> None:
            try:
                start.wait()
                results[version] = promote(mlflow_store, name, version=version, lock_timeout_s=30)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(v,)) for v in (worse, better)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert str(client.get_model_version_by_alias(name, "champion").version) == better
        # Serialisable: the better one always moved; the worse one either went first (moved, and the
        # better one then replaced it) or second (kept, having compared with the better one).
        assert results[better].moved and results[better].champion_after == better
        if results[worse].moved:
            assert results[worse].champion_before == champion_before and results[better].champion_before == worse
        else:
            assert results[worse].champion_before == better and results[better].champion_before == champion_before
    assert [m.name for m in client.search_registered_models()] == [name]  # the lock is gone
    assert not any(m.name.endswith(PROMOTION_LOCK_SUFFIX) for m in client.search_registered_models())


def test_promotion_lock_waits_for_a_live_holder_and_takes_over_an_expired_one(mlflow_store):
    import time

    from mlflow import MlflowClient

    from hmhn.tracking import LOCK_EXPIRES_TAG, LOCK_TOKEN_TAG, PROMOTION_LOCK_SUFFIX, PromotionBusy, promote

    client = MlflowClient()
    name = "locked"
    client.create_registered_model(name)
    (version,) = _versions(client, name, [5.0], mlflow_store)
    lock = name + PROMOTION_LOCK_SUFFIX
    client.create_registered_model(lock, tags={LOCK_TOKEN_TAG: "other", LOCK_EXPIRES_TAG: str(time.time() + 600)})
    with pytest.raises(PromotionBusy, match="holds the lock"):
        promote(mlflow_store, name, lock_timeout_s=0.5)
    assert client.get_registered_model(lock).tags[LOCK_TOKEN_TAG] == "other"  # a live lock is never broken
    client.set_registered_model_tag(lock, LOCK_EXPIRES_TAG, str(time.time() - 1))  # its holder died
    result = promote(mlflow_store, name, lock_timeout_s=5)
    assert result.moved and result.champion_after == version
    assert [m.name for m in client.search_registered_models()] == [name]


def test_promote_job_exit_codes(mlflow_store, capsys):
    from mlflow import MlflowClient

    client = MlflowClient()
    name = "job"
    client.create_registered_model(name)
    good, bad = _versions(client, name, [6.0, 7.0], mlflow_store)
    assert _run_job("promote", ["--model-name", name, "--version", good]) == 0
    assert f"champion is now version {good}" in capsys.readouterr().out
    assert _run_job("promote", ["--model-name", name]) == 3           # @candidate = the worse one: kept
    assert "champion kept" in capsys.readouterr().out
    assert _run_job("promote", ["--model-name", name, "--version", "42"]) == 2
    assert _run_job("promote", ["--model-name", "nope"]) == 2
    assert _run_job("promote", ["--model-name", name, "--version", good, "--metric", "auc"]) == 2
    err = capsys.readouterr().err
    assert "no version 42" in err and "no registered model 'nope'" in err and "no 'auc'" in err
    assert str(client.get_model_version_by_alias(name, "champion").version) == good


# ----------------------------------------------------------------------------------------------
# Per-video predictions stay out of MLflow when asked (clinical deployments)


def test_log_predictions_off_logs_no_per_video_artifacts(tmp_path):
    from hmhn.data import open_shardset, write_synthetic_shardset
    from hmhn.train import TrainConfig, log_final_evaluation

    class Recorder:
        def __init__(self):
            self.files = []

        def log_text(self, text, artifact_file):
            self.files.append(artifact_file)

        def log_figure(self, figure, artifact_file):
            self.files.append(artifact_file)

    root = write_synthetic_shardset(str(tmp_path / "s"), {"train": 1, "dev": 2}, frames_per_video=2, no_face={"dev": 1})
    index = open_shardset(root)
    dev_ids = [v.video_id for v in index.videos("dev", with_frames=False)]
    predictions = {"dev": ({v: 10.0 for v in dev_ids}, {"fallback_videos": [dev_ids[-1]]})}
    research, clinical = Recorder(), Recorder()
    log_final_evaluation(research, TrainConfig(), index, predictions, "r", 1)
    log_final_evaluation(clinical, TrainConfig(log_predictions=False), index, predictions, "r", 1)
    assert set(research.files) == {"evaluation/video_predictions.csv", "evaluation/fallback_videos.csv",
                                   "evaluation/predicted_vs_true.png"}
    assert clinical.files == []
