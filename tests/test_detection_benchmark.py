"""The nodule-detection benchmark, the window-position probe and the paired comparison, end to end."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import detection_comparison  # noqa: E402
import position_probe  # noqa: E402


def _detection_benchmark():
    """benchmarks/detection.py, loaded under its own name: the top-level detection.py has the same one."""
    spec = importlib.util.spec_from_file_location("detection_benchmark", REPO / "benchmarks" / "detection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_detection_benchmark_records_froc_figures_and_the_probe_reads_its_network(tmp_path):
    benchmark = _detection_benchmark()
    output, runs = tmp_path / "detection.json", tmp_path / "runs"
    arguments = ["--quick", "--data", str(tmp_path), "--runs", str(runs), "--output", str(output)]
    assert benchmark.main(arguments) == 0
    record = json.loads(output.read_text())
    assert record["quick"] and record["settings"]["foreground_jitter"] == 0.0
    assert 0.0 <= record["cpm_ci"][0] <= record["cpm"] <= record["cpm_ci"][1] <= 1.0
    assert list(record["sensitivities"]) == ["0.125", "0.25", "0.5", "1", "2", "4", "8"]
    assert record["test_scans"] == 2 and record["seconds_per_scan"] > 0

    probe = tmp_path / "probe.json"
    run = runs / record["settings"]["run_name"]
    assert position_probe.main([str(run), "--shifts", "0", "2", "--scans", "4", "--output", str(probe)]) == 0
    (row,) = json.loads(probe.read_text())["runs"]
    assert row["foreground_jitter"] == 0.0 and row["shifts"] == [0, 2]
    assert row["nodules"] >= 1 and row["skipped_near_edge"] >= 0
    assert len(row["mean_peak"]) == 2 and all(0.0 <= v <= 1.0 for v in row["mean_peak"])
    assert len(row["share_above_half"]) == 2

    compared = detection_comparison.compare(run, run, iterations=50)
    assert compared["test_scans"] == 2 and compared["cpm_a"] == compared["cpm_b"] == record["cpm"]
    assert (compared["difference"], compared["p_value"]) == (0.0, 1.0)
    other = tmp_path / "other-split"
    shutil.copytree(run, other)
    settings = json.loads((other / "args.json").read_text())
    settings["split"]["test"] = settings["split"]["test"][:1]
    (other / "args.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="differ in split"):
        detection_comparison.compare(run, other)


def test_the_report_s_detection_table_equals_the_results_files():
    report = (REPO / "report.md").read_text()
    for name in ("detection.json", "detection-jitter0.5.json"):
        record = json.loads((REPO / "benchmarks" / "results" / name).read_text())
        low, high = record["cpm_ci"]
        at_1, at_4 = record["sensitivities"]["1"], record["sensitivities"]["4"]
        row = (
            f"| `{name}` | {record['epochs']} | {record['best_val_cpm']:.3f} ({record['best_epoch']}) | "
            f"{record['cpm']:.3f} [{low:.3f}, {high:.3f}] | {at_1:.2f} / {at_4:.2f} |"
        )
        assert row in report.replace("**", ""), row
