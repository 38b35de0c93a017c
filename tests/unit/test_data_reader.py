"""The LLaVA conversation-format reader: good records, every kind of bad record counted, image modes and EXIF."""

import json

import numpy as np
import pytest
from PIL import Image

from adallava.data import BadRecordReport, load_llava_json


def _rec(rid, image=None, turns=("<image>\nWhat colour is it?", "red"), **extra):
    convs = [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]
    r = {"id": rid, "conversations": convs, **extra}
    if image is not None:
        r["image"] = image
    return r


@pytest.fixture
def root(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    (tmp_path / "truncated.png").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return tmp_path


def _write(path, records):
    path.write_text(json.dumps(records))
    return path


def test_well_formed_image_text_only_and_multi_turn(root):
    records = [
        _rec("img", "ok.png", question_type="colour", answer="red", difficulty="easy", source="coco"),
        _rec("text", None, ("What comes after 3?", "4")),
        _rec("multi", "ok.png", ("<image>\nWhat colour?", "red", "What shape?", "square")),
        {"id": 7, "image": "ok.png", "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "a red box"}]},
    ]  # fmt: skip
    ds = load_llava_json(_write(root / "d.json", records))
    assert len(ds) == 4 and ds.report.counts == {} and ds.report.kept == 4 and ds.report.total == 4
    a, b, c, d = (ds[i] for i in range(4))
    assert a["id"] == "img" and a["image"].mode == "RGB" and a["image"].size == (40, 30)
    assert a["image"].getpixel((0, 0)) == (200, 10, 10)
    assert (a["question_type"], a["answer"], a["difficulty"], a["extra"]) == ("colour", "red", "easy",
                                                                             {"difficulty": "easy", "source": "coco"})
    assert b["image"] is None and b["question_type"] is None and b["answer"] is None
    assert [t["value"] for t in c["conversations"]] == ["<image>\nWhat colour?", "red", "What shape?", "square"]
    # an image record whose text does not place the image gets it first in the first human turn (LLaVA's rule)
    assert d["id"] == "7" and d["conversations"][0]["value"] == "<image>\nDescribe."


def test_json_lines_with_a_bad_line_skips_and_counts_it(root):
    lines = [json.dumps(_rec("a", "ok.png")), "{not json", json.dumps(_rec("b", None, ("hi", "hello")))]
    (root / "d.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_llava_json(root / "d.jsonl")
    assert [ds[i]["id"] for i in range(len(ds))] == ["a", "b"]
    assert ds.report.counts == {"bad_json": 1} and ds.report.examples["bad_json"] == ["d.jsonl:line 2"]
    assert ds.report.total == 3 and ds.report.kept == 2
    with pytest.raises(ValueError, match="line 2"):
        load_llava_json(root / "d.jsonl", on_bad="fail")


def test_whole_file_that_does_not_parse_names_file_and_position(root):
    (root / "broken.json").write_text('[{"id": "a", "conversations": []},\n {"id": "b", oops}]')
    with pytest.raises(ValueError, match=r"broken\.json.*line 2 column"):
        load_llava_json(root / "broken.json")


BAD = [
    ("missing", _rec("missing", "nope.png"), "missing_image"),
    ("no_human", {"id": "no_human", "conversations": [{"from": "gpt", "value": "x"}]}, "no_human_turn"),
    ("no_gpt", _rec("no_gpt", None, ("hello?",)), "no_gpt_turn"),
    ("token_no_image", _rec("token_no_image", None), "image_token_without_image"),
    ("order", {"id": "order", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                                {"from": "gpt", "value": "c"}]}, "bad_turn_order"),  # fmt: skip
    ("two_tokens", _rec("two_tokens", "ok.png", ("<image><image>\nQ", "A")), "too_many_image_tokens"),
    ("malformed", {"id": "malformed", "conversations": "hello"}, "malformed"),
    ("speaker", {"id": "speaker", "conversations": [{"from": "bot", "value": "x"}]}, "malformed"),
]


def test_each_bad_kind_is_skipped_and_counted_with_its_id(root):
    records = [_rec("good", "ok.png")] + [r for _, r, _ in BAD] + ["not a record"]
    ds = load_llava_json(_write(root / "d.json", records))
    assert len(ds) == 1 and ds[0]["id"] == "good"
    expected = {}
    for rid, _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
        assert rid in ds.report.examples[reason]
    expected["malformed"] += 1
    assert ds.report.counts == expected
    assert ds.report.examples["malformed"][-1] == "d.json#9"  # a record with no id is named by file and index
    assert ds.report.total == len(records) and ds.report.kept == 1
    summary = ds.report.summary()
    assert "kept 1 of 10" in summary and "missing_image: 1 (e.g. missing)" in summary


@pytest.mark.parametrize("rid, record, reason", BAD, ids=[b[0] for b in BAD])
def test_on_bad_fail_raises_naming_the_record(root, rid, record, reason):
    path = _write(root / "d.json", [_rec("good", "ok.png"), record])
    with pytest.raises(ValueError, match=rf"{rid}.*{reason}"):
        load_llava_json(path, on_bad="fail")


@pytest.mark.parametrize("name", ["corrupt.png", "truncated.png"])
def test_image_that_fails_to_decode_yields_none_and_is_counted_once(root, name):
    ds = load_llava_json(_write(root / "d.json", [_rec("good", "ok.png"), _rec("bad", name)]))
    assert len(ds) == 2 and ds.report.counts == {}  # the file exists: only decoding can tell
    assert ds[0] is not None
    assert ds[1] is None and ds[1] is None  # read twice (two epochs), counted once
    assert ds.report.counts == {"bad_image": 1} and ds.report.examples == {"bad_image": ["bad"]}
    assert ds.report.kept == 1
    strict = load_llava_json(root / "d.json", on_bad="fail")
    with pytest.raises(ValueError, match="'bad'.*bad_image"):
        strict[1]


def test_image_root_defaults_to_json_folder_and_can_be_given(root, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("json")
    path = _write(elsewhere / "d.json", [_rec("a", "ok.png")])
    assert load_llava_json(path).report.counts == {"missing_image": 1}
    ds = load_llava_json(path, image_root=root)
    assert len(ds) == 1 and ds[0]["image"].size == (40, 30)


def test_on_bad_must_be_skip_or_fail(root):
    with pytest.raises(ValueError, match="on_bad"):
        load_llava_json(_write(root / "d.json", []), on_bad="ignore")


def _modes(root):
    """Images in several modes whose true RGB colour is known."""
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent: shows as the white background
    rgba.putpixel((1, 1), (10, 20, 30, 255))
    rgba.save(root / "rgba.png")
    Image.new("L", (8, 8), 77).save(root / "l.png")
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 12, 200, 34] + [0] * 762)
    p.save(root / "p.png")
    Image.fromarray(np.full((8, 8), 257 * 100, dtype=np.uint16)).save(root / "i16.png")  # 16-bit grey 100/255
    return {"rgba.png": [((0, 0), (255, 255, 255)), ((1, 1), (10, 20, 30))], "l.png": [((0, 0), (77, 77, 77))],
            "p.png": [((3, 3), (12, 200, 34))], "i16.png": [((5, 5), (100, 100, 100))]}  # fmt: skip


def test_any_image_mode_decodes_to_rgb(root):
    expected = _modes(root)
    assert Image.open(root / "i16.png").mode.startswith("I")  # really stored as 16-bit
    ds = load_llava_json(_write(root / "d.json", [_rec(n, n) for n in expected]))
    for i, (name, checks) in enumerate(expected.items()):
        img = ds[i]["image"]
        assert img.mode == "RGB", name
        for xy, rgb in checks:
            assert img.getpixel(xy) == rgb, (name, xy)


def test_exif_orientation_is_applied(root):
    # 20 wide x 10 high with a red left half, tagged "rotate 90 CW to display" (orientation 6): shown 10 x 20 with
    # the red half on top
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(root / "rot.jpg", exif=exif, quality=95)
    ds = load_llava_json(_write(root / "d.json", [_rec("rot", "rot.jpg")]))
    out = ds[0]["image"]
    assert out.size == (10, 20)
    top, bottom = out.getpixel((5, 2)), out.getpixel((5, 17))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_report_merge_and_dict_round_trip():
    a, b = BadRecordReport(total=10), BadRecordReport(total=5)
    a.add("missing_image", "x")
    b.add("missing_image", "y")
    b.add("bad_image", "z")
    merged = a.merge(b)
    assert merged is a and a.total == 15 and a.kept == 12
    assert a.counts == {"missing_image": 2, "bad_image": 1} and a.examples["missing_image"] == ["x", "y"]
    assert BadRecordReport.from_dict(a.as_dict()).as_dict() == a.as_dict()
    for i in range(10):
        a.add("bad_image", f"id{i}")
    assert a.counts["bad_image"] == 11 and len(a.examples["bad_image"]) == 5
