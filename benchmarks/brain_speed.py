"""Speed of the reference brain-MRI configuration, with and without mixed precision.

The reference experiment of the course (2D U-Net, 256 × 256 slices, batch 16, init_features 32, Dice loss,
Adam 1e-4) on the generated kaggle_3m demo data (synthetic; made on first use). For each precision, amp off
and on (float16 with a gradient scaler on CUDA, bfloat16 on CPU), the real training loop (`engine.train`,
augmentation and data loading included) runs for `--budget` minutes, then the trained network predicts the
test volumes (`engine.predict_case`). Recorded: training slices per second (the first epoch, which includes
warm-up, left out when there are more), the share of training time spent waiting for data, inference slices
per second, peak GPU memory. Results go to benchmarks/results/brain_speed.json, one record per device and
precision (replaced when re-run).

    .venv/bin/python benchmarks/brain_speed.py                     # 1 minute per precision
    .venv/bin/python benchmarks/brain_speed.py --budget 0.3 --workers 0
    .venv/bin/python benchmarks/brain_speed.py --quick --budget 0.02   # a smoke check, not the reference
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from run import commit, device_name  # noqa: E402

from engine import TrainConfig, load_cases, load_run, predict_case, train  # noqa: E402
from synthetic import DEMO_DATA_DIR, ensure_demo_data  # noqa: E402

OUTPUT = REPO / "benchmarks" / "results" / "brain_speed.json"
REFERENCE = {
    "dataset": "kaggle_3m",
    "image_size": 256,
    "model": "unet",
    "init_features": 32,
    "batch_size": 16,
    "loss": "dice",
    "lr": 1e-4,
    "validation_cases": 4,
    "test_cases": 4,
    "epochs": 1000,
    "vis_freq": 1000,
    "seed": 0,
    "resume": False,
}
QUICK = {"image_size": 64, "init_features": 4, "batch_size": 4}  # small enough for a test on a CPU


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_speed(history: list[dict]) -> tuple[float, float]:
    """(slices per second, data wait share) over the epochs after the first, or the only one."""
    timed = history[1:] or history
    seconds = sum(entry["seconds"] for entry in timed)
    slices = sum(entry["samples_per_second"] * entry["seconds"] for entry in timed)
    return slices / seconds, sum(entry["data_seconds"] for entry in timed) / seconds


def inference_speed(run_dir: Path, device: torch.device) -> float:
    """Slices per second over the run's test volumes, after one warm-up volume."""
    config, args, model = load_run(run_dir, device)
    cases, _, _ = load_cases(config)
    volumes = [case.image for case in cases if case.case_id in args["split"]["test"]]
    predict_case(model, volumes[0], device, args["shapes"], config)
    synchronize(device)
    started = time.perf_counter()
    for volume in volumes:
        predict_case(model, volume, device, args["shapes"], config)
    synchronize(device)
    return sum(volume.shape[1] for volume in volumes) / (time.perf_counter() - started)


def measure(amp: bool, args: argparse.Namespace, runs: Path) -> dict:
    """Train for the budget with amp on or off, then time inference; the record."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = {**REFERENCE, "data_dir": str(args.data), "runs_dir": str(runs), "amp": amp}
    settings |= {"run_name": f"brain-speed-amp-{amp}", "time_budget_minutes": args.budget}
    settings["num_workers"] = args.workers
    if args.quick:
        settings |= QUICK
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = train(TrainConfig(**settings))
    train_speed, data_wait = training_speed(result["history"])
    record = {
        "device": device_name(),
        "amp": amp,
        "precision": ("float16" if device.type == "cuda" else "bfloat16") if amp else "float32",
        "train_slices_per_second": train_speed,
        "data_wait_share": data_wait,
        "inference_slices_per_second": inference_speed(Path(result["run_dir"]), device),
        "epochs": len(result["history"]),
        "best_val_dsc": result["best_val_mean_dsc"],
    }
    if device.type == "cuda":
        record["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    record |= {"budget_minutes": args.budget, "num_workers": args.workers, "quick": args.quick}
    record["settings"] = settings
    record |= {"commit": commit(), "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    return record


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--budget", type=float, default=1.0, help="training minutes per precision")
    parser.add_argument("--workers", type=int, default=8 if torch.cuda.is_available() else 0)
    parser.add_argument("--data", type=Path, default=DEMO_DATA_DIR, help="a kaggle_3m folder")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--quick", action="store_true", help=f"not the reference: {QUICK}")
    args = parser.parse_args(argv)
    ensure_demo_data(args.data)
    records = json.loads(args.output.read_text()) if args.output.exists() else []
    with tempfile.TemporaryDirectory(prefix="brain-speed-") as runs:
        for amp in (False, True):
            record = measure(amp, args, Path(runs))
            key = ("device", "amp", "quick")
            records = [r for r in records if [r.get(k) for k in key] != [record[k] for k in key]] + [record]
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(records, indent=1) + "\n")
            print(
                f"{record['device']}, {record['precision']}: training "
                f"{record['train_slices_per_second']:.1f} slices/s (data wait "
                f"{100 * record['data_wait_share']:.1f}%), inference "
                f"{record['inference_slices_per_second']:.1f} slices/s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
