"""The bundled visual-QA dataset: generated here, deterministic by seed, in the LLaVA conversation format.

    python -m adallava.data.bundled out_dir=data/bundled seed=0 num_train=2000 num_validation=200 num_test=400

Question families (question_type), each with an easy and a hard form (the "difficulty" key), so the content of a
question matters to how much compute it needs:
  colour    easy: one shape, "What colour is the shape?"      hard: 2-3 shapes, "What colour is the circle?"
  shape     easy: one shape, "What shape is this?"            hard: 2-3 shapes, "What shape is the red one?"
  count     easy: 1-4 identical shapes, "How many shapes?"   hard: 1-4 of a kind among others, "How many circles?"
  position  easy: one shape, left/right/top/bottom           hard: two shapes on opposite sides, "Where is the red square?"
  compare   easy: big vs small, "the left or the right one?"  hard: "Are there more circles or squares?"
  digit     hard: scikit-learn's 8x8 handwritten digits (real images), "What digit is this?"; disjoint per split
  scene     easy: crops of scikit-learn's two sample photos, "What is in the picture?" -> building | flower
  text      text-only records (the real mix has them): "What number comes after 3?" / "Which is bigger, 3 or 7?"
Answers are one word or number from a small vocabulary and are drawn in rotation, so every answer is equally common
within each family: a tiny model can learn them in minutes of CPU training, and chance is known per family. Shapes
are big and simple on 64x64 canvases because the tiny preset sees 32x32 pixels. A quarter of the easy colour/shape
training records carry a second question and answer, so multi-turn training is exercised too.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
from pathlib import Path

GENERATOR_VERSION = 1  # bump when the output changes, so existing folders regenerate
CANVAS = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
SIDES = ("left", "right", "top", "bottom")
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
# One cycle of question families: equal weight for the five shape families and digits, a little of scene and text.
CYCLE = [
    ("colour", "easy"), ("colour", "hard"), ("shape", "easy"), ("shape", "hard"), ("count", "easy"),
    ("count", "hard"), ("position", "easy"), ("position", "hard"), ("compare", "easy"), ("compare", "hard"),
    ("digit", "hard"), ("digit", "hard"), ("scene", "easy"), ("text", None),
]  # fmt: skip
SPLITS = ("train", "validation", "test")
# Digits are split by image (test first, then validation, the rest train) so test digits are never trained on.
DIGIT_FRACTIONS = {"test": 0.2, "validation": 0.1}


# ------------------------------------------------------------------------------------------------------ drawing


def _colour(rng, name):
    # a little jitter so the model learns colour names, not three exact RGB values
    return tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS[name])


def _draw(draw, kind, cx, cy, size, fill):
    h = size / 2
    if kind == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif kind == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)


def _canvas(shapes, rng):
    """shapes: [(kind, colour name, cx, cy, size)] -> a white 64x64 RGB image."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (CANVAS, CANVAS), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for kind, colour, cx, cy, size in shapes:
        _draw(draw, kind, cx, cy, size, _colour(rng, colour))
    return img


def _grid(rng, n):
    """n distinct cells of a 3x3 grid: centres with a little jitter, so up to 9 shapes never overlap."""
    step = CANVAS / 3
    return [((c % 3 + 0.5) * step + rng.uniform(-2, 2), (c // 3 + 0.5) * step + rng.uniform(-2, 2))
            for c in rng.sample(range(9), n)]  # fmt: skip


def _side_centre(rng, side):
    j = lambda: rng.uniform(-4, 4)  # noqa: E731
    return {"left": (15 + j(), 32 + j()), "right": (49 + j(), 32 + j()), "top": (32 + j(), 15 + j()),
            "bottom": (32 + j(), 49 + j())}[side]  # fmt: skip


def _pick(answers, k):
    return answers[k % len(answers)]


# ------------------------------------------------------------------------------------------------------ families
# Each takes (rng, k) where k counts earlier records of the same family and difficulty (answers rotate with k) and
# returns (image or None, question, answer, optional second turn (question, answer)).


def colour_q(rng, k, hard):
    target = _pick(list(COLOURS), k)
    if not hard:
        kind = rng.choice(SHAPES)
        img = _canvas([(kind, target, 32 + rng.uniform(-6, 6), 32 + rng.uniform(-6, 6), rng.uniform(26, 36))], rng)
        return img, "What colour is the shape?", target, ("What shape is it?", kind)
    n = rng.choice((2, 3))
    kinds = rng.sample(SHAPES, n)
    colours = [target] + rng.sample([c for c in COLOURS if c != target], n - 1)
    img = _canvas([(kd, c, x, y, rng.uniform(14, 18)) for kd, c, (x, y) in zip(kinds, colours, _grid(rng, n))], rng)
    return img, f"What colour is the {kinds[0]}?", target, None


def shape_q(rng, k, hard):
    target = _pick(SHAPES, k)
    if not hard:
        colour = rng.choice(list(COLOURS))
        img = _canvas([(target, colour, 32 + rng.uniform(-6, 6), 32 + rng.uniform(-6, 6), rng.uniform(26, 36))], rng)
        return img, "What shape is this?", target, ("What colour is it?", colour)
    n = rng.choice((2, 3))
    kinds = [target] + rng.sample([s for s in SHAPES if s != target], n - 1)
    colours = rng.sample(list(COLOURS), n)
    img = _canvas([(kd, c, x, y, rng.uniform(14, 18)) for kd, c, (x, y) in zip(kinds, colours, _grid(rng, n))], rng)
    return img, f"What shape is the {colours[0]} one?", target, None


def count_q(rng, k, hard):
    n = _pick((1, 2, 3, 4), k)
    if not hard:
        kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        img = _canvas([(kind, colour, x, y, rng.uniform(13, 17)) for x, y in _grid(rng, n)], rng)
        return img, "How many shapes are there?", str(n), None
    kind = rng.choice(SHAPES)
    others = [s for s in SHAPES if s != kind]
    kinds = [kind] * n + [rng.choice(others) for _ in range(rng.choice((1, 2)))]
    img = _canvas([(kd, rng.choice(list(COLOURS)), x, y, rng.uniform(13, 17))
                   for kd, (x, y) in zip(kinds, _grid(rng, len(kinds)))], rng)  # fmt: skip
    return img, f"How many {PLURAL[kind]} are there?", str(n), None


def position_q(rng, k, hard):
    side = _pick(SIDES, k)
    if not hard:
        kind = rng.choice(SHAPES)
        img = _canvas([(kind, rng.choice(list(COLOURS)), *_side_centre(rng, side), rng.uniform(18, 24))], rng)
        return img, f"Where is the {kind}?", side, None
    kinds = rng.sample(SHAPES, 2)
    colours = rng.sample(list(COLOURS), 2)
    img = _canvas([(kinds[0], colours[0], *_side_centre(rng, side), rng.uniform(16, 22)),
                   (kinds[1], colours[1], *_side_centre(rng, OPPOSITE[side]), rng.uniform(16, 22))], rng)  # fmt: skip
    return img, f"Where is the {colours[0]} {kinds[0]}?", side, None


def compare_q(rng, k, hard):
    if not hard:
        bigger = _pick(("left", "right"), k)
        kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        big, small = rng.uniform(26, 30), rng.uniform(9, 13)
        sizes = (big, small) if bigger == "left" else (small, big)
        img = _canvas([(kind, colour, 16 + rng.uniform(-2, 2), 32 + rng.uniform(-8, 8), sizes[0]),
                       (kind, colour, 48 + rng.uniform(-2, 2), 32 + rng.uniform(-8, 8), sizes[1])], rng)  # fmt: skip
        return img, "Which shape is bigger, the left or the right one?", bigger, None
    more = _pick(("circle", "square"), k)
    fewer = "square" if more == "circle" else "circle"
    n_more = rng.choice((2, 3, 4))
    n_fewer = rng.randint(1, n_more - 1)
    kinds = [more] * n_more + [fewer] * n_fewer
    img = _canvas([(kd, rng.choice(list(COLOURS)), x, y, rng.uniform(13, 17))
                   for kd, (x, y) in zip(kinds, _grid(rng, len(kinds)))], rng)  # fmt: skip
    return img, "Are there more circles or squares?", PLURAL[more], None


class _RealImages:
    """scikit-learn's digits (split by image) and sample photos, loaded once per generation."""

    def __init__(self, seed):
        from sklearn.datasets import load_digits, load_sample_images

        digits = load_digits()
        order = list(range(len(digits.target)))
        random.Random(f"digits-{seed}").shuffle(order)
        n_test = int(len(order) * DIGIT_FRACTIONS["test"])
        n_val = int(len(order) * DIGIT_FRACTIONS["validation"])
        pools = {"test": order[:n_test], "validation": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
        # per split and class, the images in a fixed shuffled order; drawn in rotation
        self.digits = {s: {c: [i for i in idx if digits.target[i] == c] for c in range(10)} for s, idx in pools.items()}
        self.digit_images = digits.images  # [N, 8, 8] values 0..16, ink bright on black
        self.photos = load_sample_images().images  # china.jpg (a building), flower.jpg

    def digit(self, split, rng, k):
        from PIL import Image

        c = k % 10
        pool = self.digits[split][c]
        idx = pool[(k // 10) % len(pool)]
        pixels = (self.digit_images[idx] * (255.0 / 16.0)).round().astype("uint8")
        return Image.fromarray(pixels, "L").resize((CANVAS, CANVAS), Image.BILINEAR), str(c)

    def scene(self, split, rng, k):
        from PIL import Image

        answer = _pick(("building", "flower"), k)
        photo = self.photos[0 if answer == "building" else 1]  # [427, 640, 3]
        H, W = photo.shape[:2]
        # crops from the left 60% for training and the right 40% for validation/test: no shared pixels
        x0, x1 = (0, int(W * 0.6)) if split == "train" else (int(W * 0.6), W)
        size = rng.randint(128, min(H, x1 - x0))
        x, y = rng.randint(x0, x1 - size), rng.randint(0, H - size)
        img = Image.fromarray(photo[y : y + size, x : x + size]).resize((CANVAS, CANVAS), Image.LANCZOS)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return img, answer


def text_q(rng, k, hard):
    if not hard:
        n = _pick(range(9), k)
        return None, f"What number comes after {n}?", str(n + 1), None
    big = _pick(range(1, 10), k)
    small = rng.randrange(big)
    a, b = (big, small) if rng.random() < 0.5 else (small, big)
    return None, f"Which is bigger, {a} or {b}?", str(big), None


SYNTHETIC = {"colour": colour_q, "shape": shape_q, "count": count_q, "position": position_q, "compare": compare_q}


# ------------------------------------------------------------------------------------------------------ splits


def _split_records(split, n, seed, real, images_dir, progress):
    """(records, {image file name: PNG bytes}) for one split; everything drawn from one seeded stream."""
    from tqdm import tqdm

    rng = random.Random(f"adallava-bundled-{seed}-{split}")
    counters: dict = {}
    records, pngs = [], {}
    text_hard = False
    for i in tqdm(range(n), desc=f"bundled {split}", disable=None if progress else True, leave=False):  # off when not a TTY
        qtype, difficulty = CYCLE[i % len(CYCLE)]
        if qtype == "text":  # alternate easy and hard text questions
            difficulty, text_hard = ("hard" if text_hard else "easy"), not text_hard
        key = (qtype, difficulty)
        k = counters[key] = counters.get(key, -1) + 1
        second = None
        if qtype in SYNTHETIC:
            img, question, answer, second = SYNTHETIC[qtype](rng, k, difficulty == "hard")
        elif qtype == "digit":
            img, answer = real.digit(split, rng, k)
            question = "What digit is this?"
        elif qtype == "scene":
            img, answer = real.scene(split, rng, k)
            question = "What is in the picture?"
        else:
            img, question, answer, _ = text_q(rng, k, difficulty == "hard")
        rid = f"{split}-{i:05d}"
        record = {"id": rid}
        if img is not None:
            name = f"{rid}.png"
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            pngs[name] = buf.getvalue()
            record["image"] = f"{images_dir}/{name}"
            question = "<image>\n" + question
        convs = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        # a quarter of the easy single-shape training records ask a second question about the same image
        if second is not None and split == "train" and rng.random() < 0.25:
            convs += [{"from": "human", "value": second[0]}, {"from": "gpt", "value": second[1]}]
        record.update(conversations=convs, question_type=qtype, difficulty=difficulty, answer=answer)
        records.append(record)
    # shuffle so a sequential reader does not see the family cycle (ids keep the generation order)
    order = list(range(n))
    rng.shuffle(order)
    return [records[j] for j in order], pngs


def _write(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a half-written file never looks finished


def _images_present(out: Path, json_paths) -> bool:
    try:
        return all((out / r["image"]).is_file() for p in json_paths for r in json.loads(p.read_text()) if "image" in r)
    except (ValueError, KeyError, TypeError):
        return False


def generate_bundled(out_dir, seed: int = 0, num_train: int = 2000, num_validation: int = 200, num_test: int = 400,
                     progress: bool = True) -> dict:  # fmt: skip
    """Write out_dir/{train,validation,test}.json (LLaVA conversation format) and their PNGs under out_dir/images/.
    Same arguments, same bytes. Skips the work when out_dir/manifest.json records the same seed, sizes and generator
    version and the files are there. Returns {"train": Path, "validation": Path, "test": Path}."""
    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    for split, n in sizes.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"num_{split} must be a non-negative integer, got {n!r}")
    out = Path(out_dir)
    paths = {split: out / f"{split}.json" for split in SPLITS}
    manifest_path = out / "manifest.json"
    wanted = {"generator": "adallava.data.bundled", "version": GENERATOR_VERSION, "seed": seed, "sizes": sizes}
    if manifest_path.is_file() and all(p.is_file() for p in paths.values()):
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = {}
        if {k: old.get(k) for k in wanted} == wanted and _images_present(out, paths.values()):
            return paths
    images_dir = "images"
    (out / images_dir).mkdir(parents=True, exist_ok=True)
    real = _RealImages(seed)
    summary = {}
    for split in SPLITS:
        records, pngs = _split_records(split, sizes[split], seed, real, images_dir, progress)
        for name, data in pngs.items():
            _write(out / images_dir / name, data)
        _write(paths[split], json.dumps(records, indent=1).encode())
        types: dict = {}
        for r in records:
            types[r["question_type"]] = types.get(r["question_type"], 0) + 1
        summary[split] = {"records": len(records), "images": len(pngs), "question_types": types}
    # written last: its presence means every split above is complete
    _write(manifest_path, json.dumps({**wanted, "splits": summary}, indent=1).encode())
    return paths


def main(argv=None):
    """key=value overrides: out_dir, seed, num_train, num_validation, num_test."""
    args = {"out_dir": "data/bundled"}
    for a in argv if argv is not None else sys.argv[1:]:
        if a in ("-h", "--help"):
            print(__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])
            return
        key, sep, value = a.partition("=")
        if not sep or key not in ("out_dir", "seed", "num_train", "num_validation", "num_test"):
            raise SystemExit(f"unknown argument {a!r}; use key=value with out_dir, seed, num_train, num_validation, "
                             "num_test")  # fmt: skip
        args[key] = value if key == "out_dir" else int(value)
    import time

    t0 = time.perf_counter()
    paths = generate_bundled(**args)
    print(json.dumps(json.loads((Path(args["out_dir"]) / "manifest.json").read_text())["splits"], indent=1))
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
