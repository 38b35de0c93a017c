# Two commands do all set-up on a fresh machine (python3 >= 3.10 with venv; no GPU needed):
#   make demo   # the main job on the embedded default
#   make test   # the test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench venv

venv: $(VENV)/.installed

# Re-install when pyproject.toml changes. torch==2.13.0 takes the CPU wheel here and the CUDA build on a GPU machine.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

demo: venv
	$(PY) -m pipelines.demo

test: venv
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: venv
	$(PY) -m bench.bench_budget_latency
