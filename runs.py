"""A run folder and its state: one owner at a time, checkpoints that survive a kill, and a clean restart.

A training run owns `runs/<name>/` while it trains: a second process is refused (an advisory lock on
`.lock`, which the operating system releases when the owner dies, so a killed run never leaves it stuck).
The checkpoint is the run's single source of truth: it holds the network, the optimiser, the mixed-precision
scaler, the history, the best epoch's weights, the settings and data it was trained with, and whether the run
is finished. `weights.pt` (the best weights as a plain state_dict, for inference and for users) is written
only after the checkpoint that contains them, so it never holds an epoch the history does not have.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch

from utils import save_checkpoint_atomic, write_json_atomic

CHECKPOINT, WEIGHTS, ARGS, HISTORY, RESULT = (
    "checkpoint.pt",
    "weights.pt",
    "args.json",
    "history.json",
    "result.json",
)
# What a run writes; starting a run over removes exactly these (not the executed notebooks beside them).
STATE = (CHECKPOINT, WEIGHTS, ARGS, HISTORY, RESULT, "history.png", "tensorboard")


class RunLock:
    """Exclusive ownership of a run folder while a training process lives (`with RunLock(run_dir):`)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.file = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "another process"
            self.file.close()
            raise RuntimeError(
                f"Run folder {self.path.parent} is in use by {owner}: wait for that training to end, or "
                "choose another run_name"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        self.file.write(f"process {os.getpid()} on {socket.gethostname()} since {started}")
        self.file.flush()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.file.truncate(0)
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def remove_leftovers(run_dir: Path) -> None:
    """Temporary files of saves that a kill interrupted (atomic writes leave `.<name>.<random>.tmp`)."""
    for leftover in Path(run_dir).glob(".*.tmp"):
        leftover.unlink(missing_ok=True)


def clear_run(run_dir: Path) -> None:
    """Remove a run's state before it starts over, so nothing of the old run survives beside the new."""
    for name in STATE:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for output in Path(run_dir).glob("inference*"):
        if output.is_dir():
            shutil.rmtree(output)
    remove_leftovers(run_dir)


def read_json(path: Path, what: str) -> Any:
    """A JSON file written by a run, with an error naming it when it is missing, truncated or corrupt."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: expected {what}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is corrupt or truncated ({error}): expected {what}") from error


def read_checkpoint(path: Path) -> dict:
    """A torch file written by a run (checkpoint or weights), with an error naming it when unreadable."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: expected a file written by train()")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(f"{path} is corrupt or truncated and cannot be loaded ({error})") from error


def save_state(run_dir: Path, checkpoint: dict, history: list[dict]) -> None:
    """Write the checkpoint, then the best weights it contains, then the history for humans."""
    save_checkpoint_atomic(checkpoint, run_dir / CHECKPOINT)
    if checkpoint["best_model"] is not None:
        save_checkpoint_atomic(checkpoint["best_model"], run_dir / WEIGHTS)
    write_json_atomic(history, run_dir / HISTORY)
