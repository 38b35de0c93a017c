"""Short-answer scoring by normalised match (the VQA convention, kept simple: the bundled answers are one word)."""

from __future__ import annotations

import re
import string

_NUMBER_WORDS = {
    "zero": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13",
    "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19",
    "twenty": "20",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# Punctuation becomes a space, except a point between digits ("3.5") which is part of the number.
_PUNCT = re.compile("[" + re.escape(string.punctuation.replace(".", "")) + "]|(?<!\\d)\\.|\\.(?!\\d)")


def normalize_answer(text: str) -> list[str]:
    """Lower-case words with punctuation and articles removed and number words as digits."""
    words = _PUNCT.sub(" ", str(text).lower()).split()
    return [_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES]


def score_answer(prediction: str, gold: str) -> bool:
    """True when the prediction's first normalised word(s) equal the normalised gold answer: "Red." and "the red
    one" match "red"; "two" matches "2"; "reddish" does not match "red"."""
    g = normalize_answer(gold)
    p = normalize_answer(prediction)
    return p[: len(g)] == g if g else not p
