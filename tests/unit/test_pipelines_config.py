"""Pipeline configs: dataclass defaults <- YAML <- key=value; unknown keys and wrong types are errors naming the key;
every shipped config file loads and says how to run it."""

from pathlib import Path

import pytest

from pipelines.config import EvalConfig, TrainConfig, load_config, parse_overrides
from pipelines.train import (_gather_bad_records, batches_per_epoch, grad_accumulation, merge_bad_record_reports,
                             micro_batch_indices, total_steps)

CONFIGS = sorted((Path(__file__).parents[2] / "pipelines" / "configs").glob("*.yaml"))


def test_defaults_are_the_paper_recipe():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.warmup_ratio, cfg.epochs, cfg.global_batch_size) == (1e-5, 0.03, 1.0, 128)
    assert cfg.freeze_vision_tower and cfg.gradient_checkpointing and cfg.precision == "bf16"


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("# run me\nstage: base\nlr: 1.0e-3\nmax_steps: 10\n")
    cfg = load_config(TrainConfig, f, ["max_steps=20", "lr=3e-4", "use_gpu=true", "model_overrides={hidden_size: 64}"])
    assert cfg.stage == "base" and cfg.max_steps == 20 and cfg.use_gpu is True
    assert cfg.lr == pytest.approx(3e-4) and isinstance(cfg.lr, float)  # "3e-4" is a string to YAML 1.1
    assert cfg.model_overrides == {"hidden_size": 64}
    assert load_config(TrainConfig, f).max_steps == 10  # the file alone


def test_int_accepted_for_float():
    assert load_config(TrainConfig, None, ["epochs=2"]).epochs == 2.0


@pytest.mark.parametrize(
    "override, key",
    [("max_step=5", "max_step"), ("max_steps=ten", "max_steps"), ("use_gpu=yes please", "use_gpu"),
     ("stage=pretrain", "stage"), ("lr=fast", "lr"), ("num_workers=1.5", "num_workers"),
     ("model_overrides=3", "model_overrides")],
)  # fmt: skip
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        load_config(TrainConfig, None, [override])


def test_bad_key_in_file_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("stage: base\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*learning_rate"):
        load_config(TrainConfig, f)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["max_steps"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(TrainConfig, tmp_path / "nope.yaml")


def test_eval_budgets_list():
    cfg = load_config(EvalConfig, None, ["model=x", "budgets=[0.5, 1.0]"])
    assert cfg.budgets == [0.5, 1.0]
    with pytest.raises(ValueError, match="budgets"):
        load_config(EvalConfig, None, ["budgets=0.5"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_says_how_to_run(path):
    head = path.read_text().splitlines()[:6]
    assert head[0].startswith("#") and any("python -m pipelines." in line for line in head), path
    cls = EvalConfig if path.name.startswith("eval") else TrainConfig
    load_config(cls, path)


def test_global_batch_must_split_over_workers():
    assert grad_accumulation(TrainConfig(global_batch_size=128, micro_batch_size=2, num_workers=8), 8) == 8
    with pytest.raises(ValueError, match="global_batch_size=30"):
        grad_accumulation(TrainConfig(global_batch_size=30, micro_batch_size=16), 2)


def test_epochs_to_steps():
    cfg = TrainConfig(global_batch_size=32, micro_batch_size=8, epochs=2.0)
    # 100 examples, 2 workers x 8 -> 6 micro-batches per worker per epoch; 2 per step -> 3 steps an epoch
    assert batches_per_epoch(100, 8, 2) == 6 and total_steps(cfg, 100, 2) == 6
    assert total_steps(TrainConfig(max_steps=7), 100, 2) == 7


def test_data_position_resumes_exactly():
    """Workers see disjoint examples; a run resumed at micro-batch p sees what the uninterrupted run saw from p."""
    def take(rank, start, n):
        it = micro_batch_indices(50, 4, 2, rank, seed=3, start=start)
        return [next(it) for _ in range(n)]

    full = take(0, 0, 15)  # 6 batches an epoch: crosses two epoch boundaries
    assert take(0, 9, 6) == full[9:]
    assert [pos for pos, _ in full] == list(range(15))
    r0 = {i for _, idx in take(0, 0, 6) for i in idx}
    r1 = {i for _, idx in take(1, 0, 6) for i in idx}
    assert not r0 & r1 and len(r0) == len(r1) == 24
    with pytest.raises(ValueError, match="micro_batch_size"):
        next(micro_batch_indices(3, 4, 2, 0, 0, 0))


def _worker(counts, examples, total=100, dropped=0):
    return {"report": {"total": total, "counts": counts, "examples": examples},
            "collator": {"counts": {"dropped": dropped}, "examples": {}}}  # fmt: skip


def test_every_workers_bad_records_reach_the_run_report():
    """Read-time reasons are found by every worker (the whole file): counted once. Decode-time reasons (bad_image) are
    found only by the worker whose batch held the record: summed over workers, examples merged without repeats.
    Collator drops are summed."""
    read = {"missing_image": 2}
    rank0 = _worker({**read, "bad_image": 1}, {"missing_image": ["a", "b"], "bad_image": ["x"]}, dropped=1)
    rank1 = _worker({**read, "bad_image": 2}, {"missing_image": ["a", "b"], "bad_image": ["y", "x"]}, dropped=0)
    rank2 = _worker(dict(read), {"missing_image": ["a", "b"]}, dropped=3)
    merged = merge_bad_record_reports([rank0, rank1, rank2])
    assert merged["counts"] == {"missing_image": 2, "bad_image": 3}
    assert merged["examples"] == {"missing_image": ["a", "b"], "bad_image": ["x", "y"]}
    assert merged["skipped"] == 5 and merged["total_records"] == 100 and merged["collator_dropped"] == 4
    # a reason rank 0 never saw still arrives from another worker; examples are capped at 5
    many = _worker({"bad_image": 7}, {"bad_image": [f"i{j}" for j in range(7)]})
    merged = merge_bad_record_reports([_worker({}, {}), many])
    assert merged["counts"] == {"bad_image": 7} and merged["examples"]["bad_image"] == ["i0", "i1", "i2", "i3", "i4"]


def test_a_single_worker_reports_its_own_counts():
    class Report:
        def as_dict(self):
            return {"total": 4, "counts": {"bad_image": 1}, "examples": {"bad_image": ["z"]}}

    class Dataset:
        report = Report()

    class Collator:
        dropped = 2

    merged = _gather_bad_records(Dataset(), Collator(), world_size=1)
    assert merged == {"total_records": 4, "skipped": 1, "counts": {"bad_image": 1}, "examples": {"bad_image": ["z"]},
                      "collator_dropped": 2}  # fmt: skip
