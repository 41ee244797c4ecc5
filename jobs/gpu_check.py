"""`make gpu-check`: on one GPU machine, measure the GPU paths and prove that CUDA kernels ran.

    make gpu-check                                  # GPU node: gpu-install, then this script
    make gpu-check-dry-run                          # any machine, CPU, smallest sizes (what CI runs)
    .venv/bin/python jobs/gpu_check.py --dry-run --out /tmp/gpu_check.json
    .venv/bin/python jobs/gpu_check.py --steps model detect   # a subset

Steps (each with its own timeout; a failed step is reported and the next one runs):
  model       HMHN train-step img/s (forward, loss, backward, Adam) at 224 px: fp32 eager, bf16 autocast +
              channels_last, and the ResNet-18 trunk alone (HMHN with GWA, DFF, MAB and AFB off) in both
              modes - jobs/bench_model.py's own train_step_throughput. Proof: the model and data live on
              CUDA and torch.cuda.max_memory_allocated() > 0.
  detect      MTCNN face detection with --detector-use-gpu (no CPU fallback: the detector refuses a
              session without CUDAExecutionProvider): frames/s one frame per onnxruntime call vs batches
              of 32 frames, with identical faces. Proof: onnxruntime's profiler lists the graph nodes
              that ran on CUDAExecutionProvider.
  demo_data   the demo videos (jobs/make_demo_data.py) in a temporary folder.
  preprocess  jobs/preprocess.py on the demo videos twice, with CUDA detection (--detector-use-gpu, no
              fallback) and on CPU: frames/s of each (the runs' own summary.json). GPU use sampled.
  train       jobs/train_ddp.py --gpu --workers 1 for 2 epochs on the CUDA run's shards: samples/s per epoch
              (MLflow metrics) and GPU utilisation (pynvml when importable, else nvidia-smi, every 0.5 s;
              mean / max over the epochs and over the whole job).
  predict     jobs/predict.py with the model just registered, on the demo videos: videos/s; GPU actors
              and GPU use sampled.
Everything goes to a temporary folder (MLflow: a sqlite store there; Ray Train: a --storage-path
there), never to the repository's mlflow.db / mlartifacts. The jobs connect to one private local Ray
instance this script starts (as jobs submitted to a cluster do), so Ray starts once.

At the end one table is printed and written as JSON to --out (default: $OUT/gpu_check.json if $OUT
is set, else ./gpu_check.json). Exit status 0 only when every step succeeded, and, without --dry-run,
proved that it ran on CUDA.

--dry-run: the same steps on CPU at the smallest sizes (3 one-second demo videos at 320x240, 64 px
model input, 1 epoch, a few steps), with --detector-allow-cpu-fallback in place of a GPU; it proves
the wiring, its figures mean nothing.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.cli import job_parser, parse_args  # noqa: E402

STEPS = ("model", "detect", "demo_data", "preprocess", "train", "predict")
MODEL_NAME = "gpu-check"


@dataclass(frozen=True)
class Sizes:
    """Work per step and per-step timeouts (seconds). GPU: one H200-class node in about 5 minutes."""

    model_size: int
    model_batch: int
    model_steps: int
    model_warmup: int
    detect_frames: int
    detect_frame_size: tuple[int, int]  # width, height
    detect_repeats: int
    demo_subjects: int
    demo_videos_per_subject: int
    demo_seconds: float
    demo_size: tuple[int, int]  # width, height
    demo_face_size: int
    every_n: int  # preprocessing keeps every n-th frame
    train_epochs: int
    train_input_size: int
    train_batch: int
    train_frames_per_video: int
    eval_frames: int
    timeouts: dict[str, float]


GPU_SIZES = Sizes(model_size=224, model_batch=64, model_steps=15, model_warmup=3,
                  detect_frames=64, detect_frame_size=(640, 480), detect_repeats=3,
                  demo_subjects=8, demo_videos_per_subject=2, demo_seconds=3.0, demo_size=(640, 480),
                  demo_face_size=300, every_n=1,
                  train_epochs=2, train_input_size=224, train_batch=64, train_frames_per_video=128, eval_frames=16,
                  # at most 8 minutes in all; a healthy run takes a fraction of each
                  timeouts={"model": 75, "detect": 45, "demo_data": 45, "preprocess": 105, "train": 135,
                            "predict": 75})
DRY_SIZES = Sizes(model_size=32, model_batch=2, model_steps=1, model_warmup=0,
                  detect_frames=4, detect_frame_size=(320, 240), detect_repeats=1,
                  demo_subjects=3, demo_videos_per_subject=1, demo_seconds=1.0, demo_size=(320, 240),
                  demo_face_size=150, every_n=3,
                  train_epochs=1, train_input_size=64, train_batch=4, train_frames_per_video=4, eval_frames=4,
                  timeouts={"model": 60, "detect": 60, "demo_data": 60, "preprocess": 120, "train": 120,
                            "predict": 90})


def sizes_from_args(args: argparse.Namespace) -> Sizes:
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    if args.detect_frames:
        sizes = replace(sizes, detect_frames=args.detect_frames)
    if args.detect_repeats:
        sizes = replace(sizes, detect_repeats=args.detect_repeats)
    if args.detect_frame_size:
        width, height = (int(x) for x in args.detect_frame_size.lower().split("x"))
        sizes = replace(sizes, detect_frame_size=(width, height))
    return sizes


# ------------------------------------------------------------------------------------------------
# GPU sampling


class GpuSampler:
    """Samples GPU utilisation (%), memory used (MiB) and the number of compute processes every
    `interval` s in a thread: through pynvml when it is importable, else `nvidia-smi`; no samples
    (backend None) on a machine without either. utilization.gpu is the share of the last sample
    period in which a kernel was running, so a maximum above 0 means CUDA kernels ran."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.samples: list[tuple[float, float, float, int]] = []  # (time, util %, memory MiB, processes)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self.backend: str | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
            self.backend = "pynvml"
        except Exception:  # noqa: BLE001 - not installed, or no driver
            if shutil.which("nvidia-smi"):
                self.backend = "nvidia-smi"

    def _sample(self) -> tuple[float, float, int] | None:
        if self._nvml is not None:
            nvml, handle = self._nvml
            util = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
            memory = nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
            return float(util), float(memory), len(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        if self.backend == "nvidia-smi":
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=5).stdout.strip().splitlines()
            apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=5).stdout.strip().splitlines()
            if not gpu:
                return None
            util, memory = (float(x) for x in gpu[0].split(","))
            return util, memory, len([a for a in apps if a.strip()])
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sample = self._sample()
            except Exception:  # noqa: BLE001 - a failed sample is skipped, not fatal
                sample = None
            if sample is not None:
                self.samples.append((time.time(), *sample))
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuSampler:
        if self.backend:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def stats(self, windows: list[tuple[float, float]] | None = None) -> dict[str, Any]:
        """Mean / max over all samples, or over those inside the (start, end) time windows."""
        rows = [s for s in self.samples if windows is None or any(a <= s[0] <= b for a, b in windows)]
        if not rows:
            return {"backend": self.backend, "samples": 0}
        utils = [r[1] for r in rows]
        memory = [r[2] for r in rows]
        return {"backend": self.backend, "samples": len(rows), "util_mean": round(sum(utils) / len(utils), 1),
                "util_max": max(utils), "memory_max_mib": round(max(memory)),
                "memory_rise_mib": round(max(memory) - min(memory)), "processes_max": max(r[3] for r in rows)}


def gpu_was_used(stats: dict[str, Any]) -> bool:
    """Kernels ran (utilisation above 0), or a CUDA context appeared (memory rose by 200+ MiB), or a
    compute process was listed (often invisible inside containers, so not required)."""
    return bool(stats.get("util_max") or stats.get("memory_rise_mib", 0) >= 200 or stats.get("processes_max"))


# ------------------------------------------------------------------------------------------------
# Running things with a deadline


class StepFailed(Exception):
    pass


def run_logged(cmd: list[str], log_path: Path, timeout: float, cwd: Path, env: dict[str, str]) -> tuple[str, float]:
    """Run cmd (its own process group) with output to log_path; (output, seconds). Raises StepFailed
    on a non-zero exit or the timeout (the whole group is killed), with the output's last lines."""
    started = time.time()
    with open(log_path, "ab") as log:
        log.write(("\n$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    seconds = time.time() - started
    output = log_path.read_text(errors="replace").split("\n$ ")[-1]
    if code != 0:
        tail = "\n".join(line for line in output.splitlines()[-15:])
        what = f"timed out after {timeout:.0f} s" if code is None else f"exit status {code}"
        raise StepFailed(f"{Path(cmd[1]).name if len(cmd) > 1 else cmd[0]} {what}; last output:\n{tail}")
    return output, seconds


class Check:
    """The steps, sharing a work folder, a private Ray instance and the results of earlier steps."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.dry_run = args.dry_run
        self.sizes = sizes_from_args(args)
        self.passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                            ("detect_frames", "detect_repeats", "detect_frame_size") if getattr(args, k)]
        self.timeout_scale = args.timeout_scale
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.mlflow_uri = f"sqlite:///{workdir / 'mlflow.db'}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    "MLFLOW_TRACKING_URI": self.mlflow_uri,
                    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(
                        os.pathsep))])}
        self.results: dict[str, dict[str, Any]] = {}
        self.state: dict[str, Any] = {}

    def timeout(self, step: str) -> float:
        return self.sizes.timeouts[step] * self.timeout_scale

    def run_job(self, step: str, script: str, args: list[str], deadline: float) -> tuple[str, float]:
        return run_logged([sys.executable, str(REPO / "jobs" / script), *args], self.logs / f"{step}.log",
                          deadline - time.time(), cwd=self.workdir, env=self.env)

    def run_child(self, step: str, deadline: float) -> dict[str, Any]:
        """In-process measurements (torch, onnxruntime) run in a child process of this script, so
        that a hang or a crash in CUDA code is contained by the step's timeout."""
        result_file = self.workdir / f"{step}.result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step, "--child-result", str(result_file),
               *self.passthrough]
        if self.dry_run:
            cmd.append("--dry-run")
        run_logged(cmd, self.logs / f"{step}.log", deadline - time.time(), cwd=self.workdir, env=self.env)
        return json.loads(result_file.read_text())

    # -- steps ---------------------------------------------------------------------------------

    def step_model(self, deadline: float) -> dict[str, Any]:
        return self.run_child("model", deadline)

    def step_detect(self, deadline: float) -> dict[str, Any]:
        return self.run_child("detect", deadline)

    def step_demo_data(self, deadline: float) -> dict[str, Any]:
        s = self.sizes
        videos = self.workdir / "demo"
        output, seconds = self.run_job("demo_data", "make_demo_data.py", [
            "--output", str(videos), "--subjects", str(s.demo_subjects), "--videos-per-subject",
            str(s.demo_videos_per_subject), "--seconds", str(s.demo_seconds), "--width", str(s.demo_size[0]),
            "--height", str(s.demo_size[1]), "--face-size", str(s.demo_face_size)], deadline)
        summary = json.loads(output.strip().splitlines()[-1])
        self.state["videos"] = videos
        return {"videos": summary["videos"], "splits": summary["splits"],
                "video": f"{s.demo_seconds:g} s {s.demo_size[0]}x{s.demo_size[1]} 30 fps", "seconds": round(seconds, 1)}

    def _preprocess(self, name: str, extra: list[str], deadline: float) -> dict[str, Any]:
        output_root = self.workdir / f"faces_{name}"
        with GpuSampler() as sampler:
            _, seconds = self.run_job("preprocess", "preprocess.py", [
                "--dataset", "avec2014", "--input", str(self.state["videos"]), "--output", str(output_root),
                "--sampling-mode", "every_n", "--sampling-every-n", str(self.sizes.every_n), *extra], deadline)
        summaries = sorted(output_root.glob("*/summary.json"))
        if len(summaries) != 1:
            raise StepFailed(f"preprocess ({name}) left {len(summaries)} summary.json files under {output_root}")
        summary = json.loads(summaries[0].read_text())
        run = summary["this_run"]
        if summary["ok"] != summary["videos"]:
            raise StepFailed(f"preprocess ({name}): only {summary['ok']} of {summary['videos']} videos ok: "
                             f"{summary['problems']}")
        return {"frames": run["frames_decoded"], "faces": summary["faces_total"], "videos": summary["videos"],
                "run_seconds": run["seconds"], "frames_per_s": run["frames_per_s"],
                "job_seconds": round(seconds, 1), "shard_set": summary["shard_set"], "gpu": sampler.stats()}

    def step_preprocess(self, deadline: float) -> dict[str, Any]:
        if "videos" not in self.state:
            raise StepFailed("skipped: needs the demo_data step")
        # CUDA first: the CPU run then starts on a warm Ray (Python workers, page cache), which can only
        # flatter the CPU figure.
        gpu_flags = ["--detector-use-gpu"] + (["--detector-allow-cpu-fallback"] if self.dry_run else [])
        cuda = self._preprocess("cuda", gpu_flags, deadline)
        cpu = self._preprocess("cpu", [], deadline)
        self.state["shard_set"] = cuda["shard_set"]
        result = {"cuda": cuda, "cpu": cpu, "speedup": round(cuda["frames_per_s"] / max(cpu["frames_per_s"], 1e-9), 2)}
        if not self.dry_run:
            # The job succeeded without --detector-allow-cpu-fallback: every detector session had
            # CUDAExecutionProvider (pipeline.detect refuses one without). Also seen from outside:
            result["cuda_proof"] = ("detector sessions verified on CUDAExecutionProvider (no fallback allowed); "
                                    f"GPU during the run: max utilisation {cuda['gpu'].get('util_max')}%, memory "
                                    f"+{cuda['gpu'].get('memory_rise_mib')} MiB")
            if not gpu_was_used(cuda["gpu"]):
                raise StepFailed(f"the GPU stayed idle during the CUDA preprocessing run: {cuda['gpu']}")
        return result

    def step_train(self, deadline: float) -> dict[str, Any]:
        if "shard_set" not in self.state:
            raise StepFailed("skipped: needs the preprocess step")
        s = self.sizes
        args = ["--data", self.state["shard_set"], "--workers", "1", "--epochs", str(s.train_epochs),
                "--input-size", str(s.train_input_size), "--batch-size", str(s.train_batch),
                "--frames-per-video", str(s.train_frames_per_video), "--eval-frames-per-video", str(s.eval_frames),
                "--final-eval-frames-per-video", str(s.eval_frames), "--eval-batch-size", str(2 * s.train_batch),
                "--storage-path", str(self.workdir / "ray_results"), "--mlflow-uri", self.mlflow_uri,
                "--experiment", "gpu-check", "--model-name", MODEL_NAME,
                "--run-name", time.strftime("gpu-check-%Y%m%d-%H%M%S"), "--no-log-predictions"]
        if not self.dry_run:
            args.append("--gpu")
        with GpuSampler() as sampler:
            output, seconds = self.run_job("train", "train_ddp.py", args, deadline)
        result = json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("{")))
        self.state["model_uri"] = f"models:/{MODEL_NAME}@candidate"
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.mlflow_uri)
        speeds = client.get_metric_history(result["run_id"], "samples_per_s")
        durations = {m.step: m.value for m in client.get_metric_history(result["run_id"], "epoch_seconds")}
        epochs = [{"epoch": m.step, "samples_per_s": round(m.value, 1), "seconds": round(durations.get(m.step, 0), 1)}
                  for m in sorted(speeds, key=lambda m: m.step)]
        # The epochs' time windows (a metric is logged when its epoch ends) for the utilisation.
        windows = [(m.timestamp / 1000 - durations.get(m.step, 0), m.timestamp / 1000) for m in speeds]
        out = {"epochs": epochs, "samples_per_s_last_epoch": epochs[-1]["samples_per_s"] if epochs else None,
               "job_seconds": round(seconds, 1), "gpu_during_epochs": sampler.stats(windows),
               "gpu_whole_job": sampler.stats(), "model_version": result.get("model_version")}
        if not self.dry_run:
            if not out["gpu_during_epochs"].get("util_max"):
                raise StepFailed(f"GPU utilisation stayed at 0 during the training epochs: {out}")
            out["cuda_proof"] = (f"GPU utilisation up to {out['gpu_during_epochs']['util_max']}% during the epochs "
                                 f"({out['gpu_during_epochs']['samples']} samples)")
        return out

    def step_predict(self, deadline: float) -> dict[str, Any]:
        if "model_uri" not in self.state:
            raise StepFailed("skipped: needs the train step")
        scores = self.workdir / "scores.csv"
        with GpuSampler() as sampler:
            output, seconds = self.run_job("predict", "predict.py", [
                "--model", self.state["model_uri"], "--mlflow-uri", self.mlflow_uri, "--input",
                str(self.state["videos"]), "--output", str(scores), "--workdir", str(self.workdir / "scoring")], deadline)
        import csv

        with scores.open() as fh:
            rows = list(csv.DictReader(fh))
        scored = sum(r["status"] == "ok" for r in rows)
        wrote = re.search(r"\[predict\] wrote .* in ([\d.]+) s", output)
        actors = re.search(r"inference actors: (\d+) x \(CPU ([\d.]+), GPU ([\d.]+)\)", output)
        run_seconds = float(wrote.group(1)) if wrote else seconds
        out = {"videos": len(rows), "scored": scored, "run_seconds": run_seconds, "job_seconds": round(seconds, 1),
               "videos_per_s": round(len(rows) / max(run_seconds, 1e-9), 3),
               "inference_actors": actors.group(0) if actors else None, "gpu": sampler.stats()}
        if scored != len(rows):
            raise StepFailed(f"predict scored {scored} of {len(rows)} videos: {rows}")
        if not self.dry_run:
            if not actors or float(actors.group(3)) <= 0:
                raise StepFailed(f"predict's inference actors did not get a GPU: {out['inference_actors']}")
            if not gpu_was_used(out["gpu"]):
                raise StepFailed(f"the GPU stayed idle while predict ran: {out['gpu']}")
            out["cuda_proof"] = (f"{out['inference_actors']}; GPU max utilisation {out['gpu'].get('util_max')}%, "
                                 f"memory +{out['gpu'].get('memory_rise_mib')} MiB")
        return out


# ------------------------------------------------------------------------------------------------
# In-process measurements (run as `--child STEP`)


def _load_bench_model():
    spec = importlib.util.spec_from_file_location("bench_model", REPO / "jobs" / "bench_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_model"] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


def child_model(dry_run: bool, s: Sizes) -> dict[str, Any]:
    import torch

    from hmhn import HMHN, HMHNConfig

    bench = _load_bench_model()
    if dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # wiring only: one thread suffers least from a busy shared machine
    elif not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False): "
                           "a CPU build of torch, or no GPU / driver")
    else:
        device = torch.device("cuda")
    trunk = dict(use_gwa=False, use_dff=False, use_mab=False, use_afb=False)  # ResNet-18 trunk + pooled linear head
    figures = {}
    for label, extra, fast in (("hmhn_fp32_eager", {}, False), ("hmhn_bf16_channels_last", {}, True),
                               ("trunk_fp32_eager", trunk, False), ("trunk_bf16_channels_last", trunk, True)):
        torch.manual_seed(0)
        model = HMHN(HMHNConfig(input_size=s.model_size, **extra))
        figures[label] = round(bench.train_step_throughput(model, s.model_batch, s.model_size, device, s.model_steps,
                                                           s.model_warmup, bf16_channels_last=fast), 1)
        del model
    out = {"device": str(device), "size": s.model_size, "batch": s.model_batch, "img_per_s": figures,
           "bf16_speedup": round(figures["hmhn_bf16_channels_last"] / figures["hmhn_fp32_eager"], 2)}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out.update(gpu=torch.cuda.get_device_name(device), peak_memory_gib=round(peak / 2**30, 2),
                   cuda_proof=f"torch.cuda.max_memory_allocated() = {peak} bytes after the CUDA train steps")
        if peak <= 0:
            raise RuntimeError("torch.cuda.max_memory_allocated() is 0 after the CUDA steps")
    return out


def _detect_frames(n: int, width: int, height: int):
    """Frames like a decoded chunk: the astronaut's face drifting over a plain background, one size."""
    import cv2
    import numpy as np
    from skimage import data

    face = cv2.resize(data.astronaut(), (int(height * 0.9), int(height * 0.9)), interpolation=cv2.INTER_AREA)
    frames = []
    for i in range(n):
        frame = np.full((height, width, 3), 90, np.uint8)
        x = (width - face.shape[1]) // 2 + (i % 7) * 2 - 6
        y = (height - face.shape[0]) // 2 + (i % 3)
        frame[y:y + face.shape[0], x:x + face.shape[1]] = face
        frames.append(frame)
    return frames


def onnxruntime_profile(model_path: str, feed: dict, use_gpu: bool, allow_cpu_fallback: bool,
                        workdir: str) -> dict[str, int]:
    """Run `model_path` once with onnxruntime's profiler; graph-node runs per execution provider."""
    import onnxruntime as ort

    from pipeline.detect import preload_cuda_libraries, select_providers

    providers = select_providers(use_gpu, allow_cpu_fallback)
    if use_gpu:
        preload_cuda_libraries()
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(workdir, "ort_profile")
    options.log_severity_level = 3
    session = ort.InferenceSession(model_path, sess_options=options, providers=providers)
    session.run(None, feed)
    session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    counts: dict[str, int] = {}
    for event in events:
        provider = (event.get("args") or {}).get("provider")
        if event.get("cat") == "Node" and provider and event.get("name", "").endswith("_kernel_time"):
            counts[provider] = counts.get(provider, 0) + 1
    counts["session_providers"] = session.get_providers()  # type: ignore[assignment]
    return counts


def child_detect(dry_run: bool, s: Sizes, workdir: str) -> dict[str, Any]:
    import numpy as np

    from pipeline.detect import CUDA_PROVIDER, DetectorConfig, MtcnnDetector, make_detector, mtcnn_model_dir

    # --dry-run asks for the GPU too, with the CPU fallback allowed: the flags' path, on CPU.
    base = dict(use_gpu=True, allow_cpu_fallback=dry_run)
    frames = _detect_frames(s.detect_frames, *s.detect_frame_size)
    per_frame: MtcnnDetector = make_detector(DetectorConfig(batch_frames=1, **base))
    batched: MtcnnDetector = make_detector(DetectorConfig(batch_frames=32, **base))
    providers = per_frame.providers()
    if not dry_run and providers[0] != CUDA_PROVIDER:
        raise RuntimeError(f"detector sessions run on {providers}, not CUDA")
    reference = per_frame.detect_batch(frames[:2])
    batched.detect_batch(frames[:2])  # warm-up (CUDA: kernels, cuDNN algorithm search)
    times: dict[str, list[float]] = {"per_frame": [], "batched": []}
    for _ in range(s.detect_repeats):
        for name, detector in (("per_frame", per_frame), ("batched", batched)):
            started = time.perf_counter()
            found = detector.detect_batch(frames)
            times[name].append(time.perf_counter() - started)
            if name == "per_frame":
                reference = found
            elif [len(f) for f in found] != [len(f) for f in reference] or any(
                    not np.allclose(a.bbox, b.bbox, atol=0.05) for fa, fb in zip(found, reference) for a, b in zip(fa, fb)):
                raise RuntimeError("batched detection found other faces than per-frame detection")
    with_face = sum(bool(f) for f in reference)
    if with_face < len(frames) * 0.9:
        raise RuntimeError(f"faces found in only {with_face} of {len(frames)} frames")
    fps = {name: round(len(frames) / min(t), 1) for name, t in times.items()}
    # Proof that CUDA kernels ran: onnxruntime's profiler, P-Net on the batch's first pyramid level.
    level = MtcnnDetector._to_net_input(np.stack([f[::4, ::4] for f in frames]))
    profile = onnxruntime_profile(os.path.join(mtcnn_model_dir(), "pnet.onnx"), {"input_1": level},
                                  use_gpu=True, allow_cpu_fallback=dry_run, workdir=workdir)
    out = {"providers": providers, "frames": len(frames), "frame_size": "x".join(map(str, s.detect_frame_size)),
           "frames_per_s": fps, "batch_speedup": round(fps["batched"] / fps["per_frame"], 2),
           "profiled_node_runs": profile}
    if not dry_run:
        if not profile.get(CUDA_PROVIDER):
            raise RuntimeError(f"onnxruntime's profile shows no node run on {CUDA_PROVIDER}: {profile}")
        out["cuda_proof"] = f"onnxruntime profile: {profile[CUDA_PROVIDER]} node runs on {CUDA_PROVIDER}"
    return out


def run_child(args: argparse.Namespace) -> int:
    sizes = sizes_from_args(args)
    workdir = str(Path(args.child_result).parent)
    result = child_model(args.dry_run, sizes) if args.child == "model" else child_detect(args.dry_run, sizes, workdir)
    Path(args.child_result).write_text(json.dumps(result, indent=1, default=str))
    return 0


# ------------------------------------------------------------------------------------------------
# Report


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for module in ("torch", "onnxruntime", "ray", "mlflow"):
        try:
            info[module] = importlib.metadata.version(module if module != "onnxruntime" else _ort_dist())
        except Exception:  # noqa: BLE001
            info[module] = None
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
        info["gpus"] = listing.splitlines()
    else:
        info["gpus"] = []
    info["pynvml"] = importlib.util.find_spec("pynvml") is not None
    return info


def _ort_dist() -> str:
    import importlib.metadata

    for name in ("onnxruntime-gpu", "onnxruntime"):
        try:
            importlib.metadata.version(name)
            return name
        except importlib.metadata.PackageNotFoundError:
            continue
    return "onnxruntime"


def figures_line(step: str, r: dict[str, Any]) -> str:
    if step == "model":
        f = r["img_per_s"]
        return (f"{r['device']} {r['size']} px batch {r['batch']}: HMHN fp32 {f['hmhn_fp32_eager']} | HMHN bf16+CL "
                f"{f['hmhn_bf16_channels_last']} ({r['bf16_speedup']}x) | trunk fp32 {f['trunk_fp32_eager']} | "
                f"trunk bf16+CL {f['trunk_bf16_channels_last']} img/s")
    if step == "detect":
        f = r["frames_per_s"]
        return (f"{r['providers'][0]}: {r['frames']} frames {r['frame_size']}: per-frame {f['per_frame']} | "
                f"batched {f['batched']} frames/s ({r['batch_speedup']}x)")
    if step == "demo_data":
        return f"{r['videos']} videos ({r['video']}) {r['splits']}"
    if step == "preprocess":
        c, p = r["cuda"], r["cpu"]
        return (f"CUDA detection {c['frames_per_s']} frames/s ({c['frames']} frames, {c['run_seconds']} s) | CPU "
                f"{p['frames_per_s']} frames/s ({p['run_seconds']} s) | {r['speedup']}x")
    if step == "train":
        gpu = r["gpu_during_epochs"]
        util = (f"GPU util mean {gpu['util_mean']}% max {gpu['util_max']}% ({gpu['backend']})"
                if gpu.get("samples") else "GPU util: no samples")
        return ", ".join(f"epoch {e['epoch']} {e['samples_per_s']} samples/s" for e in r["epochs"]) + " | " + util
    if step == "predict":
        return (f"{r['scored']}/{r['videos']} videos in {r['run_seconds']} s = {r['videos_per_s']} videos/s | "
                f"{r['inference_actors']}")
    return ""


def print_table(report: dict[str, Any]) -> None:
    print("\n" + "=" * 100)
    print(f"gpu-check {'(DRY RUN on CPU: wiring only, the figures mean nothing)' if report['dry_run'] else ''}")
    print(f"{'step':<11} {'status':<7} {'seconds':>7}  figures")
    for step, r in report["steps"].items():
        line = figures_line(step, r) if r["status"] == "ok" else r.get("error", "").splitlines()[0][:200]
        print(f"{step:<11} {r['status']:<7} {r['seconds']:>7.1f}  {line}")
        if r.get("cuda_proof"):
            print(f"{'':<27}CUDA proof: {r['cuda_proof']}")
    print(f"all steps ok: {report['ok']}   total {report['seconds']:.0f} s   JSON: {report['out']}")
    print("=" * 100)


def default_out() -> str:
    return os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else "gpu_check.json"


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(__doc__, verbose=False)
    parser.add_argument("--dry-run", action="store_true", help="CPU, smallest sizes: proves the wiring (CI)")
    parser.add_argument("--out", default=None, help="JSON report (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="steps to run (default: all)")
    parser.add_argument("--workdir", default="", help="work folder (default: a temporary one, deleted at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, shards, MLflow store)")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every step's timeout")
    parser.add_argument("--detect-frames", type=int, default=0, help="detect step: frames per call (default: "
                        f"{GPU_SIZES.detect_frames}, dry run {DRY_SIZES.detect_frames})")
    parser.add_argument("--detect-repeats", type=int, default=0, help="detect step: timed repeats, the best "
                        f"counts (default: {GPU_SIZES.detect_repeats}, dry run {DRY_SIZES.detect_repeats})")
    parser.add_argument("--detect-frame-size", default="", help="detect step: WIDTHxHEIGHT (default: 640x480, "
                        "dry run 320x240)")
    parser.add_argument("--child", choices=("model", "detect"), help=argparse.SUPPRESS)
    parser.add_argument("--child-result", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if args.child:
        return run_child(args)

    started = time.time()
    out_path = Path(args.out or default_out()).resolve()
    workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    check = Check(args, workdir)
    report: dict[str, Any] = {"dry_run": args.dry_run, "environment": environment(), "sizes": asdict(check.sizes),
                              "workdir": str(workdir), "steps": {}, "out": str(out_path)}
    print(f"[gpu-check] {'DRY RUN (CPU) ' if args.dry_run else ''}work folder {workdir}; "
          f"environment {json.dumps(report['environment'])}", flush=True)

    needs_ray = {"preprocess", "train", "predict"} & set(args.steps)
    if needs_ray:
        # One private local Ray for every job (they connect through RAY_ADDRESS, as jobs submitted to a
        # cluster do): Ray starts once, and its workers inherit PYTHONPATH / MLflow settings from here.
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.update({k: check.env[k] for k in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED", "MLFLOW_TRACKING_URI")})
        import ray

        from pipeline.ray_utils import init_ray

        init_ray()
        # ray.init turned on token authentication for this process (RAY_AUTH_MODE=token): the jobs need
        # the same settings to connect.
        check.env.update({k: v for k, v in os.environ.items() if k.startswith("RAY_")})
        check.env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        print(f"[gpu-check] private Ray at {check.env['RAY_ADDRESS']}: {ray.cluster_resources()}", flush=True)

    steps: dict[str, Callable[[float], dict[str, Any]]] = {
        "model": check.step_model, "detect": check.step_detect, "demo_data": check.step_demo_data,
        "preprocess": check.step_preprocess, "train": check.step_train, "predict": check.step_predict}
    try:
        for step in STEPS:
            if step not in args.steps:
                continue
            print(f"[gpu-check] {step} (timeout {check.timeout(step):.0f} s) ...", flush=True)
            tic = time.time()
            try:
                result = {"status": "ok", **steps[step](tic + check.timeout(step))}
            except StepFailed as exc:
                status = "skipped" if str(exc).startswith("skipped") else "failed"
                result = {"status": status, "error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - one step's failure never stops the next
                result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
            result["seconds"] = round(time.time() - tic, 1)
            report["steps"][step] = result
            print(f"[gpu-check] {step}: {result['status']} in {result['seconds']} s"
                  + (f"\n{result['error']}" if result["status"] != "ok" else f": {figures_line(step, result)}"),
                  flush=True)
    finally:
        if needs_ray:
            import ray

            ray.shutdown()
        report["seconds"] = round(time.time() - started, 1)
        report["ok"] = bool(report["steps"]) and all(r["status"] == "ok" for r in report["steps"].values())
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1, default=str))
        print_table(report)
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep:
            print(f"[gpu-check] kept {workdir} (logs in {workdir / 'logs'})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
