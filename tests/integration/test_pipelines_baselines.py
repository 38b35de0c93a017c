"""The trained baselines end to end, kept light: a few steps of each baseline stage on Ray Train from a tiny base,
then an evaluation with both trained checkpoints beside the untrained baselines, with held-out perplexity."""

import json
import math

import pytest
import torch
from tiny_training import tiny_train_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from adallava.data import generate_bundled

    root = tmp_path_factory.mktemp("baselines")
    generate_bundled(root / "data", seed=0, num_train=32, num_validation=8, num_test=16)
    return root


def _cfg(work, **kw):
    return tiny_train_config(work, 32, 16, **{"num_workers": 1, "global_batch_size": 4, "max_steps": 2, **kw})


@pytest.fixture(scope="module")
def trained(ray_cluster, work):
    from pipelines import train

    # The base trains its vision tower, whose last layer never gets a gradient (LLaVA reads layer -2), so its checkpoint's
    # optimizer state has no entry for those parameters; a rerun with the same name resumes from it all the same.
    first = train.run(_cfg(work, stage="base", name="base", freeze_vision_tower=False, max_steps=2))
    assert first.result.metrics["step"] == 2
    base = train.run(_cfg(work, stage="base", name="base", freeze_vision_tower=False, max_steps=4))
    assert base.result.metrics["resumed_from_step"] == 2 and base.result.metrics["step"] == 4
    out = {"base": base}
    for stage in ("layerskip", "layerdrop"):
        out[stage] = train.run(_cfg(work, stage=stage, name=stage, init_from=str(base.final_checkpoint),
                                    baseline_args={"layerskip_p_max": 0.2, "layerdrop_rate": 0.5}))  # fmt: skip
    return out


def test_each_baseline_stage_trains_from_the_base(trained, work):
    import mlflow

    from adallava import presets
    from pipelines.train import read_state

    base_model, _ = presets.load(trained["base"].final_checkpoint)
    for stage in ("layerskip", "layerdrop"):
        outcome = trained[stage]
        state = read_state(outcome.final_checkpoint)
        assert state["stage"] == stage and state["step"] == 2 and state["samples"] == 8
        run = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_run(outcome.mlflow_run_id)
        assert run.data.tags["stage"] == stage and run.data.params["stage"] == stage and "loss" in run.data.metrics
        model, _ = presets.load(outcome.final_checkpoint)
        # the language model was fine-tuned; the vision tower stayed frozen (freeze_vision_tower default)
        name = "model.language_model.layers.7.mlp.down_proj.weight"
        a, b = dict(model.named_parameters())[name], dict(base_model.named_parameters())[name]
        assert not torch.equal(a, b), stage
        v = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
        assert torch.equal(dict(model.named_parameters())[v], dict(base_model.named_parameters())[v])
        assert math.isfinite(outcome.result.metrics["loss"])


def test_evaluation_puts_trained_baselines_beside_untrained_ones(trained, work, tmp_path):
    from pipelines import evaluate
    from pipelines.config import EvalConfig

    base = str(trained["base"].final_checkpoint)
    cfg = EvalConfig(
        model=base, base=base, early_exit_model=str(trained["layerskip"].final_checkpoint),
        random_skip_model=str(trained["layerdrop"].final_checkpoint), data_dir=str(work / "data"), max_examples=8,
        batch_size=8, max_new_tokens=3, latency_samples=1, num_qualitative=0, budgets=[0.5, 0.75, 1.0],
        perplexity_chunks=2, perplexity_ctx=8, perplexity_cont=8, perplexity_batch=2,
        output_dir=str(tmp_path / "eval"), progress=False, mlflow_tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
        experiment="test-eval",
    )  # fmt: skip
    report = evaluate.run(cfg)
    res = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    assert list(res) == ["adallava", "early_exit", "random_skip", "early_exit_trained", "random_skip_trained", "full"]
    for method in ("early_exit_trained", "random_skip_trained"):
        for v in res[method].values():
            assert sum(v["layer_usage"]) == pytest.approx(8 * v["budget"]) and v["n"] == 8
            assert math.isfinite(v["perplexity"]) and v["perplexity"] > 1
    assert res["early_exit_trained"]["0.7500"]["layer_usage"] == [1, 1, 1, 1, 1, 1, 0, 0]
    # where early exit and random skipping run the same layers (none or all schedulable ones) on the same weights,
    # they agree exactly; trained and untrained weights give different perplexities
    for key in ("0.5000", "1.0000"):
        assert res["early_exit"][key]["perplexity"] == res["random_skip"][key]["perplexity"]
        assert res["early_exit"][key]["accuracy"] == res["random_skip"][key]["accuracy"]
        assert res["early_exit_trained"][key]["perplexity"] != res["early_exit"][key]["perplexity"]
    alone = report["perplexity_language_model_alone"]
    assert set(alone) == {"adallava", "base", "early_exit_trained", "random_skip_trained"}
    assert alone["adallava"] == alone["base"]  # model = base here
    assert (tmp_path / "eval" / "perplexity_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
    assert "EE LayerSkip" in report["table"] and "Perplexity of held-out text (16 tokens)" in report["table"]
