"""The nodule-detection benchmark and the window-position probe, end to end on a tiny generated LUNA16."""

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

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
    assert record["quick"] and record["settings"]["foreground_jitter"] == 0.5
    assert 0.0 <= record["cpm_ci"][0] <= record["cpm"] <= record["cpm_ci"][1] <= 1.0
    assert list(record["sensitivities"]) == ["0.125", "0.25", "0.5", "1", "2", "4", "8"]
    assert record["test_scans"] == 2 and record["seconds_per_scan"] > 0

    probe = tmp_path / "probe.json"
    run = runs / record["settings"]["run_name"]
    assert position_probe.main([str(run), "--shifts", "0", "2", "--scans", "4", "--output", str(probe)]) == 0
    (row,) = json.loads(probe.read_text())["runs"]
    assert row["foreground_jitter"] == 0.5 and row["shifts"] == [0, 2]
    assert row["nodules"] >= 1 and row["skipped_near_edge"] >= 0
    assert len(row["mean_peak"]) == 2 and all(0.0 <= v <= 1.0 for v in row["mean_peak"])
    assert len(row["share_above_half"]) == 2
