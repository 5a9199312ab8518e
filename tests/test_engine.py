"""Training and evaluation on generated volumetric data: 3D patches, 2D slices of volumes, resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import (
    TrainConfig,
    ensemble_logits,
    evaluate,
    load_cases,
    load_run,
    predict_case,
    set_learning_rate,
    train,
    training_data,
)
from synthetic import make_decathlon, make_luna
from utils import read_metrics_csv
from volumes import read_volume


@pytest.fixture(scope="module")
def hippocampus(tmp_path_factory) -> Path:
    return make_decathlon(tmp_path_factory.mktemp("msd"), n_cases=6, seed=1)


@pytest.fixture(scope="module")
def luna(tmp_path_factory) -> Path:
    return make_luna(tmp_path_factory.mktemp("luna"), n_cases=3, shape=(40, 80, 80), seed=1)


def tiny(tmp_path: Path, **settings) -> TrainConfig:
    defaults = {
        "run_name": "tiny",
        "runs_dir": str(tmp_path / "runs"),
        "cache_dir": str(tmp_path / "cache"),
        "init_features": 4,
        "validation_cases": 1,
        "test_cases": 1,
        "epochs": 1,
        "batch_size": 4,
        "lr": 3e-3,
        "patches_per_epoch": 8,
    }
    return TrainConfig(**{**defaults, **settings})


def test_a_3d_unet_trains_on_patches_and_writes_nifti_predictions_on_the_source_grid(tmp_path, hippocampus):
    config = tiny(tmp_path, dataset="msd", data_dir=str(hippocampus), model="unet3d", loss="dice_ce")
    result = train(config)
    args = json.loads((config.run_dir / "args.json").read_text())
    # the largest case (about 34 × 50 × 42) rounded up to multiples of 16
    assert args["shapes"]["patch_size"] == [48, 64, 48]
    assert args["class_names"] == {"1": "Anterior", "2": "Posterior"}
    assert 0.0 <= result["best_val_mean_dsc"] <= 1.0
    output = evaluate(config.run_dir)["output_dir"]
    rows = read_metrics_csv(output / "dsc.csv")
    assert {"dsc_Anterior", "dsc_Posterior", "hd95_Anterior", "dsc_mean_lcc"} <= set(rows[0])
    for row in rows:
        label_file = output / "labels" / f"{row['case']}.nii.gz"
        predicted, geometry = read_volume(label_file)
        source, source_geometry = read_volume(hippocampus / "imagesTr" / f"{row['case']}.nii.gz")
        assert predicted.shape == source.shape
        assert geometry == source_geometry
        assert set(np.unique(predicted)) <= {0, 1, 2}


def test_unlabelled_decathlon_cases_get_predictions_but_no_metrics(tmp_path, hippocampus):
    config = tiny(tmp_path, dataset="msd", data_dir=str(hippocampus), model="unet", epochs=1)
    train(config)
    output = evaluate(config.run_dir, data_dir=str(hippocampus))
    rows = output["rows"]
    test_ids = [p.name.removesuffix(".nii.gz") for p in (hippocampus / "imagesTs").glob("*.nii.gz")]
    assert test_ids and not {row["case"] for row in rows} & set(test_ids)
    for case_id in test_ids:
        assert (output["output_dir"] / "labels" / f"{case_id}.nii.gz").is_file()
        assert (output["output_dir"] / "predictions" / f"{case_id}.gif").is_file()


def test_a_2d_unet_trains_on_lung_ct_slices_and_writes_mhd_predictions(tmp_path, luna):
    config = tiny(tmp_path, dataset="luna", data_dir=str(luna), model="unet", slice_axis=0, epochs=2)
    result = train(config)
    assert len(result["history"]) == 2
    output = evaluate(config.run_dir, subsets=["validation"])["output_dir"]
    (row,) = read_metrics_csv(output / "dsc.csv")
    predicted, geometry = read_volume(output / "labels" / f"{row['case']}.mhd")
    ct, ct_geometry = read_volume(luna / "subset0" / f"{row['case']}.mhd")
    assert predicted.shape == ct.shape
    assert geometry == ct_geometry


def test_an_interrupted_run_resumes_and_a_changed_one_is_refused(tmp_path, hippocampus, capsys):
    config = tiny(tmp_path, dataset="msd", data_dir=str(hippocampus), model="unet", epochs=1)
    train(config)
    config.epochs = 2
    result = train(config)
    assert "Resuming" in capsys.readouterr().out
    assert [entry["epoch"] for entry in result["history"]] == [1, 2]
    config.lr = 1e-2
    with pytest.raises(ValueError, match=r"exists with other settings \{'lr': \(0\.003, 0\.01\)\}"):
        train(config)


def test_the_time_budget_stops_training_within_the_epoch_that_passes_it(tmp_path, hippocampus):
    config = tiny(tmp_path, dataset="msd", data_dir=str(hippocampus), epochs=5, time_budget_minutes=1e-4)
    (epoch,) = train(config)["history"]
    assert epoch["samples_per_second"] * epoch["seconds"] == pytest.approx(config.batch_size)


def test_the_poly_schedule_decays_the_learning_rate_and_constant_keeps_it():
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
    poly = TrainConfig(lr=1e-3, lr_schedule="poly")
    set_learning_rate(optimizer, poly, 0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**0.9)
    set_learning_rate(optimizer, poly, 1.2)
    assert optimizer.param_groups[0]["lr"] == 0.0
    set_learning_rate(optimizer, TrainConfig(lr=1e-3), 0.7)
    assert optimizer.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="lr_schedule must be 'constant' or 'poly'"):
        set_learning_rate(optimizer, TrainConfig(lr_schedule="cosine"), 0.1)


def test_mirror_tta_flips_the_trained_axes_at_inference_only(tmp_path, hippocampus):
    config = tiny(
        tmp_path, dataset="msd", data_dir=str(hippocampus), model="unet", aug_flip_axes=[0], mirror_tta=True
    )
    train(config)
    _, args, model = load_run(config.run_dir, torch.device("cpu"))
    cases, _ = load_cases(config)
    loader = training_data(cases, config, spatial_dims=2, shapes=args["shapes"])
    assert loader.dataset.transform.transforms[0].flip_axes == (0,)
    image = np.random.default_rng(0).normal(size=(1, 4, 16, 16)).astype(np.float32)
    slices = torch.from_numpy(image).movedim(1, 0)
    with torch.no_grad():
        expected = (model(slices) + model(slices.flip(2)).flip(2)).movedim(0, 1) / 2
    assert torch.allclose(predict_case(model, image, torch.device("cpu"), {}, config), expected, atol=1e-5)


def test_an_ensemble_averages_probabilities_not_logits():
    sure, extreme = torch.tensor([[0.0], [4.0], [0.0]]), torch.tensor([[0.0], [-30.0], [1.0]])
    combined = ensemble_logits([sure, extreme])
    mean = (torch.softmax(sure, 0) + torch.softmax(extreme, 0)) / 2
    assert torch.allclose(torch.softmax(combined, 0), mean, atol=1e-6)
    assert combined.argmax(0).item() == 1 and (sure + extreme).argmax(0).item() == 2
    single = torch.tensor([[-1.0, 3.0]])
    assert torch.allclose(torch.sigmoid(ensemble_logits([single, -single])), torch.full((1, 2), 0.5))
    assert ensemble_logits([sure]) is sure


def test_evaluate_predicts_with_the_ensemble_of_several_runs(tmp_path, hippocampus):
    settings = {
        "dataset": "msd",
        "data_dir": str(hippocampus),
        "model": "unet",
        "loss": "dice_ce",
        "split_seed": 0,
    }
    first = tiny(tmp_path, run_name="first", seed=1, **settings)
    second = tiny(tmp_path, run_name="second", seed=2, **settings)
    train(first)
    train(second)
    result = evaluate([first.run_dir, second.run_dir], subsets=["test"])
    assert result["output_dir"] == first.run_dir / "inference-ensemble2"
    (row,) = result["rows"]
    (case,) = [case for case in load_cases(first)[0] if case.case_id == row["case"]]
    probabilities = []
    for run_dir in (first.run_dir, second.run_dir):
        config, args, model = load_run(run_dir, torch.device("cpu"))
        logits = predict_case(model, case.image, torch.device("cpu"), args["shapes"], config)
        probabilities.append(torch.softmax(logits, 0))
    expected = ((probabilities[0] + probabilities[1]) / 2).argmax(0).numpy()
    predicted, _ = read_volume(result["output_dir"] / "labels" / f"{row['case']}.nii.gz")
    assert np.array_equal(predicted, expected)
    assert not np.array_equal(probabilities[0].argmax(0).numpy(), probabilities[1].argmax(0).numpy())


@pytest.mark.parametrize(("setting", "value"), [("split_seed", 5), ("spacing", 1.5)])
def test_an_ensemble_of_runs_with_another_split_or_preprocessing_is_refused(
    tmp_path, hippocampus, setting, value
):
    settings = {"dataset": "msd", "data_dir": str(hippocampus), "model": "unet"}
    first = tiny(tmp_path, run_name="first", **settings)
    other = tiny(tmp_path, run_name="other", **{**settings, setting: value})
    train(first)
    train(other)
    differ = "split" if setting == "split_seed" else setting
    with pytest.raises(ValueError, match=rf"other differs from .*first in \['{differ}'\]"):
        evaluate([first.run_dir, other.run_dir])
