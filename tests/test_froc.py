"""Tests for froc.py: LUNA16 matching, FROC, CPM, bootstrap, CSV files and figure, on hand-built cases.

Nodules lie on the x axis of world space; false positives far from every finding (x >= 1000).
"""

import math

import imageio.v3 as iio
import numpy as np
import pytest

import froc
import utils
from froc import Candidate, Finding, Outcome

RATES = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)


def nodule(uid, x, diameter=10.0):
    return Finding(uid, float(x), 0.0, 0.0, diameter)


def mark(uid, x, probability, y=0.0):
    return Candidate(uid, float(x), float(y), 0.0, probability)


def false_marks(uid, probability, count, start=0):
    return [mark(uid, 1000 + 20 * (start + i), probability) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------


def test_a_single_hit_is_a_true_positive_and_scores_one():
    candidates = [mark("a", 1, 0.9)]
    matching = froc.match_candidates(candidates, [nodule("a", 0)])
    assert matching.outcomes == (Outcome.TRUE_POSITIVE,)
    assert matching.detections == (0,)
    result = froc.froc(candidates, [nodule("a", 0)], [], ["a"])
    assert result.sensitivities.tolist() == [1.0] * 7
    assert result.cpm == 1.0
    assert (result.n_detected, result.n_false_positives) == (1, 0)


@pytest.mark.parametrize("order", [1, -1])
def test_of_two_hits_on_a_nodule_the_more_probable_counts_and_the_other_is_ignored(order):
    candidates = [mark("a", 1, 0.9), mark("a", -1, 0.5)][::order]
    matching = froc.match_candidates(candidates, [nodule("a", 0)])
    expected = (Outcome.TRUE_POSITIVE, Outcome.DUPLICATE)[::order]
    assert matching.outcomes == expected
    assert candidates[matching.detections[0]].probability == 0.9
    result = froc.froc(candidates, [nodule("a", 0)], [], ["a"])
    assert (result.n_false_positives, result.n_duplicates, result.cpm) == (0, 1, 1.0)


def test_equally_probable_hits_on_a_nodule_pick_the_first_in_input_order():
    candidates = [mark("a", 1, 0.7), mark("a", -1, 0.7)]
    assert froc.match_candidates(candidates, [nodule("a", 0)]).outcomes == (
        Outcome.TRUE_POSITIVE,
        Outcome.DUPLICATE,
    )


def test_hits_on_irrelevant_findings_are_ignored_and_an_unknown_diameter_means_10_mm():
    excluded = [nodule("a", 50, diameter=-1.0)]  # radius 5 mm
    candidates = [mark("a", 1, 0.9), mark("a", 54.9, 0.95), mark("a", 55.1, 0.3)]
    matching = froc.match_candidates(candidates, [nodule("a", 0)], excluded)
    assert matching.outcomes == (Outcome.TRUE_POSITIVE, Outcome.EXCLUDED, Outcome.FALSE_POSITIVE)
    result = froc.froc(candidates, [nodule("a", 0)], excluded, ["a"])
    assert (result.n_excluded_hits, result.n_false_positives) == (1, 1)
    assert result.sensitivities[0] == 1.0  # the 0.95 mark on the irrelevant finding is no false positive


def test_a_hit_on_a_nodule_outranks_a_hit_on_an_overlapping_irrelevant_finding():
    matching = froc.match_candidates([mark("a", 1, 0.9)], [nodule("a", 0)], [nodule("a", 2)])
    assert matching.outcomes == (Outcome.TRUE_POSITIVE,)


def test_a_missed_nodule_stays_in_the_denominator():
    result = froc.froc([mark("a", 1, 0.9)], [nodule("a", 0), nodule("a", 100)], [], ["a"])
    assert result.n_nodules == 2
    assert result.n_detected == 1
    assert result.sensitivities.tolist() == [0.5] * 7
    assert result.cpm == 0.5


@pytest.mark.parametrize(
    ("position", "outcome"),
    [
        ((4.999, 0.0), Outcome.TRUE_POSITIVE),
        ((5.0, 0.0), Outcome.FALSE_POSITIVE),  # at the radius: the script compares strictly
        ((3.0, 4.0), Outcome.FALSE_POSITIVE),  # 3-4-5 triangle, also exactly 5 mm away
        ((3.0, 3.999), Outcome.TRUE_POSITIVE),
    ],
)
def test_the_hit_radius_is_half_the_diameter_and_its_boundary_is_outside(position, outcome):
    candidate = mark("a", position[0], 0.9, y=position[1])
    assert froc.match_candidates([candidate], [nodule("a", 0, diameter=10.0)]).outcomes == (outcome,)


def test_a_candidate_inside_two_nodules_detects_both_as_in_the_script():
    nodules = [nodule("a", 0), nodule("a", 6)]  # radius 5 each: x = 3 is inside both
    matching = froc.match_candidates([mark("a", 3, 0.8)], nodules)
    assert matching.outcomes == (Outcome.TRUE_POSITIVE,)
    assert matching.detections == (0, 0)
    assert froc.froc([mark("a", 3, 0.8)], nodules, [], ["a"]).cpm == 1.0


def test_a_candidate_in_two_nodules_is_a_duplicate_where_others_are_more_probable():
    nodules = [nodule("a", 0), nodule("a", 6)]
    candidates = [mark("a", 3, 0.5), mark("a", -1, 0.9), mark("a", 7, 0.9)]
    matching = froc.match_candidates(candidates, nodules)
    assert matching.outcomes == (Outcome.DUPLICATE, Outcome.TRUE_POSITIVE, Outcome.TRUE_POSITIVE)
    assert matching.detections == (1, 2)


def test_matching_never_crosses_scans():
    matching = froc.match_candidates([mark("b", 0, 0.9)], [nodule("a", 0)])
    assert matching.outcomes == (Outcome.FALSE_POSITIVE,)
    assert matching.detections == (None,)


def test_only_the_100_most_probable_marks_of_a_scan_are_scored_ties_at_the_cut_dropped():
    candidates = false_marks("a", 0.5, 99) + false_marks("a", 0.1, 2, start=99) + [mark("a", 0, 0.1)]
    outcomes = froc.match_candidates(candidates, [nodule("a", 0)]).outcomes
    assert outcomes.count(Outcome.FALSE_POSITIVE) == 99
    assert outcomes.count(Outcome.OVER_LIMIT) == 3  # the 101st value, 0.1, is shared by three marks
    assert froc.match_candidates(candidates, [nodule("a", 0)], max_marks_per_scan=None).outcomes[-1] == (
        Outcome.TRUE_POSITIVE
    )


# ---------------------------------------------------------------------------------------------
# FROC and CPM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, -1])
def test_tied_probabilities_enter_the_curve_together_whatever_their_order(order):
    # Threshold 0.5 keeps the hit and the false positive at once: (0, 0) -> (1/2 FP per scan, 1).
    candidates = [mark("a", 0, 0.5), mark("b", 0, 0.5)][::order]
    result = froc.froc(candidates, [nodule("a", 0)], [], ["a", "b"])
    np.testing.assert_allclose(result.fp_per_scan, [0.0, 0.5])
    np.testing.assert_allclose(result.sensitivity, [0.0, 1.0])
    np.testing.assert_allclose(result.sensitivities, [0.25, 0.5, 1, 1, 1, 1, 1])
    assert result.cpm == pytest.approx(5.75 / 7)
    assert result.thresholds.tolist() == [math.inf, 0.5]


def test_scans_without_nodules_or_candidates_count_in_the_false_positives_per_scan():
    candidates = [mark("b", 0, 0.9), mark("a", 0, 0.8)]  # b has no nodule: its mark is a false positive
    two_scans = froc.froc(candidates, [nodule("a", 0)], [], ["a", "b"])
    np.testing.assert_allclose(two_scans.fp_per_scan, [0.0, 0.5, 0.5])
    np.testing.assert_allclose(two_scans.sensitivities, [0, 0, 1, 1, 1, 1, 1])
    assert two_scans.cpm == pytest.approx(5 / 7)
    three_scans = froc.froc(candidates, [nodule("a", 0)], [], ["a", "b", "c"])
    assert three_scans.n_scans == 3
    np.testing.assert_allclose(three_scans.fp_per_scan, [0.0, 1 / 3, 1 / 3])
    np.testing.assert_allclose(three_scans.sensitivities, [0, 0, 1, 1, 1, 1, 1])


def test_a_perfect_detector_scores_one_and_a_detector_with_only_false_positives_zero():
    nodules = [nodule("a", 0), nodule("b", 0)]
    hits = [mark("a", 0, 0.9), mark("b", 0, 0.8)]
    assert froc.froc(hits, nodules, [], ["a", "b", "c"]).cpm == 1.0
    assert froc.froc(hits + false_marks("c", 0.1, 20), nodules, [], ["a", "b", "c"]).cpm == 1.0
    only_false = froc.froc(false_marks("a", 0.9, 5) + false_marks("c", 0.4, 30), nodules, [], ["a", "b", "c"])
    assert only_false.cpm == 0.0
    assert only_false.n_detected == 0


def test_the_seven_sensitivities_interpolate_the_curve_as_the_script():
    # One scan, four nodules (the fourth missed); by decreasing probability the marks give the points
    # (0,0) -1.0: hit + FP-> (1,1/4) -0.9: hit-> (1,1/2) -0.8: 2 FP-> (3,1/2) -0.7: hit + 2 FP-> (5,3/4)
    # -0.6: 4 FP-> (9,3/4).
    nodules = [nodule("a", x) for x in (0, 20, 40, 60)]
    candidates = (
        [mark("a", 0, 1.0)]
        + false_marks("a", 1.0, 1)
        + [mark("a", 20, 0.9)]
        + false_marks("a", 0.8, 2, start=1)
        + [mark("a", 40, 0.7)]
        + false_marks("a", 0.7, 2, start=3)
        + false_marks("a", 0.6, 4, start=5)
    )
    result = froc.froc(candidates, nodules, [], ["a"])
    np.testing.assert_allclose(result.fp_per_scan, [0, 1, 1, 3, 5, 9])
    np.testing.assert_allclose(result.sensitivity, [0, 0.25, 0.5, 0.5, 0.75, 0.75])
    # 1/8 .. 1/2 on the slope from (0,0) to (1,1/4); 1 on the step up at 1 FP takes its top (np.interp);
    # 2 on the flat part; 4 halfway up from (3,1/2) to (5,3/4); 8 on the flat end.
    expected = [0.03125, 0.0625, 0.125, 0.5, 0.5, 0.625, 0.75]
    np.testing.assert_allclose(result.sensitivities, expected)
    assert result.cpm == pytest.approx(sum(expected) / 7)
    assert result.operating_points == RATES


def test_beyond_the_curves_end_the_last_sensitivity_holds():
    result = froc.froc(
        [mark("a", 0, 0.9), mark("b", 0, 0.1)], [nodule("a", 0), nodule("a", 50)], [], ["a", "b"]
    )
    np.testing.assert_allclose(result.sensitivities, [0.5] * 7)


def test_the_curve_matches_a_threshold_sweep_on_random_detections():
    rng = np.random.default_rng(3)
    series = [f"s{i}" for i in range(6)]
    nodules = [nodule(uid, 40 * k) for uid in series[:4] for k in range(2)]
    candidates = [
        mark(str(rng.choice(series)), float(rng.integers(-3, 100)), float(rng.integers(1, 8)) / 8)
        for _ in range(40)
    ]
    result = froc.froc(candidates, nodules, [], series)
    outcomes = froc.match_candidates(candidates, nodules).outcomes
    for t, fp_rate, sensitivity in zip(
        result.thresholds[1:], result.fp_per_scan[1:], result.sensitivity[1:], strict=True
    ):
        kept = [c for c in candidates if c.probability >= t]
        found = sum(
            any(c.seriesuid == n.seriesuid and abs(c.x - n.x) < n.hit_radius_mm for c in kept)
            for n in nodules
        )
        false = sum(
            o is Outcome.FALSE_POSITIVE and c.probability >= t
            for c, o in zip(candidates, outcomes, strict=True)
        )
        assert sensitivity == pytest.approx(found / len(nodules))
        assert fp_rate == pytest.approx(false / len(series))


def test_findings_and_candidates_of_scans_not_evaluated_are_left_out():
    result = froc.froc([mark("a", 0, 0.9), mark("z", 0, 0.9)], [nodule("a", 0), nodule("z", 0)], [], ["a"])
    assert (result.n_nodules, result.n_candidates, result.n_outside_series, result.cpm) == (1, 1, 1, 1.0)


def test_froc_rejects_repeated_or_no_series_and_scans_without_any_nodule():
    with pytest.raises(ValueError, match="more than once"):
        froc.froc([], [nodule("a", 0)], [], ["a", "a"])
    with pytest.raises(ValueError, match="at least one"):
        froc.froc([], [nodule("a", 0)], [], [])
    with pytest.raises(ValueError, match="no nodule"):
        froc.froc([mark("a", 0, 0.9)], [], [], ["a"])


# ---------------------------------------------------------------------------------------------
# Bootstrap, table, figure
# ---------------------------------------------------------------------------------------------


def bootstrap_case():
    series = [f"s{i}" for i in range(12)]
    nodules = [nodule(uid, 0) for uid in series[:10]]
    candidates = [mark(uid, 0, 0.3 + 0.05 * i) for i, uid in enumerate(series[:7])]
    candidates += [mark(uid, 500, 0.2 + 0.04 * i) for i, uid in enumerate(series)]
    return candidates, nodules, [], series


def test_the_bootstrap_interval_holds_the_point_estimate_and_is_seeded():
    result = froc.bootstrap_froc(*bootstrap_case(), iterations=300, seed=7)
    band = result.bootstrap
    assert band.samples_used == 300
    assert np.all(band.sensitivities_lower <= result.sensitivities)
    assert np.all(result.sensitivities <= band.sensitivities_upper)
    assert band.cpm_lower <= result.cpm <= band.cpm_upper
    assert band.cpm_lower < band.cpm_upper
    again = froc.bootstrap_froc(*bootstrap_case(), iterations=300, seed=7).bootstrap
    np.testing.assert_array_equal(again.sensitivities_lower, band.sensitivities_lower)
    np.testing.assert_array_equal(again.band_upper, band.band_upper)
    assert (again.cpm_lower, again.cpm_upper) == (band.cpm_lower, band.cpm_upper)
    other = froc.bootstrap_froc(*bootstrap_case(), iterations=300, seed=8).bootstrap
    assert not np.array_equal(other.band_mean, band.band_mean)


def test_the_bootstrap_bounds_are_the_order_statistics_the_script_takes():
    values = np.arange(1000, dtype=float)[::-1, None]
    lower, upper = froc._order_statistics(values, 0.95)
    assert (lower[0], upper[0]) == (25.0, 975.0)


def test_the_sensitivity_table_feeds_the_metrics_table_helpers(tmp_path):
    rows = froc.sensitivity_table(froc.bootstrap_froc(*bootstrap_case(), iterations=50, seed=0))
    assert [row["fp_per_scan"] for row in rows] == ["1/8", "1/4", "1/2", "1", "2", "4", "8", "CPM"]
    assert all(row["ci_lower"] <= row["sensitivity"] <= row["ci_upper"] for row in rows)
    assert "| CPM |" in utils.markdown_table(rows)
    written = utils.read_metrics_csv(utils.write_metrics_csv(rows, tmp_path / "froc.csv"))
    assert written[-1]["sensitivity"] == pytest.approx(rows[-1]["sensitivity"], abs=1e-4)
    plain = froc.sensitivity_table(froc.froc(*bootstrap_case()))
    assert set(plain[0]) == {"fp_per_scan", "sensitivity"}


@pytest.mark.parametrize("with_bootstrap", [False, True])
def test_plot_froc_writes_a_png(tmp_path, with_bootstrap):
    result = (
        froc.bootstrap_froc(*bootstrap_case(), iterations=50)
        if with_bootstrap
        else froc.froc(*bootstrap_case())
    )
    picture = iio.imread(froc.plot_froc(result, tmp_path / "froc.png", title="fold 0"))
    assert picture.shape == (500, 700, 4)


# ---------------------------------------------------------------------------------------------
# CSV files
# ---------------------------------------------------------------------------------------------

ANNOTATIONS_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
CANDIDATES_HEADER = "seriesuid,coordX,coordY,coordZ,probability\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_annotations_finds_columns_by_name_and_skips_blank_lines(tmp_path):
    path = write(tmp_path, "annotations.csv", "diameter_mm,seriesuid,coordX,coordY,coordZ\n5.5,a,1,2,-3\n\n")
    assert froc.read_annotations(path, known_series={"a", "b"}) == [Finding("a", 1.0, 2.0, -3.0, 5.5)]


def test_read_excluded_takes_minus_one_or_empty_as_an_unknown_diameter(tmp_path):
    path = write(tmp_path, "excluded.csv", ANNOTATIONS_HEADER + "a,1,2,3,-1\na,4,5,6,\na,7,8,9,2.5\n")
    findings = froc.read_excluded(path)
    assert [f.diameter_mm for f in findings] == [-1.0, -1.0, 2.5]
    assert [f.hit_radius_mm for f in findings] == [5.0, 5.0, 1.25]


@pytest.mark.parametrize(
    ("reader", "text", "message"),
    [
        (
            froc.read_annotations,
            ANNOTATIONS_HEADER + "a,1,2,3,4\na,1,2,3\n",
            "4 values for the 5 header columns",
        ),
        (froc.read_annotations, ANNOTATIONS_HEADER + "a,1,2,3,4\na,1,x,3,4\n", "coordY is 'x', not a number"),
        (froc.read_annotations, ANNOTATIONS_HEADER + "a,1,2,3,4\na,1,2,nan,4\n", "must be finite"),
        (froc.read_annotations, ANNOTATIONS_HEADER + "a,1,2,3,4\na,1,2,3,-1\n", "must be positive"),
        (froc.read_annotations, ANNOTATIONS_HEADER + "a,1,2,3,4\n,1,2,3,4\n", "seriesuid is empty"),
        (froc.read_excluded, ANNOTATIONS_HEADER + "a,1,2,3,4\na,1,2,3,big\n", "diameter_mm is 'big'"),
        (froc.read_candidates, CANDIDATES_HEADER + "a,1,2,3,0.5\na,1,2,3,\n", "probability is ''"),
        (froc.read_candidates, CANDIDATES_HEADER + "a,1,2,3,0.5\nzzz,1,2,3,0.5\n", "series zzz has no scan"),
    ],
)
def test_malformed_rows_name_the_file_and_the_line(tmp_path, reader, text, message):
    path = write(tmp_path, "bad.csv", text)
    with pytest.raises(froc.CsvFormatError, match=message) as error:
        reader(path, known_series={"a"})
    assert str(error.value).startswith(f"{path}, line 3:")


def test_a_wrong_header_is_reported_on_line_one(tmp_path):
    path = write(tmp_path, "submission.csv", "seriesuid,x,y,z,probability\na,1,2,3,0.5\n")
    with pytest.raises(froc.CsvFormatError, match=r"line 1: .*lacks coordX, coordY, coordZ") as error:
        froc.read_candidates(path)
    assert str(path) in str(error.value)
    with pytest.raises(froc.CsvFormatError, match="line 1"):
        froc.read_annotations(write(tmp_path, "empty.csv", ""))


def test_written_candidates_read_back_identically(tmp_path):
    candidates = [mark("1.3.6.1.4", -128.6994211, 0.1 + 0.2, y=1e-17), Candidate("b", 1.0, 2.5, -3.25, 1.0)]
    path = froc.write_candidates(candidates, tmp_path / "out" / "submission.csv")
    assert path.read_text().splitlines()[0] == CANDIDATES_HEADER.strip()
    assert froc.read_candidates(path, known_series={"1.3.6.1.4", "b"}) == candidates


def test_read_series_takes_one_uid_per_line_and_rejects_repeats(tmp_path):
    assert froc.read_series(write(tmp_path, "uids.csv", "a\nb\n\nc\n")) == ["a", "b", "c"]
    with pytest.raises(froc.CsvFormatError, match="line 3: series a is listed twice"):
        froc.read_series(write(tmp_path, "twice.csv", "a\nb\na\n"))


# ---------------------------------------------------------------------------------------------
# Paired comparison of two systems
# ---------------------------------------------------------------------------------------------


def test_a_system_that_finds_every_nodule_beats_one_that_finds_none_in_every_resample():
    nodules = [nodule("a", 0), nodule("b", 0)]
    finds_all = [mark("a", 1, 0.9), mark("b", 1, 0.8)]
    finds_none = false_marks("a", 0.9, 1) + false_marks("b", 0.9, 1)
    result = froc.paired_cpm_difference(finds_all, finds_none, nodules, [], ["a", "b"], iterations=200)
    assert (result.cpm_a, result.cpm_b, result.difference) == (1.0, 0.0, 1.0)
    assert (result.lower, result.upper) == (1.0, 1.0)
    assert result.p_value == pytest.approx(2 / 201)
    assert result.samples_used == 200


def test_identical_systems_differ_by_zero_with_p_one():
    nodules = [nodule("a", 0), nodule("b", 0)]
    candidates = [mark("a", 1, 0.9)] + false_marks("b", 0.5, 3)
    result = froc.paired_cpm_difference(candidates, list(candidates), nodules, [], ["a", "b"])
    assert (result.difference, result.lower, result.upper, result.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_systems_each_better_on_one_scan_give_an_interval_across_zero():
    nodules = [nodule("a", 0), nodule("b", 0)]
    first = [mark("a", 1, 0.9)]
    second = [mark("b", 1, 0.9)]
    result = froc.paired_cpm_difference(first, second, nodules, [], ["a", "b"], iterations=500)
    assert result.difference == 0.0
    assert result.lower == -1.0 and result.upper == 1.0
    assert result.p_value > 0.5
