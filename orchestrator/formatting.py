"""How accuracy reads wherever a person reads it (consoles, the report): points, and a mean over one value says so
instead of `± 0.00` or `± nan`. Display only: MLflow metrics and `dataframe()` stay fractions, as old ledgers hold."""

from __future__ import annotations

import math


def mean_std(mean: float, std: float, n: int | None = None) -> str:
    """`mean ± std`, or `mean (n=1)` when it is one value (`n` 1, or no std); '' when there is no mean."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    if n == 1 or std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.2f} (n=1)"
    return f"{mean:.2f} ± {std:.2f}"


def metric_text(key: str, value: float) -> str:
    """One metric as a console line shows it: an accuracy (`*_acc`) in points with a % sign, the rest as is."""
    return f"{100 * value:.2f}%" if key.endswith("_acc") else f"{value:.4g}"
