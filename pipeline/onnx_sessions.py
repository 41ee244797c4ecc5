"""onnxruntime sessions for the face detectors: providers, the CUDA fail-fast rule, batch sizes.

Every detector builds its sessions with `create_session`, which enforces one rule: asked for the GPU
(`use_gpu`), a session either really runs on CUDAExecutionProvider or the call fails with
GpuUnavailableError, unless CPU fallback was allowed (`allow_cpu_fallback`, then one warning per
process). Two ways CUDA goes missing are caught: the CPU onnxruntime package (no CUDA provider at
all, `select_providers`), and a session that silently came up on CPU because the CUDA / cuDNN
libraries did not load (checked after creation, after `preload_cuda_libraries`).

The settings come from any object with the attributes of `SessionSettings` (the detectors pass
their `pipeline.detect.DetectorConfig`).
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Protocol

import onnxruntime as ort

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
AUTO_BATCH_FRAMES_CUDA = 32  # batch_frames=0 on CUDA (a decoded chunk is 32 frames by default)
GPU_INSTALL_HINT = ("on a GPU node run `make gpu-install` (it replaces the CPU package onnxruntime with "
                    "onnxruntime-gpu==1.31.1 and installs its CUDA 13 / cuDNN 9 wheels, nvidia-*); never keep "
                    "onnxruntime and onnxruntime-gpu installed together")


class GpuUnavailableError(RuntimeError):
    """GPU face detection was asked for (use_gpu=True) but onnxruntime cannot run it on CUDA, and
    CPU fallback was not allowed (allow_cpu_fallback=False)."""


class SessionSettings(Protocol):
    use_gpu: bool
    allow_cpu_fallback: bool
    intra_op_threads: int  # 0 = onnxruntime's default (all cores)
    batch_frames: int  # 0 = auto (see batch_frames below)


_preload_report: str | None = None
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A detector creates several sessions (MTCNN: three) and an actor may build several detectors:
    say each CPU-fallback warning once per process."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def preload_cuda_libraries() -> str:
    """Load the CUDA / cuDNN libraries that come as pip wheels (nvidia-*), once per process.

    onnxruntime-gpu from pip finds them only when they are already loaded (or when a torch built for
    the same CUDA major version was imported first); otherwise creating a CUDA session logs an error
    inside onnxruntime and the session silently runs on CPU. `onnxruntime.preload_dlls()` (onnxruntime
    >= 1.21) loads them from the nvidia site packages; it does nothing with the CPU package and reports
    missing libraries by printing, which is captured here. Returns one line saying what happened
    (it becomes part of the error when CUDA still does not load).
    """
    global _preload_report
    if _preload_report is None:
        if not hasattr(ort, "preload_dlls"):
            _preload_report = f"onnxruntime {ort.__version__} has no preload_dlls() (it came in 1.21)"
        else:
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    ort.preload_dlls()
            except Exception as exc:  # noqa: BLE001 - reported, and the session check below decides
                _preload_report = f"onnxruntime.preload_dlls() failed: {type(exc).__name__}: {exc}"
                log.warning("%s", _preload_report)
            else:
                lines = " | ".join(line.strip() for line in printed.getvalue().splitlines() if line.strip())
                _preload_report = "onnxruntime.preload_dlls() ran" + (f" and printed: {lines}" if lines else " quietly")
                if lines:
                    log.warning("%s", _preload_report)
    return _preload_report


def select_providers(use_gpu: bool, allow_cpu_fallback: bool = False) -> list[str]:
    """CUDA first when asked for, CPU always last.

    use_gpu with an onnxruntime that offers no CUDAExecutionProvider (the CPU package) raises
    GpuUnavailableError, or with allow_cpu_fallback logs a warning and returns CPU only.
    """
    available = ort.get_available_providers()
    if not use_gpu:
        return [CPU_PROVIDER]
    if CUDA_PROVIDER in available:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    problem = (f"GPU face detection was requested (use_gpu=True, --detector-use-gpu) but onnxruntime "
               f"{ort.__version__} offers no {CUDA_PROVIDER} (available: {available}): this is the CPU package")
    if not allow_cpu_fallback:
        raise GpuUnavailableError(f"{problem}. To fix it, {GPU_INSTALL_HINT}. To detect on CPU instead, "
                                  "drop --detector-use-gpu or pass --detector-allow-cpu-fallback "
                                  "(DetectorConfig(allow_cpu_fallback=True)).")
    _warn_once(f"{problem}; face detection will run on CPU (allow_cpu_fallback=True). To use the GPU, "
               f"{GPU_INSTALL_HINT}.")
    return [CPU_PROVIDER]


def create_session(model: str | bytes, settings: SessionSettings,
                   cuda_options: dict[str, str] | None = None) -> ort.InferenceSession:
    """An InferenceSession for `model` (a file or the serialised graph) on the providers `settings` ask for."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # onnxruntime's own warnings (e.g. unused initialisers) are noise here
    providers = select_providers(settings.use_gpu, settings.allow_cpu_fallback)
    if CUDA_PROVIDER in providers:
        preload_cuda_libraries()
    session = ort.InferenceSession(model, sess_options=options, providers=[
        (p, cuda_options) if p == CUDA_PROVIDER and cuda_options else p for p in providers])
    # CUDA failing to load (libcudnn missing, a driver too old for the CUDA build) only logs inside
    # onnxruntime and the session silently runs on CPU, so check what the session really got.
    if CUDA_PROVIDER in providers and CUDA_PROVIDER not in session.get_providers():
        problem = (f"GPU face detection was requested but the onnxruntime session for "
                   f"{model if isinstance(model, str) else '<in-memory model>'} FELL BACK TO CPU (session "
                   f"providers: {session.get_providers()}): the CUDA / cuDNN libraries did not load "
                   f"({preload_cuda_libraries()}). Check `nvidia-smi`, and that the nvidia-* CUDA 13 / cuDNN 9 "
                   "wheels onnxruntime-gpu needs are installed")
        if not settings.allow_cpu_fallback:
            raise GpuUnavailableError(f"{problem}: {GPU_INSTALL_HINT}. To detect on CPU instead, pass "
                                      "--detector-allow-cpu-fallback (DetectorConfig(allow_cpu_fallback=True)).")
        _warn_once(f"{problem}; face detection runs on CPU (allow_cpu_fallback=True).")
    return session


def batch_frames(settings: SessionSettings, session: ort.InferenceSession) -> int:
    """Frames per session.run: the configured number, or with 0 (auto) a whole chunk on CUDA and one
    frame on CPU (on the 2-core CPU machines batching was no faster; see docs/DETECTION.md)."""
    if settings.batch_frames:
        return settings.batch_frames
    return AUTO_BATCH_FRAMES_CUDA if session.get_providers()[0] == CUDA_PROVIDER else 1
