"""Every bad input a new user may give: a clear error naming the file or setting, before long work starts,
never a silent wrong result; and the data folders are never modified (hashed before and after)."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import utils
from config import TrainConfig
from dataset import find_sources
from engine import evaluate, load_run, train
from synthetic import make_decathlon, make_kaggle_3m
from train import parse_overrides
from volumes import read_volume, write_volume


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def brain(tmp_path_factory) -> Path:
    return make_kaggle_3m(tmp_path_factory.mktemp("brain"), n_patients=4, slices_per_patient=(8, 9), seed=5)


@pytest.fixture(scope="module")
def hippocampus(tmp_path_factory) -> Path:
    return make_decathlon(tmp_path_factory.mktemp("msd"), n_cases=5, seed=6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, hippocampus) -> Path:
    work = tmp_path_factory.mktemp("run")
    config = tiny(work, hippocampus)
    train(config)
    return config.run_dir


def tiny(work: Path, data: Path, **settings) -> TrainConfig:
    values = {
        "run_name": "run",
        "runs_dir": str(work / "runs"),
        "cache_dir": str(work / "cache"),
        "dataset": "msd",
        "data_dir": str(data),
        "model": "unet",
        "init_features": 4,
        "validation_cases": 1,
        "test_cases": 1,
        "epochs": 1,
        "batch_size": 4,
        "preprocess_workers": 1,
    }
    return TrainConfig(**{**values, **settings})


def copy_of(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("epochs", 0, "epochs must be at least 1"),
        ("validation_cases", 0, "validation_cases must be at least 1"),
        ("validation_cases", -2, "validation_cases must be at least 1"),
        ("test_cases", -1, "test_cases must be at least 1"),
        ("test_cases", True, r"test_cases must be an integer or a list, got True \(bool\)"),
        ("test_cases", [], "test_cases as a list must name one or more distinct case ids"),
        ("validation_cases", ["a", "a"], "validation_cases as a list must name one or more distinct"),
        ("validation_cases", [3], "validation_cases as a list must name one or more distinct case ids"),
        ("image_size", 0, "image_size must be at least 8"),
        ("slice_axis", 3, "slice_axis must be 0, 1 or 2"),
        ("edge_slices", -1, "edge_slices must be 0 or more"),
        ("context_slices", -1, "context_slices must be an integer, 0 or more"),
        ("context_slices", 1.5, r"context_slices must be an integer, got 1\.5 \(float\)"),
        ("context_slices", True, r"context_slices must be an integer, got True \(bool\)"),
        ("patch_size", [32, 32], r"patch_size must be 3 positive sizes"),
        ("foreground_jitter", 1.5, r"foreground_jitter must be in \[0, 1\]"),
        ("aug_scale", 1.0, r"aug_scale must be in \[0, 1\), got 1\.0"),
        ("batch_size", 0, "batch_size must be at least 1"),
        ("lr", -1e-3, "lr must be positive"),
        ("amp", "fp8", "amp must be one of"),
        ("epochs", 2.0, r"epochs must be an integer, got 2\.0 \(float\)"),
        ("lr", "fast", r"lr must be a number, got 'fast' \(str\)"),
        ("model_options", {"init_features": 8}, "model_options must not hold 'init_features'"),
        ("model", "unett", "unknown model 'unett'; valid names: unet, "),
        ("model_options", {"depht": 3}, "model 'unet' does not accept option 'depht'"),
        ("loss", "dice_cee", "unknown loss 'dice_cee'; expected one of: bce, "),
        ("loss_options", {"gama": 2}, "loss 'dice' got unexpected option"),
        ("aug_flip_axes", [2], r"aug_flip_axes must be spatial axes of a 2D network \(-2\.\.1\), got \[2\]"),
    ],
)
def test_an_impossible_setting_is_refused_before_any_data_is_read(
    tmp_path, setting, value, message, monkeypatch
):
    def never(*args, **kwargs):
        raise AssertionError("data was read before the settings were checked")

    monkeypatch.setattr("engine.find_sources", never)
    with pytest.raises((ValueError, TypeError), match=message):
        train(tiny(tmp_path, tmp_path / "data", **{setting: value}))


@pytest.mark.parametrize(
    "options, patch, message",
    [
        ({}, [24, 16, 16], r"ResUNet needs every spatial size divisible by 16, got \(24, 16, 16\); pad to"),
        ({"norm": "instance"}, [16, 16, 16], r"ResUNet with instance norm cannot train on inputs of \(16,"),
    ],
)
def test_a_patch_the_network_cannot_take_is_refused_before_any_data_is_read(
    tmp_path, options, patch, message, monkeypatch
):
    def never(*args, **kwargs):
        raise AssertionError("data was read before the patch size was checked")

    monkeypatch.setattr("engine.find_sources", never)
    settings = {"model": "res_unet3d", "model_options": options, "patch_size": patch}
    with pytest.raises(ValueError, match=message):
        train(tiny(tmp_path, tmp_path / "data", **settings))
    train_config = tiny(tmp_path, tmp_path / "data", **{**settings, "patch_size": [32, 16, 16]})
    with pytest.raises(AssertionError, match="data was read"):  # a patch it can take passes the check
        train(train_config)


def test_mirrored_inference_without_flips_in_training_is_refused(tmp_path, trained):
    with pytest.raises(ValueError, match="mirror_tta averages over the flips training makes, and aug_flip=0"):
        train(tiny(tmp_path, tmp_path / "data", mirror_tta=True, aug_flip=0.0))
    args = json.loads((trained / "args.json").read_text())
    assert args["aug_flip"] > 0
    unflipped = tmp_path / "unflipped"
    shutil.copytree(trained, unflipped)
    (unflipped / "args.json").write_text(json.dumps({**args, "aug_flip": 0.0}))
    with pytest.raises(ValueError, match=r"unflipped was trained without flips \(aug_flip=0\)"):
        evaluate(unflipped, mirror_tta=True)


def test_numbers_that_yaml_reads_as_text_are_read_as_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads 3e-4 as the text '3e-4': in a settings file, --set or papermill's -y."""
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-4\ntime_budget_minutes: 5e-1\nepochs: 3\npatch_size: foreground\n")
    config = TrainConfig.from_file(path, parse_overrides(["aug_scale=3e-1"]))
    assert (config.lr, config.time_budget_minutes, config.aug_scale) == (1e-4, 0.5, 0.3)
    assert (config.epochs, config.patch_size) == (3, "foreground")
    config.check()


def test_a_named_held_out_case_missing_from_the_data_is_refused_before_preprocessing(tmp_path, hippocampus):
    with pytest.raises(ValueError, match=rf"\['hippocampus_999'\] are not in {re.escape(str(hippocampus))} "):
        train(tiny(tmp_path, hippocampus, test_cases=["hippocampus_999"]))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_named_held_out_cases_are_the_run_s_validation_and_test_cases(tmp_path, hippocampus):
    case_ids = sorted(source.case_id for source in find_sources("msd", hippocampus)[0])
    validation, test = [case_ids[3]], [case_ids[0], case_ids[4]]
    train(tiny(tmp_path, hippocampus, validation_cases=validation, test_cases=test))
    split = json.loads((tmp_path / "runs" / "run" / "args.json").read_text())["split"]
    assert (split["validation"], split["test"]) == (validation, test)
    assert split["train"] == case_ids[1:3]


def test_neighbouring_slices_as_channels_are_refused_for_a_3d_network_before_any_data_is_read(tmp_path):
    with pytest.raises(ValueError, match="context_slices is for 2D networks; 'vnet' is 3D"):
        train(tiny(tmp_path, tmp_path / "data", model="vnet", context_slices=1))


def test_a_cache_inside_the_data_folder_is_refused(tmp_path, hippocampus):
    data = copy_of(hippocampus, tmp_path / "data")
    with pytest.raises(ValueError, match="cache_dir .* is inside data_dir"):
        train(tiny(tmp_path, data, cache_dir=str(data / ".cache")))
    assert not (data / ".cache").exists()


def test_a_misspelt_notebook_parameter_is_an_error_that_suggests_the_setting():
    namespace = {"learning_rate": 3e-4, "epochs": 2, "np": np, "Path": Path, "_private": 1, "config": None}
    with pytest.raises(ValueError, match=r"'learning_rate' \(did you mean 'lr'\?\)"):
        TrainConfig.from_namespace(namespace)
    with pytest.raises(ValueError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        TrainConfig.from_namespace({"epoch": 3})
    assert TrainConfig.from_namespace({"epochs": 2, "np": np, "result": {}}).epochs == 2


def test_a_settings_file_with_an_unknown_name_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\nbach_size: 4\n")
    with pytest.raises(ValueError, match=r"run\.yaml: 'bach_size' \(did you mean 'batch_size'\?\)"):
        TrainConfig.from_file(path)
    path.write_text("epochs: [3\n")
    with pytest.raises(ValueError, match=r"Cannot read the settings file .*run\.yaml"):
        TrainConfig.from_file(path)


def test_no_tumour_in_any_patient_is_refused_instead_of_reporting_dsc_1(tmp_path, brain):
    data = copy_of(brain, tmp_path / "kaggle_3m")
    for mask in data.rglob("*_mask.tif"):
        mask.write_bytes((next(data.rglob("*_1_mask.tif"))).read_bytes())  # slice 1 never has tumour
    before = folder_hash(data)
    config = tiny(tmp_path, data, dataset="kaggle_3m", image_size=32)
    with pytest.raises(ValueError, match=r"No training case of .*kaggle_3m has any foreground voxel"):
        train(config)
    assert folder_hash(data) == before


def test_every_empty_label_map_is_refused(tmp_path, hippocampus):
    data = copy_of(hippocampus, tmp_path / "msd")
    for label_file in (data / "labelsTr").glob("*.nii.gz"):
        label, geometry = read_volume(label_file)
        write_volume(np.zeros_like(label), geometry, label_file)
    with pytest.raises(ValueError, match="every label map is empty"):
        train(tiny(tmp_path, data))


@pytest.mark.parametrize("name", ["args.json", "weights.pt", "checkpoint.pt"])
def test_a_truncated_run_file_is_named(tmp_path, trained, name):
    run_dir = shutil.copytree(trained, tmp_path / "copy")
    path = run_dir / name
    path.write_bytes(path.read_bytes()[:50])
    if name == "weights.pt":
        (run_dir / "checkpoint.pt").unlink()  # otherwise the checkpoint's best weights are used
    with pytest.raises(ValueError, match=rf"{name} is corrupt or truncated"):
        load_run(run_dir, torch.device("cpu"))


def test_a_checkpoint_of_another_network_is_named(tmp_path, trained):
    run_dir = shutil.copytree(trained, tmp_path / "copy")
    args = json.loads((run_dir / "args.json").read_text())
    (run_dir / "args.json").write_text(json.dumps({**args, "model": "res_unet"}))
    with pytest.raises(ValueError, match=r"checkpoint\.pt does not hold weights of the network 'res_unet'"):
        load_run(run_dir, torch.device("cpu"))


def test_an_unknown_subset_is_named(trained):
    with pytest.raises(ValueError, match=r"Unknown subset\(s\) \['tset'\]"):
        evaluate(trained, subsets=["tset"])


def test_an_evaluation_set_with_a_class_the_run_never_saw_is_refused(tmp_path, trained, hippocampus):
    data = copy_of(hippocampus, tmp_path / "msd")
    label_file = sorted((data / "labelsTr").glob("*.nii.gz"))[0]
    label, geometry = read_volume(label_file)
    label[0, 0, 0] = 3
    write_volume(label, geometry, label_file)
    before = folder_hash(data)
    with pytest.raises(ValueError, match=rf"{label_file.name}: label values \[3\] are not among the allowed"):
        evaluate(trained, data_dir=str(data), output_dir=tmp_path / "out")
    assert folder_hash(data) == before


def test_a_one_channel_run_on_a_two_channel_set_is_refused(tmp_path, trained, hippocampus):
    data = copy_of(hippocampus, tmp_path / "msd")
    description = json.loads((data / "dataset.json").read_text())
    for entry in description["training"]:
        image_file = data / entry["image"]
        image, geometry = read_volume(image_file)
        stem = image_file.name.removesuffix(".nii.gz")
        for channel in range(2):
            write_volume(image, geometry, image_file.with_name(f"{stem}_{channel:04d}.nii.gz"))
        image_file.unlink()
    shutil.rmtree(data / "imagesTs")
    description = {**description, "test": [], "modality": {"0": "T1", "1": "T2"}}
    (data / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(ValueError, match=r"has 2 image channel\(s\), the run .* was trained on 1"):
        evaluate(trained, data_dir=str(data), output_dir=tmp_path / "out")


def test_an_evaluation_set_whose_classes_have_other_names_is_refused(tmp_path, trained, hippocampus):
    data = copy_of(hippocampus, tmp_path / "msd")
    description = json.loads((data / "dataset.json").read_text())
    labels = description["labels"]
    swapped = {"0": labels["0"], "1": labels["2"], "2": labels["1"]}
    (data / "dataset.json").write_text(json.dumps({**description, "labels": swapped}))
    with pytest.raises(ValueError, match=r"labels its classes .* the per-class columns would name the wrong"):
        evaluate(trained, data_dir=str(data), output_dir=tmp_path / "out")


def test_a_full_disk_says_no_space_left_and_names_the_path(tmp_path, monkeypatch):
    def full(state, file):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 4042")

    monkeypatch.setattr(utils.torch, "save", full)
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    target = tmp_path / "checkpoint.pt"
    with pytest.raises(OSError, match=rf"No space left on the disk while writing {target}"):
        utils.save_checkpoint_atomic({"a": 1}, target)
    assert not list(tmp_path.iterdir())  # no half-written file either


def test_nan_in_the_training_loss_stops_before_a_nan_network_is_saved(tmp_path, hippocampus):
    config = tiny(tmp_path, hippocampus, lr=1e30, epochs=3)
    with pytest.raises(FloatingPointError, match=r"Training loss became nan in epoch \d+ of .*run"):
        train(config)
    if (config.run_dir / "checkpoint.pt").exists():
        state = torch.load(config.run_dir / "checkpoint.pt", weights_only=False)
        assert all(torch.isfinite(value).all() for value in state["best_model"].values())
