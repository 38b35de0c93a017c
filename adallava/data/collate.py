"""Collators: dataset items -> model batches, in the model's own chat format (processor.apply_chat_template).

Training labels cover the assistant turns only. They are found without searching strings: the conversation is
rendered prefix by prefix (up to each assistant turn with the generation prompt, then through that turn), which gives
each answer's character span in the full text; the tokenizer's offsets map spans to tokens; and the processor's own
encoding of the full text (with the image placeholder expanded to the image's tokens) is walked alongside, so the
ids the model trains on are exactly the ones the processor produces at inference.

Items that are None (an image that failed to decode in the dataset) are dropped and counted here as well as in the
dataset's report, because with DataLoader workers the dataset's report lives in the worker processes. In a worker the
collator is a copy too, so TrainCollator also puts the count in the batch (batch["num_dropped"], a 0-dim tensor)
for the trainer to add up; collator.dropped / collator.report are exact when collating in the main process.
"""

from __future__ import annotations

import numpy as np
import torch

from .llava_json import IMAGE_TOKEN, ROLES
from .report import BadRecordReport

IGNORE_INDEX = -100
UNREADABLE_ITEM = "unreadable_item"  # a None item: the dataset could not decode its image (reason in ds.report)
TOO_LONG = "too_long"  # max_length would cut the image tokens, or leave no answer token to learn from


def to_messages(conversations) -> list[dict]:
    """LLaVA turns -> chat-template messages. The content stays a string with "<image>" where the record put it."""
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in conversations]


class _Encoder:
    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        token = getattr(processor, "image_token", IMAGE_TOKEN)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(token)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

    def render(self, messages, add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str, image):
        """(input_ids with the image placeholder expanded, pixel_values [3, H, W] or None) from the processor."""
        out = self.processor(text=[text], images=[image] if image is not None else None)
        pixels = out.get("pixel_values")
        return list(out["input_ids"][0]), None if pixels is None else np.asarray(pixels[0], dtype=np.float32)

    def answer_spans(self, messages) -> tuple[str, list[tuple[int, int]]]:
        """The full rendered text and the character span of each assistant turn (its answer and end-of-turn)."""
        full = self.render(messages, False)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:k], True)
            through = self.render(messages[: k + 1], False)
            if not (through.startswith(before) and full.startswith(through)):
                raise ValueError(
                    "the processor's chat template does not render a conversation prefix by prefix (turn "
                    f"{k}: {before[-40:]!r} / {through[-40:]!r}), so assistant spans cannot be located"
                )
            spans.append((len(before), len(through)))
        return full, spans

    def train_example(self, item) -> tuple[list[int], list[int], np.ndarray | None]:
        messages = to_messages(item["conversations"])
        full, spans = self.answer_spans(messages)
        enc = self.tokenizer(full, return_offsets_mapping=True)
        # a token is a target when it starts inside an answer span (a byte-level BPE token carries the space before
        # the answer; a SentencePiece offset may start after it: either way the token belongs to the answer)
        text_labels = [
            tid if any(s <= start < e for s, e in spans) else IGNORE_INDEX
            for tid, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"])
        ]
        ids, pixels = self.encode(full, item.get("image"))
        return ids, self._align(enc["input_ids"], text_labels, ids, item["id"]), pixels

    def _align(self, text_ids, text_labels, ids, record_id) -> list[int]:
        """Labels for the processor's ids: the tokenizer's labels, with the one image placeholder expanded to the run
        of image tokens the processor put in its place (never a target)."""
        labels, j = [], 0
        for tid, lab in zip(text_ids, text_labels):
            if j >= len(ids) or ids[j] != tid:
                break
            if tid == self.image_token_id:
                while j < len(ids) and ids[j] == self.image_token_id:
                    labels.append(IGNORE_INDEX)
                    j += 1
            else:
                labels.append(lab)
                j += 1
        else:
            if j == len(ids):
                return labels
        raise ValueError(f"record {record_id!r}: the processor's token ids differ from the tokenizer's beyond the "
                         f"image placeholder (at token {j}); cannot place the labels")  # fmt: skip


class TrainCollator:
    """Items -> {"input_ids", "attention_mask", "labels", "pixel_values" (images of the records that have one, in
    order; None when none has), "num_dropped"}, right-padded to the longest row.

    labels are -100 except on the assistant turns' tokens (each answer and its end-of-turn "</s>"), every assistant
    turn of a multi-turn record included. A record longer than max_length is cut at max_length unless the cut would
    reach an image token or leave no answer token, in which case it is dropped and counted as "too_long".
    collator.dropped: items dropped (None items and too-long records); collator.report: the same by reason with
    example ids; collator.truncated: records that were cut but kept. Returns None when every item was dropped.
    """

    def __init__(self, processor, max_length: int = 512):
        self.enc = _Encoder(processor)
        self.max_length = max_length
        self.dropped = 0
        self.truncated = 0
        self.report = BadRecordReport()

    def __call__(self, items):
        rows, pixels = [], []
        self.report.total += len(items)
        n_before = self.dropped
        for item in items:
            if item is None:
                self._drop(UNREADABLE_ITEM, None)
                continue
            ids, labels, pix = self.enc.train_example(item)
            if len(ids) > self.max_length:
                image_pos = [i for i, t in enumerate(ids) if t == self.enc.image_token_id]
                if (image_pos and image_pos[-1] >= self.max_length) or all(
                    lab == IGNORE_INDEX for lab in labels[: self.max_length]
                ):
                    self._drop(TOO_LONG, item["id"])
                    continue
                ids, labels = ids[: self.max_length], labels[: self.max_length]
                self.truncated += 1
            rows.append((ids, labels))
            if pix is not None:
                pixels.append(pix)
        if not rows:
            return None
        T = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), T), self.enc.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, labs) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attention_mask[r, : len(ids)] = 1
            labels[r, : len(ids)] = torch.tensor(labs)
        return {
            "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pixel_values": torch.from_numpy(np.stack(pixels)) if pixels else None,
            "num_dropped": torch.tensor(self.dropped - n_before),
        }  # fmt: skip

    def _drop(self, reason, record_id):
        self.dropped += 1
        self.report.add(reason, record_id)


def first_question(conversations) -> str:
    """The first human turn's text without the image placeholder."""
    text = next(t["value"] for t in conversations if ROLES[t["from"]] == "user")
    return text.replace(IMAGE_TOKEN, "").strip()


class EvalCollator:
    """Items -> (batch, metas) for generation. batch: left-padded prompt {"input_ids", "attention_mask",
    "pixel_values" (None when no item has an image)}; the prompt is the conversation through its first human turn
    (a leading system turn kept) with the generation prompt. metas: one dict per kept item: {"id", "question_type",
    "answer" (the record's gold answer, else its first assistant turn), "question", "difficulty"}.
    None items are dropped and counted (collator.dropped, collator.report); (None, []) when every item was dropped.
    """

    def __init__(self, processor):
        self.enc = _Encoder(processor)
        self.dropped = 0
        self.report = BadRecordReport()

    def __call__(self, items):
        rows, pixels, metas = [], [], []
        self.report.total += len(items)
        for item in items:
            if item is None:
                self.dropped += 1
                self.report.add(UNREADABLE_ITEM, None)
                continue
            convs = item["conversations"]
            messages = to_messages(convs)
            first_user = next(k for k, m in enumerate(messages) if m["role"] == "user")
            prompt = self.enc.render(messages[: first_user + 1], True)
            ids, pix = self.enc.encode(prompt, item.get("image"))
            rows.append(ids)
            if pix is not None:
                pixels.append(pix)
            answer = item.get("answer")
            if answer is None:
                answer = next((t["value"] for t in convs if ROLES[t["from"]] == "assistant"), None)
            metas.append({
                "id": item["id"], "question_type": item.get("question_type"), "answer": answer,
                "question": first_question(convs), "difficulty": item.get("difficulty"),
            })  # fmt: skip
        if not rows:
            return None, []
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.enc.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, ids in enumerate(rows):
            input_ids[r, T - len(ids) :] = torch.tensor(ids)
            attention_mask[r, T - len(ids) :] = 1
        pixel_values = torch.from_numpy(np.stack(pixels)) if pixels else None
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}, metas
