"""Mutation score per module (and per modeling function) from mutmut's results in mutants/ (after `make mutate`).

    python tests/mutation/score.py            # a table: killed / checked, survived, not checked, score
    python tests/mutation/score.py --survived # also the names of the surviving mutants (see equivalent.md)
    python tests/mutation/score.py --min 90 adallava.budget adallava.scheduler  # exit 1 unless each named module
        # (a prefix of the first column) scores >= 90% with every mutant checked; no name: every module run

A mutant counts as killed when a test failed (or timed out: a mutant that makes the code loop forever is caught);
"no tests" (no selected test runs that function) and "not checked" (outside the run's selection) are shown apart and
left out of the score.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "mutants"
KILLED = {1, 3, 36, 24, -24, 152, 255}  # failed, pytest internal error, timeouts
SURVIVED = {0}
NO_TESTS = {5, 33}
# modeling: only its plan/cache paths are in the run (the Makefile's MUTATE names them)
PLAN_CACHE = ("_full_weights", "_sliced_weights", "_groups_for_layer", "_run_layer", "resolve_budget",
              "latency_token")  # fmt: skip


def group_of(key: str) -> str:
    module, _, rest = key.partition(".x")
    if module == "adallava.modeling":
        fn = re.sub(r"__mutmut_\d+$", "", rest).split("ǁ")[-1].lstrip("_") if "ǁ" in rest else \
            re.sub(r"__mutmut_\d+$", "", rest).lstrip("_")  # fmt: skip
        return f"adallava.modeling ({'plan/cache' if fn.lstrip('_') in [p.lstrip('_') for p in PLAN_CACHE] else 'other'})"
    return module


def main(argv: list[str]) -> int:
    minimum, named = None, []
    args = iter(argv)
    for a in args:
        if a == "--min":
            minimum = float(next(args))
        elif not a.startswith("--"):
            named.append(a)
    rows = defaultdict(lambda: {"killed": 0, "survived": 0, "no_tests": 0, "unchecked": 0, "other": 0})
    survivors = defaultdict(list)
    for meta in sorted(ROOT.rglob("*.py.meta")):
        for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            r = rows[group_of(key)]
            if code is None:
                r["unchecked"] += 1
            elif code in KILLED:
                r["killed"] += 1
            elif code in SURVIVED:
                r["survived"] += 1
                survivors[group_of(key)].append(key)
            elif code in NO_TESTS:
                r["no_tests"] += 1
            else:
                r["other"] += 1
    print(f"{'module':38} {'killed':>7} {'survived':>8} {'no tests':>8} {'unchecked':>9} {'score':>6}")
    for name, r in sorted(rows.items()):
        checked = r["killed"] + r["survived"] + r["other"]
        score = f"{100 * r['killed'] / checked:5.1f}%" if checked else "    -"
        print(f"{name:38} {r['killed']:7d} {r['survived']:8d} {r['no_tests']:8d} {r['unchecked']:9d} {score:>6}")
    if "--survived" in argv:
        for name, keys in sorted(survivors.items()):
            print(f"\n{name}:")
            for k in keys:
                print("  ", k)
    if minimum is None:
        return 0
    # a module is held to the target when named, or (no names) when any of its mutants was checked; modeling's
    # functions outside plan/cache are never in the selection
    held = [n for n in rows if any(n.startswith(p) for p in named)] if named else \
        [n for n, r in rows.items() if r["killed"] + r["survived"] + r["other"] and not n.endswith("(other)")]  # fmt: skip
    missing = [p for p in named if not any(n.startswith(p) for n in rows)]
    failed = [f"{p}: no results (run mutmut first)" for p in missing]
    for n in held:
        r = rows[n]
        checked = r["killed"] + r["survived"] + r["other"]
        if r["unchecked"]:
            failed.append(f"{n}: {r['unchecked']} mutants not checked (the run did not finish)")
        elif not checked or 100 * r["killed"] / checked < minimum:
            failed.append(f"{n}: score below {minimum:g}% ({r['killed']}/{checked} killed)")
    for f in failed:
        print(f"mutation score: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
