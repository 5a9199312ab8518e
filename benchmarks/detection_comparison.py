"""Two detection runs on the same test scans: their CPMs and the paired-bootstrap difference A − B.

Each run is a folder that benchmarks/detection.py trained and evaluated (its inference/candidates.csv holds
the test scans' candidates). Both runs must share the data folder and the test split, so the same scans and
nodules score both; every resample of the bootstrap draws scans once and scores both systems on them.

    .venv/bin/python benchmarks/detection_comparison.py runs/benchmarks/luna-nodules-50-30min \\
        runs/benchmarks/luna-nodules-50-30min-jitter0.5   # → benchmarks/results/detection_comparison.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detection import find_nodule_scans  # noqa: E402
from froc import paired_cpm_difference, read_candidates  # noqa: E402
from runs import ARGS, read_json  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "detection_comparison.json"


def run_settings(run_dir: Path) -> dict:
    return read_json(run_dir / ARGS, f"the settings of a trained run ({run_dir} is not a run folder?)")


def compare(run_a: Path, run_b: Path, iterations: int = 1000) -> dict:
    """The record: each run's name, jitter and CPM, and the paired difference with its interval."""
    settings = [run_settings(run_a), run_settings(run_b)]
    for key in ("data_dir", "split"):
        if settings[0][key] != settings[1][key]:
            raise ValueError(f"{run_a} and {run_b} differ in {key}: they were not scored on the same scans")
    series = settings[0]["split"]["test"]
    test_scans = [scan for scan in find_nodule_scans(settings[0]["data_dir"]) if scan.case_id in series]
    annotations = [finding for scan in test_scans for finding in scan.nodules]
    excluded = [finding for scan in test_scans for finding in scan.excluded]
    candidates = [read_candidates(run / "inference" / "candidates.csv", series) for run in (run_a, run_b)]
    result = paired_cpm_difference(*candidates, annotations, excluded, series, iterations=iterations)
    return {
        "a": {"run": run_a.name, "foreground_jitter": settings[0]["foreground_jitter"]},
        "b": {"run": run_b.name, "foreground_jitter": settings[1]["foreground_jitter"]},
        "test_scans": len(series),
        "test_nodules": len(annotations),
        **dataclasses.asdict(result),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    record = compare(args.run_a, args.run_b, args.iterations)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"CPM {record['cpm_a']:.3f} ({args.run_a.name}) − {record['cpm_b']:.3f} ({args.run_b.name}) = "
        f"{record['difference']:+.3f} (95% CI {record['lower']:+.3f} to {record['upper']:+.3f}, "
        f"p = {record['p_value']:.3f}, {record['test_scans']} scans)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
