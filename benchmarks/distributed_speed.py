"""The overhead of data parallelism on this CPU: one process with every core against one process per core.

Each configuration trains through `train.py --config <yaml>` in a subprocess, so that both modes run the same
code: once as 1 process × 2 threads (`python train.py`, OMP_NUM_THREADS=2) and once as 2 processes × 1 thread
(`torchrun --standalone --nproc_per_node=2 train.py`, gloo, OMP_NUM_THREADS=1), each for the same training
time budget. The configurations: `brain`, the reference 2D U-Net (256 × 256, batch 16, init_features 32,
Dice, Adam 1e-4) on the generated kaggle_3m demo data (24 synthetic patients, made on first use); and
`hippocampus`, the 3D residual U-Net of the best hippocampus configuration (depth 3, full resolution 8,
32 × 48 × 32 patches, batch 4, Dice + CE, 200 patches per epoch, one loader worker) on the real MSD Task04
data (skipped, with the reason printed, when ../shared/data/msd-hippocampus is absent). The cases are
preprocessed into the cache before the timed runs, so that neither mode pays for it.

Recorded per configuration and mode: training samples per second (from the run's history.json, the epochs
after the first, or the only one), its ratio to the single process, the wall time of the whole subprocess
(start-up, process group, validation included), the training and validation seconds, the CPU, the date and
the commit. Records go to benchmarks/results/distributed_speed.json (replaced per configuration, mode, CPU
and --quick when re-run). On 2 cores no speed-up is expected: the figure is the cost of the second process.

    .venv/bin/python benchmarks/distributed_speed.py                  # 2 minutes per run, about 15 minutes
    .venv/bin/python benchmarks/distributed_speed.py --budget 5 --configs hippocampus
    .venv/bin/python benchmarks/distributed_speed.py --quick          # tiny data, one short epoch each
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model_speed import cpu_name  # noqa: E402
from run import brain_data, commit, first_cases  # noqa: E402

from config import TrainConfig  # noqa: E402
from dataset import find_sources, prepare_cases, split_cases  # noqa: E402
from engine import _plan  # noqa: E402
from synthetic import make_kaggle_3m  # noqa: E402

OUTPUT = REPO / "benchmarks" / "results" / "distributed_speed.json"
HIPPOCAMPUS_DATA = REPO.parent / "shared" / "data" / "msd-hippocampus"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, with this interpreter
CORES = 2
MODES = {"single": (1, CORES), "torchrun": (CORES, 1)}  # mode: (processes, threads per process)
COMMON = {"epochs": 1000, "vis_freq": 1000, "seed": 0, "resume": False, "channels_last": True}
SETTINGS = {
    "brain": {
        "dataset": "kaggle_3m",
        "model": "unet",
        "init_features": 32,
        "image_size": 256,
        "batch_size": 16,
        "lr": 1e-4,
        "loss": "dice",
        "validation_cases": 4,
        "test_cases": 4,
        "num_workers": 0,
    },
    "hippocampus": {  # the split of benchmarks/run.py's hippocampus suite, so its cache is reused
        "dataset": "msd",
        "model": "res_unet3d",
        "model_options": {"depth": 3, "full_resolution": 8},
        "init_features": 16,
        "patch_size": [32, 48, 32],
        "batch_size": 4,
        "loss": "dice_ce",
        "patches_per_epoch": 200,
        "num_workers": 1,
        "validation_cases": 20,
        "test_cases": 52,
        "split_seed": 0,
    },
}
# Not the reference: small enough for a test on two busy cores (one epoch of a few steps per run).
QUICK = {
    "brain": {"image_size": 64, "init_features": 4, "batch_size": 4, "validation_cases": 1, "test_cases": 1},
    "hippocampus": {
        "init_features": 4,
        "patches_per_epoch": 8,
        "num_workers": 0,
        "validation_cases": 1,
        "test_cases": 1,
    },
}
QUICK_CASES = 6  # patients (brain) or labelled cases (hippocampus) of the quick data


def quick_data(name: str, folder: Path) -> Path:
    """Tiny data for --quick: 6 small synthetic patients, or links to the first 6 hippocampus cases."""
    if name == "brain":
        return make_kaggle_3m(folder, QUICK_CASES, slices_per_patient=(6, 7), image_size=64, seed=0)
    return first_cases(HIPPOCAMPUS_DATA, QUICK_CASES, folder / "msd")


def data_folder(name: str, quick: bool, scratch: Path) -> Path | None:
    """A configuration's data folder; None (with the reason printed) when the hippocampus data is absent."""
    if name == "hippocampus" and not (HIPPOCAMPUS_DATA / "dataset.json").is_file():
        print(f"hippocampus: skipped, the MSD Task04 data is not at {HIPPOCAMPUS_DATA}", flush=True)
        return None
    if quick:
        return quick_data(name, scratch)
    return brain_data() if name == "brain" else HIPPOCAMPUS_DATA


def make_config(name: str, data: Path, args: argparse.Namespace, runs: Path, cache: Path) -> TrainConfig:
    """The configuration's settings for one run: time budget, or one epoch with --quick."""
    settings = {**COMMON, **SETTINGS[name], **(QUICK[name] if args.quick else {})}
    settings |= {"data_dir": str(data), "runs_dir": str(runs), "cache_dir": str(cache), "run_name": name}
    settings |= {"epochs": 1} if args.quick else {"time_budget_minutes": args.budget}
    return TrainConfig(**settings)


def warm_cache(config: TrainConfig) -> None:
    """Preprocess the cases into the cache with the plan train() will make, so no timed run pays for it."""
    sources, info = find_sources(config.dataset, config.data_dir)
    by_id = {source.case_id: source for source in sources}
    split_seed = config.seed if config.split_seed is None else config.split_seed
    split = split_cases(list(by_id), config.validation_cases, config.test_cases, split_seed)
    plan = _plan(config, [by_id[case_id] for case_id in split["train"]], info)
    prepare_cases(sources, plan, info, config.cache_dir, CORES)


def command(config_file: Path, processes: int) -> list[str]:
    """train.py in this process's interpreter, or under torchrun (a free rendezvous port) for several."""
    if processes == 1:
        return [sys.executable, str(REPO / "train.py"), "--config", str(config_file)]
    launcher = [*TORCHRUN, "--standalone", f"--nproc_per_node={processes}"]
    return [*launcher, str(REPO / "train.py"), "--config", str(config_file)]


def failure(stderr: str) -> str:
    """The error a failed train.py printed: its `rank N: Error: message` line, else its last line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    ranked = [line for line in lines if line.startswith("rank ")]
    return (ranked or lines or ["(no output)"])[-1]


def launch(config: TrainConfig, mode: str, folder: Path) -> tuple[list[dict], float, str | None]:
    """Train one mode in a subprocess: (the run's history, wall seconds of the subprocess, its error).

    A run that fails after training at least one epoch still measured its speed: its history is kept and
    the error recorded (a 2D U-Net's batch-norm statistics differ per rank on CPU, and train() refuses to
    finish a run whose ranks disagree). A run with no epoch is an error.
    """
    processes, threads = MODES[mode]
    config = dataclasses.replace(config, run_name=f"{config.run_name}-{mode}")
    config_file = config.save(folder / f"{config.run_name}.yaml")
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    limit = 600 + 120 * (config.time_budget_minutes or 0)
    started = time.perf_counter()
    arguments = command(config_file, processes)
    finished = subprocess.run(
        arguments, cwd=REPO, env=environment, capture_output=True, text=True, timeout=limit
    )
    seconds = time.perf_counter() - started
    history_file = config.run_dir / "history.json"
    if not history_file.is_file():
        raise RuntimeError(f"{config.run_name}: train.py trained no epoch\n{finished.stderr[-3000:]}")
    error = None if finished.returncode == 0 else failure(finished.stderr)
    return json.loads(history_file.read_text()), seconds, error


def training_speed(history: list[dict]) -> float:
    """Training samples per second over the epochs after the first (warm-up), or the only one."""
    timed = history[1:] or history
    return sum(e["samples_per_second"] * e["seconds"] for e in timed) / sum(e["seconds"] for e in timed)


def measure(name: str, mode: str, config: TrainConfig, folder: Path, quick: bool) -> dict:
    """One record: a configuration trained in one mode."""
    processes, threads = MODES[mode]
    history, wall_seconds, error = launch(config, mode, folder)
    return {
        "config": name,
        "mode": mode,
        "processes": processes,
        "threads": threads,
        "samples_per_second": training_speed(history),
        "seconds": wall_seconds,
        "train_seconds": sum(entry["seconds"] for entry in history),
        "validation_seconds": sum(entry["validation_seconds"] for entry in history),
        "epochs": len(history),
        "completed": error is None,
        "error": error,
        "budget_minutes": config.time_budget_minutes,
        "quick": quick,
        "settings": {**SETTINGS[name], **(QUICK[name] if quick else {})},
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
    }


def save(records: list[dict], new: list[dict], output: Path) -> list[dict]:
    """The records with `new` replacing those of the same configuration, mode, CPU and quickness."""
    key = ("config", "mode", "cpu", "quick")
    kept = [r for r in records if all([r.get(k) for k in key] != [n[k] for k in key] for n in new)]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(kept + new, indent=1) + "\n")
    return kept + new


def run_configuration(name: str, args: argparse.Namespace, scratch: Path) -> list[dict]:
    """Both modes of one configuration (none when its data is absent), each relative to the single process."""
    data = data_folder(name, args.quick, scratch)
    if data is None:
        return []
    cache = scratch / "cache" if args.quick else REPO / ".cache"
    config = make_config(name, data, args, scratch / "runs", cache)
    warm_cache(config)
    records = []
    for mode in MODES:
        record = measure(name, mode, config, scratch, args.quick)
        record["relative_to_single"] = (
            record["samples_per_second"] / (records or [record])[0]["samples_per_second"]
        )
        records.append(record)
        print(
            f"{name}, {mode} ({record['processes']} × {record['threads']}): "
            f"{record['samples_per_second']:.2f} samples/s ({record['relative_to_single']:.2f} × single), "
            f"{record['seconds']:.0f} s wall, {record['epochs']} epoch(s)"
            + ("" if record["completed"] else f"; train.py then failed: {record['error']}"),
            flush=True,
        )
    return records


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--budget", type=float, default=2.0, help="training minutes per run")
    parser.add_argument("--configs", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--quick", action="store_true", help="tiny data, one epoch per run (a smoke check)")
    args = parser.parse_args(argv)
    records = json.loads(args.output.read_text()) if args.output.exists() else []
    with tempfile.TemporaryDirectory(prefix="distributed-speed-") as scratch:
        for name in args.configs:
            records = save(records, run_configuration(name, args, Path(scratch) / name), args.output)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
