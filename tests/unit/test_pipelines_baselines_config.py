"""The trained baselines and the smol pipeline in the pipelines' configs: stage names, their settings, errors that name
bad values, same steps and data as adapt, the method set of an evaluation, the headline of smol_trained.json."""

from pathlib import Path

import pytest

from pipelines import evaluate, train
from pipelines.config import EvalConfig, TrainConfig, load_config
from pipelines.demo import CONFIGS, baseline_configs, split_overrides
from pipelines.smol import check_targets, headline


@pytest.fixture
def base_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # validate() only checks that a checkpoint is there
    return str(tmp_path)


def test_bad_stage_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"stage: must be one of \['base', 'adapt', 'layerskip', 'layerdrop'\]"):
        load_config(TrainConfig, None, ["stage=layerskp"])


def test_baseline_stage_settings_are_checked(base_dir):
    with pytest.raises(ValueError, match="stage layerskip fine-tunes a base model: set init_from"):
        train.validate(TrainConfig(stage="layerskip"))
    with pytest.raises(ValueError, match=r"baseline_args: unknown key\(s\) \['p_max'\]"):
        train.validate(TrainConfig(stage="layerskip", init_from=base_dir, baseline_args={"p_max": 0.1}))
    with pytest.raises(ValueError, match="layerdrop_rate must be in"):
        train.validate(TrainConfig(stage="layerdrop", init_from=base_dir, baseline_args={"layerdrop_rate": 2}))
    with pytest.raises(ValueError, match=r"baseline_args apply to stages \['layerskip', 'layerdrop'\], not stage adapt"):
        train.validate(TrainConfig(stage="adapt", init_from=base_dir, baseline_args={"layerdrop_rate": 0.2}))
    with pytest.raises(ValueError, match="freeze_language_model must be false"):
        train.validate(TrainConfig(stage="layerdrop", init_from=base_dir, freeze_language_model=True))
    with pytest.raises(ValueError, match="use strategy ddp"):
        train.validate(TrainConfig(stage="layerskip", init_from=base_dir, strategy="fsdp"))
    with pytest.raises(ValueError, match="loss_weights"):
        train.validate(TrainConfig(stage="layerskip", init_from=base_dir, loss_weights={"gamma": 1.0}))
    train.validate(TrainConfig(stage="layerskip", init_from=base_dir, baseline_args={"layerskip_p_max": 0.2}))


def test_presets_without_init_from_and_scheduler_lr():
    with pytest.raises(ValueError, match=r"preset 'llava-1.5-7b' is not built here \(tiny or smol\)"):
        train.validate(TrainConfig(stage="base", preset="llava-1.5-7b"))
    train.validate(TrainConfig(stage="base", preset="smol", global_batch_size=16, micro_batch_size=4))
    with pytest.raises(ValueError, match="scheduler_lr must be > 0"):
        train.validate(TrainConfig(stage="base", scheduler_lr=0.0))


def test_param_groups_put_scheduler_and_latency_encoder_at_their_own_lr():
    from adallava.presets import build_tiny

    model, _ = build_tiny()
    model.model.vision_tower.requires_grad_(False)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    one = train.param_groups(TrainConfig(lr=1e-4), model)
    assert len(one) == 1 and {id(p) for p in one[0]["params"]} == trainable and "lr" not in one[0]
    two = train.param_groups(TrainConfig(lr=1e-4, scheduler_lr=1e-2), model)
    own = {id(p) for n, p in model.named_parameters() if n.startswith(("scheduler.", "latency_encoder."))}
    assert two[1]["lr"] == 1e-2 and {id(p) for p in two[1]["params"]} == own
    assert {id(p) for p in two[0]["params"]} == trainable - own and "lr" not in two[0]


def test_baselines_take_the_adapt_stage_config_steps_and_data():
    adapt = load_config(TrainConfig, CONFIGS / "smol_adapt.yaml", ["max_steps=7"])
    cfgs = baseline_configs(CONFIGS / "smol_adapt.yaml", "run", ["max_steps=7"], ["baseline_args={layerdrop_rate: 0.3}"])
    assert list(cfgs) == ["layerskip", "layerdrop"]
    for stage, cfg in cfgs.items():
        assert cfg.stage == stage and cfg.name == f"run-{stage}"
        for key in ("max_steps", "lr", "global_batch_size", "micro_batch_size", "num_workers", "dataset", "data_seed",
                    "max_length", "freeze_vision_tower", "warmup_ratio", "min_lr_ratio"):  # fmt: skip
            assert getattr(cfg, key) == getattr(adapt, key), key
        assert cfg.baseline_args == {"layerdrop_rate": 0.3}
    with pytest.raises(ValueError, match=r"<stage>.key=value with <stage> one of \['base', 'adapt', 'baselines', 'eval'\]"):
        split_overrides(["train.max_steps=3"])


def test_smol_configs_describe_the_paper_stages():
    base = load_config(TrainConfig, CONFIGS / "smol_base.yaml")
    adapt = load_config(TrainConfig, CONFIGS / "smol_adapt.yaml")
    assert (base.stage, base.preset, base.freeze_language_model, base.freeze_vision_tower) == ("base", "smol", True, False)
    assert (adapt.stage, adapt.freeze_language_model, adapt.freeze_vision_tower) == ("adapt", False, True)
    ev = load_config(EvalConfig, CONFIGS / "eval_smol.yaml")
    assert ev.perplexity_chunks > 0 and 0.75 in ev.budgets and 0.6 in ev.budgets and 0.8 in ev.budgets


def test_evaluation_method_set():
    assert evaluate.resolve_methods(EvalConfig(model="m")) == ["adallava", "early_exit", "random_skip", "full"]
    cfg = EvalConfig(model="m", early_exit_model="a", random_skip_model="b")
    assert evaluate.resolve_methods(cfg) == ["adallava", "early_exit", "random_skip", "early_exit_trained",
                                             "random_skip_trained", "full"]  # fmt: skip
    with pytest.raises(ValueError, match="method early_exit_trained needs its checkpoint: early_exit_model=<dir>"):
        evaluate.resolve_methods(EvalConfig(model="m", methods=["adallava", "early_exit_trained"]))
    with pytest.raises(ValueError, match="random_skip_model is given but method random_skip_trained is not in"):
        evaluate.resolve_methods(EvalConfig(model="m", random_skip_model="b", methods=["adallava"]))
    with pytest.raises(ValueError, match=r"methods: unknown \['oracle'\]"):
        evaluate.resolve_methods(EvalConfig(model="m", methods=["oracle"]))


def _summary(b, acc, ppl):
    return {"budget": b, "accuracy": acc, "perplexity": ppl}


def test_headline_and_targets_from_an_evaluation_report():
    res = {
        "adallava": {"0.6000": _summary(0.6, 0.74, 30.0), "0.7500": _summary(0.75, 0.78, 20.0),
                     "0.8000": _summary(0.8, 0.79, 12.0), "1.0000": _summary(1.0, 0.80, 10.0)},
        "early_exit_trained": {"0.6000": _summary(0.6, 0.70, 90.0), "0.7500": _summary(0.75, 0.70, 50.0),
                               "0.8000": _summary(0.8, 0.80, 30.0), "1.0000": _summary(1.0, 0.81, 10.5)},
        "random_skip_trained": {"0.6000": _summary(0.6, 0.60, 99.0), "0.7500": _summary(0.75, 0.65, 60.0),
                                "0.8000": _summary(0.8, 0.70, 40.0), "1.0000": _summary(1.0, 0.79, 10.2)},
        "early_exit": {"1.0000": _summary(1.0, 0.5, 11.0)},
    }  # fmt: skip
    head = headline({"results": res})
    assert head["full_budget_accuracy"] == 0.80
    assert head["accuracy"]["adallava"] == {"0.6": 0.74, "0.75": 0.78, "0.8": 0.79, "1": 0.80}
    assert head["accuracy"]["early_exit"]["0.75"] == 0.70 and head["accuracy"]["random_skip"]["1"] == 0.79
    assert head["perplexity"]["adallava"]["0.8"] == 12.0 and set(head["perplexity"]) == {"adallava", "early_exit",
                                                                                         "random_skip"}  # fmt: skip
    t = check_targets(head)
    assert t["adallava_keeps_0.95_of_full_at_0.75"]["value"] == pytest.approx(0.975)
    assert t["adallava_keeps_0.95_of_full_at_0.75"]["met"]
    assert t["adallava_keeps_0.9_of_full_at_0.6"]["value"] == pytest.approx(0.925)
    assert t["adallava_keeps_0.9_of_full_at_0.6"]["met"]
    beats = t["adallava_above_both_trained_baselines_below_1"]
    assert beats["per_budget"] == {"0.6": True, "0.75": True, "0.8": False} and not beats["met"]  # 0.79 < 0.80 at 0.8
    assert t["adallava_perplexity_at_0.8_within_1.3x_of_full"]["value"] == pytest.approx(1.2)
    assert t["adallava_perplexity_at_0.8_within_1.3x_of_full"]["met"]


def test_every_baseline_stage_in_config_files_is_known():
    for path in Path(CONFIGS).glob("*.yaml"):
        if not path.name.startswith("eval"):
            assert load_config(TrainConfig, path).stage in ("base", "adapt", "layerskip", "layerdrop")
