"""Mean and spread over seeds, formatted for the reproduction tables."""
from __future__ import annotations

import statistics


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation; the deviation is None for a single value (no spread is known)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_mean_std(values: list[float], digits: int = 2) -> str:
    """"m ± s" over several seeds; "m (1 seed)" for one value, never a made-up "± 0.00"."""
    m, s = mean_std(values)
    return f"{m:.{digits}f} (1 seed)" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"
