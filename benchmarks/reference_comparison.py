"""The reference course program and the project side by side, at the reference settings, in one run.

Both train the reference network (2D U-Net, init_features 32), its Dice loss, Adam 1e-4, batch 16, for
the same number of epochs on the same training patients of the generated kaggle_3m set (the demo's
split), choose their best epoch on the same validation patients, and predict the same test patients.
Recorded for each: first-run preprocessing seconds, training slices per second, per-patient test DSC.
The two DSCs are not on one grid: the reference scores its own preprocessed slices (cropped, resized,
first and last slice dropped), the project the original slices, every one of them; the per-patient
pairs are listed, not tested (4 patients).

    .venv/bin/python benchmarks/reference_comparison.py --epochs 3 --image-size 128
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model_speed import cpu_name  # noqa: E402
from peers import kaggle_data, reference_split, run_reference  # noqa: E402
from run import commit  # noqa: E402

from engine import TrainConfig, evaluate, train  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "reference_comparison.json"


def project_run(data: Path, epochs: int, image_size: int, work: Path) -> dict:
    """The project at the reference settings, with a fresh cache so that preprocessing is timed."""
    config = TrainConfig(
        run_name="reference-settings",
        runs_dir=str(work / "runs"),
        cache_dir=str(work / "cache"),
        data_dir=str(data),
        image_size=image_size,
        init_features=32,
        loss="dice",
        lr=1e-4,
        batch_size=16,
        epochs=epochs,
        validation_cases=4,
        test_cases=4,
        seed=42,
        channels_last=False,
    )
    started = time.perf_counter()
    summary = train(config)
    seconds = time.perf_counter() - started
    history = summary["history"]
    training = sum(e["seconds"] + e["validation_seconds"] for e in history)
    rows = evaluate(config.run_dir, subsets=["test"])["rows"]
    return {
        "preprocessing_seconds": seconds - training,  # train() minus its epochs: reading, plan, cache
        "slices_per_second": sum(e["samples_per_second"] * e["seconds"] for e in history)
        / sum(e["seconds"] for e in history),
        "best_val_dsc": summary["best_val_mean_dsc"],
        "rows": [{"case": row["case"], "dsc": row["dsc_mean"]} for row in rows],
        "dsc_metric": "per volume on the original slices, every slice, no post-processing",
        "split": summary["split"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--data", type=Path, help="a kaggle_3m folder (default: the demo's, generated)")
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    data = kaggle_data(args.data)
    split = reference_split(data, validation=4, test=4, seed=42)
    code = commit()
    reference = run_reference(data, split, args.epochs, args.image_size)
    with tempfile.TemporaryDirectory(prefix="project-") as work:
        project = project_run(data, args.epochs, args.image_size, Path(work))
    if project["split"]["test"] != sorted(split["test"]):
        raise RuntimeError(f"the splits differ: {project['split']['test']} vs {sorted(split['test'])}")
    theirs = {row["case"]: row["dsc"] for row in reference["rows"]}
    ours = {row["case"]: row["dsc"] for row in project["rows"]}
    record = {
        "epochs": args.epochs,
        "image_size": args.image_size,
        "patients": {case: {"project": ours[case], "reference": theirs[case]} for case in ours},
        "project": {k: v for k, v in project.items() if k != "rows"},
        "reference": {
            k: reference[k] for k in ("preprocessing_seconds", "slices_per_second", "best_val_dsc")
        },
        "cpu": cpu_name(),
        "commit": code,
        "date": datetime.date.today().isoformat(),
    }
    record["reference"]["dsc_metric"] = reference["dsc_metric"]
    for side in ("project", "reference"):
        values = [patient[side] for patient in record["patients"].values()]
        record[side]["dsc_mean"] = sum(values) / len(values)
    record["preprocessing_speedup"] = reference["preprocessing_seconds"] / project["preprocessing_seconds"]
    record["training_speedup"] = project["slices_per_second"] / reference["slices_per_second"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("preprocessing_speedup", "training_speedup")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
