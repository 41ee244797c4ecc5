# The two commands of the README: `make demo` and `make test`. Both create .venv with pip on a
# fresh machine (Python 3.11 only) and install the pinned dependencies plus this project.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= data/demo
PYTEST_ARGS ?=

.PHONY: demo test install gpu-install clean-demo bench gpu-check gpu-check-dry-run

# pip, not uv/poetry: pip finds the local CPU wheel of torch 2.13.0 (others download ~3 GB of CUDA).
# `pip check` is informational: recent pips flag decord 0.6.0's manylinux2010 wheel as "not supported
# on this platform" although it installs and imports fine; a real conflict still shows up there.
# -qq: pip prints errors only (not setuptools' notice on editable installs, ~10 lines per install).
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade "pip>=23"
	$(PY) -m pip install -qq -e ".[test]"
	$(PY) -m pip check || true
	$(PY) -c "import torch, ray, mlflow, decord, av, onnxruntime, insightface; print('dependencies import: ok')"
	@touch $(STAMP)

install: $(STAMP)

# GPU nodes: onnxruntime-gpu replaces the CPU onnxruntime (never both; see ENVIRONMENT.md).
# --no-deps keeps pip from pulling the CPU package back in, and also drops the [cuda,cudnn]
# extras, so their CUDA 13 / cuDNN 9 wheels are installed in a second, normal step.
# Afterwards `pip check` reports insightface's onnxruntime requirement as missing: expected.
ORT_GPU_CUDA_LIBS := "nvidia-cuda-nvrtc~=13.0" "nvidia-cuda-runtime~=13.0" "nvidia-cufft~=12.0" \
	"nvidia-curand~=10.0" "nvidia-cudnn-cu13~=9.0"
gpu-install: $(STAMP)
	$(PY) -m pip uninstall -y onnxruntime onnxruntime-gpu
	$(PY) -m pip install --no-deps "onnxruntime-gpu==1.31.1"
	$(PY) -m pip install $(ORT_GPU_CUDA_LIBS)

# `make gpu-check` on a GPU node (docs/GPU.md): installs the GPU extras, then measures the GPU paths
# (model, detection, preprocessing, training, predict) and proves CUDA kernels ran; JSON report in
# $OUT/gpu_check.json or ./gpu_check.json. Script options go in GPU_CHECK_ARGS (`make gpu-check --dry-run`
# would be make's own -n): `make gpu-check GPU_CHECK_ARGS=--dry-run` or `make gpu-check-dry-run` runs the
# CPU dry run (CI) WITHOUT gpu-install, which would swap in onnxruntime-gpu.
GPU_CHECK_ARGS ?=
gpu-check: $(if $(findstring --dry-run,$(GPU_CHECK_ARGS)),$(STAMP),gpu-install)
	$(PY) jobs/gpu_check.py $(GPU_CHECK_ARGS)

gpu-check-dry-run: $(STAMP)
	$(PY) jobs/gpu_check.py --dry-run $(filter-out --dry-run,$(GPU_CHECK_ARGS))

demo: $(STAMP)
	$(PY) jobs/demo.py --workdir $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q --timeout=900 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) jobs/bench_model.py
	$(PY) jobs/bench_preprocess.py
	$(PY) jobs/bench_train.py

clean-demo:
	rm -rf $(DEMO_DIR) mlflow.db mlartifacts ray_results
