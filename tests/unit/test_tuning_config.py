"""The sweep config: everything wrong is rejected before Ray starts, with the key named; the shipped configs load."""

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from tuning.config import LOSS_KEYS, SweepConfig, default_point, load_sweep_config, validate

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "tuning" / "configs"


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A real tiny checkpoint (random init: a valid base for config checks)."""
    from adallava.presets import build_tiny

    d = tmp_path_factory.mktemp("base")
    model, processor = build_tiny(seed=0)
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return str(d)


def _load(base_ckpt, *overrides, path=CONFIGS / "smoke.yaml"):
    return load_sweep_config(path, [f"init_from={base_ckpt}", *overrides])


def test_loss_keys_match_the_objective():
    from adallava.objective import LossWeights

    hints = typing.get_type_hints(LossWeights)
    assert {f.name: hints[f.name] for f in dataclasses.fields(LossWeights)} == LOSS_KEYS


@pytest.mark.parametrize("name", ["smoke.yaml", "tiny.yaml"])
def test_shipped_configs_validate_and_say_how_to_run(base_ckpt, name):
    cfg = _load(base_ckpt, path=CONFIGS / name)
    train = validate(cfg)
    assert train.stage == "adapt" and train.init_from == base_ckpt
    assert train.val_every == cfg.val_every and train.max_steps > cfg.asha_grace_steps
    assert cfg.fixed_trials == [{}]  # the paper's defaults are always one trial
    head = (CONFIGS / name).read_text().splitlines()[:4]
    assert any(f"python -m tuning.sweep --config tuning/configs/{name}" in line for line in head)


def test_tiny_sweep_meets_the_evidence_brief(base_ckpt):
    cfg = _load(base_ckpt, path=CONFIGS / "tiny.yaml")
    validate(cfg)
    assert cfg.num_samples >= 8 and cfg.max_concurrent_trials * cfg.train["num_workers"] <= 2
    assert {"gamma", "distill", "budget_dist", "lr", "gumbel_tau"} <= set(cfg.search_space)


def test_default_point_is_the_paper(base_ckpt):
    train = validate(_load(base_ckpt))
    point = default_point(train)
    assert point["gamma"] == 0 and point["distill"] == 0 and point["latency"] == 0
    assert point["budget_dist"] == "uniform" and point["gumbel_tau"] == 5.0 and point["lr"] == train.lr


def test_dotted_overrides_merge_into_the_yaml_mapping(base_ckpt):
    cfg = _load(base_ckpt, "train.max_steps=9", "search_space.gamma={uniform: [0, 0.5]}")
    assert cfg.train["max_steps"] == 9 and cfg.train["num_workers"] == 1  # the file's other keys stay
    assert cfg.search_space["gamma"] == {"uniform": [0, 0.5]} and "distill" in cfg.search_space


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["num_sample=3"], "num_sample"),  # unknown top-level key
        (["num_samples=many"], "num_samples"),  # wrong type
        (["searcher=grid"], "searcher"),
        (["search_space={}"], "search_space"),  # empty
        (["search_space={lr: 0.001}"], "search_space"),  # constants only: nothing to search
        (["search_space.gama={uniform: [0, 1]}"], "gama"),  # unknown search key
        (["search_space.gamma={normal: [0, 1]}"], "search_space.gamma"),  # unknown distribution
        (["search_space.gamma={uniform: [1, -1]}"], "search_space.gamma"),  # low >= high
        (["search_space.gamma={uniform: [0]}"], "search_space.gamma"),  # wrong arity
        (["search_space.gamma={uniform: [0, one]}"], "search_space.gamma"),  # wrong type
        (["search_space.lr={loguniform: [0, 0.1]}"], "search_space.lr"),  # log of 0
        (["search_space.distill={uniform: [-1, 1]}"], "search_space.distill"),  # a weight the trial would reject
        (["search_space.budget_dist={uniform: [0, 1]}"], "search_space.budget_dist"),  # a range of strings
        (["search_space.budget_dist={choice: [uniform, gauss]}"], "search_space.budget_dist"),
        (["search_space.budget_dist={choice: []}"], "search_space.budget_dist"),
        (["fixed_trials=[{gamma: 0, tau: 1}]"], "tau"),
        (["fixed_trials=[{distill: -0.5}]"], "fixed_trials[0].distill"),
        (["num_samples=0"], "num_samples"),
        (["train.max_step=5"], "max_step"),  # unknown train key
        (["train.lr=fast"], "lr"),  # wrong train type
        (["train.init_from=/elsewhere"], "train.init_from"),  # the sweep sets it
        (["train.stage=base"], "train.stage"),
        (["train.max_steps=-1"], "train.max_steps"),
        (["train.checkpoint_every=4"], "train.checkpoint_every"),  # reports without val_loss
        (["asha_grace_steps=6"], "asha_grace_steps"),  # no rung before the last step
        (["max_concurrent_trials=0"], "max_concurrent_trials"),
        (["time_budget_s=-5"], "time_budget_s"),
        (["name=has space"], "name"),
        (["train.dataset=some.json"], "train.dataset"),  # no validation split to score on
        (["init_from=/no/such/checkpoint"], "init_from"),
    ],
)
def test_bad_configs_are_rejected_naming_the_key(base_ckpt, overrides, key):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        validate(_load(base_ckpt, *overrides))
    assert key in str(e.value)


def test_init_from_latest_finds_the_newest_base_or_says_how_to_make_one(tmp_path, monkeypatch, base_ckpt):
    import shutil

    import pipelines.config as pc

    monkeypatch.setattr(pc, "PROJECT_DIR", tmp_path)
    train_config = f"train_config={ROOT / 'pipelines' / 'configs' / 'tiny_adapt.yaml'}"
    cfg = load_sweep_config(CONFIGS / "smoke.yaml", ["init_from=latest", train_config])
    with pytest.raises(FileNotFoundError, match="init_from=latest.*make demo"):
        validate(cfg)
    for run, step in (("tiny-base-20260101-000000", "0000900"), ("tiny-base-20260102-000000", "0000400"),
                      ("tiny-base-20260102-000000", "0000800")):  # fmt: skip
        shutil.copytree(base_ckpt, tmp_path / "runs" / run / f"checkpoint_{step}")
    (tmp_path / "runs" / "tiny-base-20260103-000000" / "checkpoint_0000100").mkdir(parents=True)  # incomplete
    cfg = load_sweep_config(CONFIGS / "smoke.yaml", ["init_from=latest", train_config])
    assert validate(cfg).init_from == str(tmp_path / "runs" / "tiny-base-20260102-000000" / "checkpoint_0000800")


def test_cli_rejects_a_bad_config_before_ray_starts(base_ckpt):
    """The whole CLI in a fresh interpreter: exit 2 naming the key, and neither Ray nor MLflow imported."""
    code = (
        "import sys\n"
        "from tuning import sweep\n"
        "try:\n"
        f"    sweep.main(['--config', {str(CONFIGS / 'smoke.yaml')!r}, 'init_from={base_ckpt}', "
        "'search_space.gamma={uniform: [2, 1]}'])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'ray' in sys.modules, 'mlflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)  # ends when it exits
    assert "exit 2 False False" in out.stdout, out.stdout + out.stderr
    assert "search_space.gamma" in out.stderr and "low < high" in out.stderr


def test_sweep_help_is_light():
    code = "import sys\nfrom tuning import sweep\nprint(sorted(m for m in ('ray', 'mlflow', 'torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)  # ends when it exits
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_trial_values_and_paper_defaults():
    from tuning.sweep import fixed_points, is_paper_default, trial_train_dict

    cfg = SweepConfig(search_space={"gamma": {"uniform": [-1, 1]}, "lr": {"loguniform": [1e-4, 1e-3]}},
                      fixed_trials=[{}, {"gamma": 0.5}])  # fmt: skip
    defaults = {"lr": 3e-4, "gumbel_tau": 5.0, "gamma": 0.0, "distill": 0.0, "distill_temperature": 1.0,
                "latency": 0.0, "budget_dist": "uniform", "budget_alpha": 1.0, "budget_beta": 1.0}  # fmt: skip
    points = fixed_points(cfg, defaults)
    assert points == [{"gamma": 0.0, "lr": 3e-4}, {"gamma": 0.5, "lr": 3e-4}]
    assert is_paper_default(points[0], defaults) and not is_paper_default(points[1], defaults)
    values = trial_train_dict({"lr": 1e-5, "gumbel_tau": None, "loss_weights": {}}, {"gamma": 0.5, "lr": 2e-4})
    assert values == {"lr": 2e-4, "gumbel_tau": None, "loss_weights": {"gamma": 0.5}}


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"gumbel_tau": 0.0}, "gumbel_tau"),
        ({"val_every": -1}, "val_every"),
        ({"val_every": 5, "val_examples": 0}, "val_examples"),
        ({"val_every": 5, "strategy": "fsdp"}, "fsdp"),
        ({"val_every": 5, "dataset": "mine.json"}, "validation split"),
    ],
)
def test_train_config_checks_the_sweep_knobs(base_ckpt, kw, match):
    from pipelines.config import TrainConfig
    from pipelines.train import validate as validate_train

    validate_train(TrainConfig(init_from=base_ckpt, global_batch_size=32, gumbel_tau=2.0, val_every=5))  # fine
    with pytest.raises(ValueError, match=match):
        validate_train(TrainConfig(init_from=base_ckpt, global_batch_size=32, **kw))
