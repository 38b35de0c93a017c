"""BadRecordReport: what was skipped, why, and which records, so nothing is dropped silently."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_EXAMPLES = 5  # ids kept per reason: enough to find the records, small enough to log and to ship between workers


@dataclass
class BadRecordReport:
    """Counts of skipped records by reason, with up to MAX_EXAMPLES example ids each.

    total: records seen (for a dataset: records in the file, unparsable JSON lines included; for a collator: items it
    was handed). kept: total minus everything counted as bad.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    total: int = 0

    @property
    def kept(self) -> int:
        return self.total - sum(self.counts.values())

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, record_id: str | None = None, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        examples = self.examples.setdefault(reason, [])
        if record_id is not None and len(examples) < MAX_EXAMPLES:
            examples.append(str(record_id))

    def merge(self, other: "BadRecordReport") -> "BadRecordReport":
        """Adds other's counts into this report (in place) and returns it, so both `a.merge(b)` and
        `total = a.merge(b)` read naturally when reports from several workers or files are combined."""
        self.total += other.total
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
        for reason, ids in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(i for i in ids[: MAX_EXAMPLES - len(mine)])
        return self

    def as_dict(self) -> dict:
        return {
            "total": self.total, "kept": self.kept, "skipped": self.skipped, "counts": dict(self.counts),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> "BadRecordReport":
        return cls(counts=dict(d.get("counts", {})), examples={k: list(v) for k, v in d.get("examples", {}).items()},
                   total=int(d.get("total", 0)))  # fmt: skip

    def summary(self) -> str:
        head = f"kept {self.kept} of {self.total} records"
        if not self.counts:
            return head + "; nothing skipped"
        parts = []
        for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            ids = self.examples.get(reason, [])
            parts.append(f"{reason}: {n}" + (f" (e.g. {', '.join(ids)})" if ids else ""))
        return f"{head}; skipped {self.skipped}: " + "; ".join(parts)

    def __str__(self) -> str:
        return self.summary()
