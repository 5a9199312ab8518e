"""Both notebooks run headless (papermill) on a tiny generated kaggle_3m set and produce their files."""

import json
from pathlib import Path

import papermill
import pytest
import torch
from PIL import Image

import distributed
from engine import TrainConfig, data_shapes, evaluate, load_cases, make_model, output_folder, validate
from loss import build_loss
from synthetic import make_decathlon, make_kaggle_3m, make_luna
from utils import read_metrics_csv, seed_everything

REPO = Path(__file__).resolve().parents[1]


def tiny_settings(tmp_path: Path) -> dict:
    return {
        "run_name": "tiny",
        "runs_dir": str(tmp_path / "runs"),
        "data_dir": str(tmp_path / "data" / "kaggle_3m"),
        "cache_dir": str(tmp_path / "cache"),
        "image_size": 64,
        "init_features": 8,
        "validation_cases": 2,
        "test_cases": 1,
        "epochs": 6,
        "lr": 3e-3,
        "lr_schedule": "constant",  # 6 epochs: a decaying rate would leave too few steps at full rate
        "vis_freq": 3,
    }


def untrained_validation_dsc(settings: dict) -> float:
    """Mean validation DSC of the same network before any training step."""
    config = TrainConfig(**{k: v for k, v in settings.items() if k != "run_name"})
    seed_everything(config.seed)
    args = json.loads((Path(settings["runs_dir"]) / "tiny" / "args.json").read_text())
    cases, info, _ = load_cases(config, plan=args["plan"])
    validation = [case for case in cases if case.case_id in args["split"]["validation"]]
    model = make_model(config, info)
    shapes = data_shapes(cases, config, model.size_divisor)
    context = distributed.Context(device=torch.device("cpu"))
    return validate(model, validation, build_loss("dice"), info, context, shapes, config)["dsc"]


def run_notebook(name: str, executed: Path, **parameters) -> None:
    papermill.execute_notebook(str(REPO / name), str(executed), parameters=parameters, cwd=str(REPO))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("notebooks")
    make_kaggle_3m(tmp_path / "data", n_patients=6, slices_per_patient=(12, 14), seed=3)
    settings = tiny_settings(tmp_path)
    run_notebook("train.ipynb", tmp_path / "train.ipynb", **settings)
    return tmp_path, settings


def test_train_notebook_writes_weights_settings_logs_and_beats_an_untrained_network(trained_run):
    tmp_path, settings = trained_run
    run_dir = Path(settings["runs_dir"]) / "tiny"
    for name in ("weights.pt", "checkpoint.pt", "args.json", "history.json", "history.png"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    executed = (tmp_path / "train.ipynb").read_text()
    assert "Best validation mean DSC: 0." in executed
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history) == settings["epochs"]
    best = max(entry["val_mean_dsc"] for entry in history)
    assert best > untrained_validation_dsc(settings) + 0.2


def test_inference_notebook_writes_the_dsc_table_plot_overlays_and_gifs(trained_run):
    tmp_path, settings = trained_run
    run_dir = Path(settings["runs_dir"]) / "tiny"
    run_notebook("inference.ipynb", tmp_path / "inference.ipynb", run_dir=str(run_dir))
    output = run_dir / "inference"
    rows = read_metrics_csv(output / "dsc.csv")
    split = json.loads((run_dir / "args.json").read_text())["split"]
    assert sorted(row["case"] for row in rows) == sorted(split["validation"] + split["test"])
    assert all(0.0 <= row["dsc_mean"] <= 1.0 and 0.0 <= row["dsc_mean_pp"] <= 1.0 for row in rows)
    assert (output / "dsc.png").is_file()
    for case_id in split["validation"] + split["test"]:
        pngs = sorted((output / "predictions").glob(f"{case_id}-*.png"))
        gif = Image.open(output / "predictions" / f"{case_id}.gif")
        assert len(pngs) >= 8
        assert gif.n_frames == len(pngs)


def test_inference_notebook_takes_a_list_of_runs_as_an_ensemble(trained_run):
    tmp_path, settings = trained_run
    run_dir = Path(settings["runs_dir"]) / "tiny"
    run_notebook(
        "inference.ipynb", tmp_path / "inference-ensemble.ipynb", run_dir=[str(run_dir)] * 2, subsets=["test"]
    )
    (row,) = read_metrics_csv(output_folder([run_dir, run_dir], None) / "dsc.csv")
    (alone,) = evaluate(run_dir, subsets=["test"], output_dir=tmp_path / "alone")["rows"]
    assert row["case"] == alone["case"]
    assert row["dsc_mean"] == pytest.approx(alone["dsc_mean"], abs=1e-4)  # two copies predict as one


def test_inference_predicts_a_folder_without_masks(trained_run):
    tmp_path, settings = trained_run
    unlabelled = tmp_path / "unlabelled"
    source = Path(settings["data_dir"])
    patient = sorted(p for p in source.iterdir() if p.is_dir())[0]
    (unlabelled / patient.name).mkdir(parents=True)
    for image in patient.glob("*.tif"):
        if not image.name.endswith("_mask.tif"):
            (unlabelled / patient.name / image.name).write_bytes(image.read_bytes())
    run_dir = Path(settings["runs_dir"]) / "tiny"
    run_notebook(
        "inference.ipynb",
        tmp_path / "inference-unlabelled.ipynb",
        run_dir=str(run_dir),
        data_dir=str(unlabelled),
    )
    output = output_folder([run_dir], str(unlabelled))
    assert not (output / "dsc.csv").exists()
    assert (output / "predictions" / f"{patient.name}.gif").is_file()
    assert list((output / "predictions").glob(f"{patient.name}-*.png"))


@pytest.mark.parametrize(
    ("dataset", "model", "make"),
    [
        ("msd", "unet3d", lambda root: make_decathlon(root, n_cases=5, seed=2)),
        ("luna", "vnet", lambda root: make_luna(root, n_cases=3, shape=(40, 80, 80), seed=2)),
    ],
)
def test_both_notebooks_run_on_tiny_volumetric_sets(tmp_path, dataset, model, make):
    data_dir = make(tmp_path / "data")
    settings = {
        "run_name": f"tiny-{dataset}",
        "runs_dir": str(tmp_path / "runs"),
        "cache_dir": str(tmp_path / "cache"),
        "dataset": dataset,
        "data_dir": str(data_dir),
        "model": model,
        "init_features": 4,
        "validation_cases": 1,
        "test_cases": 1,
        "epochs": 1,
        "patches_per_epoch": 8,
        "batch_size": 2,
        **({"spacing": 8.0} if dataset == "luna" else {}),  # a real-size chest, trained coarse for speed
    }
    run_notebook("train.ipynb", tmp_path / "train.ipynb", **settings)
    run_dir = tmp_path / "runs" / f"tiny-{dataset}"
    run_notebook("inference.ipynb", tmp_path / "inference.ipynb", run_dir=str(run_dir))
    rows = read_metrics_csv(run_dir / "inference" / "dsc.csv")
    assert len(rows) == 2
    suffix = ".mhd" if dataset == "luna" else ".nii.gz"
    assert all((run_dir / "inference" / "labels" / f"{row['case']}{suffix}").is_file() for row in rows)


def test_both_notebooks_train_and_evaluate_a_nodule_detector(tmp_path):
    data_dir = make_luna(tmp_path / "data", n_cases=6, shape=(48, 64, 64), seed=11)
    settings = {
        "run_name": "detector",
        "runs_dir": str(tmp_path / "runs"),
        "cache_dir": str(tmp_path / "cache"),
        "dataset": "luna_nodules",
        "data_dir": str(data_dir),
        "spacing": 3.0,
        "model": "res_unet3d",
        "model_options": {"depth": 2},
        "init_features": 4,
        "patch_size": [32, 32, 32],
        "validation_cases": 2,
        "test_cases": 2,
        "epochs": 1,
        "patches_per_epoch": 8,
        "batch_size": 4,
        "split_seed": 1,
    }
    run_notebook("train.ipynb", tmp_path / "train.ipynb", **settings)
    run_dir = tmp_path / "runs" / "detector"
    run_notebook(
        "inference.ipynb", tmp_path / "inference.ipynb", run_dir=str(run_dir), subsets=["validation"]
    )
    output = run_dir / "inference"
    assert (output / "candidates.csv").read_text().startswith("seriesuid,coordX,coordY,coordZ,probability")
    assert (output / "froc-validation.png").is_file()
    assert "CPM" in (tmp_path / "inference.ipynb").read_text()
