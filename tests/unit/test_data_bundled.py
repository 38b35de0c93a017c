"""The bundled dataset: deterministic by seed, split sizes, readable by the same reader, balanced answers."""

import hashlib
import json
from collections import Counter

import pytest

from adallava.data import generate_bundled, load_llava_json, score_answer
from adallava.data.bundled import CYCLE

SIZES = dict(num_train=56, num_validation=14, num_test=28)  # four, one and two family cycles


def _digest(folder):
    """Hash of every file's bytes except the manifest (which is also compared on its own)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("bundled")
    out = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        generate_bundled(base / name, seed=seed, progress=False, **SIZES)
        out[name] = base / name
    return out


def test_same_seed_same_bytes_different_seed_differs(runs):
    assert _digest(runs["a"]) == _digest(runs["b"])
    assert _digest(runs["a"]) != _digest(runs["c"])
    a, c = (json.loads((runs[k] / "train.json").read_text()) for k in "ac")
    assert a != c
    img = next(r["image"] for r in a if "image" in r)
    assert (runs["a"] / img).read_bytes() == (runs["b"] / img).read_bytes()


def test_split_sizes_and_manifest(runs):
    for split, n in [("train", 56), ("validation", 14), ("test", 28)]:
        records = json.loads((runs["a"] / f"{split}.json").read_text())
        assert len(records) == n and len({r["id"] for r in records}) == n
        assert all(r["id"].startswith(split) for r in records)
    manifest = json.loads((runs["a"] / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["sizes"] == {"train": 56, "validation": 14, "test": 28}


def test_regeneration_is_skipped_when_manifest_matches_and_redone_when_not(runs, tmp_path):
    paths = generate_bundled(runs["a"], seed=0, progress=False, **SIZES)
    assert paths == {s: runs["a"] / f"{s}.json" for s in ("train", "validation", "test")}
    # skipped: a marker written into the split file survives
    train = runs["a"] / "train.json"
    original = train.read_text()
    records = json.loads(original)
    records[0]["marker"] = True
    train.write_text(json.dumps(records))
    generate_bundled(runs["a"], seed=0, progress=False, **SIZES)
    assert json.loads(train.read_text())[0].get("marker") is True
    # a different size regenerates
    generate_bundled(runs["a"], seed=0, progress=False, num_train=14, num_validation=14, num_test=28)
    assert len(json.loads(train.read_text())) == 14
    generate_bundled(runs["a"], seed=0, progress=False, **SIZES)
    assert train.read_text() == original
    with pytest.raises(ValueError, match="num_test"):
        generate_bundled(tmp_path, num_test=-1)


def test_every_record_reads_cleanly_with_the_llava_reader(runs):
    for split in ("train", "validation", "test"):
        ds = load_llava_json(runs["a"] / f"{split}.json")
        assert ds.report.counts == {} and len(ds) == ds.report.total
        for i in range(len(ds)):
            item = ds[i]
            assert item is not None and item["difficulty"] in ("easy", "hard")
            assert (item["image"] is None) == (item["question_type"] == "text")
            if item["image"] is not None:
                assert item["image"].mode == "RGB" and item["image"].size == (64, 64)
            gpt = [t["value"] for t in item["conversations"] if t["from"] == "gpt"]
            assert gpt[0] == item["answer"] and score_answer(item["answer"], item["answer"])
            assert len(item["answer"].split()) == 1


def test_families_difficulties_and_balanced_answers(runs):
    records = json.loads((runs["a"] / "train.json").read_text())
    types = Counter((r["question_type"], r["difficulty"]) for r in records)
    families = {q for q, _ in CYCLE}
    assert {q for q, _ in types} == families == {"colour", "shape", "count", "position", "compare", "digit", "scene",
                                                 "text"}  # fmt: skip
    for q in ("colour", "shape", "count", "position", "compare"):  # one easy and one hard per cycle of 14
        assert types[(q, "easy")] == types[(q, "hard")] == 4
    assert types[("digit", "hard")] == 8 and types[("scene", "easy")] == 4
    assert types[("text", "easy")] == types[("text", "hard")] == 2
    # answers rotate within a family: the count questions answer 1, 2, 3, 4 equally often
    counts = Counter(r["answer"] for r in records if r["question_type"] == "count")
    assert counts == {"1": 2, "2": 2, "3": 2, "4": 2}
    positions = Counter(r["answer"] for r in records if r["question_type"] == "position")
    assert positions == {"left": 2, "right": 2, "top": 2, "bottom": 2}
    assert any(len(r["conversations"]) == 4 for r in records)  # some multi-turn training records


def test_digit_images_are_disjoint_across_splits(runs):
    def digit_bytes(split):
        records = json.loads((runs["a"] / f"{split}.json").read_text())
        return {(runs["a"] / r["image"]).read_bytes() for r in records if r["question_type"] == "digit"}

    train, test = digit_bytes("train"), digit_bytes("test")
    assert train and test and not (train & test)
