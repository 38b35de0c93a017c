"""Collators: assistant-only labels in the model's chat format, padding, drops counted; score_answer."""

import json

import pytest
import torch
from PIL import Image

from adallava.data import EvalCollator, TrainCollator, load_llava_json, score_answer
from adallava.presets import build_processor, build_tokenizer

IMAGE_TOKENS = 16  # the tiny preset: 32 px / patch 8


@pytest.fixture(scope="module")
def processor():
    return build_processor(build_tokenizer())


@pytest.fixture
def ds(tmp_path):
    Image.new("RGB", (64, 64), (30, 160, 60)).save(tmp_path / "g.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    t = lambda *v: [{"from": "human" if i % 2 == 0 else "gpt", "value": x} for i, x in enumerate(v)]  # noqa: E731
    records = [
        {"id": "img", "image": "g.png", "conversations": t("<image>\nWhat colour is the shape?", "green"),
         "question_type": "colour", "answer": "green", "difficulty": "easy"},
        {"id": "text", "conversations": t("What number comes after 3?", "4"), "question_type": "text", "answer": "4"},
        {"id": "multi", "image": "g.png",
         "conversations": t("<image>\nWhat colour is it?", "green", "What shape is it?", "square")},
        {"id": "bad", "image": "bad.png", "conversations": t("<image>\nQ?", "A")},
    ]  # fmt: skip
    (tmp_path / "d.json").write_text(json.dumps(records))
    return load_llava_json(tmp_path / "d.json")


def _answer_text(tok, labels):
    return tok.decode(labels[labels != -100])


def test_labels_cover_only_the_assistant_turns(processor, ds):
    tok = processor.tokenizer
    batch = TrainCollator(processor)([ds[0], ds[1], ds[2]])
    assert _answer_text(tok, batch["labels"][0]).strip() == "green</s>"
    assert _answer_text(tok, batch["labels"][1]).strip() == "4</s>"
    assert _answer_text(tok, batch["labels"][2]) == " green</s> square</s>"  # every assistant turn, nothing else
    # the prompt is exactly the chat template's rendering up to the answer
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    answer_start = int((batch["labels"][0] != -100).nonzero()[0])
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat colour is the shape?"}], tokenize=False, add_generation_prompt=True
    )
    expected = processor(text=[prompt], images=[ds[0]["image"]])["input_ids"][0]
    assert ids[:answer_start].tolist() == expected
    assert int((ids == tok.convert_tokens_to_ids("<image>")).sum()) == IMAGE_TOKENS


def test_right_padding_and_pixel_values_only_for_image_records(processor, ds):
    batch = TrainCollator(processor)([ds[1], ds[0], ds[2]])
    B, T = batch["input_ids"].shape
    lengths = batch["attention_mask"].sum(1)
    assert B == 3 and int(lengths.max()) == T
    pad = processor.tokenizer.pad_token_id
    for r in range(3):
        n = int(lengths[r])
        assert batch["attention_mask"][r, :n].all() and not batch["attention_mask"][r, n:].any()
        assert (batch["input_ids"][r, n:] == pad).all() and (batch["labels"][r, n:] == -100).all()
    assert batch["pixel_values"].shape == (2, 3, 32, 32)  # the text-only record has no image
    assert batch["labels"].dtype == batch["input_ids"].dtype == torch.long
    only_text = TrainCollator(processor)([ds[1]])
    assert only_text["pixel_values"] is None


def test_batched_equals_one_by_one(processor, ds):
    c = TrainCollator(processor)
    batch = c([ds[0], ds[1], ds[2]])
    for r, i in enumerate([0, 1, 2]):
        one = c([ds[i]])
        n = one["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][r, :n], one["input_ids"][0])
        assert torch.equal(batch["labels"][r, :n], one["labels"][0])


def test_none_items_dropped_and_counted(processor, ds):
    c = TrainCollator(processor)
    items = [ds[0], ds[3], ds[1]]
    assert items[1] is None and ds.report.counts == {"bad_image": 1}
    batch = c(items)
    assert batch["input_ids"].shape[0] == 2 and int(batch["num_dropped"]) == 1
    assert c.dropped == 1 and c.report.counts == {"unreadable_item": 1} and c.report.total == 3
    assert c([None, None]) is None and c.dropped == 3
    e = EvalCollator(processor)
    eb, metas = e([None, ds[1]])
    assert eb["input_ids"].shape[0] == 1 and [m["id"] for m in metas] == ["text"] and e.dropped == 1


def test_truncation_never_cuts_image_tokens(processor, ds):
    full = TrainCollator(processor)([ds[2]])["input_ids"].shape[1]
    c = TrainCollator(processor, max_length=10)  # the 16 image tokens cannot fit
    assert c([ds[0], ds[2]]) is None
    assert c.dropped == 2 and c.report.counts == {"too_long": 2} and c.report.examples["too_long"] == ["img", "multi"]
    # cut after the first answer: kept, truncated to max_length, first answer still learned
    first_answer_end = int((TrainCollator(processor)([ds[2]])["labels"][0] != -100).nonzero()[2]) + 1
    c = TrainCollator(processor, max_length=first_answer_end)
    batch = c([ds[2]])
    assert batch["input_ids"].shape[1] == first_answer_end < full and c.truncated == 1 and c.dropped == 0
    assert _answer_text(processor.tokenizer, batch["labels"][0]) == " green</s>"


def test_eval_collator_left_pads_prompts_with_generation_prompt(processor, ds):
    batch, metas = EvalCollator(processor)([ds[1], ds[2]])
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    mask = batch["attention_mask"]
    lengths = mask.sum(1)
    for r in range(2):
        assert mask[r, mask.shape[1] - int(lengths[r]) :].all() and not mask[r, : mask.shape[1] - int(lengths[r])].any()
    tok = processor.tokenizer
    text = tok.decode(batch["input_ids"][1][mask[1].bool()])
    assert text.endswith("What colour is it? ASSISTANT:") and "green" not in text and "shape" not in text
    assert metas == [
        {"id": "text", "question_type": "text", "answer": "4", "question": "What number comes after 3?",
         "difficulty": None},
        {"id": "multi", "question_type": None, "answer": "green", "question": "What colour is it?", "difficulty": None},
    ]  # fmt: skip


def test_batches_run_through_the_tiny_model(processor, ds):
    from adallava.presets import build_tiny

    model, processor = build_tiny()
    batch = TrainCollator(processor)([ds[0], ds[1], ds[2]])
    assert int(batch.pop("num_dropped")) == 0  # bookkeeping for the trainer, not a model input
    out = model(**batch)
    assert torch.isfinite(out.loss)
    eval_batch, _ = EvalCollator(processor)([ds[0], ds[1]])
    seq = model.generate(**eval_batch, budget=1.0, max_new_tokens=2)
    assert seq.shape[0] == 2


@pytest.mark.parametrize("prediction, gold, right", [
    ("red", "red", True), ("Red.", "red", True), ("The red one", "red", True), ("  RED!  ", "red", True),
    ("reddish", "red", False), ("blue", "red", False), ("", "red", False), ("a red", "red", True),
    ("two", "2", True), ("2 circles", "two", True), ("Three.", "3", True), ("4", "3", False),
    ("left side", "left", True), ("right", "left", False), ("3.5", "3.5", True), ("3", "3.5", False),
    ("circles", "circles", True), ("circle", "circles", False), ("new york city", "new york", True),
])  # fmt: skip
def test_score_answer(prediction, gold, right):
    assert score_answer(prediction, gold) is right


def test_drops_in_dataloader_workers_reach_the_trainer_through_the_batch(processor, ds):
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=TrainCollator(processor))
    batches = [b for b in loader if b is not None]
    # the bad image was seen (and counted) in a worker: the main process learns of it only through num_dropped
    assert sum(int(b["num_dropped"]) for b in batches) == 1
    assert sum(b["input_ids"].shape[0] for b in batches) == len(ds) - 1
