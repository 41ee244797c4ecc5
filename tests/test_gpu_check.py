"""jobs/gpu_check.py: the CPU dry run of `make gpu-check` (what CI runs) end to end, plus its plumbing.

The dry run starts its own private Ray and runs the real jobs (make_demo_data, preprocess twice,
train_ddp, predict) as subprocesses on three one-second demo videos: about 1-2 minutes on the
2-core machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.job_modules import load_job

REPO = Path(__file__).resolve().parents[1]


def load_gpu_check():
    return load_job("gpu_check")


def _positive_numbers(value, path="") -> list[tuple[str, float]]:
    """Every number in a nested result, with where it is."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [(path, value)]
    if isinstance(value, dict):  # GPU samples are legitimately empty (0) on a machine without a GPU
        return [n for k, v in value.items() if not k.startswith("gpu") for n in _positive_numbers(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _positive_numbers(v, f"{path}[{i}]")]
    return []


def test_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--timeout-scale", "3"],  # the shared CI machine can be slow; timeouts still apply
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.time() - started
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["ok"] is True
    steps = report["steps"]
    assert list(steps) == ["model", "detect", "demo_data", "preprocess", "train", "predict"]
    assert all(r["status"] == "ok" for r in steps.values()), {k: r.get("error") for k, r in steps.items()}
    assert "all steps ok: True" in proc.stdout  # the printed table

    model = steps["model"]
    assert set(model["img_per_s"]) == {"hmhn_fp32_eager", "hmhn_bf16_channels_last", "trunk_fp32_eager",
                                       "trunk_bf16_channels_last"}
    assert all(v > 0 for v in model["img_per_s"].values())
    detect = steps["detect"]
    assert detect["providers"][0] == "CPUExecutionProvider"
    assert detect["frames_per_s"]["per_frame"] > 0 and detect["frames_per_s"]["batched"] > 0
    assert detect["profiled_node_runs"]["CPUExecutionProvider"] > 0  # the profiler wiring that proves CUDA on GPU
    assert steps["demo_data"]["videos"] == 3
    for run in ("cuda", "cpu"):  # "cuda" = --detector-use-gpu --detector-allow-cpu-fallback on this machine
        pre = steps["preprocess"][run]
        assert pre["videos"] == 3 and pre["frames"] > 0 and pre["faces"] > 0 and pre["frames_per_s"] > 0
    train = steps["train"]
    assert [e["epoch"] for e in train["epochs"]] == [1] and train["samples_per_s_last_epoch"] > 0
    predict = steps["predict"]
    assert predict["scored"] == predict["videos"] == 3 and predict["videos_per_s"] > 0
    # every figure is a positive number (counts, rates, seconds), none is 0 or negative
    numbers = _positive_numbers(steps)
    assert numbers and all(v > 0 for _, v in numbers), [n for n in numbers if n[1] <= 0]
    # the run's own temporary work folder is gone; nothing was written to the repository's MLflow store
    assert not Path(report["workdir"]).exists()
    print(f"gpu_check --dry-run: {seconds:.0f} s")


def test_step_timeout_kills_the_process_group(tmp_path):
    gpu_check = load_gpu_check()
    started = time.time()
    with pytest.raises(gpu_check.StepFailed, match="timed out after 1 s"):
        gpu_check.run_logged(["bash", "-c", "sleep 60 & sleep 60"], tmp_path / "log", timeout=1, cwd=tmp_path,
                             env=dict(os.environ))
    assert time.time() - started < 10


def test_failed_command_reports_its_last_lines(tmp_path):
    gpu_check = load_gpu_check()
    with pytest.raises(gpu_check.StepFailed, match="exit status 3") as error:
        gpu_check.run_logged(["bash", "-c", "echo first; echo the reason; exit 3"], tmp_path / "log", timeout=30,
                             cwd=tmp_path, env=dict(os.environ))
    assert "the reason" in str(error.value)


def test_gpu_sampler_without_gpu_and_window_stats():
    gpu_check = load_gpu_check()
    sampler = gpu_check.GpuSampler()
    if sampler.backend is None:  # this machine: no pynvml, no nvidia-smi -> no samples, no thread
        with sampler:
            pass
        assert sampler.stats() == {"backend": None, "samples": 0}
    sampler.samples = [(10.0, 0.0, 100.0, 0), (11.0, 80.0, 900.0, 1), (12.0, 100.0, 950.0, 1), (13.0, 0.0, 100.0, 0)]
    assert sampler.stats([(10.5, 12.5)]) == {"backend": sampler.backend, "samples": 2, "util_mean": 90.0,
                                             "util_max": 100.0, "memory_max_mib": 950, "memory_rise_mib": 50,
                                             "processes_max": 1}
    everything = sampler.stats()
    assert everything["util_mean"] == 45.0 and everything["memory_rise_mib"] == 850
    assert gpu_check.gpu_was_used(everything)
    assert not gpu_check.gpu_was_used({"backend": None, "samples": 0})
    assert gpu_check.gpu_was_used({"util_max": 0.0, "memory_rise_mib": 600, "processes_max": 0})  # a context


def test_make_dry_run_never_installs_the_gpu_extras():
    """`make gpu-check GPU_CHECK_ARGS=--dry-run` and `make gpu-check-dry-run` must not run gpu-install
    (it would replace onnxruntime with onnxruntime-gpu on a CPU machine); `make gpu-check` does."""
    def plan(*args):
        # Under `make test` the outer make's MAKEFLAGS/MAKELEVEL reach this make: it would print
        # "Entering directory" lines around the plan.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
        return subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO, capture_output=True,
                              text=True, check=True, env=env).stdout

    for args in (("gpu-check", "GPU_CHECK_ARGS=--dry-run"), ("gpu-check-dry-run",)):
        commands = plan(*args)
        assert "onnxruntime-gpu" not in commands and "jobs/gpu_check.py --dry-run" in commands, commands
    full = plan("gpu-check")
    assert "onnxruntime-gpu==" in full and full.strip().endswith("jobs/gpu_check.py")
