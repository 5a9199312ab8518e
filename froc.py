"""Lung-nodule detection scoring as LUNA16 does it: FROC curve, CPM score and bootstrap intervals.

Everything works in world millimetres, the coordinates of the challenge's CSV files. The rules follow
the challenge's evaluation script (noduleCADEvaluationLUNA16.py: evaluateCAD, computeFROC,
computeFROC_bootstrap), so that a submission scores here what the challenge publishes; each function
says where it deviates (only in degenerate cases the script turns into NaN).

A candidate hits a finding when its centre lies strictly closer than the finding's radius
(diameter / 2) to the finding's centre. Per nodule, the most probable hit is the true positive; the
other hits are ignored; hits on irrelevant findings (annotations_excluded.csv) are ignored; every
other candidate is a false positive. A FROC point keeps the candidates with probability >= t.
"""

import csv
import math
from collections import Counter, defaultdict
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from utils import bootstrap_p_value

# False positives per scan at which the challenge reads the sensitivity; the CPM is their mean.
OPERATING_POINTS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# Diameter the script assumes for a finding whose diameter is unknown (negative, -1 in the files).
DEFAULT_DIAMETER_MM = 10.0
# The challenge scores only the 100 most probable candidates of each scan.
MAX_MARKS_PER_SCAN = 100

FINDING_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
# Fine grid (log-spaced, for a log axis) on which the bootstrap band is drawn.
BAND_FP_PER_SCAN = np.geomspace(OPERATING_POINTS[0], OPERATING_POINTS[-1], 201)


@dataclass(frozen=True)
class Finding:
    """A nodule (annotations.csv) or an irrelevant finding (annotations_excluded.csv), in world mm.

    A negative diameter means unknown; such a finding is hit within DEFAULT_DIAMETER_MM / 2.
    """

    seriesuid: str
    x: float
    y: float
    z: float
    diameter_mm: float
    where: str = field(default="", compare=False)  # "file, line N", for errors about the finding

    @property
    def hit_radius_mm(self) -> float:
        diameter = DEFAULT_DIAMETER_MM if self.diameter_mm < 0 else self.diameter_mm
        return diameter / 2.0


@dataclass(frozen=True)
class Candidate:
    """One detection (CAD mark) of a submission, in world mm, with its degree of suspicion."""

    seriesuid: str
    x: float
    y: float
    z: float
    probability: float


class Outcome(StrEnum):
    """What the scoring made of a candidate."""

    TRUE_POSITIVE = "tp"
    FALSE_POSITIVE = "fp"
    DUPLICATE = "ignored-duplicate"  # hits a nodule that a more probable candidate already detects
    EXCLUDED = "ignored-excluded"  # hits an irrelevant finding only
    OVER_LIMIT = "ignored-over-limit"  # not among the max_marks_per_scan most probable of its scan


@dataclass(frozen=True)
class Matching:
    """Per-candidate outcomes (input order) and, per nodule, the index of its true positive (None: missed)."""

    outcomes: tuple[Outcome, ...]
    detections: tuple[int | None, ...]


@dataclass(frozen=True)
class Bootstrap:
    """Bootstrap over scans: mean and interval of the seven sensitivities, the CPM and a band for plots.

    Bounds are order statistics of the resampled values, taken as the script takes them.
    """

    iterations: int
    seed: int
    confidence: float
    samples_used: int  # resamples holding at least one nodule; the others have no sensitivity
    sensitivities_mean: np.ndarray
    sensitivities_lower: np.ndarray
    sensitivities_upper: np.ndarray
    cpm_mean: float
    cpm_lower: float
    cpm_upper: float
    band_fp_per_scan: np.ndarray
    band_mean: np.ndarray
    band_lower: np.ndarray
    band_upper: np.ndarray


@dataclass(frozen=True)
class FrocResult:
    """FROC curve (one point per distinct threshold, from (0, 0)), its seven sensitivities and the CPM."""

    fp_per_scan: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray  # probability threshold of each curve point; inf for (0, 0)
    sensitivities: np.ndarray  # at OPERATING_POINTS
    cpm: float
    n_scans: int
    n_nodules: int
    n_detected: int
    n_candidates: int  # candidates on the evaluated scans
    n_false_positives: int
    n_duplicates: int
    n_excluded_hits: int
    n_over_limit: int
    n_outside_series: int  # candidates on scans not evaluated, left out as the script does
    bootstrap: Bootstrap | None = None
    operating_points: tuple[float, ...] = OPERATING_POINTS


# ----------------------------------------------------------------------------------------------
# CSV files
# ----------------------------------------------------------------------------------------------


class CsvFormatError(ValueError):
    """A malformed LUNA16 CSV file; the message names the file and the line."""


def _rows(path: Path, columns: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield ("file, line N", {column: text}) per non-blank row; columns are found by header name."""
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in columns if name not in header]
        if missing:
            raise CsvFormatError(
                f"{path}, line 1: header {','.join(header) or '(empty)'} lacks {', '.join(missing)}; "
                f"expected the columns {','.join(columns)}"
            )
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise CsvFormatError(f"{where}: {len(row)} values for the {len(header)} header columns")
            yield where, {name: row[header.index(name)].strip() for name in columns}


def _number(text: str, column: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CsvFormatError(f"{where}: {column} is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise CsvFormatError(f"{where}: {column} is {text!r}; values must be finite")
    return value


def _seriesuid(text: str, where: str, known_series: Collection[str] | None) -> str:
    if not text:
        raise CsvFormatError(f"{where}: seriesuid is empty")
    if known_series is not None and text not in known_series:
        raise CsvFormatError(f"{where}: series {text} has no scan (not among the known series)")
    return text


def _read_findings(
    path: str | Path, known_series: Collection[str] | None, unknown_diameter_allowed: bool
) -> list[Finding]:
    findings = []
    for where, cells in _rows(Path(path), FINDING_COLUMNS):
        uid = _seriesuid(cells["seriesuid"], where, known_series)
        x, y, z = (_number(cells[c], c, where) for c in ("coordX", "coordY", "coordZ"))
        if unknown_diameter_allowed:
            diameter = (
                -1.0 if cells["diameter_mm"] == "" else _number(cells["diameter_mm"], "diameter_mm", where)
            )
        else:
            diameter = _number(cells["diameter_mm"], "diameter_mm", where)
            if diameter <= 0:
                raise CsvFormatError(
                    f"{where}: diameter_mm is {cells['diameter_mm']}; a nodule's diameter must be positive "
                    "(only irrelevant findings may leave it unknown)"
                )
        findings.append(Finding(uid, x, y, z, diameter, where))
    return findings


def read_annotations(path: str | Path, known_series: Collection[str] | None = None) -> list[Finding]:
    """The nodules of annotations.csv (seriesuid,coordX,coordY,coordZ,diameter_mm; positive diameters).

    With `known_series` (the scans present), a row on any other series is an error. Scans without
    nodules simply have no rows.
    """
    return _read_findings(path, known_series, unknown_diameter_allowed=False)


def read_excluded(path: str | Path, known_series: Collection[str] | None = None) -> list[Finding]:
    """The irrelevant findings of annotations_excluded.csv (same columns as annotations.csv).

    The file marks an unknown diameter with -1; a negative or empty diameter_mm is read as -1, which
    the matching treats as DEFAULT_DIAMETER_MM, as the script does.
    """
    return _read_findings(path, known_series, unknown_diameter_allowed=True)


def read_candidates(path: str | Path, known_series: Collection[str] | None = None) -> list[Candidate]:
    """A candidates or submission file (seriesuid,coordX,coordY,coordZ,probability), in file order."""
    candidates = []
    for where, cells in _rows(Path(path), CANDIDATE_COLUMNS):
        uid = _seriesuid(cells["seriesuid"], where, known_series)
        x, y, z, probability = (_number(cells[c], c, where) for c in CANDIDATE_COLUMNS[1:])
        candidates.append(Candidate(uid, x, y, z, probability))
    return candidates


def read_series(path: str | Path) -> list[str]:
    """The evaluated scans, seriesuids.csv: one series UID per line (first column), no header needed."""
    path = Path(path)
    series: list[str] = []
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        for row in reader:
            uid = row[0].strip() if row else ""
            if not uid or (uid == "seriesuid" and reader.line_num == 1):
                continue
            if uid in series:
                raise CsvFormatError(f"{path}, line {reader.line_num}: series {uid} is listed twice")
            series.append(uid)
    return series


def write_candidates(candidates: Sequence[Candidate], path: str | Path) -> Path:
    """Write a submission file the challenge's script reads; floats keep every digit. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CANDIDATE_COLUMNS)
        for c in candidates:
            writer.writerow([c.seriesuid, repr(c.x), repr(c.y), repr(c.z), repr(c.probability)])
    return path


# ----------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------


def _indices_by_series(items: Sequence[Candidate | Finding]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[item.seriesuid].append(index)
    return groups


def _most_probable(indices: list[int], candidates: Sequence[Candidate], limit: int | None) -> list[int]:
    """The candidates the script keeps on a crowded scan: probability above the (limit + 1)-th highest.

    Ties at that probability are all dropped, so a scan may keep fewer than `limit`.
    """
    if limit is None or len(indices) <= limit:
        return indices
    cutoff = sorted((candidates[i].probability for i in indices), reverse=True)[limit]
    return [i for i in indices if candidates[i].probability > cutoff]


def _inside(findings: list[Finding], candidates: list[Candidate]) -> np.ndarray:
    """(findings, candidates) booleans: squared centre distance strictly below the squared radius."""
    centres = np.array([(f.x, f.y, f.z) for f in findings], dtype=np.float64).reshape(-1, 3)
    points = np.array([(c.x, c.y, c.z) for c in candidates], dtype=np.float64).reshape(-1, 3)
    delta = centres[:, None, :] - points[None, :, :]
    squared = delta[..., 0] ** 2 + delta[..., 1] ** 2 + delta[..., 2] ** 2
    radii = np.array([f.hit_radius_mm for f in findings], dtype=np.float64)
    return squared < (radii**2)[:, None]


def match_candidates(
    candidates: Sequence[Candidate],
    annotations: Sequence[Finding],
    excluded: Sequence[Finding] = (),
    max_marks_per_scan: int | None = MAX_MARKS_PER_SCAN,
) -> Matching:
    """Match candidates to nodules per scan with the challenge's rules (see the module docstring).

    A candidate inside two nodules detects both, as in the script (which only warns about it). The
    true positive of a nodule is its most probable hit, the first in input order on a tie. A hit on a
    nodule outranks a hit on an irrelevant finding. `max_marks_per_scan` is the challenge's cap (None: off).
    """
    outcomes = [Outcome.OVER_LIMIT] * len(candidates)
    detections: list[int | None] = [None] * len(annotations)
    nodules_by_series = _indices_by_series(annotations)
    excluded_by_series = _indices_by_series(excluded)
    for uid, indices in _indices_by_series(candidates).items():
        kept = _most_probable(indices, candidates, max_marks_per_scan)
        scan_candidates = [candidates[i] for i in kept]
        nodule_indices = nodules_by_series.get(uid, [])
        in_nodule = _inside([annotations[n] for n in nodule_indices], scan_candidates)
        in_excluded = _inside([excluded[e] for e in excluded_by_series.get(uid, [])], scan_candidates)
        probabilities = np.array([c.probability for c in scan_candidates])
        true_positives = set()
        for row, nodule in zip(in_nodule, nodule_indices, strict=True):
            if row.any():
                hits = np.flatnonzero(row)
                best = int(hits[np.argmax(probabilities[hits])])
                true_positives.add(best)
                detections[nodule] = kept[best]
        for position, index in enumerate(kept):
            if position in true_positives:
                outcomes[index] = Outcome.TRUE_POSITIVE
            elif in_nodule[:, position].any():
                outcomes[index] = Outcome.DUPLICATE
            elif in_excluded[:, position].any():
                outcomes[index] = Outcome.EXCLUDED
            else:
                outcomes[index] = Outcome.FALSE_POSITIVE
    return Matching(tuple(outcomes), tuple(detections))


# ----------------------------------------------------------------------------------------------
# FROC
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Marks:
    """What the FROC needs: the scored marks (detected nodules and false positives) sorted by
    decreasing probability, the last mark of each run of equal probability, and nodules per scan."""

    probability: np.ndarray
    is_true_positive: np.ndarray
    scan: np.ndarray
    run_ends: np.ndarray
    nodules_per_scan: np.ndarray
    counts: dict[str, int]


def _check_series(series: Sequence[str]) -> list[str]:
    series = list(series)
    if not series:
        raise ValueError("series must name at least one evaluated scan")
    repeated = sorted(uid for uid, count in Counter(series).items() if count > 1)
    if repeated:
        raise ValueError(f"series lists scans more than once: {repeated}")
    return series


def _run_ends(descending: np.ndarray) -> np.ndarray:
    """Index of the last value of each run of equal values: one FROC point per distinct threshold."""
    if len(descending) == 0:
        return np.array([], dtype=np.int64)
    return np.flatnonzero(np.append(descending[1:] != descending[:-1], True))


def _marks(
    candidates: Sequence[Candidate],
    annotations: Sequence[Finding],
    excluded: Sequence[Finding],
    series: Sequence[str],
    max_marks_per_scan: int | None,
) -> _Marks:
    """Score the evaluated scans; findings and candidates on other scans are left out, as in the script."""
    scan_of = {uid: index for index, uid in enumerate(_check_series(series))}
    evaluated = [c for c in candidates if c.seriesuid in scan_of]
    nodules = [f for f in annotations if f.seriesuid in scan_of]
    matching = match_candidates(
        evaluated, nodules, [f for f in excluded if f.seriesuid in scan_of], max_marks_per_scan
    )
    marks = [
        (evaluated[d].probability, True, scan_of[n.seriesuid])
        for n, d in zip(nodules, matching.detections, strict=True)
        if d is not None
    ]
    marks += [
        (c.probability, False, scan_of[c.seriesuid])
        for c, outcome in zip(evaluated, matching.outcomes, strict=True)
        if outcome is Outcome.FALSE_POSITIVE
    ]
    marks.sort(key=lambda mark: -mark[0])
    probability = np.array([m[0] for m in marks], dtype=np.float64)
    nodules_per_scan = np.bincount([scan_of[n.seriesuid] for n in nodules], minlength=len(scan_of))
    counts = {
        "n_scans": len(scan_of),
        "n_nodules": len(nodules),
        "n_detected": sum(d is not None for d in matching.detections),
        "n_candidates": len(evaluated),
        "n_false_positives": matching.outcomes.count(Outcome.FALSE_POSITIVE),
        "n_duplicates": matching.outcomes.count(Outcome.DUPLICATE),
        "n_excluded_hits": matching.outcomes.count(Outcome.EXCLUDED),
        "n_over_limit": matching.outcomes.count(Outcome.OVER_LIMIT),
        "n_outside_series": len(candidates) - len(evaluated),
    }
    return _Marks(
        probability=probability,
        is_true_positive=np.array([m[1] for m in marks], dtype=bool),
        scan=np.array([m[2] for m in marks], dtype=np.int64),
        run_ends=_run_ends(probability),
        nodules_per_scan=nodules_per_scan,
        counts=counts,
    )


def _curve(marks: _Marks, scan_copies: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """FROC points of a (re)sampled set of scans, `scan_copies` times each; None without nodules.

    Each distinct probability t gives the point of all marks >= t (what the script's roc_curve gives);
    false positives are divided by the number of scans drawn, nodules by the nodules on them.
    """
    nodules = float(scan_copies @ marks.nodules_per_scan)
    if nodules == 0:
        return None
    weights = scan_copies[marks.scan].astype(np.float64)
    true_positives = np.cumsum(weights * marks.is_true_positive)[marks.run_ends]
    false_positives = np.cumsum(weights * ~marks.is_true_positive)[marks.run_ends]
    fp_per_scan = np.concatenate([[0.0], false_positives / scan_copies.sum()])
    sensitivity = np.concatenate([[0.0], true_positives / nodules])
    return fp_per_scan, sensitivity


def _at(points: Sequence[float] | np.ndarray, curve: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Sensitivity read off the curve as the script does (np.interp): linear between points, the top of
    a vertical step at its FP rate, and the last sensitivity beyond the curve's end."""
    return np.interp(points, *curve)


def froc(
    candidates: Sequence[Candidate],
    annotations: Sequence[Finding],
    excluded: Sequence[Finding],
    series: Sequence[str],
    max_marks_per_scan: int | None = MAX_MARKS_PER_SCAN,
) -> FrocResult:
    """FROC curve, sensitivities at OPERATING_POINTS and CPM of candidates over the scans in `series`.

    `series` lists every evaluated scan, those without nodules or candidates included: it is the FP
    per scan denominator. Missed nodules stay in the sensitivity's denominator. A system without any
    true positive scores 0 (the script gives NaN there).
    """
    return _score(_marks(candidates, annotations, excluded, series, max_marks_per_scan))


def _score(marks: _Marks) -> FrocResult:
    """The FROC of all evaluated scans, each counted once."""
    curve = _curve(marks, np.ones(marks.counts["n_scans"], dtype=np.int64))
    if curve is None:
        raise ValueError("the evaluated series hold no nodule: sensitivity is undefined")
    sensitivities = _at(OPERATING_POINTS, curve)
    return FrocResult(
        fp_per_scan=curve[0],
        sensitivity=curve[1],
        thresholds=np.concatenate([[np.inf], marks.probability[marks.run_ends]]),
        sensitivities=sensitivities,
        cpm=float(sensitivities.mean()),
        **marks.counts,
    )


def _order_statistics(values: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bound per column, the sorted values at floor(p * n) and floor((1 - p) * n)."""
    ordered = np.sort(values, axis=0)
    tail = (1.0 - confidence) / 2.0
    count = len(ordered)
    lower = ordered[int(math.floor(tail * count))]
    upper = ordered[min(int(math.floor((1.0 - tail) * count)), count - 1)]
    return lower, upper


def _bootstrap(marks: _Marks, iterations: int, seed: int, confidence: float) -> Bootstrap:
    rng = np.random.default_rng(seed)
    n_scans = marks.counts["n_scans"]
    points, band = [], []
    for _ in range(iterations):
        drawn = rng.integers(n_scans, size=n_scans)
        curve = _curve(marks, np.bincount(drawn, minlength=n_scans))
        if curve is not None:
            points.append(_at(OPERATING_POINTS, curve))
            band.append(_at(BAND_FP_PER_SCAN, curve))
    if not points:
        raise ValueError("no bootstrap resample holds a nodule; use more iterations or more scans")
    sensitivities = np.array(points)
    cpms = sensitivities.mean(axis=1, keepdims=True)
    band_values = np.array(band)
    sensitivities_lower, sensitivities_upper = _order_statistics(sensitivities, confidence)
    cpm_lower, cpm_upper = _order_statistics(cpms, confidence)
    band_lower, band_upper = _order_statistics(band_values, confidence)
    return Bootstrap(
        iterations=iterations,
        seed=seed,
        confidence=confidence,
        samples_used=len(points),
        sensitivities_mean=sensitivities.mean(axis=0),
        sensitivities_lower=sensitivities_lower,
        sensitivities_upper=sensitivities_upper,
        cpm_mean=float(cpms.mean()),
        cpm_lower=float(cpm_lower[0]),
        cpm_upper=float(cpm_upper[0]),
        band_fp_per_scan=BAND_FP_PER_SCAN,
        band_mean=band_values.mean(axis=0),
        band_lower=band_lower,
        band_upper=band_upper,
    )


def _check_bootstrap_settings(iterations: int, confidence: float) -> None:
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def bootstrap_froc(
    candidates: Sequence[Candidate],
    annotations: Sequence[Finding],
    excluded: Sequence[Finding],
    series: Sequence[str],
    iterations: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    max_marks_per_scan: int | None = MAX_MARKS_PER_SCAN,
) -> FrocResult:
    """froc() plus its `bootstrap`: scans drawn with replacement, `iterations` times, seeded.

    Each resample keeps the number of scans and every mark of a scan drawn (once per draw), as the
    script's computeFROC_bootstrap does. Beyond the script, the CPM gets an interval too (from the
    CPM of each resample), and resamples without a nodule are left out instead of turning into NaN.
    """
    _check_bootstrap_settings(iterations, confidence)
    marks = _marks(candidates, annotations, excluded, series, max_marks_per_scan)
    return replace(_score(marks), bootstrap=_bootstrap(marks, iterations, seed, confidence))


@dataclass(frozen=True)
class PairedCpm:
    """CPM of system A minus system B on the same scans, with its paired-bootstrap interval and p-value."""

    cpm_a: float
    cpm_b: float
    difference: float
    lower: float
    upper: float
    p_value: float  # two-sided: twice the smaller share of resampled differences beyond 0, add-one smoothed
    iterations: int
    samples_used: int
    confidence: float


def paired_cpm_difference(
    candidates_a: Sequence[Candidate],
    candidates_b: Sequence[Candidate],
    annotations: Sequence[Finding],
    excluded: Sequence[Finding],
    series: Sequence[str],
    iterations: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    max_marks_per_scan: int | None = MAX_MARKS_PER_SCAN,
) -> PairedCpm:
    """Compare two systems on the same scans: each resample draws scans once and scores both on them.

    Two CPMs with overlapping intervals from separate bootstraps say little; the paired difference is
    what tells whether one system beats the other on these scans.
    """
    _check_bootstrap_settings(iterations, confidence)
    marks_a = _marks(candidates_a, annotations, excluded, series, max_marks_per_scan)
    marks_b = _marks(candidates_b, annotations, excluded, series, max_marks_per_scan)
    cpm_a, cpm_b = _score(marks_a).cpm, _score(marks_b).cpm
    rng = np.random.default_rng(seed)
    n_scans = marks_a.counts["n_scans"]
    differences = []
    for _ in range(iterations):
        copies = np.bincount(rng.integers(n_scans, size=n_scans), minlength=n_scans)
        curve_a, curve_b = _curve(marks_a, copies), _curve(marks_b, copies)
        if curve_a is not None:
            differences.append(_at(OPERATING_POINTS, curve_a).mean() - _at(OPERATING_POINTS, curve_b).mean())
    if not differences:
        raise ValueError("no bootstrap resample holds a nodule; use more iterations or more scans")
    values = np.array(differences)
    lower, upper = _order_statistics(values, confidence)
    return PairedCpm(
        cpm_a=cpm_a,
        cpm_b=cpm_b,
        difference=cpm_a - cpm_b,
        lower=float(lower),
        upper=float(upper),
        p_value=bootstrap_p_value(values),
        iterations=iterations,
        samples_used=values.size,
        confidence=confidence,
    )


# ----------------------------------------------------------------------------------------------
# Table and figure
# ----------------------------------------------------------------------------------------------


def _rate_label(rate: float) -> str:
    return str(Fraction(rate).limit_denominator())


def sensitivity_table(result: FrocResult) -> list[dict[str, Any]]:
    """Rows for utils.write_metrics_csv / utils.markdown_table: the seven sensitivities, then the CPM.

    Columns: fp_per_scan (1/8 ... 8, then CPM), sensitivity and, with a bootstrap, ci_lower and
    ci_upper (its confidence, 95% by default).
    """
    bootstrap = result.bootstrap
    rows: list[dict[str, Any]] = []
    for i, rate in enumerate(result.operating_points):
        row: dict[str, Any] = {
            "fp_per_scan": _rate_label(rate),
            "sensitivity": float(result.sensitivities[i]),
        }
        if bootstrap is not None:
            row["ci_lower"] = float(bootstrap.sensitivities_lower[i])
            row["ci_upper"] = float(bootstrap.sensitivities_upper[i])
        rows.append(row)
    cpm_row: dict[str, Any] = {"fp_per_scan": "CPM", "sensitivity": result.cpm}
    if bootstrap is not None:
        cpm_row["ci_lower"] = bootstrap.cpm_lower
        cpm_row["ci_upper"] = bootstrap.cpm_upper
    rows.append(cpm_row)
    return rows


def _title(result: FrocResult, title: str | None) -> str:
    score = f"CPM = {result.cpm:.3f}"
    if result.bootstrap is not None:
        percent = f"{100 * result.bootstrap.confidence:g}%"
        score += f" ({percent} CI {result.bootstrap.cpm_lower:.3f}-{result.bootstrap.cpm_upper:.3f})"
    return f"{title}\n{score}" if title else f"FROC, {score}"


def _visible_curve(result: FrocResult, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """The curve's points between two FP rates, with its interpolated values at both ends, so that its
    steps stay vertical on the plot."""
    curve = (result.fp_per_scan, result.sensitivity)
    inside = (result.fp_per_scan > low) & (result.fp_per_scan < high)
    x = np.concatenate([[low], result.fp_per_scan[inside], [high]])
    y = np.concatenate([_at([low], curve), result.sensitivity[inside], _at([high], curve)])
    return x, y


def plot_froc(result: FrocResult, path: str | Path, title: str | None = None) -> Path:
    """PNG of the FROC curve on a log2 axis from 1/8 to 8 FP per scan, with the seven operating points
    labelled, the bootstrap band when computed and the CPM in the title. Draws on a standalone Agg
    figure, so pyplot's state is never touched. Returns the path."""
    rates = np.array(result.operating_points)
    figure = Figure(figsize=(7.0, 5.0), layout="constrained")
    axes = figure.subplots()
    axes.plot(*_visible_curve(result, rates[0], rates[-1]), color="tab:blue", linewidth=2, label="FROC")
    if result.bootstrap is not None:
        band = result.bootstrap
        axes.fill_between(
            band.band_fp_per_scan,
            band.band_lower,
            band.band_upper,
            color="tab:blue",
            alpha=0.15,
            label=f"{100 * band.confidence:g}% bootstrap interval ({band.iterations} resamples)",
        )
    axes.plot(rates, result.sensitivities, "o", color="tab:red", label="operating points", clip_on=False)
    for i, (rate, sensitivity) in enumerate(zip(rates, result.sensitivities, strict=True)):
        alignment = "left" if i == 0 else "right" if i == len(rates) - 1 else "center"  # stay inside
        axes.annotate(
            f"{sensitivity:.3f}",
            (rate, sensitivity),
            textcoords="offset points",
            xytext=(0, 7),
            ha=alignment,
            fontsize=8,
        )
    axes.set_xscale("log", base=2)
    axes.set_xlim(rates[0], rates[-1])
    axes.set_xticks(rates, [_rate_label(rate) for rate in rates])
    axes.set_ylim(0.0, 1.05)
    axes.set_xlabel("average number of false positives per scan")
    axes.set_ylabel("sensitivity")
    axes.set_title(_title(result, title))
    axes.grid(which="both", alpha=0.3)
    axes.legend(loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
