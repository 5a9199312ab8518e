"""Whether a demo run's errors are misses or false alarms, on the development patients.

For each development patient (benchmarks/demo_selection.py's data/development/kaggle_3m) and each run
folder given: the true, the predicted, the missed (false negative) and the falsely predicted (false
positive) tumour pixels on the original slices, before post-processing. A network that finds only the
bright core of a tumour shows many misses and few false pixels. Printed for the patients below a DSC of
0.9 and in total, and written as JSON beside each run's development predictions
(`<run>/development/errors.json`).

    .venv/bin/python benchmarks/demo_errors.py runs/benchmarks/demo-<candidate> [...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo_selection import development_data  # noqa: E402

from dataset import find_sources, prepare_cases, read_source, to_source_grid  # noqa: E402
from engine import load_run, mean_probabilities, predict_case  # noqa: E402
from utils import select_device  # noqa: E402


def pixel_errors(predicted: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """True, predicted, missed and false foreground pixels of one binary case."""
    predicted, truth = predicted > 0, truth > 0
    return {
        "true": int(truth.sum()),
        "predicted": int(predicted.sum()),
        "missed": int((truth & ~predicted).sum()),
        "false": int((predicted & ~truth).sum()),
    }


def dice(errors: dict[str, int]) -> float:
    """DSC from the pixel counts (1 when both are empty)."""
    found = errors["true"] - errors["missed"]
    denominator = errors["true"] + errors["predicted"]
    return 1.0 if denominator == 0 else 2.0 * found / denominator


def run_errors(run_dir: Path, data: Path) -> dict[str, dict[str, int]]:
    """Pixel errors of one run's best weights on every labelled patient in `data`."""
    device = select_device("cpu")
    config, args, model = load_run(run_dir, device)
    info = args["info"]
    sources, _ = find_sources(config.dataset, data)
    cases = prepare_cases(sources, args["plan"], info, config.cache_dir, config.preprocess_workers)
    errors = {}
    for case in cases:
        logits = predict_case(model, np.asarray(case.image), device, args["shapes"], config)
        predicted = to_source_grid(case, mean_probabilities([logits]))
        errors[case.case_id] = pixel_errors(predicted, read_source(case, args["plan"], info).label)
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of benchmarks/demo_selection.py")
    args = parser.parse_args(argv)
    data = development_data()
    for run_dir in args.runs:
        errors = run_errors(run_dir, data)
        total = {
            key: sum(case[key] for case in errors.values())
            for key in ("true", "predicted", "missed", "false")
        }
        for case_id, case in errors.items():
            if dice(case) < 0.9:
                print(f"{run_dir.name} {case_id}: DSC {dice(case):.3f}, {case}")
        print(f"{run_dir.name} all {len(errors)} patients: {total}")
        output = run_dir / "development" / "errors.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"patients": errors, "total": total}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
