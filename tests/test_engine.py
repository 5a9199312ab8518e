"""Training and evaluation on generated data: 3D patches, 2D slices of volumes, source grids, runs folders."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import dataset
import engine
from dataset import Case, find_sources, prepare_cases, read_source, to_source_grid
from engine import (
    TrainConfig,
    choose_postprocessing,
    evaluate,
    load_cases,
    load_run,
    mean_probabilities,
    output_folder,
    predict_case,
    set_learning_rate,
    train,
    training_data,
)
from synthetic import make_decathlon, make_kaggle_3m, make_luna
from utils import POSTPROCESSING, read_metrics_csv
from volumes import Geometry, read_volume, write_volume


@pytest.fixture(scope="module")
def hippocampus(tmp_path_factory) -> Path:
    return make_decathlon(tmp_path_factory.mktemp("msd"), n_cases=6, seed=1)


@pytest.fixture(scope="module")
def luna(tmp_path_factory) -> Path:
    return make_luna(tmp_path_factory.mktemp("luna"), n_cases=3, shape=(40, 80, 80), seed=1)


@pytest.fixture(scope="module")
def brain(tmp_path_factory) -> Path:
    return make_kaggle_3m(tmp_path_factory.mktemp("brain"), n_patients=4, slices_per_patient=(8, 10), seed=2)


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
        "preprocess_workers": 1,
    }
    return TrainConfig(**{**defaults, **settings})


def test_a_3d_unet_trains_on_patches_and_writes_nifti_predictions_on_the_source_grid(tmp_path, hippocampus):
    config = tiny(tmp_path, dataset="msd", data_dir=str(hippocampus), model="unet3d", loss="dice_ce")
    result = train(config)
    args = json.loads((config.run_dir / "args.json").read_text())
    train_ids = set(args["split"]["train"])
    shapes = [read_volume(hippocampus / "imagesTr" / f"{i}.nii.gz")[0].shape for i in train_ids]
    expected = [int(np.ceil(size / 16) * 16) for size in np.max(shapes, 0)]
    assert args["shapes"]["patch_size"] == expected  # from the training cases only, rounded up to 16
    assert args["plan"]["spacing"] == [1.0, 1.0, 1.0]  # the training cases' median spacing
    assert args["class_names"] == {"1": "Anterior", "2": "Posterior"}
    assert sorted(args["case_ids"]) == sorted(
        p.name[:-7] for p in (hippocampus / "labelsTr").glob("*.nii.gz")
    )
    assert 0.0 <= result["best_val_mean_dsc"] <= 1.0
    output = evaluate(config.run_dir)["output_dir"]
    rows = read_metrics_csv(output / "dsc.csv")
    assert {"dsc_Anterior", "dsc_Posterior", "hd95_Anterior", "dsc_mean_pp", "missed_Anterior"} <= set(
        rows[0]
    )
    assert {row["hd95_unit"] for row in rows} == {"mm"}
    for row in rows:
        predicted, geometry = read_volume(output / "labels" / f"{row['case']}.nii.gz")
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
    # a chest of real size in mm, trained on coarse voxels for speed
    config = tiny(tmp_path, dataset="luna", data_dir=str(luna), model="unet", spacing=8.0, epochs=2)
    result = train(config)
    assert len(result["history"]) == 2
    output = evaluate(config.run_dir, subsets=["validation"])["output_dir"]
    (row,) = read_metrics_csv(output / "dsc.csv")
    predicted, geometry = read_volume(output / "labels" / f"{row['case']}.mhd")
    ct, ct_geometry = read_volume(luna / "subset0" / f"{row['case']}.mhd")
    assert predicted.shape == ct.shape
    assert geometry == ct_geometry
    ct_only = tmp_path / "ct_only" / "subset0"  # new CTs, no lung masks: predicted, not scored
    ct_only.mkdir(parents=True)
    for file in (luna / "subset0").glob(f"{row['case']}.*"):
        (ct_only / file.name).symlink_to(file)
    unlabelled = evaluate(config.run_dir, data_dir=str(ct_only.parent))["output_dir"]
    assert not (unlabelled / "dsc.csv").exists()
    again, again_geometry = read_volume(unlabelled / "labels" / f"{row['case']}.mhd")
    np.testing.assert_array_equal(again, predicted)
    assert again_geometry == geometry
    assert list((unlabelled / "predictions").glob(f"{row['case']}*.gif"))


def write_scan(path: Path, array: np.ndarray, geometry: Geometry) -> None:
    write_volume(array, geometry, path)


def resampled_decathlon(root: Path, direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)) -> Path:
    """Three cases on 2 mm voxels (to be resampled to 1 mm) with a box of class 1 and a ball of class 2."""
    root.mkdir(parents=True)
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    training = []
    rng = np.random.default_rng(0)
    for number in range(3):
        label = np.zeros((10, 12, 14), np.uint8)
        label[2:6, 3:8, 4 + number : 10] = 1
        label[7:9, 8:11, 2:5] = 2
        image = (label * 100 + rng.normal(0, 10, label.shape)).astype(np.float32)
        geometry = Geometry(spacing=(2.0, 2.0, 2.0), origin=(10.0, -5.0, 3.0 + number), direction=direction)
        write_scan(root / "imagesTr" / f"case_{number}.nii.gz", image, geometry)
        write_scan(root / "labelsTr" / f"case_{number}.nii.gz", label, geometry)
        training.append(
            {"image": f"./imagesTr/case_{number}.nii.gz", "label": f"./labelsTr/case_{number}.nii.gz"}
        )
    description = {"labels": {"0": "background", "1": "box", "2": "ball"}, "modality": {"0": "MRI"}}
    (root / "dataset.json").write_text(json.dumps({**description, "training": training}))
    return root


def test_a_prediction_equal_to_the_truth_scores_1_after_the_round_trip_through_the_resampled_grid(tmp_path):
    data = resampled_decathlon(tmp_path / "msd")
    cases, info, plan = load_cases(tiny(tmp_path, dataset="msd", data_dir=str(data), spacing=1.0))
    for case in cases:
        assert case.shape == (20, 24, 28) and case.spacing == (1.0, 1.0, 1.0)
        one_hot = np.eye(3, dtype=np.float32)[np.asarray(case.label)].transpose(3, 0, 1, 2)
        source = read_source(case, plan, info)
        np.testing.assert_array_equal(to_source_grid(case, one_hot), source.label)


def test_evaluation_writes_labels_with_the_source_scans_size_spacing_origin_and_direction(tmp_path):
    flipped = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    data = resampled_decathlon(tmp_path / "msd", direction=flipped)
    config = tiny(
        tmp_path, dataset="msd", data_dir=str(data), model="unet3d", spacing=1.0, patch_size=[16, 16, 16]
    )
    train(config)
    output = evaluate(config.run_dir, subsets=["validation", "test"])
    for row in output["rows"]:
        written, geometry = read_volume(output["output_dir"] / "labels" / f"{row['case']}.nii.gz")
        source, source_geometry = read_volume(data / "imagesTr" / f"{row['case']}.nii.gz")
        assert written.shape == source.shape == (10, 12, 14)
        assert geometry == source_geometry


def test_predicting_a_folder_covers_every_slice_whatever_edge_slices_training_used(tmp_path, brain):
    config = tiny(tmp_path, data_dir=str(brain), image_size=32, edge_slices=2, batch_size=8)
    train(config)
    output = evaluate(config.run_dir, data_dir=str(brain))
    for patient in sorted(p for p in brain.iterdir() if p.is_dir()):
        slices = [p for p in patient.glob("*.tif") if not p.name.endswith("_mask.tif")]
        pngs = list((output["output_dir"] / "predictions").glob(f"{patient.name}-*.png"))
        assert len(pngs) == len(slices)
        assert Image.open(output["output_dir"] / "predictions" / f"{patient.name}.gif").n_frames == len(
            slices
        )
    assert len(output["rows"]) == 4


def test_kaggle_overlays_are_drawn_on_the_original_slices_and_hd95_is_in_their_pixels(tmp_path, brain):
    config = tiny(tmp_path, data_dir=str(brain), image_size=32, batch_size=8)
    train(config)
    output = evaluate(config.run_dir, subsets=["test"])
    (row,) = output["rows"]
    original = tifffile.imread(next((brain / row["case"]).glob("*_1.tif")))
    png = Image.open(next((output["output_dir"] / "predictions").glob(f"{row['case']}-*.png")))
    assert png.size == (original.shape[1], original.shape[0])  # not the 32-pixel training size
    assert row["hd95_unit"] == "px"


def test_a_second_evaluation_leaves_nothing_of_the_first_and_an_unfinished_run_keeps_its_postprocessing(
    tmp_path, hippocampus
):
    config = tiny(tmp_path, dataset="msd", data_dir=str(hippocampus), model="unet", epochs=1)
    train(config)
    both = evaluate(config.run_dir)
    assert (both["output_dir"] / "dsc-validation.png").exists()
    test_only = evaluate(config.run_dir, subsets=["test"])
    assert test_only["output_dir"] == both["output_dir"]
    test_ids = {row["case"] for row in test_only["rows"]}
    written = {p.name.split(".")[0] for p in (both["output_dir"] / "labels").iterdir()}
    assert written == test_ids and not (both["output_dir"] / "dsc-validation.png").exists()
    assert (
        evaluate(config.run_dir, subsets=["test"], mirror_tta=True)["output_dir"].name == "inference-mirrored"
    )
    chosen = test_only["postprocessing"]
    stale = json.loads((config.run_dir / "result.json").read_text())  # as a continued run's, killed before
    other = next(method for method in POSTPROCESSING if method != chosen)  # its end, still has
    (config.run_dir / "result.json").write_text(json.dumps({**stale, "postprocessing": other}))
    assert load_run(config.run_dir, torch.device("cpu"))[1]["postprocessing"] == chosen
    (config.run_dir / "result.json").unlink()  # as a run killed in its first training has none
    assert load_run(config.run_dir, torch.device("cpu"))[1]["postprocessing"] == chosen


def test_output_folders_of_two_data_folders_with_the_same_name_differ(tmp_path):
    first, second = tmp_path / "a" / "kaggle_3m", tmp_path / "b" / "kaggle_3m"
    runs = [tmp_path / "run"]
    assert output_folder(runs, str(first)) != output_folder(runs, str(second))
    assert output_folder(runs, str(first)).name.startswith("inference-kaggle_3m-")
    assert output_folder(runs, None) == runs[0] / "inference"


def test_figures_of_a_ct_stored_with_flipped_axes_are_drawn_in_radiological_orientation(tmp_path):
    normal, flipped = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    folders = {}
    for name, direction in (("normal", normal), ("flipped", flipped)):
        data = resampled_decathlon(tmp_path / name / "msd", direction=direction)
        for image_file in (data / "imagesTr").glob("*.nii.gz"):
            image, geometry = read_volume(image_file)
            image[:, :3, :3] = 1000.0  # a bright corner at the first rows and columns of the array
            write_volume(image.astype(np.float32), geometry, image_file)
        config = tiny(tmp_path / name / "work", dataset="msd", data_dir=str(data), model="unet", spacing=2.0)
        train(config)
        folders[name] = evaluate(config.run_dir, subsets=["test"])["output_dir"] / "predictions"
    (normal_png,) = [p for p in folders["normal"].glob("*-5.png")]
    (flipped_png,) = [p for p in folders["flipped"].glob("*-5.png")]
    normal_image, flipped_image = np.asarray(Image.open(normal_png)), np.asarray(Image.open(flipped_png))

    def grey(image, rows, cols):  # brightest grey pixel of a block (outlines are coloured, never grey)
        block = image[rows, cols]
        return int(np.where(np.ptp(block, axis=-1) == 0, block[..., 0], 0).max())

    top_left, bottom_right = (slice(0, 3), slice(0, 3)), (slice(-3, None), slice(-3, None))
    assert grey(normal_image, *top_left) == 255 and grey(normal_image, *bottom_right) < 100
    # diag(-1, -1, 1): the same physical corner, stored at the array's start, belongs at the bottom right
    assert grey(flipped_image, *bottom_right) == 255 and grey(flipped_image, *top_left) < 100


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


def test_a_finished_run_is_not_trained_again_unless_asked_to_continue(tmp_path, hippocampus, capsys):
    config = tiny(tmp_path, dataset="msd", data_dir=str(hippocampus), model="unet", epochs=1)
    train(config)
    weights = (config.run_dir / "weights.pt").read_bytes()
    again = train(config)
    assert "is finished" in capsys.readouterr().out and again["finished"]
    assert (config.run_dir / "weights.pt").read_bytes() == weights
    config.epochs = 2
    assert len(train(config)["history"]) == 2


def test_a_run_the_time_budget_stopped_says_to_raise_the_budget_not_the_epochs(tmp_path, hippocampus, capsys):
    config = tiny(
        tmp_path, dataset="msd", data_dir=str(hippocampus), model="unet", epochs=5, time_budget_minutes=1e-4
    )
    assert len(train(config)["history"]) == 1
    capsys.readouterr()
    train(config)
    said = capsys.readouterr().out
    assert "Nothing was changed: raise time_budget_minutes (or set it to None) to continue it" in said


def test_starting_over_removes_the_old_state_before_anything_new_is_written(
    tmp_path, hippocampus, monkeypatch
):
    config = tiny(tmp_path, dataset="msd", data_dir=str(hippocampus), model="unet", epochs=1)
    train(config)
    (config.run_dir / "inference").mkdir()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "training_data", killed)
    restart = tiny(tmp_path, dataset="msd", data_dir=str(hippocampus), model="unet", lr=1e-2, resume=False)
    with pytest.raises(KeyboardInterrupt):
        train(restart)
    left = {p.name for p in config.run_dir.iterdir()}
    assert not left & {"checkpoint.pt", "weights.pt", "history.json", "inference"}
    assert json.loads((config.run_dir / "args.json").read_text())["lr"] == 1e-2
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="weights.pt is missing"):
        evaluate(config.run_dir)  # the old network is never reported under the new settings


def test_a_second_training_of_the_same_run_folder_is_refused(tmp_path, hippocampus):
    config = tiny(tmp_path, dataset="msd", data_dir=str(hippocampus), model="unet")
    with engine.RunLock(config.run_dir), pytest.raises(RuntimeError, match=r"is in use by process \d+ on"):
        train(config)
    train(config)  # the lock is free again once its owner is gone


def test_a_moved_run_folder_a_symlinked_data_folder_and_another_cache_still_resume(tmp_path, hippocampus):
    config = tiny(tmp_path, dataset="msd", data_dir=str(hippocampus), model="unet", epochs=1)
    train(config)
    shutil.move(tmp_path / "runs", tmp_path / "elsewhere")
    (tmp_path / "link").symlink_to(hippocampus)
    moved = tiny(
        tmp_path,
        dataset="msd",
        data_dir=str(tmp_path / "link") + "/",
        model="unet",
        epochs=2,
        runs_dir=str(tmp_path / "elsewhere"),
        cache_dir=str(tmp_path / "other-cache"),
    )
    assert [entry["epoch"] for entry in train(moved)["history"]] == [1, 2]


def test_a_data_folder_that_gained_a_case_is_refused_on_resume(tmp_path):
    data = resampled_decathlon(tmp_path / "msd")
    config = tiny(tmp_path, dataset="msd", data_dir=str(data), model="unet", spacing=2.0, epochs=1)
    train(config)
    description = json.loads((data / "dataset.json").read_text())
    for kind in ("imagesTr", "labelsTr"):
        shutil.copy(data / kind / "case_0.nii.gz", data / kind / "case_9.nii.gz")
    description["training"].append({"image": "./imagesTr/case_9.nii.gz", "label": "./labelsTr/case_9.nii.gz"})
    (data / "dataset.json").write_text(json.dumps(description))
    config.epochs = 2
    with pytest.raises(
        ValueError, match=r"no longer holds the cases .* \(new: \['case_9'\], missing: \[\]\)"
    ):
        train(config)


def test_a_data_set_whose_label_maps_are_all_empty_is_refused_before_training(tmp_path):
    data = resampled_decathlon(tmp_path / "msd")
    for label_file in (data / "labelsTr").glob("*.nii.gz"):
        label, geometry = read_volume(label_file)
        write_volume(np.zeros_like(label), geometry, label_file)
    config = tiny(tmp_path, dataset="msd", data_dir=str(data), model="unet", spacing=2.0)
    with pytest.raises(ValueError, match="has any foreground voxel"):
        train(config)


def test_a_foreground_patch_too_small_for_instance_norm_is_refused_before_training(
    tmp_path, hippocampus, monkeypatch
):
    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(engine, "set_learning_rate", never)
    options = {"norm": "instance", "depth": 6}  # 1/64 of the structures' box: one voxel
    config = tiny(tmp_path, dataset="msd", data_dir=str(hippocampus), model="res_unet3d")
    config = dataclasses.replace(config, model_options=options, patch_size="foreground")
    with pytest.raises(ValueError, match=r"instance norm cannot train on inputs of \(64, 64, 64\)"):
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


@pytest.mark.parametrize("jitter", [0.0, 0.5, 1.0])
def test_the_patches_get_the_foreground_jitter_setting(jitter):
    case = Case.from_arrays("a", np.zeros((1, 8, 8, 8), np.float32), np.ones((8, 8, 8), np.uint8))
    config = TrainConfig(foreground_jitter=jitter, patches_per_epoch=4, batch_size=2)
    loader, _ = training_data([case], config, 3, {"patch_size": [4, 4, 4]})
    assert loader.dataset.foreground_jitter == jitter


def test_mirror_tta_flips_the_trained_axes_at_inference_only(tmp_path, hippocampus):
    config = tiny(
        tmp_path, dataset="msd", data_dir=str(hippocampus), model="unet", aug_flip_axes=[0], mirror_tta=True
    )
    train(config)
    _, args, model = load_run(config.run_dir, torch.device("cpu"))
    cases, _, _ = load_cases(config, plan=args["plan"])
    loader, _ = training_data(cases, config, spatial_dims=2, shapes=args["shapes"])
    assert loader.dataset.transform.transforms[0].flip_axes == (0,)
    image = np.random.default_rng(0).normal(size=(1, 4, 16, 16)).astype(np.float32)
    slices = torch.from_numpy(image).movedim(1, 0)
    with torch.no_grad():
        expected = (model(slices) + model(slices.flip(2)).flip(2)).movedim(0, 1) / 2
    assert torch.allclose(predict_case(model, image, torch.device("cpu"), {}, config), expected, atol=1e-5)


def test_a_25d_network_sees_at_inference_the_neighbours_it_was_trained_with(tmp_path, brain):
    config = tiny(tmp_path, data_dir=str(brain), image_size=32, batch_size=4, context_slices=1)
    train(config)
    _, args, model = load_run(config.run_dir, torch.device("cpu"))
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 3 * 3  # three image channels of three slices
    cases, _, _ = load_cases(config, plan=args["plan"])
    loader, _ = training_data(cases, config, spatial_dims=2, shapes=args["shapes"])
    image, _ = next(iter(loader))
    assert image.shape[1] == 9
    case = cases[0]
    slices = torch.from_numpy(np.array(case.image)).movedim(1, 0)
    for start in (0, 4):
        batch = engine.slice_batch(slices, start, start + 4, context_slices=1)
        for row, index in enumerate(range(start, min(start + 4, len(slices)))):
            expected = dataset.slice_with_context(np.asarray(case.image), index, 0, 1)
            np.testing.assert_array_equal(batch[row].numpy(), expected)
    logits = predict_case(model, case.image, torch.device("cpu"), args["shapes"], config)
    with torch.no_grad():
        expected = model(engine.slice_batch(slices, 0, len(slices), context_slices=1)).movedim(0, 1)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert len(evaluate(config.run_dir, subsets=["test"])["rows"]) == 1


def test_an_ensemble_averages_probabilities_not_logits():
    sure, extreme = torch.tensor([[0.0], [4.0], [0.0]]), torch.tensor([[0.0], [-30.0], [1.0]])
    combined = mean_probabilities([sure, extreme])
    mean = (torch.softmax(sure, 0) + torch.softmax(extreme, 0)) / 2
    np.testing.assert_allclose(combined, mean.numpy(), atol=1e-6)
    assert combined.argmax(0).item() == 1 and (sure + extreme).argmax(0).item() == 2
    single = torch.tensor([[-1.0, 3.0]])
    np.testing.assert_allclose(mean_probabilities([single, -single]), np.full((1, 2), 0.5))


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
    assert result["output_dir"] == output_folder([first.run_dir, second.run_dir], None)
    assert result["output_dir"].name.startswith("inference-ensemble2-")
    assert output_folder([first.run_dir, first.run_dir], None) != result["output_dir"]
    (row,) = result["rows"]
    _, args, _ = load_run(first.run_dir, torch.device("cpu"))
    (case,) = [case for case in load_cases(first, plan=args["plan"])[0] if case.case_id == row["case"]]
    probabilities = []
    for run_dir in (first.run_dir, second.run_dir):
        config, args, model = load_run(run_dir, torch.device("cpu"))
        logits = predict_case(model, case.image, torch.device("cpu"), args["shapes"], config)
        probabilities.append(torch.softmax(logits, 0))
    expected = ((probabilities[0] + probabilities[1]) / 2).argmax(0).numpy()
    predicted, _ = read_volume(result["output_dir"] / "labels" / f"{row['case']}.nii.gz")
    assert result["postprocessing"] == "none" or args["postprocessing"] != "none"
    if result["postprocessing"] == "none":
        assert np.array_equal(predicted, expected)
    assert not np.array_equal(probabilities[0].argmax(0).numpy(), probabilities[1].argmax(0).numpy())


@pytest.mark.parametrize(
    ("setting", "value", "differ"), [("split_seed", 5, "split"), ("spacing", 1.5, "plan")]
)
def test_an_ensemble_of_runs_with_another_split_or_preprocessing_is_refused(
    tmp_path, hippocampus, setting, value, differ
):
    settings = {"dataset": "msd", "data_dir": str(hippocampus), "model": "unet"}
    first = tiny(tmp_path, run_name="first", **settings)
    other = tiny(tmp_path, run_name="other", **{**settings, setting: value})
    train(first)
    train(other)
    with pytest.raises(ValueError, match=rf"other differs from .*first in \['{differ}'\]"):
        evaluate([first.run_dir, other.run_dir])


def test_the_post_processing_is_the_best_on_validation_and_ties_keep_the_simpler():
    scores = {"none": 0.80, "largest": 0.60, "large": 0.81}
    assert choose_postprocessing({"val_dsc_postprocessed": scores}) == "large"
    assert (
        choose_postprocessing({"val_dsc_postprocessed": {"none": 0.8, "largest": 0.8, "large": 0.8}})
        == "none"
    )


def test_prepared_cases_know_their_sources_again(tmp_path, hippocampus):
    sources, info = find_sources("msd", hippocampus)
    config = tiny(tmp_path, dataset="msd", data_dir=str(hippocampus))
    _, _, plan = load_cases(config)
    (case,) = prepare_cases(sources[:1], plan, info, tmp_path / "cache", workers=1)
    source = read_source(case, plan, info)
    image, _ = read_volume(sources[0].image_paths[0])
    np.testing.assert_array_equal(source.image, image.astype(np.float32))


def test_a_foreground_patch_is_the_largest_training_foreground_box_rounded_up():
    cases = []
    for extent in ((5, 9, 3), (7, 4, 12)):
        label = np.zeros((20, 20, 20), np.uint8)
        label[2 : 2 + extent[0], 3 : 3 + extent[1], 1 : 1 + extent[2]] = 1
        cases.append(Case.from_arrays("c", np.zeros((1, 20, 20, 20), np.float32), label))
    config = TrainConfig(patch_size="foreground")
    assert engine.data_shapes(cases, config, divisor=8)["patch_size"] == [8, 16, 16]


def test_the_dsc_plots_never_mix_validation_and_test_cases(tmp_path, monkeypatch):
    plotted = {}
    monkeypatch.setattr(engine, "plot_dsc", lambda rows, path, title: plotted.setdefault(path.name, rows))
    rows = [{"case": f"v{i}", "subset": "validation", "dsc_mean": 0.9} for i in range(3)]
    rows += [{"case": f"t{i}", "subset": "test", "dsc_mean": 0.5} for i in range(2)]
    engine.plot_subsets(rows, tmp_path, "run")
    assert {row["case"] for row in plotted["dsc.png"]} == {"t0", "t1"}
    assert {row["case"] for row in plotted["dsc-validation.png"]} == {"v0", "v1", "v2"}
    plotted.clear()
    engine.plot_subsets(rows[:3], tmp_path, "run")
    assert list(plotted) == ["dsc.png"]
