"""Tests of the synthetic generators (kaggle_3m, LUNA16, Decathlon, LiTS): layout, anatomy, determinism."""

import csv
import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

import synthetic
from synthetic import make_decathlon, make_kaggle_3m, make_lits, make_luna
from volumes import (
    Geometry,
    find_decathlon_cases,
    find_luna_cases,
    find_nifti_cases,
    read_dataset_info,
    read_luna_case,
    read_nifti_case,
    read_volume,
)

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


def test_a_generated_set_is_made_once_then_reused(tmp_path, monkeypatch):
    small = functools.partial(synthetic.make_kaggle_3m, image_size=32)
    monkeypatch.setattr(synthetic, "make_kaggle_3m", small)
    made = synthetic.kaggle_3m_once(tmp_path, 2, seed=4)
    assert made == tmp_path / "kaggle_3m" and len(patient_folders(made)) == 2
    before = all_files(tmp_path)
    assert synthetic.kaggle_3m_once(tmp_path, 3, seed=5) == made  # already there: not made again
    assert all_files(tmp_path) == before


def test_demo_data_is_generated_only_for_the_demo_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = functools.partial(synthetic.make_kaggle_3m, slices_per_patient=(6, 6), image_size=32)
    monkeypatch.setattr(synthetic, "make_kaggle_3m", small)  # the demo's patient count, small images
    other = tmp_path / "mine"
    assert synthetic.ensure_demo_data(other) == other
    assert not other.exists()
    made = synthetic.ensure_demo_data("data/kaggle_3m")
    assert len([p for p in made.iterdir() if p.is_dir()]) == synthetic.DEMO_PATIENTS


def test_a_demo_folder_of_another_size_is_used_as_it_is_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    synthetic.make_kaggle_3m("data", n_patients=2, slices_per_patient=(6, 8), image_size=32, seed=1)
    before = all_files(tmp_path)
    with pytest.warns(
        UserWarning, match=rf"data/kaggle_3m holds 2 patient folders, not the {synthetic.DEMO_PATIENTS}"
    ):
        assert synthetic.ensure_demo_data("data/kaggle_3m") == Path("data/kaggle_3m")
    assert all_files(tmp_path) == before


# ---- LUNA16 stand-in --------------------------------------------------------------------------------------

LUNA_UID = re.compile(r"^1\.3\.6\.1\.4\.1\.14519\.5\.2\.1\.6279\.6001\.[1-9]\d{29}$")
LUNA_CASES, LUNA_SHAPE = 6, (120, 128, 128)
FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def luna(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_luna(tmp_path_factory.mktemp("data"), n_cases=LUNA_CASES, seed=2)


@pytest.fixture(scope="module")
def luna_scans(luna: Path) -> dict[str, tuple[np.ndarray, np.ndarray, Geometry]]:
    """Every scan of the luna fixture read once: {uid: (ct, mask, geometry)}."""
    return {case.case_id: read_luna_case(case) for case in find_luna_cases(luna)}


def mhd_fields(path: Path) -> dict[str, str]:
    return dict(line.split(" = ", 1) for line in path.read_text().splitlines())


def anatomical(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The array in the orientation of an identity-direction scan (y and x undone for diag(-1, -1, 1))."""
    return array[:, ::-1, ::-1] if geometry.direction == FLIPPED else array


def read_annotations(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as table:
        return list(csv.DictReader(table))


def annotated_voxel(row: dict[str, str], geometry: Geometry) -> tuple[int, int, int]:
    world = [float(row[key]) for key in ("coordX", "coordY", "coordZ")]
    return tuple(int(i) for i in np.rint(geometry.world_to_index(world)))


def test_luna_writes_scans_masks_and_the_two_nodule_lists_in_the_luna16_layout(luna: Path) -> None:
    assert luna.name == "luna16"
    assert sorted(path.name for path in luna.iterdir()) == [
        "annotations.csv",
        "annotations_excluded.csv",
        "seg-lungs-LUNA16",
        "subset0",
    ]
    cts = sorted(path.name for path in (luna / "subset0").iterdir())
    masks = sorted(path.name for path in (luna / "seg-lungs-LUNA16").iterdir())
    uids = sorted(name[: -len(".mhd")] for name in cts if name.endswith(".mhd"))
    assert len(uids) == LUNA_CASES and all(LUNA_UID.match(uid) for uid in uids), uids
    assert cts == sorted([f"{uid}.mhd" for uid in uids] + [f"{uid}.raw" for uid in uids])
    assert masks == sorted([f"{uid}.mhd" for uid in uids] + [f"{uid}.zraw" for uid in uids])
    ct_header = mhd_fields(luna / "subset0" / f"{uids[0]}.mhd")
    mask_header = mhd_fields(luna / "seg-lungs-LUNA16" / f"{uids[0]}.mhd")
    assert ct_header["CompressedData"] == "False" and ct_header["ElementType"] == "MET_SHORT"
    assert ct_header["ElementDataFile"] == f"{uids[0]}.raw" and ct_header["DimSize"] == "128 128 120"
    assert mask_header["CompressedData"] == "True" and mask_header["ElementType"] == "MET_SHORT"
    assert [case.case_id for case in find_luna_cases(luna)] == uids
    for name in ("annotations.csv", "annotations_excluded.csv"):
        assert (luna / name).read_text().splitlines()[0] == "seriesuid,coordX,coordY,coordZ,diameter_mm"


def test_luna_scans_span_a_real_chest_field_of_view_and_every_third_is_flipped(luna_scans: dict) -> None:
    origins = set()
    for index, (ct, mask, geometry) in enumerate(luna_scans.values()):
        assert ct.shape == mask.shape == LUNA_SHAPE
        assert ct.dtype == mask.dtype == np.int16
        extent = np.array(LUNA_SHAPE) * np.array(geometry.spacing)
        assert 290 <= extent[0] <= 310 and 340 <= extent[1] <= 360
        assert geometry.spacing[1] == geometry.spacing[2]
        assert geometry.direction == (FLIPPED if index % 3 == 1 else Geometry((1, 1, 1), (0, 0, 0)).direction)
        origins.add(geometry.origin)
    assert len(origins) == LUNA_CASES


def test_luna_lungs_hold_litres_of_air_in_a_body_of_real_size(luna_scans: dict) -> None:
    for ct, mask, geometry in luna_scans.values():
        lungs = (mask == 3) | (mask == 4)
        assert 2.0 < np.count_nonzero(lungs) * geometry.voxel_volume / 1e6 < 8.0
        body = ct[LUNA_SHAPE[0] // 2] > -500
        rows, columns = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
        width = (columns[-1] - columns[0] + 1) * geometry.spacing[2]
        front_to_back = (rows[-1] - rows[0] + 1) * geometry.spacing[1]
        assert 250 < width < 380 and 150 < front_to_back < 300


def test_an_explicit_luna_spacing_is_kept(tmp_path: Path) -> None:
    root = make_luna(tmp_path, n_cases=1, shape=(16, 48, 48), spacing=(2.5, 0.7, 0.7), seed=3)
    (case,) = find_luna_cases(root)
    assert read_luna_case(case)[2].spacing == pytest.approx((2.5, 0.7, 0.7))


def test_luna_masks_hold_a_right_lung_a_left_lung_and_the_trachea_at_the_top(luna_scans: dict) -> None:
    for _, mask, geometry in luna_scans.values():
        assert set(np.unique(mask)) == {0, 3, 4, 5}
        right_x = geometry.index_to_world(np.argwhere(mask == 3))[:, 0]
        left_x = geometry.index_to_world(np.argwhere(mask == 4))[:, 0]
        assert right_x.max() < left_x.min()  # world x (LPS) runs from the patient's right to left
        assert 0.03 < (len(right_x) + len(left_x)) / mask.size < 0.3
        assert (mask[-1] == 5).any() and not (mask[-1] == 3).any()  # only the trachea reaches the top
        assert ndimage.label(mask == 5)[1] == 1  # one airway tree, joined at the top


def test_luna_ct_has_air_around_the_body_aerated_lungs_bright_bone_and_soft_tissue(luna_scans: dict) -> None:
    for ct, mask, geometry in luna_scans.values():
        lungs = (mask == 3) | (mask == 4)
        front = anatomical(ct, geometry)[:, :4, 56:72]  # above the front of the chest, inside the scan circle
        assert np.median(front) == pytest.approx(-1000, abs=40)
        assert -900 < np.median(ct[lungs]) < -780
        vessels = ct[lungs] > -500
        assert 0.002 < vessels.mean() < 0.15  # some vessels and nodules, mostly air
        assert np.percentile(ct, 99.5) > 400  # ribs and spine
        middle = anatomical(ct, geometry)[:, 54:74, 58:70]  # mediastinum, between the lungs
        assert -150 < np.median(middle) < 100
        assert ct.min() >= -3024 and ct.max() < 3072


def test_luna_nodule_lists_name_real_scans_and_some_scans_have_no_nodule(luna: Path) -> None:
    uids = [case.case_id for case in find_luna_cases(luna)]
    annotations = read_annotations(luna / "annotations.csv")
    excluded = read_annotations(luna / "annotations_excluded.csv")
    per_scan = [sum(row["seriesuid"] == uid for row in annotations) for uid in uids]
    assert 0 in per_scan and max(per_scan) >= 2 and max(per_scan) <= 4, per_scan
    assert {row["seriesuid"] for row in annotations + excluded} <= set(uids)
    assert all(3.0 <= float(row["diameter_mm"]) <= 30.0 for row in annotations)
    assert excluded and all(row["diameter_mm"] == "-1" for row in excluded)  # unmeasured, as in LUNA16


def test_every_listed_centre_lies_in_a_lung_and_every_nodule_on_a_voxel_denser_than_lung(
    luna: Path, luna_scans: dict
) -> None:
    for name, denser_than in (("annotations.csv", -800), ("annotations_excluded.csv", None)):
        for row in read_annotations(luna / name):
            ct, mask, geometry = luna_scans[row["seriesuid"]]
            voxel = annotated_voxel(row, geometry)
            assert all(0 <= i < n for i, n in zip(voxel, ct.shape, strict=True)), (row, voxel)
            assert mask[voxel] in (3, 4), row
            if denser_than is not None:
                assert np.median(ct[(mask == 3) | (mask == 4)]) < denser_than < ct[voxel], row


def test_a_flipped_scan_needs_its_direction_for_its_annotations_to_land_on_its_nodules(
    luna: Path, luna_scans: dict
) -> None:
    flipped_uid = [case.case_id for case in find_luna_cases(luna)][1]
    ct, mask, geometry = luna_scans[flipped_uid]
    assert geometry.direction == FLIPPED
    rows = [row for row in read_annotations(luna / "annotations.csv") if row["seriesuid"] == flipped_uid]
    assert rows
    ignoring_direction = Geometry(geometry.spacing, geometry.origin)
    for row in rows:
        voxel = annotated_voxel(row, geometry)
        assert mask[voxel] in (3, 4) and ct[voxel] > -800
        naive = annotated_voxel(row, ignoring_direction)
        assert naive[1] < 0 and naive[2] < 0  # off the array: the origin is the far corner


def sphere_directions(count: int = 200) -> np.ndarray:
    """Nearly uniform unit vectors (z, y, x) on a Fibonacci spiral."""
    k = np.arange(count) + 0.5
    polar, azimuth = np.arccos(1 - 2 * k / count), np.pi * (1 + 5**0.5) * k
    return np.stack([np.cos(polar), np.sin(polar) * np.sin(azimuth), np.sin(polar) * np.cos(azimuth)], axis=1)


def measured_diameter(ct: np.ndarray, lung_hu: float, centre: np.ndarray, diameter: float, spacing) -> float:
    """Diameter (mm) of the object at centre (voxel index), from rays cast out of it.

    On a lightly smoothed crop, each ray ends where the density falls below halfway between the lung
    and the object's median density within 0.4 diameter (its halo for a part-solid nodule). Twice the
    lower-quartile ray length ignores the rays that run into the chest wall or a touching vessel.
    """
    spacing = np.array(spacing)
    reach = diameter / 2 + 3 * spacing.max()
    low = np.maximum(np.floor(centre - reach / spacing).astype(int), 0)
    high = np.minimum(np.ceil(centre + reach / spacing).astype(int) + 1, ct.shape)
    crop = ndimage.gaussian_filter(ct[tuple(map(slice, low, high))].astype(np.float32), 0.7)
    axes = [(np.arange(a, b) - c) * s for a, b, c, s in zip(low, high, centre, spacing, strict=True)]
    distance = np.sqrt(sum(o**2 for o in np.meshgrid(*axes, indexing="ij")))
    inner = crop[distance < 0.4 * diameter]
    threshold = (lung_hu + np.median(inner if inner.size else crop)) / 2
    steps = np.arange(0.0, reach, 0.2)
    points = (centre - low)[:, None, None] + (sphere_directions().T / spacing[:, None])[:, :, None] * steps
    profiles = ndimage.map_coordinates(crop, points.reshape(3, -1), order=1, mode="nearest")
    below = profiles.reshape(points.shape[1:]) < threshold
    lengths = np.where(below.any(axis=1), steps[np.argmax(below, axis=1)], reach)
    return 2 * float(np.percentile(lengths, 25))


def test_measured_diameter_helper_finds_the_diameter_of_a_drawn_ball() -> None:
    spacing = (2.5, 2.7, 2.7)
    grid = np.stack(np.meshgrid(*[np.arange(32) * s for s in spacing], indexing="ij"), axis=-1)
    ball = np.linalg.norm(grid - 40.0, axis=-1) < 6.0
    ct = np.where(ball, 40.0, -850.0)
    centre = 40.0 / np.array(spacing)
    assert measured_diameter(ct, -850.0, centre, 12.0, spacing) == pytest.approx(12.0, abs=2.0)


def test_annotated_diameters_match_the_drawn_nodules_to_a_voxel_and_a_half(
    luna: Path, luna_scans: dict
) -> None:
    errors, largest_voxel = [], 0.0
    for row in read_annotations(luna / "annotations.csv"):
        ct, mask, geometry = luna_scans[row["seriesuid"]]
        world = [float(row[key]) for key in ("coordX", "coordY", "coordZ")]
        lung_hu = float(np.median(ct[(mask == 3) | (mask == 4)]))
        diameter = float(row["diameter_mm"])
        found = measured_diameter(ct, lung_hu, geometry.world_to_index(world), diameter, geometry.spacing)
        errors.append(found - diameter)
        largest_voxel = max(largest_voxel, *geometry.spacing)
    assert len(errors) >= 8
    assert np.abs(errors).max() < 1.5 * largest_voxel, np.round(errors, 2)
    assert abs(np.mean(errors)) < 0.5 * largest_voxel


def test_luna_is_byte_identical_for_a_seed_and_refuses_to_overwrite(tmp_path: Path) -> None:
    first = all_files(make_luna(tmp_path / "a", n_cases=2, shape=(20, 48, 48), seed=5))
    second = all_files(make_luna(tmp_path / "b", n_cases=2, shape=(20, 48, 48), seed=5))
    other = all_files(make_luna(tmp_path / "c", n_cases=2, shape=(20, 48, 48), seed=6))
    assert first == second
    assert {"annotations.csv", "annotations_excluded.csv"} <= set(first)
    scans = {name: data for name, data in first.items() if not name.endswith(".csv")}
    assert not set(scans.values()) & set(other.values())
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


# ---- LiTS stand-in ----------------------------------------------------------------------------------------

LITS_CASES, LITS_SIZE, LITS_SLICES = 3, 64, (12, 20)
IN_PLANE_NEIGHBOURS = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool)


@pytest.fixture(scope="module")
def lits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lits(tmp_path_factory.mktemp("data"), LITS_CASES, seed=0, size=LITS_SIZE, slices=LITS_SLICES)


@pytest.fixture(scope="module")
def lits_cases(lits: Path) -> list[tuple[np.ndarray, np.ndarray, Geometry]]:
    """(HU image (D, H, W), labels, geometry) of every case, read with the training reader."""
    cases = []
    for case in find_nifti_cases(lits):
        image, labels, geometry = read_nifti_case(case, {0, 1, 2})
        cases.append((image[0], labels, geometry))
    return cases


def test_lits_writes_uncompressed_volume_and_segmentation_pairs_that_the_reader_finds(lits: Path) -> None:
    assert lits.name == "lits"
    numbers = range(LITS_CASES)
    assert sorted(path.name for path in lits.iterdir()) == sorted(
        [f"volume-{n}.nii" for n in numbers] + [f"segmentation-{n}.nii" for n in numbers]
    )
    cases = find_nifti_cases(lits)
    assert [(case.case_id, case.label_path.name) for case in cases] == [
        (f"volume-{n}", f"segmentation-{n}.nii") for n in numbers
    ]
    assert read_dataset_info(lits) == {
        "name": "LiTS",
        "class_names": {1: "liver", 2: "tumour"},
        "channel_names": ["CT"],
    }
    for case in cases:
        assert read_volume(case.image_paths[0])[0].dtype == np.int16
        assert read_volume(case.label_path)[0].dtype == np.uint8


def test_lits_cases_have_real_coverage_on_a_coarse_grid_and_every_third_is_flipped(lits_cases: list) -> None:
    for index, (image, labels, geometry) in enumerate(lits_cases):
        assert image.shape == labels.shape and image.shape[1:] == (LITS_SIZE, LITS_SIZE)
        assert LITS_SLICES[0] <= image.shape[0] <= LITS_SLICES[1]
        assert 300 < LITS_SIZE * geometry.spacing[2] == LITS_SIZE * geometry.spacing[1] < 420
        assert 200 <= image.shape[0] * geometry.spacing[0] <= 500
        assert geometry.direction == (FLIPPED if index % 3 == 1 else Geometry((1, 1, 1), (0, 0, 0)).direction)
        assert set(np.unique(labels)) <= {0, 1, 2}


def test_real_size_lits_grids_are_512_pixels_of_06_to_08_mm_and_100_to_400_slices_of_1_to_25_mm() -> None:
    for seed in range(40):
        (slices, height, width), spacing = synthetic._lits_grid(np.random.default_rng(seed), 512, (100, 400))
        assert height == width == 512 and 100 <= slices <= 400
        assert 0.6 <= spacing[1] == spacing[2] <= 0.8 and 1.0 <= spacing[0] <= 2.5


def test_lits_livers_are_a_litre_or_two_denser_than_fat_with_darker_tumours_inside(lits_cases: list) -> None:
    with_tumours = 0
    for image, labels, geometry in lits_cases:
        liver, tumour = labels == 1, labels == 2
        assert 1.0 < np.count_nonzero(liver | tumour) * geometry.voxel_volume / 1e6 < 2.3
        liver_hu = np.median(image[liver])
        assert 40 < liver_hu < 80
        body = image > -500
        fat = body & (image > -150) & (image < -50)
        assert np.count_nonzero(fat) > 0.05 * np.count_nonzero(body)  # fat is there, 150 HU below the liver
        if tumour.any():
            with_tumours += 1
            assert np.median(image[tumour]) < liver_hu - 15
            around = ndimage.binary_dilation(tumour, IN_PLANE_NEIGHBOURS) & ~tumour
            assert np.all(labels[around] == 1)  # surrounded by liver in every slice
    assert 0 < with_tumours < LITS_CASES


def test_lits_livers_lie_on_the_patients_right_in_world_space_whatever_the_direction(
    lits_cases: list,
) -> None:
    for image, labels, geometry in lits_cases:
        liver_x = geometry.index_to_world(np.argwhere(labels > 0))[:, 0].mean()
        body_x = geometry.index_to_world(np.argwhere(image > -500))[:, 0].mean()
        assert liver_x < body_x - 10  # LPS: the patient's right is -x


def test_lits_is_byte_identical_for_a_seed_and_refuses_to_overwrite(tmp_path: Path) -> None:
    tiny = {"n_cases": 2, "size": 32, "slices": (8, 10)}
    first = all_files(make_lits(tmp_path / "a", seed=3, **tiny))
    assert first == all_files(make_lits(tmp_path / "b", seed=3, **tiny))
    other = all_files(make_lits(tmp_path / "c", seed=4, **tiny))
    assert not {data for name, data in first.items() if name.startswith("volume")} & set(other.values())
    with pytest.raises(FileExistsError, match="lits"):
        make_lits(tmp_path / "a", seed=3, **tiny)
    assert all_files(tmp_path / "a" / "lits") == first


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"n_cases": 0}, "n_cases"),
        ({"size": 16}, "size"),
        ({"slices": (4, 8)}, "slices"),
        ({"slices": (9, 8)}, "slices"),
    ],
)
def test_bad_lits_arguments_raise_value_error_naming_the_argument(
    tmp_path: Path, arguments: dict, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        make_lits(tmp_path, **arguments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("command", "folder"),
    [
        (["luna", "--cases", "1", "--shape", "20", "48", "48"], "luna16"),
        (["msd", "--cases", "2", "--task", "Task04_Hippocampus"], "Task04_Hippocampus"),
        (["lits", "--cases", "1", "--size", "32", "--slices", "8", "8"], "lits"),
    ],
)
def test_cli_generates_luna_msd_and_lits_then_skips_when_they_exist(
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
