"""Whether a demo run's errors are misses or false alarms, on the development patients.

For each development patient (benchmarks/demo_selection.py's data/development/kaggle_3m) and each run
folder given, from the predictions that demo_selection already made (development_rows): the true, the
predicted, the missed (false negative) and the falsely predicted (false positive) tumour pixels on the
original slices, before post-processing (engine.evaluate's `voxels_`, `fn_` and `fp_` columns). A network
that finds only the bright core of a tumour shows many misses and few false pixels. Printed for the
patients below a DSC of 0.9 and in total, and written as JSON beside each run's development predictions
(`<run>/development/errors.json`).

    .venv/bin/python benchmarks/demo_errors.py runs/benchmarks/demo-<candidate> [...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo_selection import development_data  # noqa: E402

from dataset import find_sources  # noqa: E402
from engine import evaluate  # noqa: E402
from utils import read_metrics_csv  # noqa: E402


def case_errors(row: dict) -> dict[str, int]:
    """True, predicted, missed and false tumour pixels of one patient, from its metrics row (before
    post-processing)."""
    true, missed, false = (int(row[f"{kind}_tumour"]) for kind in ("voxels", "fn", "fp"))
    return {"true": true, "predicted": true - missed + false, "missed": missed, "false": false}


def development_rows(run_dir: Path, data: Path) -> list[dict]:
    """The metrics rows of one run's best weights on every patient in `data`.

    demo_selection.run_candidate has already predicted them into `<run>/development/dsc.csv`; that table is
    read when it is newer than the run's weights and covers exactly `data`'s patients, and otherwise (a run
    trained again, or elsewhere) the patients are predicted again, so a stale table is never reported.
    """
    output = run_dir / "development"
    table = output / "dsc.csv"
    if table.is_file() and table.stat().st_mtime > (run_dir / "weights.pt").stat().st_mtime:
        rows = read_metrics_csv(table)
        patients = {source.case_id for source in find_sources("kaggle_3m", data)[0]}
        if {row["case"] for row in rows} == patients:
            return rows
    return evaluate(run_dir, data_dir=str(data), output_dir=output, device="cpu")["rows"]


def run_errors(run_dir: Path, data: Path) -> tuple[dict[str, dict[str, int]], dict[str, float]]:
    """Pixel errors and DSC of one run's best weights on every labelled patient in `data`."""
    rows = development_rows(run_dir, data)
    return {row["case"]: case_errors(row) for row in rows}, {row["case"]: row["dsc_mean"] for row in rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of benchmarks/demo_selection.py")
    args = parser.parse_args(argv)
    data = development_data()
    for run_dir in args.runs:
        errors, dsc = run_errors(run_dir, data)
        total = {
            key: sum(case[key] for case in errors.values())
            for key in ("true", "predicted", "missed", "false")
        }
        for case_id, case in errors.items():
            if dsc[case_id] < 0.9:
                print(f"{run_dir.name} {case_id}: DSC {dsc[case_id]:.3f}, {case}")
        print(f"{run_dir.name} all {len(errors)} patients: {total}")
        output = run_dir / "development" / "errors.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"patients": errors, "total": total}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
