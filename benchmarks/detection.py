"""Lung-nodule detection on the generated LUNA16 stand-in: a training budget on this CPU, then LUNA16's FROC
and CPM on the held-out scans, with bootstrap intervals and seconds per scan.

    .venv/bin/python benchmarks/detection.py                  # 50 scans, 30 training minutes
    .venv/bin/python benchmarks/detection.py --quick          # a smoke check (tiny, seconds)
    .venv/bin/python benchmarks/detection.py --jitter 0.5 \
        --output benchmarks/results/detection-jitter0.5.json  # nodules anywhere in a patch's central half

The data are made here (synthetic.make_luna, seeded) in --data; the run goes to runs/benchmarks. The
configuration is fixed before any test scan is seen; the epoch is chosen by the validation scans' CPM.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model_speed import cpu_name  # noqa: E402
from run import commit  # noqa: E402

from engine import TrainConfig, evaluate, train  # noqa: E402
from synthetic import make_luna  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "detection.json"
SETTINGS = {
    "dataset": "luna_nodules",
    "spacing": 1.5,  # the stand-in's voxels are 2.5 x 2.7 x 2.7 mm: finer than 1.5 mm adds no detail
    "model": "res_unet3d",
    "model_options": {"depth": 3},
    "init_features": 16,
    "patch_size": [48, 64, 64],
    "batch_size": 4,
    "patches_per_epoch": 500,  # validation (8 whole scans, ~10 s) after every 20 s of training
    "foreground_ratio": 0.6,
    "foreground_jitter": 0.0,  # centred (nnU-Net); 0.5 had the lower validation CPM (report.md)
    "loss": "dice_ce",
    "lr": 1e-3,
    "lr_schedule": "poly",
    "aug_flip_axes": [-1],
    "aug_affine_prob": 0.3,
    "aug_patch_context": False,  # as report.md's runs were trained: rotated patches with zero corners
    "num_workers": 1,
    "validation_cases": 8,
    "test_cases": 12,
    "split_seed": 0,
    "epochs": 1000,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=REPO / "data", help="where the stand-in is made")
    parser.add_argument("--scans", type=int, default=50)
    parser.add_argument("--budget", type=float, default=30.0, help="training minutes")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "benchmarks")
    parser.add_argument("--output", type=Path, default=RESULT)
    parser.add_argument(
        "--jitter", type=float, default=SETTINGS["foreground_jitter"], help="foreground_jitter"
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    scans, shape = (6, (48, 64, 64)) if args.quick else (args.scans, (120, 128, 128))
    folder = args.data / f"luna16-nodules-{scans}"
    data = (
        folder / "luna16"
        if (folder / "luna16").is_dir()
        else make_luna(folder, n_cases=scans, shape=shape, seed=7)
    )
    name = f"luna-nodules-{scans}-{args.budget:g}min"
    if args.jitter != SETTINGS["foreground_jitter"]:
        name += f"-jitter{args.jitter:g}"
    settings = SETTINGS | {"run_name": name, "runs_dir": str(args.runs), "foreground_jitter": args.jitter}
    settings |= {"data_dir": str(data), "time_budget_minutes": args.budget, "resume": False}
    if args.quick:
        settings |= {"spacing": 3.0, "patch_size": [32, 32, 32], "patches_per_epoch": 8, "epochs": 1}
        settings |= {
            "validation_cases": 2,
            "test_cases": 2,
            "model_options": {"depth": 2},
            "init_features": 4,
        }
    code = commit()
    summary = train(TrainConfig(**settings))
    result = evaluate(Path(args.runs) / settings["run_name"], subsets=["test"])
    froc = result["froc"]["test"]
    rows = result["rows"]
    record = {
        "scans": scans,
        "test_scans": len(rows),
        "test_nodules": froc.n_nodules,
        "budget_minutes": args.budget,
        "epochs": len(summary["history"]),
        "best_epoch": summary["best_epoch"],
        "best_val_cpm": summary["best_val_score"],
        "cpm": froc.cpm,
        "cpm_ci": [froc.bootstrap.cpm_lower, froc.bootstrap.cpm_upper],
        "sensitivities": dict(
            zip([f"{p:g}" for p in froc.operating_points], map(float, froc.sensitivities), strict=True)
        ),
        "sensitivities_ci": [
            [float(low), float(high)]
            for low, high in zip(
                froc.bootstrap.sensitivities_lower, froc.bootstrap.sensitivities_upper, strict=True
            )
        ],
        "seconds_per_scan": sum(row["seconds"] for row in rows) / len(rows),
        "settings": settings,
        "quick": args.quick,
        "device": cpu_name(),
        "commit": code,
        "date": datetime.date.today().isoformat(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"CPM {froc.cpm:.3f} (95% CI {record['cpm_ci'][0]:.3f}-{record['cpm_ci'][1]:.3f}), {len(rows)} scans"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
