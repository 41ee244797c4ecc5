"""hmhn.serving: the pyfunc model training registers, loaded in-process and served by `mlflow models serve`.

Real MLflow (sqlite store + registry + alias) and a real scoring server subprocess over HTTP. The model
is logged from code (hmhn/scoring_model.py + weights + JSON configs): nothing pickled, so the server
runs with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from hmhn import HMHN, HMHNConfig, HMHNScorer
from hmhn.image import encode_jpeg, to_model_input
from pipeline.schema import severity_band

REPO = Path(__file__).resolve().parents[1]
INPUT_SIZE = 112


def small_scoring_model(seed: int = 0) -> HMHN:
    """A random-init HMHN whose scores land inside 0..63 (at random init they are in the hundreds and
    clamping would make every score 63, hiding any difference between two scoring paths)."""
    torch.manual_seed(seed)
    model = HMHN(HMHNConfig(input_size=INPUT_SIZE, initial_score=30.0)).eval()
    with torch.no_grad():
        model.regressor.linear.weight.mul_(0.02)
    return model


def training_preprocess_doc(align_size: int = INPUT_SIZE) -> dict:
    """What a shard set's config.json holds, for a config like the one training data would use."""
    from pipeline.align import AlignConfig
    from pipeline.preprocess import PreprocessConfig, preprocess_version

    config = PreprocessConfig(input="training-manifest.csv", output="faces", align=AlignConfig(size=align_size))
    return {"preprocess_version": preprocess_version(config), "config": dataclasses.asdict(config)}


def register_champion(name: str, model: HMHN, preprocess_doc: dict | None = None) -> str:
    """Log + register `model` with log_scoring_model, alias it champion; returns models:/name@champion."""
    import mlflow

    from hmhn.serving import log_scoring_model

    with mlflow.start_run():
        info = log_scoring_model(model, preprocess_config=preprocess_doc or training_preprocess_doc(),
                                 input_size=model.config.input_size, registered_model_name=name,
                                 extra_tags={"purpose": "test"})
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", info.registered_model_version)
    return f"models:/{name}@champion"


def assert_models_from_code(uri: str) -> None:
    """The logged model is MLflow's models-from-code form: a code file + weights + JSON, no pickled object."""
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    local = Path(download_artifacts(artifact_uri=uri))
    flavor = Model.load(str(local)).flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(flavor["model_code_path"]).name == "scoring_model.py" and (local / "scoring_model.py").is_file()
    assert "python_model" not in flavor, "a pickled PythonModel is referenced"
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert {"artifacts/weights.pt", "artifacts/hmhn_config.json", "artifacts/preprocess_config.json"} <= files
    assert "cloudpickle" not in (local / "requirements.txt").read_text()
    # The weights are a plain state dict: they load with torch's safe (weights_only) unpickler.
    state = torch.load(local / "artifacts" / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def expected_scores(model: HMHN, crops_b64: list[str]) -> np.ndarray:
    """The plain torch path: hmhn.image pixels -> HMHNScorer (clamped), as training evaluates."""
    from hmhn.image import decode_jpeg

    images = np.stack([decode_jpeg(base64.b64decode(c), model.config.input_size) for c in crops_b64])
    with torch.no_grad():
        return HMHNScorer(model, clamp=True).eval()(to_model_input(images)).numpy()


def batch_scoring_scores(model: HMHN, crops_b64: list[str]) -> np.ndarray:
    """Batch scoring's inference step on the same crops: hmhn.scoring.FrameScorer (the Ray Data actor of
    `jobs/predict.py`), called in-process on the JPEG bytes, on the device the served model picks."""
    from hmhn.scoring import FrameScorer

    jpegs = np.array([base64.b64decode(c) for c in crops_b64], dtype=object)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    scorer = FrameScorer(state, dataclasses.asdict(model.config), use_gpu=torch.cuda.is_available(),
                         threads=torch.get_num_threads())  # the current count: leaves the process's setting
    n = len(jpegs)
    out = scorer({"video_id": np.array(["v"] * n, dtype=object), "frame_index": np.arange(n),
                  "timestamp_s": np.zeros(n), "image": jpegs})
    assert (out["error"] == "").all(), out["error"]
    return out["score"]


def face_crops_b64(astronaut_rgb: np.ndarray, count: int = 2) -> list[str]:
    """`count` different square crops around the astronaut's face, as base64 JPEG (what clients send)."""
    crops = []
    for i in range(count):
        y, x, side = 30 + 6 * i, 140 - 4 * i, 190 + 8 * i
        crop = cv2.resize(astronaut_rgb[y:y + side, x:x + side], (224, 224), interpolation=cv2.INTER_AREA)
        crops.append(base64.b64encode(encode_jpeg(crop)).decode("ascii"))
    return crops


def test_logged_model_loads_in_plain_torch_and_as_pyfunc(mlflow_store, astronaut_rgb):
    import mlflow
    from mlflow.exceptions import MlflowException

    from hmhn.image import decode_jpeg
    from hmhn.serving import load_scoring_model

    model = small_scoring_model()
    doc = training_preprocess_doc()
    uri = register_champion("hmhn-serving", model, doc)

    loaded, preprocess_doc, input_size = load_scoring_model(uri)
    assert input_size == INPUT_SIZE and preprocess_doc == doc
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    version = mlflow.MlflowClient().get_model_version_by_alias("hmhn-serving", "champion")
    assert version.tags["preprocess_version"] == doc["preprocess_version"] and version.tags["purpose"] == "test"
    assert_models_from_code(uri)

    # The pyfunc scores exactly like HMHNScorer on hmhn.image's pixels (the training path).
    crops = face_crops_b64(astronaut_rgb, 3)
    pyfunc = mlflow.pyfunc.load_model(uri)
    result = pyfunc.predict(pd.DataFrame({"image": crops}))
    assert list(result.columns) == ["score", "severity"] and len(result) == 3
    images = np.stack([decode_jpeg(base64.b64decode(c), INPUT_SIZE) for c in crops])
    with torch.no_grad():
        expected = HMHNScorer(model).eval()(to_model_input(images)).numpy()
    np.testing.assert_allclose(result["score"].to_numpy(), expected, atol=1e-4)
    assert ((expected > 0) & (expected < 63)).all(), "test model must not saturate"
    assert result["score"].nunique() == 3
    # ... and exactly like batch scoring (hmhn.scoring) on the same crops.
    np.testing.assert_allclose(result["score"].to_numpy(), batch_scoring_scores(loaded, crops), atol=1e-4)
    assert result["severity"].tolist() == [severity_band(v) for v in result["score"]]

    # Already-normalised arrays are accepted by the python model itself; wrong shapes are refused.
    python_model = pyfunc.unwrap_python_model()
    from_array = python_model.predict(None, to_model_input(images).numpy())
    np.testing.assert_allclose(from_array["score"].to_numpy(), expected, atol=1e-4)
    for bad, words in ((np.zeros((2, 3, 64, 64), np.float32), "shape"),
                       (np.zeros((0, 3, INPUT_SIZE, INPUT_SIZE), np.float32), "empty"),
                       (pd.DataFrame({"image": [crops[0], "bm90IGFuIGltYWdl"]}), "row 1"),
                       (pd.DataFrame({"picture": crops}), "missing column")):
        with pytest.raises(MlflowException, match=words) as caught:
            python_model.predict(None, bad)
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_mlflow_models_serve_scores_crops_and_refuses_bad_requests(mlflow_store, astronaut_rgb, tmp_path):
    model = small_scoring_model()
    uri = register_champion("hmhn-http", model)
    assert_models_from_code(uri)
    port = _free_port()
    log_path = tmp_path / "serve.log"
    # The server execs `uvicorn` by name: the venv's bin folder must be on PATH (it is once activated).
    # Pickle deserialization off: a models-from-code model must not need it.
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "MLFLOW_REGISTRY_URI": mlflow_store,
           "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert server.poll() is None, f"server exited:\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.time() < deadline, f"no /ping answer within 90 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(1)

        crops = face_crops_b64(astronaut_rgb, 3)
        status, body = _post(f"{base}/invocations",
                             {"dataframe_split": {"columns": ["image"], "data": [[c] for c in crops]}})
        assert status == 200, body
        predictions = json.loads(body)["predictions"]
        assert len(predictions) == 3
        served = np.array([row["score"] for row in predictions])
        assert [row["severity"] for row in predictions] == [severity_band(v) for v in served]
        # Over HTTP, the code-logged model scores exactly as the plain torch model does ...
        expected = expected_scores(model, crops)
        assert ((expected > 0) & (expected < 63)).all() and len(set(expected.round(4))) == 3
        np.testing.assert_allclose(served, expected, atol=1e-4)
        # ... and as batch scoring (jobs/predict.py's inference step) does on the same crops.
        np.testing.assert_allclose(served, batch_scoring_scores(model, crops), atol=1e-4)

        bad_requests = {
            "empty batch": ({"dataframe_split": {"columns": ["image"], "data": []}}, "empty batch"),
            "not an image": ({"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"], ["%%%"]]}},
                             "not a decodable JPEG/PNG image"),
            "wrong column": ({"dataframe_split": {"columns": ["picture"], "data": [["abc"]]}}, "image"),
        }
        for case, (payload, words) in bad_requests.items():
            status, body = _post(f"{base}/invocations", payload)
            assert 400 <= status < 500, f"{case}: HTTP {status} {body[:500]}"
            message = json.loads(body)["message"]
            assert words in message, f"{case}: unhelpful message {message[:500]}"
    finally:
        import signal

        try:  # the server forks uvicorn workers: stop its whole process group
            os.killpg(server.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def test_importing_the_library_prints_nothing():
    """Every hmhn and pipeline module imports silently (issue 15: `import hmhn.serving` used to print
    MLflow's "Add type hints to the `predict` method" warning). One fresh interpreter, default filters."""
    import importlib
    import pkgutil

    modules = [f"{package}.{info.name}" for package in ("hmhn", "pipeline")
               for info in pkgutil.iter_modules(importlib.import_module(package).__path__)]
    assert "hmhn.serving" in modules and "hmhn.scoring_model" in modules
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS",)}
    result = subprocess.run([sys.executable, "-c", "import " + ", ".join(["hmhn", "pipeline", *modules])],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout, result.stderr) == ("", ""), (result.stdout + result.stderr)[-3000:]
