"""The memory-scaling and preprocessing benchmarks in their --quick modes: records with plausible values."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import preprocessing  # noqa: E402
import scale  # noqa: E402

needs_reference = pytest.mark.skipif(
    not preprocessing.REFERENCE.exists(),
    reason=f"the reference course program is not at {preprocessing.REFERENCE} (../shared/peers is absent)",
)
ENVIRONMENT = ("cpu", "cpu_count", "date")


@pytest.fixture(scope="module")
def scale_records(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("scale")
    output = folder / "scale.json"
    assert scale.main(["--quick", "--work", str(folder / "work"), "--output", str(output)]) == 0
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def preprocessing_records(tmp_path_factory) -> list[dict]:
    output = tmp_path_factory.mktemp("preprocessing") / "preprocessing.json"
    assert preprocessing.main(["--quick", "--output", str(output)]) == 0
    return json.loads(output.read_text())


def test_the_quick_scale_run_records_training_and_inference_memory_of_todays_code(scale_records):
    (record,) = scale_records
    assert record["code"] == "memory-mapped cache" and record["status"] == "ok"
    assert record["cases"] == scale.QUICK_CASES and record["preprocessed_cases"] == scale.QUICK_CASES
    for key in ("peak_rss_mb", "peak_pss_mb", "ru_maxrss_children_mb", "inference_peak_rss_mb"):
        assert 0 < record[key] < 64_000, key
    assert record["peak_pss_mb"] <= record["peak_rss_mb"]
    assert 0 < record["preprocessing_seconds"] < record["seconds"]
    assert record["inference_seconds"] > 0 and record["inference_test_cases"] == 1
    assert record["epochs"] == 1 and record["threads"] >= 1
    assert record["settings"]["model"] == "res_unet3d" and record["settings"]["preprocess_workers"] == 2
    assert all(record[key] for key in (*ENVIRONMENT, "commit")) and record["quick"]


def test_a_process_past_its_time_limit_is_recorded_and_the_larger_sizes_are_not_run(tmp_path):
    output = tmp_path / "scale.json"
    arguments = ["--quick", "--sizes", "3", "4", "--time-limit", "0.01", "--work", str(tmp_path)]
    assert scale.main([*arguments, "--output", str(output)]) == 0
    small, large = json.loads(output.read_text())
    assert small["status"] == "timed out" and small["inference_peak_rss_mb"] is None
    assert large["status"] == "not run: 3 cases already timed out" and large["peak_rss_mb"] is None


def test_the_tree_of_this_process_includes_itself_and_has_memory():
    assert scale.process_tree(scale.os.getpid())[0] == scale.os.getpid()
    _, rss, pss = scale.tree_memory(scale.os.getpid())
    assert rss > 0 and 0 < pss <= rss


def test_the_quick_preprocessing_run_times_the_project_and_the_volumetric_sets(preprocessing_records):
    first_runs = [r for r in preprocessing_records if r["benchmark"] == "kaggle_3m first run"]
    assert sorted(r["workers"] for r in first_runs) == [1, 2]
    for record in first_runs:
        assert record["seconds"] > 0 and record["patients"] == 3 and record["slices"] > 0
        assert record["seconds_per_patient"] == pytest.approx(record["seconds"] / 3)
    (resize,) = [r for r in preprocessing_records if r["benchmark"] == "kaggle_3m resize"]
    assert resize["resize_4d_seconds"] > 0 and resize["resize_slices_seconds"] > 0
    assert 0 <= resize["max_abs_difference"] <= resize["value_range"]
    volumetric = [r for r in preprocessing_records if r["benchmark"] == "volumetric preprocessing"]
    assert {(r["run"], r["workers"]) for r in volumetric if r["dataset"] == "luna"} == {
        (run, workers) for run in ("first", "cached") for workers in (1, 2)
    }
    for record in volumetric:
        assert record["cases"] > 0 and record["seconds"] > 0 and record["cases_per_minute"] > 0
    for record in preprocessing_records:
        assert all(record[key] for key in ENVIRONMENT) and record["quick"]


@needs_reference
def test_the_quick_preprocessing_run_sets_the_reference_beside_the_project(preprocessing_records):
    for record in [r for r in preprocessing_records if r["benchmark"] == "kaggle_3m first run"]:
        assert record["reference_seconds"] > 0 and record["reference_slices"] > 0
        assert record["ratio_reference_to_project"] == pytest.approx(
            record["reference_seconds"] / record["seconds"]
        )
        assert record["ratio_reference_to_project"] > 0
