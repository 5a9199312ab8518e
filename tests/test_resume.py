"""A run killed with SIGKILL at any moment and resumed ends bit-identical to the run never interrupted."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runs import read_checkpoint
from synthetic import make_decathlon

REPO = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "data_seconds", "samples_per_second", "validation_seconds")  # wall clock, not results

# A driver that trains, and SIGKILLs itself at the n-th call of one function, patched in: `where` names
# the module attribute, so any moment of the loop can be hit (a step, a validation, inside a save).
DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys
    sys.path.insert(0, {repo!r})
    import engine, runs, utils
    settings, where, count = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    if where:
        module_name, name = where.split(":")
        module = {{"engine": engine, "runs": runs, "utils": utils, "os": utils.os}}[module_name]
        original, calls = getattr(module, name), [0]

        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] == count:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(module, name, dying)
    engine.train(engine.TrainConfig(**settings))
    """
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_decathlon(tmp_path_factory.mktemp("msd"), n_cases=5, seed=3)


def train_in_subprocess(settings: dict, where: str = "", count: int = 0) -> int:
    driver = DRIVER.format(repo=str(REPO))
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", driver, json.dumps(settings), where, str(count)]
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, timeout=300).returncode


def tensorboard_scalars(run_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    """Steps and values of a scalar as TensorBoard shows them (a resumed run's purge applied)."""
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars(tag)
    return [event.step for event in scalars], [event.value for event in scalars]


def outcome(run_dir: Path) -> tuple[dict, list, int]:
    state = read_checkpoint(run_dir / "checkpoint.pt")
    history = [{k: v for k, v in entry.items() if k not in TIMING} for entry in state["history"]]
    return state["model"], history, state["best_epoch"]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    settings = run_settings(folder, data, "reference")
    assert train_in_subprocess(settings) == 0
    steps, _ = tensorboard_scalars(folder / "runs" / "reference", "train/loss")
    assert steps == list(range(3 * 12)), "MOMENTS assume 3 epochs of 12 steps"
    return folder / "runs" / "reference"


def run_settings(folder: Path, data: Path, name: str) -> dict:
    return {
        "run_name": name,
        "runs_dir": str(folder / "runs"),
        "cache_dir": str(folder / "cache"),
        "dataset": "msd",
        "data_dir": str(data),
        "model": "unet",
        "loss": "dice_ce",
        "init_features": 4,
        "validation_cases": 1,
        "test_cases": 1,
        "epochs": 3,
        "batch_size": 8,
        "lr": 3e-3,
        "aug_intensity": 0.1,
        "preprocess_workers": 1,
    }


# (function whose n-th call kills the run, n): steps run 12 per epoch here (3 cases' slices, batch 8),
# saves 3 atomic writes per epoch (checkpoint.pt, weights.pt, history.json) after args.json.
MOMENTS = {
    "mid-epoch 2": ("engine:set_learning_rate", 18),
    "during validation of epoch 2": ("engine:predict_case", 2),
    "inside the checkpoint write of epoch 2": ("os:fsync", 5),
    "between checkpoint and weights of epoch 2": ("os:replace", 6),
    "inside the history write of epoch 2": ("os:fsync", 7),
    "while writing the finished run's result.json": ("engine:write_json_atomic", 2),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_run_killed_and_resumed_is_bit_identical_to_the_uninterrupted_run(
    tmp_path, data, uninterrupted, moment
):
    where, count = MOMENTS[moment]
    settings = run_settings(tmp_path, data, "killed")
    assert train_in_subprocess(settings, where, count) == -9, "the kill did not happen"
    assert train_in_subprocess(settings) == 0
    weights, history, best_epoch = outcome(tmp_path / "runs" / "killed")
    reference_dir = uninterrupted
    reference_weights, reference_history, reference_best = outcome(reference_dir)
    assert history == reference_history and best_epoch == reference_best
    for name, value in reference_weights.items():
        assert torch.equal(weights[name], value), name
    run_dir = tmp_path / "runs" / "killed"
    assert not list(run_dir.glob(".*.tmp")), "leftover temporary files"
    assert json.loads((run_dir / "result.json").read_text())["best_epoch"] == reference_best
    best = read_checkpoint(run_dir / "checkpoint.pt")["best_model"]
    exported = torch.load(run_dir / "weights.pt", weights_only=True)
    assert all(torch.equal(exported[name], best[name]) for name in best)  # weights.pt is the best epoch's
    for tag in ("train/loss", "val/mean_dsc"):  # nothing lost or shown twice after the resume
        assert tensorboard_scalars(run_dir, tag) == tensorboard_scalars(reference_dir, tag), tag


def test_a_run_with_dropout_and_a_loader_worker_resumes_bit_identically(tmp_path, data):
    """Dropout draws from the global RNG; the DataLoader's seed draw must not (its persistent worker
    starts once per process, so a resumed process would draw once more than the uninterrupted one)."""
    vnet = {"model": "vnet", "model_options": {"dropout": 0.3}, "patch_size": [16, 16, 16], "num_workers": 1}
    vnet |= {"init_features": 2, "batch_size": 2, "patches_per_epoch": 4, "epochs": 2}
    straight = {**run_settings(tmp_path, data, "straight"), **vnet}
    killed = {**run_settings(tmp_path, data, "killed"), **vnet}
    assert train_in_subprocess(straight) == 0
    assert train_in_subprocess(killed, "engine:set_learning_rate", 3) == -9, "the kill did not happen"
    assert train_in_subprocess(killed) == 0
    weights, history, _ = outcome(tmp_path / "runs" / "killed")
    reference_weights, reference_history, _ = outcome(tmp_path / "runs" / "straight")
    assert history == reference_history
    assert all(torch.equal(weights[name], value) for name, value in reference_weights.items())
