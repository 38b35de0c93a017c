"""Data for AdaLLaVA: the LLaVA conversation-format reader, the bundled visual-QA generator, collators, scoring.

    from adallava.data import generate_bundled, load_llava_json, TrainCollator, EvalCollator, score_answer

    paths = generate_bundled("data/bundled", seed=0)           # {"train": Path, "validation": Path, "test": Path}
    ds = load_llava_json(paths["train"])                      # or a real llava_v1_5_mix665k.json + image_root=...
    loader = DataLoader(ds, batch_size=8, collate_fn=TrainCollator(processor, max_length=512))
    ...
    print(ds.report.summary())                                # what was skipped, why, and example ids

Importing this package is cheap: torch, pyarrow and Pillow load with the first name that needs them.
"""

__all__ = [
    "BadRecordReport", "BadRecordError", "EvalCollator", "LlavaDataset", "TrainCollator", "decode_image",
    "generate_bundled", "load_llava_json", "normalize_answer", "score_answer",
]  # fmt: skip

_WHERE = {
    "BadRecordReport": "report", "BadRecordError": "llava_json", "LlavaDataset": "llava_json",
    "decode_image": "llava_json", "load_llava_json": "llava_json", "TrainCollator": "collate",
    "EvalCollator": "collate", "generate_bundled": "bundled", "normalize_answer": "scoring", "score_answer": "scoring",
}  # fmt: skip


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
