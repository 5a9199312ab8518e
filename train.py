"""Train from a terminal with the notebook's settings, in one process or several (torchrun).

    python train.py --config runs/demo.yaml                       # one process (CPU or one GPU)
    python train.py --config run.yaml --set epochs=50 lr=3e-4     # the file's settings, two changed
    torchrun --nproc_per_node=4 train.py --config run.yaml        # 4 GPUs (or CPU processes), one machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=host0:29500 \\
        train.py --config run.yaml                                # two machines, started on each

The settings file is YAML or JSON holding TrainConfig fields (train.ipynb writes one beside its run:
`runs/<run_name>.yaml`); `batch_size` is the global batch, split across the processes. Every process
prints its rank with any error, and a process stopped because another one failed says so.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import yaml

from config import TrainConfig


def parse_overrides(items: list[str]) -> dict:
    """`name=value` pairs, each value read as YAML (numbers, lists, null, true/false, strings)."""
    overrides = {}
    for item in items:
        name, separator, value = item.partition("=")
        if not separator or not name:
            raise SystemExit(f"--set expects name=value, got {item!r}")
        overrides[name] = yaml.safe_load(value)
    return overrides


def _stopped_by_launcher(signum: int, frame: object) -> None:
    rank = os.environ.get("RANK", "0")
    print(
        f"rank {rank}: stopped (signal {signum}), most likely because another process of the run failed; "
        "the last checkpoint is kept and resumes with the same command",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML or JSON file of TrainConfig settings")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="NAME=VALUE", help="settings that replace the file's"
    )
    args = parser.parse_args(argv)
    config = TrainConfig.from_file(args.config, parse_overrides(args.set))
    signal.signal(signal.SIGTERM, _stopped_by_launcher)
    from engine import train  # after the settings are known good: importing the engine takes seconds

    try:
        train(config)
    except Exception as error:
        print(
            f"rank {os.environ.get('RANK', '0')}: {type(error).__name__}: {error}",
            file=sys.stderr,
            flush=True,
        )
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
