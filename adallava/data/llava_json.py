"""Reader for the LLaVA conversation format (llava_v1_5_mix665k.json and the bundled splits).

A record: {"id": ..., "image": "coco/train2017/x.jpg" (relative to an image root; absent for text-only records),
"conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...], ...extra keys}.

Loading parses the JSON with the json module (exact error positions) and keeps the records in a pyarrow table with an
explicit schema: the real mix has heterogeneous extra keys per record, which breaks Arrow/`datasets` schema inference,
so only the fields we read are typed columns and everything else rides along as one JSON string per record. Arrow
buffers also keep 665K records compact and cheap to ship to DataLoader workers.

Cheap checks (structure, turn order, image file exists) run at load time; images decode lazily in __getitem__, where a
file that fails to decode yields None (counted in ds.report, never an exception).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import torch.utils.data

from .report import BadRecordReport

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Why a record is skipped. One word per reason across the reader, collators, logs and reports.
BAD_JSON = "bad_json"  # a JSON-lines line that does not parse
MALFORMED = "malformed"  # not an object, conversations not a list of {from, value} strings, unknown speaker
NO_HUMAN_TURN = "no_human_turn"
NO_GPT_TURN = "no_gpt_turn"
BAD_TURN_ORDER = "bad_turn_order"  # turns must alternate human/gpt, starting with human (after an optional system)
IMAGE_TOKEN_WITHOUT_IMAGE = "image_token_without_image"
TOO_MANY_IMAGE_TOKENS = "too_many_image_tokens"  # one image per record, so at most one <image>
MISSING_IMAGE = "missing_image"  # the image file does not exist
BAD_IMAGE = "bad_image"  # the image file exists but does not decode (corrupt, truncated, not an image)

_SCHEMA = pa.schema([
    ("id", pa.large_string()),
    ("image", pa.large_string()),
    ("conversations", pa.list_(pa.struct([("from", pa.large_string()), ("value", pa.large_string())]))),
    ("question_type", pa.large_string()),
    ("answer", pa.large_string()),
    ("extra", pa.large_string()),  # the record's other keys as JSON ("{}" when none)
])  # fmt: skip
_TYPED = {"id", "image", "conversations", "question_type", "answer"}


class BadRecordError(ValueError):
    """A bad record met with on_bad="fail"; the message names the record and the reason."""


def decode_image(path: str | os.PathLike):
    """Open an image file as an RGB PIL image: decoded fully now (so truncation shows here), EXIF orientation
    applied, any mode converted. Raises on a file that does not decode."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()  # Image.open is lazy: a truncated or corrupt file only fails when the pixels are read
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)


def to_rgb(im):
    """Any PIL mode -> RGB. Transparent pixels become white (their stored colour is arbitrary, often black);
    16/32-bit and float images are scaled to 8 bits rather than clipped (convert("RGB") would saturate them)."""
    import numpy as np
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0  # a float image in [0, 1]
        elif a.size and a.max() > 255:
            a = a / 257.0  # 16-bit range (0..65535) -> 0..255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def _read_records(path: Path, report: BadRecordReport, fail: bool):
    """Yields (index, record) from a JSON array file or a JSON-lines file. A whole file that does not parse is a
    ValueError naming the file and the position; a bad line in a JSON-lines file is one skipped record."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        first_line = f.readline()
    json_lines = path.suffix == ".jsonl"
    if not json_lines and not head.startswith(b"["):
        try:  # JSON lines under another name: the first line is a whole object on its own
            json_lines = isinstance(json.loads(first_line), dict)
        except ValueError:
            json_lines = False
    if not json_lines:
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text at byte {e.start}: {e.reason}")
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON array of records, got a JSON {type(records).__name__}")
        yield from enumerate(records)
        return
    with open(path, encoding="utf-8", errors="replace") as f:  # JSON lines: one record per line
        index = 0
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                where = f"{path.name}:line {lineno}"
                if fail:
                    raise BadRecordError(f"{path}: line {lineno} column {e.colno} is not valid JSON ({e.msg}); "
                                         f"record {where}: {BAD_JSON}")  # fmt: skip
                report.total += 1
                report.add(BAD_JSON, where)
                continue
            yield index, record
            index += 1


def _check_record(record, index: int, path: Path, image_root: Path, check_files: bool):
    """(row, None) for a usable record, (record_id, reason) for a bad one. Cheap: no image is opened."""
    if not isinstance(record, dict):
        return f"{path.name}#{index}", MALFORMED
    rid = record.get("id")
    rid = f"{path.name}#{index}" if rid is None else str(rid)
    convs = record.get("conversations")
    if not isinstance(convs, list) or not all(
        isinstance(t, dict) and t.get("from") in ROLES and isinstance(t.get("value"), str) for t in convs
    ):
        return rid, MALFORMED
    image = record.get("image")
    if image is not None and not (isinstance(image, str) and image):
        return rid, MALFORMED
    roles = [ROLES[t["from"]] for t in convs]
    if "user" not in roles:
        return rid, NO_HUMAN_TURN
    if "assistant" not in roles:
        return rid, NO_GPT_TURN
    body = roles[1:] if roles[0] == "system" else roles
    if body[0::2] != ["user"] * len(body[0::2]) or body[1::2] != ["assistant"] * len(body[1::2]):
        return rid, BAD_TURN_ORDER
    n_tokens = sum(t["value"].count(IMAGE_TOKEN) for t in convs)
    if n_tokens and image is None:
        return rid, IMAGE_TOKEN_WITHOUT_IMAGE
    if n_tokens > 1:
        return rid, TOO_MANY_IMAGE_TOKENS
    turns = [{"from": t["from"], "value": t["value"]} for t in convs]
    if image is not None:
        if check_files and not (image_root / image).is_file():
            return rid, MISSING_IMAGE
        if n_tokens == 0:
            # LLaVA's own preprocessing puts the image first in the first human turn when the text does not place it
            first = roles.index("user")
            turns[first]["value"] = IMAGE_TOKEN + "\n" + turns[first]["value"]
    extra = {k: v for k, v in record.items() if k not in _TYPED}
    qtype, answer = record.get("question_type"), record.get("answer")
    return {
        "id": rid, "image": image, "conversations": turns,
        "question_type": None if qtype is None else str(qtype), "answer": None if answer is None else str(answer),
        "extra": json.dumps(extra) if extra else "{}",
    }, None  # fmt: skip


def load_llava_json(json_path, image_root=None, on_bad: str = "skip", check_files: bool = True) -> "LlavaDataset":
    """Read a LLaVA conversation-format file (.json array, or JSON lines) into a LlavaDataset.

    image_root: folder the records' `image` paths are relative to (default: the JSON file's folder).
    on_bad: "skip" (count by reason in ds.report and go on) or "fail" (raise BadRecordError, a ValueError, naming
    the record and the reason at the first bad one). check_files: test at load time that each image file exists
    (one stat per record; 665K records take seconds on a local disk).
    """
    if on_bad not in ("skip", "fail"):
        raise ValueError(f"on_bad must be 'skip' or 'fail', got {on_bad!r}")
    path = Path(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    image_root = Path(image_root) if image_root is not None else path.parent
    report = BadRecordReport()
    rows = []
    for index, record in _read_records(path, report, on_bad == "fail"):
        report.total += 1
        row, reason = _check_record(record, index, path, image_root, check_files)
        if reason is None:
            rows.append(row)
            continue
        if on_bad == "fail":
            raise BadRecordError(f"{path}: record {row!r} (#{index}): {reason}")
        report.add(reason, row)
    table = pa.Table.from_pylist(rows, schema=_SCHEMA)
    ds = LlavaDataset(table, image_root, report, on_bad=on_bad, source=str(path))
    if report.counts:
        log.warning("%s: %s", path, report.summary())
    return ds


class LlavaDataset(torch.utils.data.Dataset):
    """Map-style dataset over checked records. ds[i] -> {"id", "image" (RGB PIL image or None for text-only),
    "conversations", "question_type", "answer", "difficulty", "extra"}, or None when the image fails to decode
    (counted once per record in ds.report under "bad_image"; with on_bad="fail" a BadRecordError instead).

    In a DataLoader with workers each worker holds its own copy of ds.report, so decode failures seen there do not
    reach the main process's ds.report: the collators count the None items they drop (collator.dropped, and
    batch["num_dropped"] of TrainCollator) for the trainer to aggregate.
    """

    def __init__(self, table: pa.Table, image_root: Path, report: BadRecordReport, on_bad: str = "skip",
                 source: str = ""):  # fmt: skip
        self.table = table
        self.image_root = Path(image_root)
        self.report = report
        self.on_bad = on_bad
        self.source = source
        self._columns = {name: table.column(name) for name in table.column_names}
        self._failed: set[int] = set()  # records whose image failed, counted once however often they are read

    def __len__(self) -> int:
        return self.table.num_rows

    def record(self, i: int) -> dict:
        """The record without opening its image: id, image path (or None), conversations, question_type, answer,
        difficulty, extra."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} records")
        i = i % len(self)
        c = self._columns
        extra = json.loads(c["extra"][i].as_py())
        image = c["image"][i].as_py()
        return {
            "id": c["id"][i].as_py(), "image_path": None if image is None else str(self.image_root / image),
            "conversations": c["conversations"][i].as_py(), "question_type": c["question_type"][i].as_py(),
            "answer": c["answer"][i].as_py(), "difficulty": extra.get("difficulty"), "extra": extra,
        }  # fmt: skip

    def __getitem__(self, i: int):
        rec = self.record(i)
        path = rec.pop("image_path")
        image = None
        if path is not None:
            try:
                image = decode_image(path)
            except Exception as e:  # any decoder failure (OSError, SyntaxError, DecompressionBombError, ...)
                if self.on_bad == "fail":
                    raise BadRecordError(f"{self.source}: record {rec['id']!r}: {BAD_IMAGE} ({path}: {e})") from e
                if i % len(self) not in self._failed:
                    self._failed.add(i % len(self))
                    self.report.add(BAD_IMAGE, rec["id"])
                return None
        rec["image"] = image
        return rec

    @property
    def question_types(self) -> list:
        return self._columns["question_type"].to_pylist()
