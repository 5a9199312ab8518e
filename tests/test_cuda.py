"""The CUDA path: training in each precision, inference, the loader and torchrun on a GPU.

Every test is marked `cuda` and skipped on a machine without a CUDA device; `pytest -m cuda` runs only these
(benchmarks/gpu.py does, and stores the outcome).
"""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed
from engine import TrainConfig, data_shapes, load_cases, load_run, train, training_data
from models import build_model
from runs import read_checkpoint
from sliding_window import sliding_window_inference
from synthetic import make_kaggle_3m

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
    ),
]

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, with this interpreter
CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("brain")
    return make_kaggle_3m(folder, n_patients=6, slices_per_patient=(6, 7), image_size=64, seed=1)


def settings(folder: Path, data: Path, **changes) -> TrainConfig:
    """A tiny 2D U-Net run on the GPU: 64 × 64 slices, width 4, 2 epochs."""
    values = {
        "runs_dir": str(folder / "runs"),
        "cache_dir": str(folder / "cache"),
        "data_dir": str(data),
        "image_size": 64,
        "init_features": 4,
        "batch_size": 4,
        "validation_cases": 1,
        "test_cases": 1,
        "epochs": 2,
        "vis_freq": 100,
        "preprocess_workers": 1,
        "device": "cuda",
    }
    return TrainConfig(**{**values, **changes})


@pytest.mark.parametrize("amp", [False, "bfloat16", "float16"])
def test_a_tiny_gpu_training_has_a_finite_loss_and_its_weights_load_on_the_cpu(tmp_path, data, amp):
    if amp == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    config = settings(tmp_path, data, run_name=f"amp-{amp}", amp=amp)
    summary = train(config)
    assert all(math.isfinite(e["train_loss"]) and math.isfinite(e["val_loss"]) for e in summary["history"])
    checkpoint = read_checkpoint(config.run_dir / "checkpoint.pt")
    if amp == "float16":  # the gradient scaler's state is saved, so that a resumed run continues its scale
        assert checkpoint["scaler"] and checkpoint["scaler"]["scale"] > 0
    else:
        assert checkpoint["scaler"] == {}
    _, _, model = load_run(config.run_dir, CPU)
    for name, value in model.state_dict().items():
        assert value.device == CPU and torch.equal(value, checkpoint["best_model"][name]), name


def test_a_float16_gpu_run_resumes_with_its_gradient_scaler(tmp_path, data, capsys):
    config = settings(tmp_path, data, run_name="resume", amp="float16", epochs=1)
    train(config)
    summary = train(dataclasses.replace(config, epochs=2))
    assert "Resuming" in capsys.readouterr().out
    assert len(summary["history"]) == 2 and all(math.isfinite(e["train_loss"]) for e in summary["history"])
    assert read_checkpoint(config.run_dir / "checkpoint.pt")["scaler"]["scale"] > 0


def test_sliding_window_inference_on_the_gpu_equals_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convolutions differ by ~1e-3
    torch.manual_seed(0)
    model = build_model("res_unet3d", in_channels=1, out_channels=3, init_features=4, depth=3).eval()
    volume = torch.randn(1, 20, 37, 29)
    options = {"overlap": 0.5, "batch_size": 2, "mirror": [-1]}
    on_cpu = sliding_window_inference(model, volume, [16, 24, 16], device=CPU, **options)
    on_gpu = sliding_window_inference(model.to(CUDA), volume, [16, 24, 16], device=CUDA, **options)
    assert on_gpu.device == CPU and on_gpu.shape == (3, 20, 37, 29)
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-3, rtol=1e-3)


def test_the_training_loader_pins_memory_on_the_gpu(tmp_path, data):
    config = settings(tmp_path, data, run_name="pinned", num_workers=1)
    cases, _, plan = load_cases(config)
    shapes = data_shapes(cases, config, divisor=16)
    context = distributed.Context(device=CUDA)
    loader, _ = training_data(cases, config, 2, shapes, plan, context)
    images, labels = next(iter(loader))
    assert loader.pin_memory and images.is_pinned() and labels.is_pinned()


def test_a_one_gpu_torchrun_run_trains_and_its_weights_load_on_the_cpu(tmp_path, data):
    config = settings(tmp_path, data, run_name="torchrun", device="auto")
    path = config.save(tmp_path / "torchrun.yaml")
    command = [
        *TORCHRUN,
        "--standalone",
        "--nproc_per_node=1",
        str(REPO / "train.py"),
        "--config",
        str(path),
    ]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    args = json.loads((config.run_dir / "args.json").read_text())
    result = json.loads((config.run_dir / "result.json").read_text())
    assert args["world_size"] == 1 and len(result["rank_weights"]) == 1
    _, _, model = load_run(config.run_dir, CPU)
    assert not model.training
