"""The distributed-speed benchmark's quick mode on this CPU, and the GPU script's refusal without a GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import distributed_speed  # noqa: E402

KEYS = {"config", "mode", "processes", "threads", "samples_per_second", "seconds", "cpu", "date", "commit"}


def test_the_quick_distributed_speed_run_records_both_modes_with_a_positive_throughput(tmp_path):
    output = tmp_path / "distributed_speed.json"
    assert distributed_speed.main(["--quick", "--output", str(output)]) == 0
    records = json.loads(output.read_text())
    configs = ["brain"] + ["hippocampus"] * (distributed_speed.HIPPOCAMPUS_DATA / "dataset.json").is_file()
    modes = distributed_speed.MODES.items()
    expected = [(config, mode, *shape) for config in configs for mode, shape in modes]
    assert [(r["config"], r["mode"], r["processes"], r["threads"]) for r in records] == expected
    for record in records:
        assert record.keys() >= KEYS and record["quick"] and record["epochs"] == 1
        assert record["samples_per_second"] > 0 and record["seconds"] > 0
        assert record["completed"] == (record["error"] is None)


def test_the_hippocampus_configuration_is_skipped_with_a_reason_without_its_data(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(distributed_speed, "HIPPOCAMPUS_DATA", tmp_path / "absent")
    assert distributed_speed.data_folder("hippocampus", True, tmp_path) is None
    assert "hippocampus: skipped" in capsys.readouterr().out


def test_a_rerun_replaces_the_records_of_the_same_configuration_mode_cpu_and_quickness(tmp_path):
    output = tmp_path / "records.json"
    old = [
        {"config": "brain", "mode": m, "cpu": "x", "quick": q, "samples_per_second": 1}
        for m in "ab"
        for q in (0, 1)
    ]
    new = [{"config": "brain", "mode": "a", "cpu": "x", "quick": 1, "samples_per_second": 2}]
    kept = distributed_speed.save(old, new, output)
    assert json.loads(output.read_text()) == kept and len(kept) == 4 and kept[-1] == new[0]
    assert [r["samples_per_second"] for r in kept if r["mode"] == "a" and r["quick"]] == [2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: gpu.py would run")
def test_the_gpu_script_exits_non_zero_with_its_message_without_a_cuda_device(tmp_path):
    output = tmp_path / "gpu.json"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--output", str(output)]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2
    assert "needs a CUDA GPU" in finished.stderr and "torch.cuda.is_available() is False" in finished.stderr
    assert not output.exists()
