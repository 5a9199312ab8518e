"""Tests of the synthetic kaggle_3m generator: layout, formats, determinism, tumour placement, safety."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

import synthetic
from synthetic import make_decathlon, make_kaggle_3m, make_luna
from volumes import find_decathlon_cases, find_luna_cases, read_luna_case, read_nifti_case, read_volume

PATIENT_FOLDER = re.compile(r"^TCGA_[A-Z0-9]{2}_\d{4}_(19|20)\d{2}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])$")
N_PATIENTS, SLICES, SIZE = 4, (12, 14), 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_kaggle_3m(tmp_path_factory.mktemp("data"), N_PATIENTS, SLICES, SIZE, seed=3)


def patient_folders(root: Path) -> list[Path]:
    return sorted(path for path in root.iterdir() if path.is_dir())


def read_patient(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (D, H, W, 3) and masks (D, H, W) of a patient, slices in numeric order."""
    count = len(list(folder.glob("*_mask.tif")))
    images = [tifffile.imread(folder / f"{folder.name}_{k}.tif") for k in range(1, count + 1)]
    masks = [tifffile.imread(folder / f"{folder.name}_{k}_mask.tif") for k in range(1, count + 1)]
    return np.stack(images), np.stack(masks)


def all_files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def test_returns_the_kaggle_3m_folder_inside_out_dir(dataset: Path) -> None:
    assert dataset.name == "kaggle_3m"
    assert dataset.is_dir()


def test_patient_folders_are_unique_tcga_ids_with_an_image_and_a_mask_for_slices_1_to_n(
    dataset: Path,
) -> None:
    folders = patient_folders(dataset)
    assert len(folders) == N_PATIENTS
    assert len({folder.name.split("_")[2] for folder in folders}) == N_PATIENTS
    for folder in folders:
        assert PATIENT_FOLDER.match(folder.name), folder.name
        slice_file = re.compile(rf"^{folder.name}_(\d+)(_mask)?\.tif$")
        matches = [slice_file.match(path.name) for path in folder.iterdir()]
        assert all(matches), [path.name for path in folder.iterdir()]
        images = sorted(int(m[1]) for m in matches if not m[2])
        masks = sorted(int(m[1]) for m in matches if m[2])
        assert images == masks == list(range(1, len(images) + 1))
        assert SLICES[0] <= len(images) <= SLICES[1]


def test_slice_numbers_have_no_zero_padding_so_lexical_order_differs_from_numeric(
    dataset: Path,
) -> None:
    folder = patient_folders(dataset)[0]
    names = [path.name for path in folder.glob("*_mask.tif")]
    numeric = [f"{folder.name}_{k}_mask.tif" for k in range(1, len(names) + 1)]
    assert len(names) >= 10
    assert sorted(names) == sorted(numeric) != numeric


def test_data_csv_has_one_row_per_patient_beside_the_folders(dataset: Path) -> None:
    with open(dataset / "data.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    assert len(rows) > 0 and len(rows[0]) >= 3
    ids = {folder.name.rsplit("_", 1)[0] for folder in patient_folders(dataset)}
    assert sorted(row["Patient"] for row in rows) == sorted(ids)


def test_images_are_rgb_uint8_and_masks_are_single_channel_uint8_of_0_and_255(dataset: Path) -> None:
    for folder in patient_folders(dataset):
        images, masks = read_patient(folder)
        assert images.dtype == np.uint8 and images.shape[1:] == (SIZE, SIZE, 3)
        assert masks.dtype == np.uint8 and masks.shape == images.shape[:3]
        assert set(np.unique(masks)) == {0, 255}


def test_image_size_sets_height_and_width(tmp_path: Path) -> None:
    root = make_kaggle_3m(tmp_path, 1, (6, 6), 40, seed=0)
    images, masks = read_patient(patient_folders(root)[0])
    assert images.shape == (6, 40, 40, 3)
    assert masks.shape == (6, 40, 40)


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    first = all_files(make_kaggle_3m(tmp_path / "a", 2, (8, 10), 48, seed=5))
    second = all_files(make_kaggle_3m(tmp_path / "b", 2, (8, 10), 48, seed=5))
    other = all_files(make_kaggle_3m(tmp_path / "c", 2, (8, 10), 48, seed=6))
    assert first == second
    assert first.keys() != other.keys()
    images = [contents for name, contents in first.items() if not name.endswith("_mask.tif")]
    other_images = [contents for name, contents in other.items() if not name.endswith("_mask.tif")]
    assert not set(images) & set(other_images)


def test_every_patient_has_one_contiguous_tumour_run_on_at_most_half_the_slices_never_the_ends(
    dataset: Path,
) -> None:
    for folder in patient_folders(dataset):
        _, masks = read_patient(folder)
        tumour_slices = np.flatnonzero(masks.any(axis=(1, 2)))
        assert 2 <= len(tumour_slices) <= len(masks) // 2, folder.name
        assert tumour_slices[0] > 0 and tumour_slices[-1] < len(masks) - 1
        assert np.array_equal(tumour_slices, np.arange(tumour_slices[0], tumour_slices[-1] + 1))


def test_each_tumour_is_a_single_3d_blob(dataset: Path) -> None:
    for folder in patient_folders(dataset):
        _, masks = read_patient(folder)
        _, count = ndimage.label(masks > 0)
        assert count == 1, folder.name


def test_tumour_is_brighter_in_flair_than_the_rest_of_its_slices_head(dataset: Path) -> None:
    for folder in patient_folders(dataset):
        images, masks = read_patient(folder)
        flair, tumour = images[..., 1].astype(float), masks > 0
        on_tumour_slices = tumour.any(axis=(1, 2))
        head = (flair > 20) & ~tumour & on_tumour_slices[:, None, None]
        assert flair[tumour].mean() > flair[head].mean(), folder.name


def best_threshold_dice(flair: np.ndarray, tumour: np.ndarray) -> float:
    """Highest Dice of (flair >= t) against tumour over every threshold t, from histograms."""
    everything = np.bincount(flair.ravel(), minlength=256)
    inside = np.bincount(flair[tumour], minlength=256)
    predicted = np.cumsum(everything[::-1])[::-1]
    true_positive = np.cumsum(inside[::-1])[::-1]
    return float((2 * true_positive / (predicted + tumour.sum())).max())


def test_best_threshold_dice_helper_is_1_when_the_tumour_is_exactly_the_bright_pixels() -> None:
    flair = np.array([[10, 200], [200, 10]], dtype=np.uint8)
    assert best_threshold_dice(flair, flair > 100) == 1.0


def test_no_single_global_flair_threshold_reaches_dice_0_8(dataset: Path) -> None:
    volumes = [read_patient(folder) for folder in patient_folders(dataset)]
    flair = np.concatenate([images[..., 1].ravel() for images, _ in volumes])
    tumour = np.concatenate([(masks > 0).ravel() for _, masks in volumes])
    # Measured while writing the generator: 0.27 on 20 patients at 256, 0.11-0.62 on 4 at 64.
    assert best_threshold_dice(flair, tumour) < 0.8


def test_refuses_to_overwrite_a_non_empty_kaggle_3m_folder(tmp_path: Path) -> None:
    existing = tmp_path / "kaggle_3m" / "keep.txt"
    existing.parent.mkdir()
    existing.write_text("mine")
    with pytest.raises(FileExistsError, match="kaggle_3m"):
        make_kaggle_3m(tmp_path, 1, (6, 6), 32)
    assert existing.read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kaggle_3m"]


def test_fills_an_existing_empty_kaggle_3m_folder(tmp_path: Path) -> None:
    (tmp_path / "kaggle_3m").mkdir()
    root = make_kaggle_3m(tmp_path, 1, (6, 6), 32)
    assert len(patient_folders(root)) == 1


def test_an_interrupted_run_leaves_no_partial_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_render = synthetic.render_patient
    calls = []

    def render_then_fail(*args: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_render(*args)

    monkeypatch.setattr(synthetic, "render_patient", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        make_kaggle_3m(tmp_path, 3, (6, 6), 32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"n_patients": 0}, "n_patients"),
        ({"slices_per_patient": (5, 8)}, "slices_per_patient"),
        ({"slices_per_patient": (10, 8)}, "slices_per_patient"),
        ({"image_size": 16}, "image_size"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(
    tmp_path: Path, arguments: dict, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        make_kaggle_3m(tmp_path, **arguments)
    assert not (tmp_path / "kaggle_3m").exists()


def test_smooth_noise_has_the_requested_shape_and_about_unit_variance() -> None:
    field = synthetic.smooth_noise(np.random.default_rng(0), (6, 50, 40), (3, 5, 4))
    assert field.shape == (6, 50, 40) and field.dtype == np.float32
    assert 0.5 < field.std() < 1.5
    assert np.abs(np.diff(field, axis=2)).max() < 0.5


def test_cli_generates_the_dataset_then_skips_when_it_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    command = ["kaggle_3m", "--out", str(tmp_path), "--patients", "2", "--seed", "1"]
    command += ["--slices", "6", "8", "--size", "32"]
    assert synthetic.main(command) == 0
    assert str(tmp_path / "kaggle_3m") in capsys.readouterr().out
    assert len(patient_folders(tmp_path / "kaggle_3m")) == 2
    before = all_files(tmp_path)
    assert synthetic.main(command) == 0
    assert "skipping" in capsys.readouterr().out
    assert all_files(tmp_path) == before


def test_demo_data_is_generated_only_for_the_demo_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "mine"
    assert synthetic.ensure_demo_data(other) == other
    assert not other.exists()
    made = synthetic.ensure_demo_data("data/kaggle_3m")
    assert len([p for p in made.iterdir() if p.is_dir()]) == synthetic.DEMO_PATIENTS


# ---- LUNA16 stand-in --------------------------------------------------------------------------------------

LUNA_UID = re.compile(r"^1\.3\.6\.1\.4\.1\.14519\.5\.2\.1\.6279\.6001\.[1-9]\d{29}$")


@pytest.fixture(scope="module")
def luna(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_luna(tmp_path_factory.mktemp("data"), seed=1)


def mhd_fields(path: Path) -> dict[str, str]:
    return dict(line.split(" = ", 1) for line in path.read_text().splitlines())


def test_luna_writes_ct_and_mask_pairs_in_the_luna16_layout(luna: Path) -> None:
    assert luna.name == "luna16"
    assert sorted(path.name for path in luna.iterdir()) == ["seg-lungs-LUNA16", "subset0"]
    cts = sorted(path.name for path in (luna / "subset0").iterdir())
    masks = sorted(path.name for path in (luna / "seg-lungs-LUNA16").iterdir())
    uids = sorted(name[: -len(".mhd")] for name in cts if name.endswith(".mhd"))
    assert len(uids) == 4 and all(LUNA_UID.match(uid) for uid in uids), uids
    assert cts == sorted([f"{uid}.mhd" for uid in uids] + [f"{uid}.raw" for uid in uids])
    assert masks == sorted([f"{uid}.mhd" for uid in uids] + [f"{uid}.zraw" for uid in uids])
    ct_header = mhd_fields(luna / "subset0" / f"{uids[0]}.mhd")
    mask_header = mhd_fields(luna / "seg-lungs-LUNA16" / f"{uids[0]}.mhd")
    assert ct_header["CompressedData"] == "False" and ct_header["ElementType"] == "MET_SHORT"
    assert ct_header["ElementDataFile"] == f"{uids[0]}.raw" and ct_header["DimSize"] == "96 96 48"
    assert mask_header["CompressedData"] == "True" and mask_header["ElementType"] == "MET_SHORT"
    assert [case.case_id for case in find_luna_cases(luna)] == uids


def test_luna_cases_have_the_requested_anisotropic_geometry_shared_by_ct_and_mask(luna: Path) -> None:
    origins = set()
    for case in find_luna_cases(luna):
        ct, mask, geometry = read_luna_case(case)  # also checks that CT and mask share their geometry
        assert ct.shape == mask.shape == (48, 96, 96)
        assert ct.dtype == mask.dtype == np.int16
        assert geometry.spacing == pytest.approx((2.5, 0.7, 0.7))
        assert all(abs(value) > 1 for value in geometry.origin)
        origins.add(geometry.origin)
    assert len(origins) == 4


def test_luna_masks_hold_a_right_lung_a_left_lung_and_the_trachea_at_the_top(luna: Path) -> None:
    for case in find_luna_cases(luna):
        _, mask, _ = read_luna_case(case)
        assert set(np.unique(mask)) == {0, 3, 4, 5}
        right, left = np.argwhere(mask == 3), np.argwhere(mask == 4)
        assert right[:, 2].max() < left[:, 2].min()  # x runs from the patient's right to left
        assert 0.03 < (len(right) + len(left)) / mask.size < 0.3
        assert (mask[-1] == 5).any() and not (mask[-1] == 3).any()  # only the trachea reaches the top
        assert ndimage.label(mask == 5)[1] == 1  # one airway tree, joined at the top


def test_luna_ct_has_air_around_the_body_aerated_lungs_bright_bone_and_soft_tissue(luna: Path) -> None:
    for case in find_luna_cases(luna):
        ct, mask, _ = read_luna_case(case)
        lungs = (mask == 3) | (mask == 4)
        corner = ct[:, :4, 40:56]  # above the front of the chest, inside the scan circle
        assert np.median(corner) == pytest.approx(-1000, abs=40)
        assert -900 < np.median(ct[lungs]) < -780
        vessels = ct[lungs] > -500
        assert 0.002 < vessels.mean() < 0.15  # some vessels, mostly air
        assert np.percentile(ct, 99.5) > 400  # ribs and spine
        middle = ct[:, 40:56, 44:52]  # mediastinum, between the lungs
        assert -150 < np.median(middle) < 100
        assert ct.min() >= -3024 and ct.max() < 3072


def test_luna_is_byte_identical_for_a_seed_and_refuses_to_overwrite(tmp_path: Path) -> None:
    first = all_files(make_luna(tmp_path / "a", n_cases=2, shape=(20, 48, 48), seed=5))
    second = all_files(make_luna(tmp_path / "b", n_cases=2, shape=(20, 48, 48), seed=5))
    other = all_files(make_luna(tmp_path / "c", n_cases=2, shape=(20, 48, 48), seed=6))
    assert first == second
    assert not set(first.values()) & set(other.values())
    with pytest.raises(FileExistsError, match="luna16"):
        make_luna(tmp_path / "a", n_cases=1, shape=(20, 48, 48))
    assert all_files(tmp_path / "a" / "luna16") == first


def test_an_interrupted_luna_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_render, calls = synthetic.render_chest_ct, []

    def render_then_fail(*args: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_render(*args)

    monkeypatch.setattr(synthetic, "render_chest_ct", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        make_luna(tmp_path, n_cases=3, shape=(20, 48, 48))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("arguments", "named"),
    [({"n_cases": 0}, "n_cases"), ({"shape": (8, 48, 48)}, "shape"), ({"spacing": (2.5, 0, 0.7)}, "spacing")],
)
def test_bad_luna_arguments_raise_value_error_naming_the_argument(
    tmp_path: Path, arguments: dict, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        make_luna(tmp_path, **arguments)
    assert not (tmp_path / "luna16").exists()


# ---- Decathlon stand-in -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decathlon(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_decathlon(tmp_path_factory.mktemp("data"), seed=2)


def test_decathlon_writes_the_msd_layout_and_a_dataset_json_like_the_real_one(decathlon: Path) -> None:
    assert decathlon.name == "Task04_Hippocampus"
    description = json.loads((decathlon / "dataset.json").read_text())
    assert description["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert description["modality"] == {"0": "MRI"} and description["tensorImageSize"] == "3D"
    assert description["numTraining"] == len(description["training"]) == 6
    assert description["numTest"] == len(description["test"]) == 1
    names = [Path(entry["image"]).name for entry in description["training"]]
    assert all(re.match(r"^hippocampus_\d{3}\.nii\.gz$", name) for name in names)
    assert sorted(path.name for path in (decathlon / "imagesTr").iterdir()) == sorted(names)
    assert sorted(path.name for path in (decathlon / "labelsTr").iterdir()) == sorted(names)
    assert [f"./imagesTs/{path.name}" for path in (decathlon / "imagesTs").iterdir()] == description["test"]
    assert Path(description["test"][0]).name not in names


def test_decathlon_cases_load_with_mixed_stored_dtypes_and_labels_0_1_2(decathlon: Path) -> None:
    cases = find_decathlon_cases(decathlon)
    assert [case.label_path is None for case in cases] == [False] * 6 + [True]
    image_dtypes = [read_volume(case.image_paths[0])[0].dtype.name for case in cases]
    label_dtypes = [read_volume(case.label_path)[0].dtype.name for case in cases[:6]]
    assert image_dtypes == ["uint8", "float32", "float32", "uint8", "float32", "float32", "uint8"]
    assert label_dtypes == ["uint8", "float32", "uint8", "uint8", "uint8", "uint8"]
    shapes = set()
    for case in cases:
        image, label, geometry = read_nifti_case(case, {0, 1, 2})
        assert image.dtype == np.float32 and image.shape[0] == 1
        assert all(abs(n - m) <= 2 for n, m in zip(image.shape[1:], (32, 48, 40), strict=True))
        assert geometry.spacing == (1.0, 1.0, 1.0)
        shapes.add(image.shape)
        if label is not None:
            assert set(np.unique(label)) == {0, 1, 2}
    assert len(shapes) > 1


def test_decathlon_classes_are_one_anterior_and_one_posterior_part_touching_each_other(
    decathlon: Path,
) -> None:
    for case in find_decathlon_cases(decathlon)[:6]:
        _, label, _ = read_nifti_case(case, {0, 1, 2})
        anterior, posterior = np.argwhere(label == 1), np.argwhere(label == 2)
        assert anterior[:, 1].mean() < posterior[:, 1].mean()
        assert ndimage.label(label > 0)[1] == 1
        assert ndimage.label(label == 1)[1] == 1
        touching = ndimage.binary_dilation(label == 1) & (label == 2)
        assert touching.any()
        assert 0.01 < (label > 0).mean() < 0.15


def test_decathlon_hippocampus_is_not_segmented_by_an_intensity_band(decathlon: Path) -> None:
    intensities, truth = [], []
    for case in find_decathlon_cases(decathlon)[:6]:
        image, label, _ = read_nifti_case(case, {0, 1, 2})
        intensities.append(((image - image.mean()) / image.std()).ravel())
        truth.append(label.ravel() > 0)
    values, inside = np.concatenate(intensities), np.concatenate(truth)
    edges = np.quantile(values, np.linspace(0, 1, 41))
    best = max(
        2 * np.count_nonzero(band & inside) / (np.count_nonzero(band) + np.count_nonzero(inside))
        for low in edges
        for high in edges
        if high > low
        for band in [(values >= low) & (values < high)]
    )
    # Measured while writing the generator: 0.12 (the real hippocampus set: 0.24).
    assert best < 0.4


def test_decathlon_is_byte_identical_for_a_seed_and_refuses_to_overwrite(tmp_path: Path) -> None:
    first = all_files(make_decathlon(tmp_path / "a", n_cases=2, seed=7))
    assert first == all_files(make_decathlon(tmp_path / "b", n_cases=2, seed=7))
    assert first != all_files(make_decathlon(tmp_path / "c", n_cases=2, seed=8))
    with pytest.raises(FileExistsError, match="Task04_Hippocampus"):
        make_decathlon(tmp_path / "a", n_cases=2)
    assert all_files(tmp_path / "a" / "Task04_Hippocampus") == first


@pytest.mark.parametrize(
    ("arguments", "named"),
    [({"n_cases": 0}, "n_cases"), ({"shape": (32, 8, 40)}, "shape"), ({"task": "Hippocampus"}, "task")],
)
def test_bad_decathlon_arguments_raise_value_error_naming_the_argument(
    tmp_path: Path, arguments: dict, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        make_decathlon(tmp_path, **arguments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("command", "folder"),
    [
        (["luna", "--cases", "1", "--shape", "20", "48", "48"], "luna16"),
        (["msd", "--cases", "2", "--task", "Task04_Hippocampus"], "Task04_Hippocampus"),
    ],
)
def test_cli_generates_luna_and_msd_then_skips_when_they_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: list[str], folder: str
) -> None:
    command = [*command, "--out", str(tmp_path), "--seed", "3"]
    assert synthetic.main(command) == 0
    assert str(tmp_path / folder) in capsys.readouterr().out
    before = all_files(tmp_path)
    assert before
    assert synthetic.main(command) == 0
    assert "skipping" in capsys.readouterr().out
    assert all_files(tmp_path) == before
