"""The kaggle_3m reader, its preprocessing, the split and the slice dataset, on tif files written here."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import dataset
from dataset import (
    Case,
    SliceDataset,
    load_kaggle_3m,
    preprocess_patient,
    read_patient,
    slice_sampling_weights,
    split_cases,
)


def write_patient(root: Path, name: str, slices: int, size: int = 32, mask_scale: int = 255, masks=True):
    """A patient folder whose slice k has every pixel of its head equal to k (to check the order)."""
    folder = root / name
    folder.mkdir(parents=True)
    for k in range(1, slices + 1):
        image = np.zeros((size, size, 3), np.uint8)
        image[4:-4, 6:-6] = 10 + k
        tifffile.imwrite(folder / f"{name}_{k}.tif", image, photometric="rgb")
        if masks:
            mask = np.zeros((size, size), np.uint8)
            if k % 3 == 0:
                mask[10:14, 12:20] = mask_scale
            tifffile.imwrite(folder / f"{name}_{k}_mask.tif", mask)
    return folder


def test_slices_are_ordered_numerically_not_lexically(tmp_path):
    folder = write_patient(tmp_path, "TCGA_CS_0001_20000101", slices=12)
    volume, _, names = read_patient(folder)
    assert names == [str(k) for k in range(1, 13)]
    assert [int(volume[k, 16, 16, 0]) for k in range(12)] == [10 + k for k in range(1, 13)]


@pytest.mark.parametrize("scale", [1, 255])
def test_masks_are_binarised_whatever_their_stored_range(tmp_path, scale):
    folder = write_patient(tmp_path, "TCGA_CS_0002_20000101", slices=4, mask_scale=scale)
    _, mask, _ = read_patient(folder)
    assert set(np.unique(mask)) == {0, 1}
    assert mask[2].sum() == 4 * 8


def test_a_missing_data_folder_describes_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: expected the Kaggle kaggle_3m layout"):
        load_kaggle_3m(tmp_path / "nowhere", cache_dir=None)


def test_an_empty_data_folder_describes_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no patient folders: expected the Kaggle"):
        load_kaggle_3m(tmp_path, cache_dir=None)


def test_a_patient_folder_without_slices_is_named(tmp_path):
    (tmp_path / "TCGA_CS_0003_20000101").mkdir()
    with pytest.raises(FileNotFoundError, match="TCGA_CS_0003_20000101 has no slices"):
        load_kaggle_3m(tmp_path, cache_dir=None)


def test_an_image_without_its_mask_is_named(tmp_path):
    folder = write_patient(tmp_path, "TCGA_CS_0004_20000101", slices=3)
    (folder / "TCGA_CS_0004_20000101_2_mask.tif").unlink()
    with pytest.raises(FileNotFoundError, match=r"TCGA_CS_0004_20000101_2\.tif has no mask"):
        read_patient(folder)


def test_a_mask_without_its_image_is_named(tmp_path):
    folder = write_patient(tmp_path, "TCGA_CS_0005_20000101", slices=3)
    (folder / "TCGA_CS_0005_20000101_3.tif").unlink()
    with pytest.raises(FileNotFoundError, match=r"_3_mask\.tif has no image"):
        read_patient(folder)


def test_a_mask_of_another_shape_than_its_image_is_named(tmp_path):
    folder = write_patient(tmp_path, "TCGA_CS_0006_20000101", slices=3)
    tifffile.imwrite(folder / "TCGA_CS_0006_20000101_2_mask.tif", np.zeros((16, 32), np.uint8))
    with pytest.raises(ValueError, match=r"_2_mask\.tif has shape \(16, 32\) but its image has \(32, 32\)"):
        read_patient(folder)


def test_a_truncated_tif_is_named(tmp_path):
    folder = write_patient(tmp_path, "TCGA_CS_0007_20000101", slices=3)
    path = folder / "TCGA_CS_0007_20000101_2.tif"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"Cannot read .*_2\.tif"):
        read_patient(folder)


def test_a_grey_image_is_rejected_with_the_expected_shape(tmp_path):
    folder = write_patient(tmp_path, "TCGA_CS_0008_20000101", slices=2)
    tifffile.imwrite(folder / "TCGA_CS_0008_20000101_1.tif", np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"expected \(H, W, 3\) RGB"):
        read_patient(folder)


def test_unlabelled_folders_load_without_masks(tmp_path):
    write_patient(tmp_path, "TCGA_CS_0009_20000101", slices=5, masks=False)
    (case,) = load_kaggle_3m(tmp_path, image_size=16, require_masks=False, cache_dir=None)
    assert case.label is None
    assert case.image.shape == (3, 3, 16, 16)


def test_preprocessing_crops_pads_resizes_and_normalises(tmp_path):
    volume = np.zeros((6, 40, 50, 3), np.uint8)
    volume[:, 5:35, 10:30] = np.random.default_rng(0).integers(50, 200, (6, 30, 20, 3))
    mask = np.zeros((6, 40, 50), np.uint8)
    mask[2:4, 10:20, 15:25] = 1
    image, label, names = preprocess_patient(volume, mask, list("123456"), image_size=24, edge_slices=1)
    assert names == list("2345")
    assert image.shape == (3, 4, 24, 24) and image.dtype == np.float32
    assert label.shape == (4, 24, 24) and set(np.unique(label)) == {0, 1}
    np.testing.assert_allclose(image.mean(axis=(1, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(image.std(axis=(1, 2, 3)), 1, atol=1e-3)
    # the head (30 × 20 box) is padded to 30 × 30 and scaled by 24/30: its width becomes 16 pixels
    assert label[1].any(axis=0).sum() == pytest.approx(10 * 24 / 30, abs=1)


def test_nothing_is_written_in_the_data_folder_and_the_cache_is_reused(tmp_path, monkeypatch):
    data = tmp_path / "kaggle_3m"
    for number in range(2):
        write_patient(data, f"TCGA_CS_000{number}_20000101", slices=6)
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    cases = load_kaggle_3m(data, image_size=16, cache_dir=tmp_path / "cache")
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before

    def fail(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(dataset, "read_patient", fail)
    cached = load_kaggle_3m(data, image_size=16, cache_dir=tmp_path / "cache")
    for first, second in zip(cases, cached, strict=True):
        np.testing.assert_array_equal(first.image, second.image)
        np.testing.assert_array_equal(first.label, second.label)
        assert first.slice_names == second.slice_names
    with pytest.raises(AssertionError, match="cache was not used"):
        load_kaggle_3m(data, image_size=20, cache_dir=tmp_path / "cache")


def test_the_split_is_seeded_disjoint_and_complete():
    ids = [f"case{i:02d}" for i in range(20)]
    split = split_cases(ids, validation=4, test=3, seed=1)
    assert split == split_cases(list(reversed(ids)), validation=4, test=3, seed=1)
    assert (len(split["train"]), len(split["validation"]), len(split["test"])) == (13, 4, 3)
    assert sorted(split["train"] + split["validation"] + split["test"]) == ids
    assert split != split_cases(ids, validation=4, test=3, seed=2)
    with pytest.raises(ValueError, match="at least one case must remain for training"):
        split_cases(ids[:5], validation=3, test=2)


def test_sampling_weights_follow_tumour_area_and_survive_an_empty_case():
    with_tumour = np.zeros((4, 8, 8), np.uint8)
    with_tumour[1, :2, :2] = 1  # area 4
    with_tumour[2, :3, :4] = 1  # area 12
    empty = np.zeros((2, 8, 8), np.uint8)
    cases = [Case("a", np.zeros((1, 4, 8, 8), np.float32), with_tumour), Case("b", None, empty)]
    weights = slice_sampling_weights(cases)
    uniform = 1 / 11 / 4
    expected_a = [uniform, 10 / 11 * 4 / 16 + uniform, 10 / 11 * 12 / 16 + uniform, uniform]
    np.testing.assert_allclose(weights, np.array(expected_a + [0.5, 0.5]) / 2)
    assert weights.sum() == pytest.approx(1.0)


def test_the_slice_dataset_serves_channels_first_tensors():
    image = np.random.default_rng(0).normal(size=(3, 5, 8, 8)).astype(np.float32)
    label = np.zeros((5, 8, 8), np.uint8)
    label[3, 2:4, 2:4] = 1
    slices = SliceDataset([Case("a", image, label), Case("b", image, label)])
    assert len(slices) == 10
    x, y = slices[8]
    assert x.shape == (3, 8, 8) and y.shape == (1, 8, 8)
    np.testing.assert_array_equal(x.numpy(), image[:, 3])
    assert int(y.sum()) == 4


def test_patches_reaching_outside_the_volume_are_zero_padded():
    volume = np.arange(1, 1 + 4 * 5 * 6, dtype=np.float32).reshape(1, 4, 5, 6)
    patch = dataset.extract_patch(volume, start=(-1, 2, 4), size=(3, 4, 4))
    assert patch.shape == (1, 3, 4, 4)
    assert np.all(patch[:, 0] == 0) and np.all(patch[:, :, 3:] == 0) and np.all(patch[..., 2:] == 0)
    np.testing.assert_array_equal(patch[0, 1:, :3, :2], volume[0, 0:2, 2:5, 4:6])


def test_center_pad_or_crop_pads_one_axis_and_crops_another():
    array = np.ones((2, 3, 8), np.uint8)
    result = dataset.center_pad_or_crop(array, (5, 4))
    assert result.shape == (2, 5, 4)
    assert result[:, 1:4].all() and not result[:, 0].any() and not result[:, 4].any()


def test_patch_dataset_centres_the_requested_share_on_foreground():
    label = np.zeros((20, 20, 20), np.uint8)
    label[2:4, 2:4, 2:4] = 1
    image = np.zeros((1, 20, 20, 20), np.float32)
    torch.manual_seed(0)
    always = dataset.PatchDataset([Case("a", image, label)], (8, 8, 8), length=20, foreground_ratio=1.0)
    assert all(int(always[i][1].sum()) > 0 for i in range(len(always)))
    never = dataset.PatchDataset([Case("a", image, label)], (8, 8, 8), length=200, foreground_ratio=0.0)
    hits = sum(int(never[i][1].sum()) > 0 for i in range(len(never)))
    assert hits < 30  # a patch placed uniformly inside covers the 2³ corner cube in about 3% of draws
    x, y = always[0]
    assert x.shape == (1, 8, 8, 8) and y.shape == (1, 8, 8, 8) and y.dtype == torch.int64


def test_a_volume_smaller_than_the_patch_is_padded_with_one_warning_and_always_seen_whole():
    small = Case("small", np.ones((1, 4, 4, 4), np.float32), np.ones((4, 4, 4), np.uint8))
    with pytest.warns(UserWarning, match=r"1 case\(s\) smaller than the patch \(8, 8, 8\) are zero-padded"):
        patches = dataset.PatchDataset([small], (8, 8, 8), length=30, foreground_ratio=0.5)
    torch.manual_seed(0)
    offsets = set()
    for x, y in patches:
        assert x.shape == (1, 8, 8, 8) and int(y.sum()) == 64
        offsets.add(tuple(np.argwhere(y[0].numpy())[0]))
    assert len(offsets) > 1  # placed at random offsets, not always centred


def test_patches_of_a_larger_volume_lie_inside_it_on_the_long_axes():
    label = np.zeros((6, 20, 20), np.uint8)
    label[:, 0, 0] = 1  # foreground in a corner: centring there must not pad the patch
    case = Case("a", np.ones((1, 6, 20, 20), np.float32), label)
    with pytest.warns(UserWarning, match="zero-padded"):
        patches = dataset.PatchDataset([case], (8, 8, 8), length=40, foreground_ratio=0.5)
    torch.manual_seed(0)
    for x, _ in patches:
        assert int(x.sum()) == 6 * 8 * 8  # the whole short axis, and no padding on the long ones


def test_slices_can_be_taken_along_any_axis_and_padded_to_one_size():
    image = np.random.default_rng(0).normal(size=(1, 6, 7, 5)).astype(np.float32)
    label = np.zeros((6, 7, 5), np.uint8)
    label[:, 3, :] = 2
    slices = SliceDataset([Case("a", image, label)], axis=1, slice_size=(8, 8))
    assert len(slices) == 7
    x, y = slices[3]
    assert x.shape == (1, 8, 8) and y.shape == (1, 8, 8)
    np.testing.assert_array_equal(x.numpy()[0, 1:7, 1:6], image[0, :, 3, :])
    assert int((y == 2).sum()) == 30
    weights = slice_sampling_weights([Case("a", image, label)], axis=1)
    assert weights[3] == pytest.approx(10 / 11 + 1 / 11 / 7)
