"""HMHN as an MLflow pyfunc model: what training registers and what `mlflow models serve` runs.

    log_scoring_model(model, preprocess_config=..., input_size=112, registered_model_name="hmhn")
    mlflow models serve -m models:/hmhn@champion --env-manager local --port 5001
    curl -H 'Content-Type: application/json' localhost:5001/invocations \
         -d '{"dataframe_split": {"columns": ["image"], "data": [["<base64 JPEG>"], ...]}}'
    -> {"predictions": [{"score": 17.3, "severity": "mild"}, ...]}

The model is logged in MLflow's models-from-code form: no Python object is pickled. The logged
directory holds everything needed to score, and nothing else:

    scoring_model.py                   hmhn/scoring_model.py: MLflow runs it at load time; it calls
                                       mlflow.models.set_model(HMHNPyfuncModel())
    MLmodel                            python_function flavor with `model_code_path` and loader
                                       mlflow.pyfunc.loaders.code_model (no python_model.pkl)
    artifacts/weights.pt               HMHN state_dict (CPU tensors; loaded with weights_only=True)
    artifacts/hmhn_config.json         HMHNConfig as JSON (rebuilds the architecture)
    artifacts/preprocess_config.json   the shard set's config.json (URIs redacted): the exact
                                       preprocessing the model was trained on, which batch scoring
                                       (hmhn.scoring) re-runs
    code/hmhn, code/pipeline           the project's .py files (code_paths), so it loads anywhere

A scoring server can then run with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false.

Why a state_dict and not MLflow's pt2 (torch.export) flavour: batch scoring and the attention-map
explainer need the real `HMHN` module (attention maps, any device, bf16 autocast), and a state_dict
loads in plain torch with `weights_only=True` (no pickle of code).

One image path: every crop goes through hmhn.image.decode_jpeg (resize to the model's input size)
and hmhn.image.to_model_input (ImageNet normalisation), exactly as training does.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from hmhn.image import decode_jpeg, to_model_input
from hmhn.inference import model_from_files, score_input, scorer_for
from hmhn.model import HMHN
from pipeline.schema import severity_band

IMAGE_COLUMN = "image"
WEIGHTS_ARTIFACT = "weights"
HMHN_CONFIG_ARTIFACT = "hmhn_config"
PREPROCESS_CONFIG_ARTIFACT = "preprocess_config"
ARTIFACT_FILES = {WEIGHTS_ARTIFACT: "weights.pt", HMHN_CONFIG_ARTIFACT: "hmhn_config.json",
                  PREPROCESS_CONFIG_ARTIFACT: "preprocess_config.json"}
# The models-from-code entry point: a file that calls mlflow.models.set_model(HMHNPyfuncModel()).
MODEL_CODE_FILE = Path(__file__).resolve().with_name("scoring_model.py")
# One request is decoded and scored in memory: bound it (a 224 px crop is ~600 KB as float32).
MAX_IMAGES_PER_REQUEST = 1024
INFERENCE_BATCH = 64
# Named in error messages so that a client learns the expected request shape from the 4xx itself.
REQUEST_HINT = ('send {"dataframe_split": {"columns": ["image"], "data": [["<base64 JPEG/PNG of an aligned face '
                'crop>"], ...]}}')
_DATA_URL_PREFIX = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,")


def _invalid(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE makes the scoring server answer HTTP 400 with this message.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _pip_requirements() -> list[str]:
    """Exact pins of what the pyfunc imports (explicit: inferring them costs ~10 s per log_model)."""
    from importlib.metadata import PackageNotFoundError, version

    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                    f"numpy=={np.__version__}", f"pandas=={pd.__version__}"]
    try:
        requirements.append(f"opencv-python=={version('opencv-python')}")
    except PackageNotFoundError:  # e.g. an image with only the headless build
        requirements.append("opencv-python")
    return requirements


def _copy_project_code(destination: Path) -> list[str]:
    """Copy only the .py files of the `hmhn` and `pipeline` packages (no caches, no stray data files)."""
    import pipeline

    paths = []
    for package in (Path(__file__).resolve().parent, Path(pipeline.__file__).resolve().parent):
        target = destination / package.name
        shutil.copytree(package, target, ignore=lambda folder, names: [
            n for n in names if n == "__pycache__" or (os.path.isfile(os.path.join(folder, n)) and not n.endswith(".py"))])
        paths.append(str(target))
    return paths


def _example_frame(input_size: int) -> pd.DataFrame:
    """A request example that is NOT a face (it is stored in the model's artifacts): a colour gradient."""
    from hmhn.image import encode_jpeg

    ramp = np.linspace(0, 255, input_size, dtype=np.float32)
    rgb = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (input_size, 1)),
                    np.tile(ramp[:, None], (1, input_size))], axis=-1).astype(np.uint8)
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(encode_jpeg(rgb)).decode("ascii")]})


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    # `image` is a string (base64) rather than MLflow's `binary`: the server would then base64-decode
    # before predict and answer a malformed value with a generic parse error; decoding here lets a
    # bad request get a message naming the offending rows.
    return ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
                          outputs=Schema([ColSpec("double", "score"), ColSpec("string", "severity")]))


def log_scoring_model(model: HMHN, *, name: str = "model", preprocess_config: dict[str, Any], input_size: int,
                      registered_model_name: str | None = None, extra_tags: dict[str, Any] | None = None):
    """Log `model` (HMHN, eval mode, CPU) as a pyfunc model inside the active MLflow run; returns ModelInfo.

    preprocess_config: the content of the shard set's config.json ({"preprocess_version", "config"}).
    input_size: the model's input side in pixels (must equal model.config.input_size).
    registered_model_name: also register it (ModelInfo.registered_model_version says which version);
    the version gets tags `preprocess_version` and `input_size`.
    extra_tags: tags of the logged model (and of the registered version).
    The model is logged from code (MODEL_CODE_FILE) with the weights and configs as artifacts;
    preprocess_config and the tags are stored with URIs redacted (pipeline.storage.redact).
    """
    if mlflow.active_run() is None:
        raise RuntimeError("log_scoring_model logs into the active MLflow run: call it inside mlflow.start_run()")
    if not isinstance(model, HMHN):
        raise TypeError(f"model must be an HMHN, got {type(model).__name__} (unwrap DDP / HMHNScorer first)")
    if model.config.input_size != input_size:
        raise ValueError(f"input_size {input_size} differs from the model's HMHNConfig.input_size "
                         f"{model.config.input_size}")
    if not isinstance(preprocess_config, dict) or "config" not in preprocess_config:
        raise ValueError("preprocess_config must be the shard set's config.json content "
                         "({'preprocess_version': ..., 'config': {...}})")
    from pipeline.storage import redact, redact_uri

    preprocess_config = redact(preprocess_config)
    version = str(preprocess_config.get("preprocess_version", ""))
    tags = {"preprocess_version": version, "input_size": str(input_size), **(extra_tags or {})}
    tags = {str(k): redact_uri(str(v)) for k, v in tags.items()}

    with tempfile.TemporaryDirectory(prefix="hmhn-model-") as tmp:
        folder = Path(tmp)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save(state, folder / ARTIFACT_FILES[WEIGHTS_ARTIFACT])
        (folder / ARTIFACT_FILES[HMHN_CONFIG_ARTIFACT]).write_text(json.dumps(dataclasses.asdict(model.config), indent=2))
        (folder / ARTIFACT_FILES[PREPROCESS_CONFIG_ARTIFACT]).write_text(json.dumps(preprocess_config, indent=2))
        code_paths = _copy_project_code(folder / "code")
        with warnings.catch_warnings():
            # Type hints on predict would switch MLflow to its type-hint schema (requests with an "inputs"
            # key, no dataframe_split): the explicit signature is deliberate, so its nag is noise.
            warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(MODEL_CODE_FILE),  # models-from-code: nothing pickled
                artifacts={key: str(folder / file) for key, file in ARTIFACT_FILES.items()},
                code_paths=code_paths,
                signature=_signature(),
                input_example=_example_frame(input_size),
                pip_requirements=_pip_requirements(),
                metadata={"preprocess_version": version, "input_size": input_size,
                          "hmhn_config": dataclasses.asdict(model.config)},
                tags=tags,
                registered_model_name=registered_model_name,
            )
    if registered_model_name and info.registered_model_version is not None:
        client = mlflow.MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(registered_model_name, str(info.registered_model_version), key, value)
    return info


def load_scoring_model(model_uri: str, device: str = "cpu") -> tuple[HMHN, dict[str, Any], int]:
    """(HMHN in eval mode, preprocess_config dict, input_size) of a model logged by log_scoring_model.

    Reads the artifacts directly (no pyfunc wrapper, no code of the model folder runs, nothing is
    unpickled - the weights load with weights_only=True): batch scoring then runs plain torch.
    model_uri: anything MLflow resolves, e.g. models:/hmhn@champion, runs:/<run_id>/model, a local folder.
    """
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    local = download_artifacts(artifact_uri=model_uri)
    flavor = Model.load(local).flavors.get("python_function", {})
    artifacts = flavor.get("artifacts") or {}
    missing = [key for key in ARTIFACT_FILES if key not in artifacts]
    if missing:
        raise MlflowException(f"{model_uri} is not an HMHN scoring model (no artifacts {missing}); log it with "
                              "hmhn.serving.log_scoring_model", error_code=INVALID_PARAMETER_VALUE)

    def path(key: str) -> str:
        return os.path.join(local, artifacts[key]["path"])

    model = model_from_files(path(WEIGHTS_ARTIFACT), path(HMHN_CONFIG_ARTIFACT), device)
    preprocess_config = json.loads(Path(path(PREPROCESS_CONFIG_ARTIFACT)).read_text())
    return model, preprocess_config, model.config.input_size


# ----------------------------------------------------------------------------------------------
# The pyfunc


def _image_bytes(value: Any) -> bytes:
    """A cell of the `image` column -> encoded image bytes (base64 text, a data URL, or raw bytes)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a base64 string, got {type(value).__name__}")
    text = _DATA_URL_PREFIX.sub("", value.strip())
    text = re.sub(r"\s+", "", text)  # base64.encodebytes wraps lines
    if not text:
        raise ValueError("empty string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


class HMHNPyfuncModel(mlflow.pyfunc.PythonModel):
    """Scores aligned face crops: DataFrame `image` (base64 JPEG/PNG) -> DataFrame `score`, `severity`.

    Also accepts a float array (N, 3, S, S) already normalised by hmhn.image.to_model_input
    (in-process only: the column signature makes the HTTP server expect the DataFrame form;
    use `pyfunc_model.unwrap_python_model().predict(None, array)`).
    """

    def load_context(self, context) -> None:
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = model_from_files(context.artifacts[WEIGHTS_ARTIFACT], context.artifacts[HMHN_CONFIG_ARTIFACT],
                                 self.device)
        self.input_size = model.config.input_size
        self.scorer = scorer_for(model)

    # The `pd.DataFrame` hint is for MLflow: without a hint on `model_input`, defining this class
    # (importing this module) prints MLflow's "Add type hints to the `predict` method" warning; a
    # DataFrame hint infers no schema and adds no validation, so the explicit signature that
    # log_scoring_model logs stays the contract. In-process a normalised np.ndarray is accepted too.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if isinstance(model_input, np.ndarray):
            batch = self._tensor_from_array(model_input)
        elif isinstance(model_input, pd.DataFrame):
            batch = self._tensor_from_frame(model_input)
        else:
            raise _invalid(f"expected a DataFrame with an '{IMAGE_COLUMN}' column or a float array "
                           f"(N, 3, {self.input_size}, {self.input_size}); got {type(model_input).__name__}. "
                           + REQUEST_HINT)
        values = score_input(self.scorer, batch, INFERENCE_BATCH)  # batch scoring's numerics (hmhn.inference)
        return pd.DataFrame({"score": values, "severity": [severity_band(v) for v in values]})

    def _tensor_from_frame(self, frame: pd.DataFrame) -> torch.Tensor:
        if IMAGE_COLUMN not in frame.columns:
            raise _invalid(f"missing column '{IMAGE_COLUMN}' (got {list(map(str, frame.columns))}); " + REQUEST_HINT)
        self._check_count(len(frame))
        images, problems = [], []
        for row, value in enumerate(frame[IMAGE_COLUMN].tolist()):
            try:
                images.append(decode_jpeg(_image_bytes(value), self.input_size))
            except ValueError as exc:
                problems.append(f"row {row}: {exc}")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} bad rows)" if len(problems) > 5 else "")
            raise _invalid(f"'{IMAGE_COLUMN}' must hold base64-encoded JPEG/PNG face crops: {shown}")
        return to_model_input(np.stack(images))

    def _tensor_from_array(self, array: np.ndarray) -> torch.Tensor:
        size = self.input_size
        if array.ndim != 4 or array.shape[1:] != (3, size, size):
            raise _invalid(f"expected a normalised float array of shape (N, 3, {size}, {size}), "
                           f"got {tuple(array.shape)}")
        if not np.issubdtype(array.dtype, np.floating):
            raise _invalid(f"expected a float array (normalised with hmhn.image.to_model_input), got {array.dtype}")
        self._check_count(array.shape[0])
        if not np.isfinite(array).all():
            raise _invalid("the array holds NaN or infinite values")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    @staticmethod
    def _check_count(count: int) -> None:
        if count == 0:
            raise _invalid("empty batch: send at least one image; " + REQUEST_HINT)
        if count > MAX_IMAGES_PER_REQUEST:
            raise _invalid(f"{count} images in one request; at most {MAX_IMAGES_PER_REQUEST}: split the batch")
