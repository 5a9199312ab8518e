"""torchrun data-parallel training on CPU (gloo): the same run as one process, written by rank 0 only."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import load_run
from runs import read_checkpoint
from synthetic import make_decathlon

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"

# Instance norm and cross-entropy make one step over 2 × 2 samples the very step over 4 (a mean over the
# batch, split evenly): batch norm's statistics or a Dice over the whole batch would differ per rank.
# What remains is the order of floating-point sums (the gradient all-reduce, and kernels that block a batch
# of 2 otherwise than one of 4), about 1e-7 per gradient; Adam divides by the gradient's running scale, so
# where a gradient is near zero that can move a weight by a fraction of one step (lr = 3e-3). So the few
# largest differences depend on the CPU's kernels, and the test bounds their bulk: measured after 8 steps,
# on AMD EPYC family 25 model 17, at most 2e-6 (2D) and 1.3e-4 (3D); on model 1 (2D) a mean of 4.7e-5, a
# 99th percentile of 3.7e-4 and a maximum of 4.5e-3. A rank that trained on other samples, or gradients not
# averaged, moves the mean by a sizeable share of lr and the losses in the first epoch already.
MEAN_TOLERANCE, PERCENTILE_TOLERANCE = 2e-4, 1e-3  # the mean and the 99th percentile of |difference|


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_decathlon(tmp_path_factory.mktemp("msd"), n_cases=6, seed=1)


def settings_file(folder: Path, data: Path, **settings) -> Path:
    values = {
        "runs_dir": str(folder / "runs"),
        "cache_dir": str(folder / "cache"),
        "dataset": "msd",
        "data_dir": str(data),
        "loss": "ce",
        "init_features": 4,
        "validation_cases": 1,
        "test_cases": 1,
        "epochs": 2,
        "batch_size": 4,
        "lr": 3e-3,
        "patches_per_epoch": 16,
        "preprocess_workers": 1,
        "channels_last": False,
        **settings,
    }
    path = folder / f"{values['run_name']}.yaml"
    path.write_text(json.dumps(values))
    return path


def launch(config: Path, processes: int, *extra: str, wait: bool = True):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, str(REPO / "train.py"), "--config", str(config), *extra]
    else:
        command = [
            str(TORCHRUN),
            f"--nproc_per_node={processes}",
            str(REPO / "train.py"),
            "--config",
            str(config),
        ]
        command += list(extra)
    if not wait:
        return subprocess.Popen(
            command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    finished = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished


def weights(run_dir: Path) -> dict:
    return read_checkpoint(run_dir / "checkpoint.pt")["model"]


def assert_close(first: dict, second: dict, mean: float, percentile: float) -> None:
    """The networks' weights agree: the mean and the 99th percentile of their absolute differences."""
    assert first.keys() == second.keys()
    difference = torch.cat([(first[name].double() - second[name].double()).abs().flatten() for name in first])
    assert difference.mean().item() <= mean, ("mean", difference.mean().item())
    assert difference.quantile(0.99).item() <= percentile, ("99th percentile", difference.quantile(0.99))


@pytest.mark.parametrize(
    ("name", "model", "options"),
    [
        ("slices", "res_unet", {"norm": "instance"}),
        ("patches", "res_unet3d", {"norm": "instance", "depth": 2}),
    ],
)
def test_two_processes_train_the_run_of_one_process_and_only_rank_0_writes(
    tmp_path, data, name, model, options
):
    two = settings_file(tmp_path, data, run_name=f"{name}-2", model=model, model_options=options)
    one = settings_file(tmp_path, data, run_name=f"{name}-1", model=model, model_options=options)
    launch(two, 2)
    launch(one, 1)
    runs = tmp_path / "runs"
    result = json.loads((runs / f"{name}-2" / "result.json").read_text())
    assert len(result["rank_weights"]) == 2 and len(set(result["rank_weights"])) == 1  # ranks agree exactly
    assert_close(
        weights(runs / f"{name}-2"), weights(runs / f"{name}-1"), MEAN_TOLERANCE, PERCENTILE_TOLERANCE
    )
    two_history = json.loads((runs / f"{name}-2" / "history.json").read_text())
    one_history = json.loads((runs / f"{name}-1" / "history.json").read_text())
    for multi, single in zip(two_history, one_history, strict=True):
        assert multi["train_loss"] == pytest.approx(single["train_loss"], abs=1e-5)
        assert multi["val_mean_dsc"] == pytest.approx(single["val_mean_dsc"], abs=1e-3)
    written = sorted(p.relative_to(runs / f"{name}-2").as_posix() for p in (runs / f"{name}-2").rglob("*"))
    assert len([p for p in written if "tfevents" in p]) == 1  # one TensorBoard writer
    assert not [p for p in written if p.endswith(".tmp")]
    _, args, network = load_run(runs / f"{name}-2", torch.device("cpu"))  # loads in a single process
    assert args["world_size"] == 2 and network.training is False


def test_a_time_budget_with_the_poly_schedule_keeps_the_ranks_identical_and_unet_pp_trains(tmp_path, data):
    """The learning rate follows the time spent: by rank 0's clock, or the ranks' weights drift apart.
    UNet++ without deep supervision leaves three heads without gradient: DistributedDataParallel must be
    told, or the second step fails."""
    config = settings_file(
        tmp_path,
        data,
        run_name="budget",
        model="unet_pp",
        epochs=3,
        lr_schedule="poly",
        time_budget_minutes=0.5,
    )
    launch(config, 2)
    result = json.loads((tmp_path / "runs" / "budget" / "result.json").read_text())
    assert len(result["rank_weights"]) == 2 and len(set(result["rank_weights"])) == 1


def test_ranks_end_with_the_same_batch_norm_statistics_on_the_cpu(tmp_path, data):
    config = settings_file(tmp_path, data, run_name="batchnorm", model="res_unet", epochs=1)
    launch(config, 2)
    result = json.loads((tmp_path / "runs" / "batchnorm" / "result.json").read_text())
    assert len(result["rank_weights"]) == 2 and len(set(result["rank_weights"])) == 1


def test_a_two_process_run_resumes_with_two_processes_to_the_uninterrupted_result(tmp_path, data):
    options = {"model": "res_unet", "model_options": {"norm": "instance"}}
    whole = settings_file(tmp_path, data, run_name="whole", **options)
    halves = settings_file(tmp_path, data, run_name="halves", **options)
    launch(whole, 2)
    launch(halves, 2, "--set", "epochs=1")
    finished = launch(halves, 2)
    assert "Resuming" in finished.stdout
    halves_weights, whole_weights = (
        weights(tmp_path / "runs" / "halves"),
        weights(tmp_path / "runs" / "whole"),
    )
    assert halves_weights.keys() == whole_weights.keys()
    assert all(torch.equal(halves_weights[name], whole_weights[name]) for name in halves_weights)
    refused = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(halves), "--set", "epochs=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0 and "resume it with as many (now 1)" in refused.stderr


def test_killing_one_rank_ends_the_run_with_a_message_and_keeps_the_last_checkpoint(tmp_path, data):
    config = settings_file(tmp_path, data, run_name="killed", model="res_unet", epochs=500)
    run = launch(config, 2, wait=False)
    checkpoint = tmp_path / "runs" / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert checkpoint.exists()
    children = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2
    os.kill(int(children[-1]), signal.SIGKILL)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode != 0
    message = stderr.decode()
    assert "another process of the run failed" in message or "exitcode  : -9" in message, message[-2000:]
    state = read_checkpoint(checkpoint)
    assert 1 <= len(state["history"]) < 500
    load_run(tmp_path / "runs" / "killed", torch.device("cpu"))


# Two ranks with the collective timeout shrunk to 2 s; rank 0 takes 4 s to make the plan and 4 s more to
# prepare the cases. WAIT names the two waits: the preparation group's, or the ordinary collectives'.
SLOW_MAIN = """
import datetime, json, sys, time
sys.path.insert(0, {repo!r})
import distributed
distributed.TIMEOUT = datetime.timedelta(seconds=2)
context = distributed.setup("cpu")

def make_plan():
    time.sleep(4)
    return {{"spacing": [1.0, 1.0, 1.0]}}

if {preparation_wait}:
    plan = distributed.from_main(context, make_plan)
else:
    plan = distributed.broadcast(context, make_plan() if context.is_main else None)
if context.is_main:
    time.sleep(4)
distributed.wait_for_main(context) if {preparation_wait} else distributed.barrier(context)
print(json.dumps(plan))
distributed.teardown(context)
"""


def run_two_ranks(preparation_wait: bool) -> list[subprocess.CompletedProcess]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    driver = SLOW_MAIN.format(repo=str(REPO), preparation_wait=preparation_wait)
    ranks = []
    for rank in range(2):
        environment = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        environment |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-c", driver]
        ranks.append(
            subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    return [
        subprocess.CompletedProcess(rank.args, rank.returncode, out.decode(), err.decode())
        for rank, (out, err) in zip(ranks, outputs, strict=True)
    ]


def test_the_other_ranks_wait_for_rank_0_to_prepare_the_data_however_long_it_takes():
    """Rank 0 makes the plan and fills the cache alone (hours on LUNA16 with an empty cache); the others
    waited in ordinary collectives, which give up after TIMEOUT, and the run died."""
    for rank in run_two_ranks(preparation_wait=True):
        assert rank.returncode == 0, rank.stderr[-2000:]
        assert json.loads(rank.stdout.splitlines()[-1]) == {"spacing": [1.0, 1.0, 1.0]}
    ordinary = run_two_ranks(preparation_wait=False)  # the same waits in the ordinary collectives fail
    assert any(rank.returncode != 0 for rank in ordinary)
