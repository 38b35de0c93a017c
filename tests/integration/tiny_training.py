"""Shared by the integration modules that train the tiny preset for a few steps."""


def tiny_train_config(work, num_train: int, num_test: int, **kw):
    """A TrainConfig for a few quick steps of the tiny preset on the bundled data generated under `work`, with its
    runs and MLflow sqlite file there too; `kw` overrides any field."""
    from pipelines.config import TrainConfig

    base = dict(
        preset="tiny", data_dir=str(work / "data"), num_train=num_train, num_validation=8, num_test=num_test,
        storage_path=str(work / "runs"), mlflow_tracking_uri=f"sqlite:///{work / 'mlflow.db'}", experiment="test",
        num_workers=2, micro_batch_size=4, global_batch_size=8, lr=1e-3, precision="fp32",
        gradient_checkpointing=False, max_length=96, report_every=1, progress=False, max_failures=0,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)
