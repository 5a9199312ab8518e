"""The benchmark runner on a few real hippocampus cases, and the report's tables against its results."""

import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import brain_speed  # noqa: E402
import errors  # noqa: E402
import numpy as np  # noqa: E402
import run  # noqa: E402

from config import TrainConfig  # noqa: E402
from dataset import split_cases  # noqa: E402
from synthetic import DEMO_PATIENTS, make_kaggle_3m  # noqa: E402

HIPPOCAMPUS = REPO.parent / "shared" / "data" / "msd-hippocampus"
needs_real_data = pytest.mark.skipif(
    not (HIPPOCAMPUS / "dataset.json").is_file(),
    reason=f"the real MSD hippocampus data is not at {HIPPOCAMPUS} (it is in CI, not in a user's clone)",
)


@needs_real_data
def test_the_runner_completes_a_tiny_configuration_with_every_field_plausible(tmp_path):
    results = tmp_path / "results.json"
    arguments = ["--quick", "--cases", "10", "--configs", "unet2d", "unet3d", "--budget", "0.02"]
    assert run.main([*arguments, "--results", str(results), "--runs", str(tmp_path / "runs")]) == 0
    records = json.loads(results.read_text())
    assert [record["config"] for record in records] == ["unet2d", "unet3d"]
    for record in records:
        for key, _ in run.columns(run.SUITES["hippocampus"]):
            assert key in record, key
        for key in ("dsc_anterior", "dsc_posterior", "dsc_mean", "dsc_mean_pp", "val_dsc_mean"):
            assert 0.0 <= record[key] <= 1.0, key
        low, high = record["dsc_mean_ci"]
        assert low <= record["dsc_mean"] <= high
        assert len(record["rows"]["test"]) == record["test_cases"] == 2
        assert len(record["rows"]["validation"]) == record["validation_cases"]
        for key in ("samples_per_second", "inference_seconds_per_volume", "peak_rss_mb"):
            assert record[key] > 0, key
        assert 0.0 <= record["data_wait_share"] < 1.0
        assert record["test_cases"] == 2
        assert record["torch"] and record["device"] and record["commit"]
        assert math.isclose(record["gap_to_nnunet"], 0.895 - record["dsc_mean"])
    assert (tmp_path / "results.md").read_text().count("\n") == 4


def test_the_runner_chooses_by_validation_even_when_another_configuration_is_better_on_test():
    def record(config, seed, validation, test):
        return {"config": config, "seed": seed, "budget_minutes": 20, "val_dsc_mean": validation} | {
            "dsc_mean": test,
            "device": "CPU A",
        }

    records = [
        record("better_on_test", 0, 0.80, 0.90),
        record("better_on_test", 1, 0.81, 0.91),
        record("better_on_validation", 0, 0.85, 0.86),
        record("better_on_validation", 1, 0.78, 0.85),  # further seeds of a chosen one do not choose
        record("other_budget", 0, 0.99, 0.99) | {"budget_minutes": 5},
        record("a_peer", 0, 0.99, 0.99) | {"peer": "monai"},
        record("a_smoke_check", 0, 0.99, 0.99) | {"quick": True},
    ]
    assert run.choose(records, 20) == "better_on_validation"
    with pytest.raises(
        ValueError, match=r"no runs of 3 minutes to choose from; the results hold budgets \[5, 20\]"
    ):
        run.choose(records, 3)
    other_machine = record("better_on_test", 0, 0.80, 0.90) | {"device": "GPU B"}
    with pytest.raises(ValueError, match=r"come from 2 machines \(CPU A; GPU B\)"):
        run.choose([*records, other_machine], 20)


def test_another_machine_s_results_file_gets_its_own_protocol_outcome_beside_it(tmp_path):
    assert run.protocol_file(run.SUITES["hippocampus"].results) == run.PROTOCOL
    other = tmp_path / "hippocampus_intel.json"
    assert run.protocol_file(other) == tmp_path / "hippocampus_intel_protocol.json"


def test_a_smoke_check_needs_its_own_results_file(capsys):
    with pytest.raises(SystemExit):
        run.main(["--quick", "--cases", "4"])
    assert "give --results <scratch file>" in capsys.readouterr().err


def test_the_chosen_configuration_is_compared_with_each_other_candidate_on_the_same_test_cases():
    def record(config, seed, test_per_case):
        rows = {case: {"dsc_mean": value} for case, value in test_per_case.items()}
        return {"config": config, "seed": seed, "budget_minutes": 20, "rows": {"test": rows}, "device": "cpu"}

    cases = [f"case{i}" for i in range(12)]
    chosen = dict(zip(cases, np.linspace(0.80, 0.90, 12), strict=True))
    records = [
        record("chosen", 0, chosen),
        record("chosen", 1, {case: 0.0 for case in cases}),  # a further seed: not in the comparison
        record("worse_everywhere", 0, {case: value - 0.01 for case, value in chosen.items()}),
        record("equal", 0, chosen),
    ]
    comparisons = run.candidate_comparisons(records, "chosen", budget=20)
    assert set(comparisons) == {"worse_everywhere", "equal"}
    worse = comparisons["worse_everywhere"]
    assert worse["mean"] == pytest.approx(0.01) and worse["ci"] == pytest.approx([0.01, 0.01])
    assert worse["verdict"].startswith("chosen better than other")
    assert comparisons["equal"]["mean"] == 0.0
    assert comparisons["equal"]["verdict"].startswith("no significant difference")


def test_candidates_that_both_ran_further_seeds_are_compared_over_each_case_s_mean_across_those_seeds():
    def record(config, seed, value):
        rows = {f"case{i}": {"dsc_mean": value + 0.01 * i} for i in range(8)}
        return {"config": config, "seed": seed, "budget_minutes": 20, "rows": {"test": rows}, "device": "cpu"}

    records = [record("chosen", 0, 0.80), record("chosen", 1, 0.90), record("chosen", 2, 0.0)]
    records += [record("other", 0, 0.84), record("other", 1, 0.84)]
    (comparison,) = run.candidate_comparisons(records, "chosen", budget=20).values()
    assert comparison["seeds"] == [0, 1]  # seed 2 of the chosen one has no partner
    assert comparison["mean"] == pytest.approx(0.01)  # (0.80 + 0.90) / 2 - 0.84 for every case


@needs_real_data
def test_an_ensemble_configuration_trains_members_on_shares_of_the_budget_and_tests_them_together(tmp_path):
    results, runs = tmp_path / "results.json", tmp_path / "runs"
    name = "res_unet3d_fullres8_affine30_pfg_intensity25_ensemble2"
    arguments = ["--quick", "--cases", "10", "--configs", name, "--budget", "0.02", "--seeds", "3"]
    assert run.main([*arguments, "--results", str(results), "--runs", str(runs)]) == 0
    (record,) = json.loads(results.read_text())
    assert record["settings"]["ensemble"] == 2
    assert record["epochs"] == sum(record["member_epochs"]) == 2
    run_name = f"hippocampus-{name}-0.02min-seed3"
    for member, seed in enumerate((3, 103)):
        args = json.loads((runs / f"{run_name}-member{member}" / "args.json").read_text())
        assert (args["seed"], args["time_budget_minutes"]) == (seed, 0.01)
    table = runs / run_name / "inference" / "dsc.csv"
    assert len(table.read_text().splitlines()) == 1 + record["test_cases"] + record["validation_cases"]


def test_a_missing_data_folder_is_refused_with_a_clear_message(tmp_path, capsys):
    assert run.main(["--data", str(tmp_path)]) == 2
    assert "is not the MSD hippocampus folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("legacy", "marker"), [("hippocampus", "results table"), ("brain", "brain results table")]
)
def test_the_reports_tables_of_earlier_attempts_are_their_frozen_results(legacy, marker):
    report = (REPO / "report.md").read_text()
    match = re.search(f"<!-- {marker} -->\n(.*?)\n<!-- end {marker} -->", report, re.S)
    assert match, f"report.md has no {marker} between its markers"
    frozen = REPO / "benchmarks" / "results" / "legacy" / f"{legacy}.md"
    assert match.group(1).strip() == frozen.read_text().strip()
    assert len(json.loads(frozen.with_suffix(".json").read_text())) == frozen.read_text().count("\n") - 2


def test_the_brain_speed_benchmark_records_training_and_inference_speed_with_and_without_amp(tmp_path):
    data = make_kaggle_3m(tmp_path, n_patients=10, slices_per_patient=(6, 7), image_size=64, seed=1)
    output = tmp_path / "brain_speed.json"
    arguments = [
        "--quick",
        "--budget",
        "0.005",
        "--workers",
        "0",
        "--data",
        str(data),
        "--output",
        str(output),
    ]
    assert brain_speed.main(arguments) == 0
    records = json.loads(output.read_text())
    mixed = "float16" if torch.cuda.is_available() else "bfloat16"
    assert [(record["amp"], record["precision"]) for record in records] == [(False, "float32"), (True, mixed)]
    for record in records:
        assert record["train_slices_per_second"] > 0 and record["inference_slices_per_second"] > 0
        assert 0.0 <= record["data_wait_share"] < 1.0 and 0.0 <= record["best_val_dsc"] <= 1.0
        assert record["settings"]["image_size"] == 64 and record["quick"]
    assert brain_speed.main(arguments) == 0
    assert len(json.loads(output.read_text())) == 2, "a re-run replaces the records of the same device"


def test_the_error_summary_counts_confusions_and_finds_errors_on_the_boundary():
    truth = np.zeros((7, 7, 7), np.int64)
    truth[2:5, 2:5, 2:5] = 1
    truth[3, 3, 3] = 2
    predicted = truth.copy()
    predicted[2, 2, 2] = 0  # a corner of the cube missed: on the boundary
    predicted[3, 3, 3] = 1  # the inner voxel given the wrong class: inside, off the boundary band
    predicted[0, 0, 0] = 2  # a false positive far from the cube
    summary = errors.error_summary([(predicted, truth)], classes=3)
    assert summary["confusion"] == [[315, 0, 1], [1, 25, 0], [0, 1, 0]]
    assert summary["wrong_voxels"] == 3
    assert summary["share_within_one_voxel_of_the_boundary"] == pytest.approx(1 / 3)
    assert summary["share_between_foreground_classes"] == pytest.approx(1 / 3)
    np.testing.assert_array_equal(errors.bounding_box_sizes([truth, predicted]), [[3, 3, 3], [5, 5, 5]])


def test_the_reports_headline_and_protocol_table_are_generated_from_the_results_files():
    records = json.loads(run.SUITES["hippocampus"].results.read_text())
    peers = json.loads(run.PEER_MONAI.read_text())
    summary = run.protocol_summary(records, peers, budget=20)
    assert summary == {k: v for k, v in json.loads(run.PROTOCOL.read_text()).items() if k != "suite"}
    report = (REPO / "report.md").read_text()
    assert summary["headline"] in report
    match = re.search("<!-- protocol table -->\n(.*?)\n<!-- end protocol table -->", report, re.S)
    assert match and match.group(1).strip() == run.markdown(run.SUITES["hippocampus"], records)


def test_the_reports_patch_context_comparison_is_generated_from_its_results_file():
    results = REPO / "benchmarks" / "results" / "hippocampus_context.json"
    records = json.loads(results.read_text())
    summary = run.protocol_summary(records, json.loads(run.PEER_MONAI.read_text()), budget=20)
    assert summary == {
        k: v for k, v in json.loads(run.protocol_file(results).read_text()).items() if k != "suite"
    }
    assert "monai" not in summary  # the peer ran on another machine: no comparison with it
    report = (REPO / "report.md").read_text()
    match = re.search("<!-- context table -->\n(.*?)\n<!-- end context table -->", report, re.S)
    assert match and match.group(1).strip() == run.markdown(run.SUITES["hippocampus"], records)
    (comparison,) = summary["against_candidates"].values()
    assert (
        f"{comparison['mean']:+.4f} (95% CI {comparison['ci'][0]:+.4f} to {comparison['ci'][1]:+.4f}"
        in report
    )


def test_the_reports_demo_selection_tables_are_generated_from_its_results_file():
    import demo_selection

    result = json.loads(demo_selection.RESULT.read_text())
    report = (REPO / "report.md").read_text()
    match = re.search("<!-- demo selection -->\n(.*?)\n<!-- end demo selection -->", report, re.S)
    assert match and match.group(1).strip() == demo_selection.markdown_tables(result)


NOT_TRAINING = {"run_name", "runs_dir", "data_dir", "cache_dir", "preprocess_workers", "device", "resume"}


def readme_settings(marker: str) -> dict:
    """The notebook's parameters cell under the `-y` block that follows `marker` in README.md."""
    notebook = json.loads((REPO / "train.ipynb").read_text())
    (cell,) = [c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", [])]
    namespace: dict = {}
    exec("".join(cell["source"]), namespace)
    block = re.search(re.escape(marker) + r" -y '\n(.*?)\n'", (REPO / "README.md").read_text(), re.S)
    assert block, f"README.md has no -y block after {marker!r}"
    config = TrainConfig.from_namespace({**namespace, **yaml.safe_load(block.group(1))})
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_TRAINING}


def training_settings(config: TrainConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_TRAINING}


def test_the_readme_s_reference_command_trains_with_the_reference_settings():
    assert readme_settings("-p run_name reference") == training_settings(TrainConfig())


def test_the_readme_s_hippocampus_command_trains_the_chosen_seed_0_configuration():
    (record,) = [
        r
        for r in json.loads((REPO / "benchmarks" / "results" / "hippocampus.json").read_text())
        if r.get("chosen") and r["seed"] == 0
    ]
    chosen = training_settings(TrainConfig(**run.recorded_settings(record)))
    ignored = {"image_size", "vis_freq"}  # image_size is kaggle_3m's; vis_freq only draws TensorBoard images
    got = readme_settings("-p run_name hippocampus")
    assert {k: v for k, v in got.items() if k not in ignored} == {
        k: v for k, v in chosen.items() if k not in ignored
    }


def test_the_readme_quotes_the_demo_results_file():
    import demo_summary

    record = json.loads(demo_summary.RESULT.read_text())
    assert demo_summary.sentence(record) in (REPO / "README.md").read_text()


def test_the_earlier_split_file_holds_out_the_24_patient_demo_s_patients_which_the_64_patient_set_holds(
    tmp_path,
):
    def patient_ids(count: int) -> list[str]:
        data = make_kaggle_3m(tmp_path / str(count), count, slices_per_patient=(6, 6), image_size=32, seed=0)
        return sorted(p.name for p in data.iterdir() if p.is_dir())

    earlier_ids = patient_ids(24)
    earlier = split_cases(earlier_ids, validation=4, test=4, seed=42)
    named = yaml.safe_load((REPO / "benchmarks" / "demo_earlier_split.yaml").read_text())
    assert named == {"validation_cases": earlier["validation"], "test_cases": earlier["test"]}
    assert set(earlier_ids) <= set(patient_ids(DEMO_PATIENTS))


def test_two_demo_records_compare_paired_on_the_subsets_whose_patients_they_share():
    import demo_summary

    def record(run, test, further):
        subsets = {"test": test, "unseen": further}
        return {"run": run, "date": "2026-12-03"} | {
            subset: {"cases": cases, "dsc_mean": sum(cases.values()) / len(cases)}
            for subset, cases in subsets.items()
        }

    earlier = record("demo", {"t1": 0.2}, {"u1": 0.50, "u2": 0.60, "u3": 0.90, "u4": 0.70})
    later = record("verify", {"t9": 0.9}, {"u1": 0.60, "u2": 0.70, "u3": 1.00, "u4": 0.80})
    test, further = demo_summary.compare_records(earlier, later)
    assert test == "test patients: not the same patients, not compared"
    assert further.startswith(
        "further patients (4): 0.775 against 0.675, difference +0.100 (+0.100 to +0.100)"
    )
    assert further.endswith("no significant difference (p = 0.125)")  # Wilcoxon, 4 cases: 1/8 at best
    same_test = record("again", {"t1": 0.5}, {"u1": 0.6, "u2": 0.7, "u3": 1.0})
    test, further = demo_summary.compare_records(earlier, same_test)
    assert test.startswith("test patients (1): 0.500 against 0.200, difference +0.300")
    assert further == "further patients: not the same patients, not compared"


def _development_record(name, values, seed=42, time_budget_minutes=None):
    cases = dict(zip(("p1", "p2", "p3", "p4"), values, strict=True))
    parameters = {"time_budget_minutes": time_budget_minutes}
    return {"config": name, "seed": seed, "development_dsc": cases, "parameters": parameters}


def test_the_demo_selection_chooses_by_development_patients_and_pairs_each_candidate_with_the_defaults():
    import demo_selection

    records = [
        _development_record("defaults", [0.90, 0.80, 0.70, 0.60]),
        _development_record("better", [0.95, 0.85, 0.75, 0.65]) | {"test_dsc_mean": 0.1},
        _development_record("worse", [0.80, 0.70, 0.60, 0.50]) | {"test_dsc_mean": 0.99},
    ]
    demo_selection.compare_with_baseline(records)
    assert "versus_defaults" not in records[0]
    assert records[1]["versus_defaults"]["mean_difference"] == pytest.approx(0.05)
    assert records[2]["versus_defaults"]["mean_difference"] == pytest.approx(-0.10)
    assert records[1]["versus_defaults"]["ci"] == pytest.approx([0.05, 0.05])
    assert demo_selection.mark_chosen(records) == "better"
    assert [record["chosen"] for record in records] == [False, True, False]


def test_once_candidates_have_every_seed_the_demo_selection_chooses_by_the_seed_averaged_development_dsc():
    import demo_selection

    first, second = demo_selection.SEEDS
    records = [
        _development_record("lucky", [0.99, 0.99, 0.99, 0.99], first),
        _development_record("steady", [0.90, 0.90, 0.90, 0.90], first),
        _development_record("steady", [0.90, 0.90, 0.90, 0.80], second),
        _development_record("erratic", [0.95, 0.95, 0.95, 0.95], first),
    ]
    assert demo_selection.mark_chosen(records) == "steady"  # the only one with every seed
    records.append(_development_record("erratic", [0.70, 0.70, 0.70, 0.70], second))
    assert demo_selection.mark_chosen(records) == "steady"  # 0.8875 against 0.825 averaged over the seeds
    assert [record["chosen"] for record in records] == [False, True, True, False, False]
    summary = demo_selection.final_summary(records, "steady")
    assert set(summary) == {"steady", "erratic"}
    assert summary["steady"]["development_dsc_mean"] == pytest.approx(0.8875)
    assert summary["erratic"]["chosen_minus_this"]["mean_difference"] == pytest.approx(0.0625)
    assert "chosen_minus_this" not in summary["steady"]


def test_once_a_finalist_bounds_its_training_time_only_such_finalists_compete():
    import demo_selection

    first, second = demo_selection.SEEDS
    records = [
        _development_record("epochs_only", [0.95, 0.95, 0.95, 0.95], first),
        _development_record("epochs_only", [0.95, 0.95, 0.95, 0.95], second),
        _development_record("bounded_early", [0.70, 0.70, 0.70, 0.70], first, time_budget_minutes=7),
    ]
    assert demo_selection.mark_chosen(records) == "epochs_only"  # no bounded finalist yet: both seeds needed
    records.append(_development_record("bounded_early", [0.8] * 4, second, time_budget_minutes=7))
    assert demo_selection.mark_chosen(records) == "bounded_early"  # worse, but the only one that fits
    summary = demo_selection.final_summary(records, "bounded_early")
    assert summary["epochs_only"]["chosen_minus_this"]["mean_difference"] == pytest.approx(-0.2)


def test_demo_errors_counts_missed_and_false_pixels_from_the_metrics_row():
    import demo_errors

    from utils import case_metrics

    truth = np.zeros((2, 4, 4), np.uint8)
    truth[0, :2, :2] = 1  # 4 tumour pixels
    predicted = np.zeros_like(truth)
    predicted[0, 0, :3] = 1  # 2 of them found, 1 false
    row = case_metrics("a", predicted, truth, {1: "tumour"})
    assert demo_errors.case_errors(row) == {"true": 4, "predicted": 3, "missed": 2, "false": 1}


def test_demo_errors_reads_the_development_table_only_when_it_is_current(tmp_path, monkeypatch):
    import os

    import demo_errors

    from dataset import find_sources
    from utils import write_metrics_csv

    data = make_kaggle_3m(tmp_path / "development", 2, slices_per_patient=(6, 6), image_size=32, seed=2)
    patients = sorted(source.case_id for source in find_sources("kaggle_3m", data)[0])
    run_dir = tmp_path / "run"
    (run_dir / "development").mkdir(parents=True)
    weights, table = run_dir / "weights.pt", run_dir / "development" / "dsc.csv"
    weights.write_bytes(b"weights")
    predicted_again = [{"case": "predicted again"}]
    monkeypatch.setattr(demo_errors, "evaluate", lambda *args, **kwargs: {"rows": predicted_again})

    def write_table(cases: list[str], seconds_after_weights: float) -> None:
        write_metrics_csv([{"case": case, "dsc_mean": 0.5} for case in cases], table)
        stamp = weights.stat().st_mtime + seconds_after_weights
        os.utime(table, (stamp, stamp))

    write_table(patients, 10)
    assert [row["case"] for row in demo_errors.development_rows(run_dir, data)] == patients
    write_table(patients, -10)  # the run was trained again after the table was written
    assert demo_errors.development_rows(run_dir, data) == predicted_again
    write_table(patients[:1], 10)  # the table covers other patients
    assert demo_errors.development_rows(run_dir, data) == predicted_again


def test_the_notebook_defaults_are_the_demo_selection_s_chosen_candidate():
    import demo_selection

    if not demo_selection.RESULT.exists():
        pytest.skip(f"{demo_selection.RESULT} has not been written yet")
    result = json.loads(demo_selection.RESULT.read_text())
    chosen_records = [record for record in result["records"] if record["chosen"]]
    assert {record["config"] for record in chosen_records} == {result["chosen"]}
    chosen = chosen_records[0]
    notebook = json.loads((REPO / "train.ipynb").read_text())
    (cell,) = [c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    defaults: dict = {}
    exec("".join(cell["source"]), {}, defaults)
    assert chosen["parameters"] == demo_selection.candidate_parameters(chosen["config"])
    parameters = dict(chosen["parameters"])
    assert parameters.pop("demo_patients") == DEMO_PATIENTS
    for name, value in parameters.items():
        assert defaults[name] == value, name


def test_model_speed_times_a_2d_network_channels_last_with_the_batch_s_channels():
    import model_speed

    result = model_speed.run_case("demo", "unet", {"init_features": 4}, (2, 3, 32, 32), 2, channels_last=True)
    assert result["input_shape"] == [2, 3, 32, 32] and result["channels_last"]
    assert len(result["seconds"]) == 2 and result["median_seconds"] > 0
    three_channels = model_speed.build_model("unet", in_channels=3, out_channels=1, init_features=4)
    assert result["parameters"] == model_speed.count_parameters(three_channels)
