"""Shared fixtures: tiny real videos (PyAV/libx264), real face photos, one local Ray per session,
and a throwaway MLflow sqlite store.

Ray is sized for the 2-core CI machine; tests that need their own cluster (`ray start --head`,
job submission) start it themselves and must not use the `ray_session` fixture.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
sys.path.insert(0, str(REPO))


def face_photo_paths() -> dict[str, Path]:
    """Real photos that ship inside installed packages (no download)."""
    import importlib.util

    spec = importlib.util.find_spec("insightface")
    root = Path(spec.submodule_search_locations[0]) / "data" / "images"
    return {"t1": root / "t1.jpg", "tom_hanks": root / "Tom_Hanks_54745.png"}


@pytest.fixture(scope="session")
def t1_rgb() -> np.ndarray:
    """insightface's t1.jpg: a group photo with six faces, RGB uint8."""
    import cv2

    bgr = cv2.imread(str(face_photo_paths()["t1"]))
    assert bgr is not None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="session")
def astronaut_rgb() -> np.ndarray:
    """scikit-image's astronaut (512x512, one face), RGB uint8."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def moving_pattern_frames(n: int, width: int = 64, height: int = 48, seed: int = 0):
    """Frames whose index can be read back from the picture (a bright bar at x = 2*i mod width)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    for i in range(n):
        frame = base.copy()
        x = (2 * i) % width
        frame[:, x:x + 2] = 255
        yield frame


def face_frames(face_rgb: np.ndarray, n: int, width: int = 320, height: int = 240):
    """n frames with the photo scaled into a width x height canvas, drifting a little."""
    import cv2

    scale = min(width / face_rgb.shape[1], height / face_rgb.shape[0])
    face = cv2.resize(face_rgb, (int(face_rgb.shape[1] * scale) // 2 * 2, int(face_rgb.shape[0] * scale) // 2 * 2))
    for i in range(n):
        canvas = np.full((height, width, 3), 90, np.uint8)
        dx = max(0, min(width - face.shape[1], (width - face.shape[1]) // 2 + (i % 5) - 2))
        dy = (height - face.shape[0]) // 2
        canvas[dy:dy + face.shape[0], dx:dx + face.shape[1]] = face
        yield canvas


@pytest.fixture
def make_video(tmp_path):
    """make_video(name, n_frames=30, fps=30, width=64, height=48, frames=None) -> Path of a real mp4."""
    from pipeline.video_io import write_mp4

    def _make(name: str = "clip.mp4", n_frames: int = 30, fps: int = 30, width: int = 64,
              height: int = 48, frames=None, audio_seconds: float = 0.0) -> Path:
        path = tmp_path / name
        src = frames if frames is not None else moving_pattern_frames(n_frames, width, height)
        write_mp4(path, src, fps=fps, audio_seconds=audio_seconds)
        return path

    return _make


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session, sized to fit 2 cores."""
    import ray

    from pipeline.ray_utils import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def mlflow_store_in(folder):
    """A fresh MLflow sqlite store + artifact folder in `folder`, for this process and the Ray
    workers it starts; yields the tracking URI. Usable from fixtures of any scope."""
    import mlflow

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(folder / "mlartifacts"))
        mp.chdir(folder)  # default artifact roots are relative to the working directory
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture
def mlflow_store(tmp_path):
    """A fresh MLflow sqlite store + artifact folder; returns the tracking URI."""
    with mlflow_store_in(tmp_path) as uri:
        yield uri


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto) on 127.0.0.1 for the session, its env set in os.environ.

    Yields a tests.s3_server.S3Server: `.endpoint`, `.bucket`, `.uri(path)`, `.env`,
    `.runtime_env`. Plain ``s3://bucket/...`` URIs then reach it through pyarrow (and boto3) in
    this process. Ray workers started BEFORE this fixture do not see the env: use `ray_with_s3`,
    or pass ``runtime_env=s3_server.runtime_env`` to the task. The env is restored at session end.
    """
    from tests.s3_server import S3Server

    with S3Server() as server, server.activated():
        yield server


@pytest.fixture(scope="session")
def ray_with_s3(s3_server, ray_session):
    """The session's Ray, with every worker (Ray Data, Train, plain tasks) seeing s3_server's env.

    `s3_server` is set up first, so a Ray started here inherits the env. If Ray was already started
    earlier in the session without it (workers get the driver's env at ray.init only), Ray is
    restarted once (~5 s) the way `ray_session` starts it. Yields the `ray` module.
    """
    from pipeline.ray_utils import init_ray
    from tests.s3_server import ray_workers_see

    if not ray_workers_see(s3_server.env):
        ray_session.shutdown()
        init_ray(num_cpus=2)
        assert ray_workers_see(s3_server.env), "Ray workers still do not see the S3 env"
    yield ray_session


@contextlib.contextmanager
def running_mlflow_server(folder: Path):
    """A real `mlflow server` on 127.0.0.1 (sqlite store + artifacts in `folder`); yields its URL."""
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{Path(folder) / 'server.db'}",
                             "--artifacts-destination", str(Path(folder) / "server-artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow server did not come up")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
