"""Table cells of BENCHMARKS.md: every figure beside its spread, and "beats" only beyond the spread."""

from __future__ import annotations

import math


def _with_std(row: dict | None, key: str, digits: int) -> str:
    if not row or row.get(key) is None:
        return "–"
    std = row.get(f"{key}_std")
    return f"{row[key]:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def fid(row: dict | None) -> str:
    """FID ± its spread (when the row was measured with one)."""
    return _with_std(row, "fid", 3)


def acc(row: dict | None) -> str:
    """Conditional accuracy ± its spread."""
    return _with_std(row, "cond_accuracy", 3)


def gap(a: dict, b: dict, key: str = "fid") -> tuple[float, float | None]:
    """(b − a, the spread of that difference √(std_a² + std_b²), None when either has none)."""
    sa, sb = a.get(f"{key}_std"), b.get(f"{key}_std")
    return b[key] - a[key], None if sa is None or sb is None else math.hypot(sa, sb)


def verdict(a: dict, b: dict, key: str = "fid") -> str:
    """Whether ``a`` is lower (better) than ``b`` on ``key`` by more than the spread of the difference:
    "wins", "loses", "within the spread", or "no spread measured"."""
    diff, spread = gap(a, b, key)
    if spread is None:
        return "no spread measured"
    if abs(diff) <= spread:
        return "within the spread"
    return "wins" if diff > 0 else "loses"


def ratio(row: dict, ref: dict, key: str = "fid") -> tuple[float, float | None]:
    """(row / ref on ``key``, its spread by first-order propagation r·√((σ_a/a)² + (σ_b/b)²); None when either
    row has no spread)."""
    r = row[key] / ref[key]
    sa, sb = row.get(f"{key}_std"), ref.get(f"{key}_std")
    return r, None if sa is None or sb is None else r * math.hypot(sa / row[key], sb / ref[key])


def ratio_cell(row: dict, ref: dict, key: str = "fid") -> str:
    """"1.23× ± 0.10" (or "1.23×" where no spread was measured)."""
    r, std = ratio(row, ref, key)
    return f"{r:.2f}×" + ("" if std is None else f" ± {std:.2f}")


def target_verdict(row: dict, ref: dict, target: float, key: str = "fid") -> str:
    """Whether row/ref ≤ ``target``: "holds" or "does not hold" when the ratio's spread is clear of the target,
    "not shown (within the spread)" when the target lies inside ratio ± spread."""
    r, std = ratio(row, ref, key)
    if std is not None and abs(r - target) <= std:
        return "not shown (within the spread)"
    return "holds" if r <= target else "does not hold"


def target_met(row: dict, ref: dict, target: float, key: str = "fid") -> str:
    """A table's target cell for row/ref ≤ ``target``: "met", "missed", or "not shown (within the spread)"."""
    return {"holds": "met", "does not hold": "missed"}.get(target_verdict(row, ref, target, key),
                                                          "not shown (within the spread)")


def teacher_rows(quality: dict[str, list[dict]], teacher: str) -> list[tuple[str, dict]]:
    """Every (sampler, row) measured of ``teacher`` in "model/sampler" → rows."""
    return [(key.split("/", 1)[1], r) for key, found in quality.items() if key.split("/")[0] == teacher for r in found]


def teacher_best(quality: dict[str, list[dict]], teacher: str) -> tuple[str, dict] | None:
    """The teacher's best: its lowest FID over every sampler and step count measured ("model/sampler" →
    rows), as ("sampler, N steps", row); None when nothing of it was measured."""
    rows = teacher_rows(quality, teacher)
    if not rows:
        return None
    sampler, row = min(rows, key=lambda sr: sr[1]["fid"])
    return f"{sampler}, {row['steps']} steps", row
