"""The statistics a reviewer expects beside a mean: intervals, paired tests, seed spread, honest selection.

Every function works on per-case (or per-seed) values and refuses NaN: a missing value has to be decided
by the caller (a failed case scores 0, or is dropped from both methods), never silently by an average.

    from stats import bootstrap_ci, paired_difference, verdict
    mean, low, high = bootstrap_ci(dsc_per_case)
    result = paired_difference(project_rows, peer_rows)  # {case id: value} mappings, or aligned sequences
    print(verdict(result, "project", "MONAI"))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import stats as scipy_stats

from utils import bootstrap_p_value

ALPHA = 0.05


class Interval(NamedTuple):
    """A mean and the bounds of its confidence interval."""

    mean: float
    low: float
    high: float


class Spread(NamedTuple):
    """Mean and sample standard deviation (NaN for a single value) over seeds."""

    mean: float
    std: float


@dataclass(frozen=True)
class PairedDifference:
    """The mean difference a − b over the same cases, its paired-bootstrap interval and two p-values."""

    mean_difference: float
    low: float
    high: float
    bootstrap_p: float
    wilcoxon_p: float
    cases: int
    level: float


def finite_values(values: Sequence[float], what: str = "values") -> np.ndarray:
    """The values as a 1-D float array; ValueError when empty or when any is NaN or infinite."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{what} is empty")
    missing = np.flatnonzero(~np.isfinite(array))
    if missing.size:
        raise ValueError(
            f"{what} holds NaN or infinity at positions {missing.tolist()}: decide what a missing value "
            "means (e.g. score 0, or drop the case from both methods) before computing statistics"
        )
    return array


def check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")


def bootstrap_means(values: np.ndarray, iterations: int, seed: int) -> np.ndarray:
    """Means of `iterations` resamples of `values` with replacement, from a seeded generator."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, values.size, size=(iterations, values.size))
    return values[picks].mean(axis=1)


def percentile_bounds(means: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, iterations: int = 10000, seed: int = 0
) -> Interval:
    """The mean over cases and its percentile-bootstrap confidence interval (seeded, so reproducible).

    NaN is an error; a single value (or identical values) gives a zero-width interval at that value.
    """
    check_level(level)
    array = finite_values(values)
    low, high = percentile_bounds(bootstrap_means(array, iterations, seed), level)
    return Interval(float(array.mean()), low, high)


def aligned_pairs(
    a: Mapping[str, float] | Sequence[float], b: Mapping[str, float] | Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-case values of both methods in the same case order.

    Mappings (case id → value) are aligned by id and must hold the same ids; sequences must have the
    same length and are taken to be in the same case order already.
    """
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise TypeError("pass both methods as {case id: value} mappings, or both as sequences")
    if isinstance(a, Mapping):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        if only_a or only_b:
            raise ValueError(
                f"the methods were scored on different cases: only in a {only_a}, only in b {only_b}"
            )
        cases = sorted(a)
        a, b = [a[case] for case in cases], [b[case] for case in cases]
    if len(a) != len(b):
        raise ValueError(f"paired values need the same cases: {len(a)} values against {len(b)}")
    return finite_values(a, "a"), finite_values(b, "b")


def wilcoxon_p_value(a: np.ndarray, b: np.ndarray) -> float:
    """scipy's Wilcoxon signed-rank p-value of a − b; 1.0 when every difference is zero."""
    if np.all(a == b):
        return 1.0
    return float(scipy_stats.wilcoxon(a, b).pvalue)


def paired_difference(
    a: Mapping[str, float] | Sequence[float],
    b: Mapping[str, float] | Sequence[float],
    level: float = 0.95,
    iterations: int = 10000,
    seed: int = 0,
) -> PairedDifference:
    """Compare two methods scored on the same cases: mean of a − b, paired-bootstrap interval and p-values.

    The bootstrap resamples cases (each resample keeps a case's two values together).
    """
    check_level(level)
    first, second = aligned_pairs(a, b)
    differences = first - second
    means = bootstrap_means(differences, iterations, seed)
    low, high = percentile_bounds(means, level)
    return PairedDifference(
        mean_difference=float(differences.mean()),
        low=low,
        high=high,
        bootstrap_p=bootstrap_p_value(means),
        wilcoxon_p=wilcoxon_p_value(first, second),
        cases=int(differences.size),
        level=level,
    )


def format_p(p: float) -> str:
    """Three decimals; four near 0.05, so that 0.0496 is not printed as 0.050 beside a claim."""
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.4f}" if 0.04 <= p < 0.06 else f"p = {p:.3f}"


def verdict(
    result: PairedDifference,
    name_a: str = "A",
    name_b: str = "B",
    alpha: float = ALPHA,
    higher_is_better: bool = True,
    test: str = "wilcoxon",
) -> str:
    """One line: "A better than B (p = …)", "B better than A (p = …)" or "no significant difference (p = …)".

    The p-value is the Wilcoxon signed-rank test's (`test="bootstrap"`: the paired bootstrap's); the
    direction is the sign of the mean difference a − b, read with `higher_is_better`. A difference is
    claimed only where the test and the paired-bootstrap interval of the mean difference agree: the signed
    ranks can favour A while one large loss makes the mean favour B, and then neither is claimed.
    """
    if test not in ("wilcoxon", "bootstrap"):
        raise ValueError(f"test must be 'wilcoxon' or 'bootstrap', got {test!r}")
    p = result.wilcoxon_p if test == "wilcoxon" else result.bootstrap_p
    if p >= alpha or result.mean_difference == 0.0:
        return f"no significant difference ({format_p(p)})"
    if result.low <= 0.0 <= result.high:
        return f"no significant difference ({format_p(p)}, but the interval of the mean difference holds 0)"
    a_wins = (result.mean_difference > 0) == higher_is_better
    better, worse = (name_a, name_b) if a_wins else (name_b, name_a)
    return f"{better} better than {worse} ({format_p(p)})"


def seed_spread(values_per_seed: Mapping[int, float] | Sequence[float]) -> Spread:
    """Mean and sample standard deviation (ddof 1) of one figure over seeds; std is NaN for one seed."""
    values = values_per_seed.values() if isinstance(values_per_seed, Mapping) else values_per_seed
    array = finite_values(list(values), "values_per_seed")
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return Spread(float(array.mean()), std)


def validation_score(record: Mapping, key: str | Callable[[Mapping], float]) -> float:
    """A record's validation score: a number, or the mean of a list (per-case or per-fold values)."""
    value = key(record) if callable(key) else record[key]
    score = float(value) if np.ndim(value) == 0 else finite_values(value, "validation values").mean()
    if math.isnan(score):
        raise ValueError(f"record {record.get('config', '?')!r} has a NaN validation score")
    return float(score)


def choose_by_validation(
    records: Sequence[Mapping],
    key: str | Callable[[Mapping], float] = "best_val_dsc",
    name: str = "config",
    higher_is_better: bool = True,
) -> Mapping:
    """The record with the best validation (or cross-validation) score; test figures are never read.

    `key` names the validation field (a number, or a list of per-case / per-fold values that is
    averaged) or computes the score from a record; a key naming a test field is refused. Ties go to the
    record whose `name` sorts first, so the choice does not depend on the order of the records.
    """
    if not records:
        raise ValueError("no records to choose from")
    if isinstance(key, str) and "test" in key.lower():
        raise ValueError(f"refusing to select by {key!r}: choose with validation figures, report test ones")
    sign = -1.0 if higher_is_better else 1.0
    return min(records, key=lambda record: (sign * validation_score(record, key), str(record[name])))
