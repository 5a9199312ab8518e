"""Bootstrap intervals, paired comparisons, seed spread and selection by validation, on hand-checked cases."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import stats  # noqa: E402


def test_a_bootstrap_of_identical_values_gives_a_zero_width_interval():
    mean, low, high = stats.bootstrap_ci([0.8] * 7)
    assert high - low == 0.0
    assert (mean, low) == pytest.approx((0.8, 0.8))


def test_a_single_value_gives_a_degenerate_interval():
    mean, low, high = stats.bootstrap_ci([0.5])
    assert mean == low == high == 0.5


def test_a_nan_value_is_refused_with_its_position():
    with pytest.raises(ValueError, match=r"NaN or infinity at positions \[1\]"):
        stats.bootstrap_ci([0.9, float("nan"), 0.7])


def test_the_interval_covers_the_true_mean_of_a_seeded_normal_sample():
    sample = np.random.default_rng(3).normal(loc=0.85, scale=0.05, size=60)
    mean, low, high = stats.bootstrap_ci(sample)
    assert low < 0.85 < high
    assert mean == pytest.approx(sample.mean())
    standard_error = sample.std(ddof=1) / math.sqrt(sample.size)
    assert high - low == pytest.approx(2 * 1.96 * standard_error, rel=0.15)


def test_the_bootstrap_is_reproducible_with_its_seed_and_varies_without_it():
    values = [0.1, 0.5, 0.9, 0.4, 0.7]
    assert stats.bootstrap_ci(values, seed=5) == stats.bootstrap_ci(values, seed=5)
    assert stats.bootstrap_ci(values, seed=5) != stats.bootstrap_ci(values, seed=6)


def test_a_constant_paired_difference_is_found_exactly_and_is_significant():
    b = [0.70, 0.80, 0.60, 0.90, 0.75, 0.85, 0.65, 0.72]
    a = [value + 0.02 for value in b]
    result = stats.paired_difference(a, b)
    assert result.mean_difference == pytest.approx(0.02)
    assert (result.low, result.high) == pytest.approx((0.02, 0.02))
    assert result.bootstrap_p == pytest.approx(2 / 10001)
    assert result.wilcoxon_p == pytest.approx(2 / 2**8)  # exact test: only all-positive signs are as extreme
    assert result.cases == 8
    assert stats.verdict(result, "project", "peer") == "project better than peer (p = 0.008)"


def test_the_wilcoxon_p_value_equals_scipys_for_a_fixed_example():
    a = [0.81, 0.86, 0.79, 0.90, 0.84, 0.88, 0.77, 0.83, 0.85, 0.80]
    b = [0.80, 0.84, 0.81, 0.87, 0.84, 0.85, 0.78, 0.80, 0.86, 0.79]
    expected = scipy_stats.wilcoxon(a, b).pvalue
    assert stats.paired_difference(a, b).wilcoxon_p == pytest.approx(expected)


def test_all_zero_differences_mean_no_difference():
    result = stats.paired_difference([0.8, 0.7, 0.9], [0.8, 0.7, 0.9])
    assert (result.mean_difference, result.wilcoxon_p, result.bootstrap_p) == (0.0, 1.0, 1.0)
    assert stats.verdict(result) == "no significant difference (p = 1.000)"


def test_mappings_are_paired_by_case_id_whatever_their_order():
    a = {"case_1": 0.9, "case_2": 0.5, "case_3": 0.7}
    b = {"case_3": 0.6, "case_1": 0.8, "case_2": 0.4}
    assert stats.paired_difference(a, b).mean_difference == pytest.approx(0.1)


def test_different_cases_or_lengths_are_refused():
    with pytest.raises(ValueError, match=r"only in a \['case_2'\], only in b \['case_9'\]"):
        stats.paired_difference({"case_1": 0.9, "case_2": 0.5}, {"case_1": 0.8, "case_9": 0.4})
    with pytest.raises(ValueError, match="3 values against 2"):
        stats.paired_difference([0.1, 0.2, 0.3], [0.1, 0.2])


def test_the_verdict_names_the_better_method_when_lower_is_better():
    result = stats.paired_difference([1.0, 1.2, 1.1, 0.9, 1.3, 1.0], [2.0, 2.1, 1.9, 2.3, 2.2, 2.4])
    lower_wins = stats.verdict(result, "project", "peer", higher_is_better=False)
    assert lower_wins == f"project better than peer (p = {result.wilcoxon_p:.3f})"
    assert stats.verdict(result, "project", "peer").startswith("peer better than project")


def test_a_small_noisy_difference_is_not_significant():
    result = stats.paired_difference([0.80, 0.90, 0.70, 0.85], [0.82, 0.88, 0.71, 0.84])
    assert stats.verdict(result, "A", "B") == f"no significant difference (p = {result.wilcoxon_p:.3f})"
    assert result.low < 0 < result.high


def test_ranks_that_favour_one_method_and_a_mean_that_favours_the_other_claim_nothing():
    """15 small gains and one large loss: the signed-rank test is significant, the mean is negative."""
    b = [0.80 + 0.005 * k for k in range(16)]
    a = [value + 0.01 for value in b[:15]] + [b[15] - 0.5]
    result = stats.paired_difference(a, b)
    assert result.wilcoxon_p < 0.05 and result.mean_difference < 0 and result.low < 0 < result.high
    assert stats.verdict(result, "A", "B") == (
        f"no significant difference ({stats.format_p(result.wilcoxon_p)}, "
        "but the interval of the mean difference holds 0)"
    )


def test_p_values_near_the_threshold_keep_a_fourth_decimal():
    assert (stats.format_p(0.0496), stats.format_p(0.0504), stats.format_p(0.2189)) == (
        "p = 0.0496",
        "p = 0.0504",
        "p = 0.219",
    )


def test_infinite_values_are_refused_like_missing_ones():
    with pytest.raises(ValueError, match=r"NaN or infinity at positions \[0\]"):
        stats.bootstrap_ci([math.inf, 1.0, 2.0])


def test_seed_spread_is_the_mean_and_sample_standard_deviation():
    assert stats.seed_spread([0.880, 0.882, 0.884]) == pytest.approx((0.882, 0.002))
    assert stats.seed_spread({0: 0.5, 1: 0.7}) == pytest.approx((0.6, math.sqrt(0.02)))
    assert math.isnan(stats.seed_spread([0.9]).std)


def per_case_records():
    """Two configurations: `wide` is better on test but worse on validation than `narrow`."""
    return [
        {"config": "wide", "val_dsc": [0.80, 0.82, 0.81], "test_dsc": [0.90, 0.91, 0.92]},
        {"config": "narrow", "val_dsc": [0.85, 0.86, 0.84], "test_dsc": [0.80, 0.81, 0.79]},
    ]


def test_the_selection_picks_by_validation_even_when_test_disagrees():
    assert stats.choose_by_validation(per_case_records(), key="val_dsc")["config"] == "narrow"


def test_the_selection_refuses_a_test_field_as_its_key():
    with pytest.raises(ValueError, match="refusing to select by 'test_dsc'"):
        stats.choose_by_validation(per_case_records(), key="test_dsc")


def test_ties_go_to_the_name_that_sorts_first_whatever_the_order():
    records = [{"config": "b", "best_val_dsc": 0.9}, {"config": "a", "best_val_dsc": 0.9}]
    assert stats.choose_by_validation(records)["config"] == "a"
    assert stats.choose_by_validation(records[::-1])["config"] == "a"


def test_a_lower_is_better_key_and_a_computed_key_are_honoured():
    records = [{"config": "x", "val_loss": 0.3}, {"config": "y", "val_loss": 0.2}]
    assert stats.choose_by_validation(records, key="val_loss", higher_is_better=False)["config"] == "y"
    assert stats.choose_by_validation(records, key=lambda record: record["val_loss"])["config"] == "x"
