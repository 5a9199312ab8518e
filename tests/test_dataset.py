"""The kaggle_3m reader, its preprocessing, the split and the slice dataset, on tif files written here."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import dataset
from dataset import (
    Case,
    SliceDataset,
    load_dataset,
    preprocess_patient,
    read_patient,
    slice_sampling_weights,
    split_cases,
)
from synthetic import make_decathlon, make_luna
from volumes import read_volume, write_volume


def load_kaggle_3m(data_dir, image_size=16, require_masks=True, cache_dir=None):
    cases, _, _ = load_dataset("kaggle_3m", data_dir, image_size, cache_dir, require_masks, workers=1)
    return cases


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


def test_an_opaque_alpha_channel_does_not_make_a_mask_all_foreground():
    mask = np.zeros((4, 4, 4), np.uint8)
    mask[..., 3] = 255
    mask[1, 2, :3] = 255
    assert dataset.binarize_mask(mask).sum() == 1


def test_upper_case_and_tiff_slice_names_are_read_and_a_missing_mask_names_its_suffix(tmp_path):
    folder = write_patient(tmp_path, "TCGA_CS_0009_20000101", slices=3)
    for path in folder.iterdir():
        path.rename(path.with_suffix(".TIF" if "_mask" in path.name else ".tiff"))
    volume, mask, names = read_patient(folder)
    assert names == ["1", "2", "3"] and volume.shape[0] == 3 and mask[2].sum() == 4 * 8
    (folder / "TCGA_CS_0009_20000101_2_mask.TIF").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"_2\.tiff has no mask: expected TCGA_CS_0009_20000101_2_mask\.tiff"
    ):
        read_patient(folder)


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
    assert case.image.shape == (3, 5, 16, 16)  # every slice: dropping edges is a training choice


def test_preprocessing_crops_pads_resizes_and_normalises(tmp_path):
    volume = np.zeros((6, 40, 50, 3), np.uint8)
    volume[:, 5:35, 10:30] = np.random.default_rng(0).integers(50, 200, (6, 30, 20, 3))
    mask = np.zeros((6, 40, 50), np.uint8)
    mask[2:4, 10:20, 15:25] = 1
    image, label, placement = preprocess_patient(volume, mask, image_size=24)
    assert placement == {
        "box": [5, 35, 10, 30],
        "padding": [[0, 0], [5, 5]],
    }  # 30 x 20 head, padded to 30 x 30
    assert image.shape == (3, 6, 24, 24) and image.dtype == np.float32
    assert label.shape == (6, 24, 24) and set(np.unique(label)) == {0, 1}
    np.testing.assert_allclose(image.mean(axis=(1, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(image.std(axis=(1, 2, 3)), 1, atol=1e-3)
    # the head (30 × 20 box) is padded to 30 × 30 and scaled by 24/30: its width becomes 16 pixels
    assert label[2].any(axis=0).sum() == pytest.approx(10 * 24 / 30, abs=1)


def test_nothing_is_written_in_the_data_folder_and_the_cache_is_reused(tmp_path, monkeypatch):
    data = tmp_path / "kaggle_3m"
    for number in range(2):
        write_patient(data, f"TCGA_CS_000{number}_20000101", slices=6)
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    cases = load_kaggle_3m(data, image_size=16, cache_dir=tmp_path / "cache")
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before

    def fail(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(dataset, "read_slices", fail)
    cached = load_kaggle_3m(data, image_size=16, cache_dir=tmp_path / "cache")
    for first, second in zip(cases, cached, strict=True):
        np.testing.assert_array_equal(first.image, second.image)
        np.testing.assert_array_equal(first.label, second.label)
        assert first.slice_names == second.slice_names
    with pytest.raises(AssertionError, match="cache was not used"):
        load_kaggle_3m(data, image_size=20, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("name", ["msd", "luna"])
def test_a_label_on_another_grid_than_its_image_is_refused_before_any_case_is_read(
    tmp_path, monkeypatch, name
):
    if name == "msd":
        data = make_decathlon(tmp_path / "data", n_cases=3, shape=(16, 24, 16))
        image, label = sorted(data.glob("imagesTr/*.nii.gz"))[-1], sorted(data.glob("labelsTr/*.nii.gz"))[-1]
    else:
        data = make_luna(tmp_path / "data", n_cases=2, shape=(16, 48, 48))
        image = sorted(data.glob("subset*/*.mhd"))[-1]
        label = data / "seg-lungs-LUNA16" / image.name
    voxels, geometry = read_volume(label)
    shifted = dataclasses.replace(geometry, origin=tuple(o + 2.0 for o in geometry.origin))
    write_volume(voxels, shifted, label, compress=name == "luna")

    def fail(*args, **kwargs):
        raise AssertionError("a case was read before the headers were compared")

    monkeypatch.setattr(dataset, "build_case", fail)
    monkeypatch.setattr(dataset, "make_plan", fail)
    with pytest.raises(ValueError, match=rf"geometry of {image} and {label} differ: origin"):
        load_dataset(name, data, cache_dir=None, workers=1)


def test_the_split_is_seeded_disjoint_and_complete():
    ids = [f"case{i:02d}" for i in range(20)]
    split = split_cases(ids, validation=4, test=3, seed=1)
    assert split == split_cases(list(reversed(ids)), validation=4, test=3, seed=1)
    assert (len(split["train"]), len(split["validation"]), len(split["test"])) == (13, 4, 3)
    assert sorted(split["train"] + split["validation"] + split["test"]) == ids
    assert split != split_cases(ids, validation=4, test=3, seed=2)
    with pytest.raises(ValueError, match="at least one case must remain for training"):
        split_cases(ids[:5], validation=3, test=2)


def test_counts_alone_draw_the_seeded_permutation_of_the_sorted_ids():
    ids = [f"case{i:02d}" for i in range(12)]
    shuffled = [ids[i] for i in np.random.default_rng(7).permutation(12)]
    split = split_cases(ids, validation=3, test=2, seed=7)
    assert split["validation"] == sorted(shuffled[:3])
    assert split["test"] == sorted(shuffled[3:5])
    assert split["train"] == sorted(shuffled[5:])


def test_named_held_out_cases_are_kept_and_counts_are_drawn_from_the_rest():
    ids = [f"case{i:02d}" for i in range(12)]
    split = split_cases(ids, validation=3, test=["case05", "case00"], seed=7)
    assert split["test"] == ["case00", "case05"]
    rest = [case for case in ids if case not in ("case00", "case05")]
    assert split["validation"] == sorted(rest[i] for i in np.random.default_rng(7).permutation(10)[:3])
    assert sorted(split["train"] + split["validation"]) == rest
    both = split_cases(ids, validation=["case11"], test=["case01", "case02"])
    assert (both["validation"], both["test"]) == (["case11"], ["case01", "case02"])
    assert len(both["train"]) == 9


def test_named_held_out_cases_must_exist_and_appear_once():
    ids = [f"case{i:02d}" for i in range(6)]
    with pytest.raises(ValueError, match=r"\['case99'\] are not in the data set"):
        split_cases(ids, validation=2, test=["case01", "case99"])
    with pytest.raises(ValueError, match=r"\['case01'\] are named both for validation and for test"):
        split_cases(ids, validation=["case01"], test=["case01", "case02"])
    with pytest.raises(ValueError, match="at least one case must remain for training"):
        split_cases(ids, validation=3, test=["case00", "case01", "case02"])


def test_sampling_weights_follow_tumour_area_and_survive_an_empty_case():
    with_tumour = np.zeros((4, 8, 8), np.uint8)
    with_tumour[1, :2, :2] = 1  # area 4
    with_tumour[2, :3, :4] = 1  # area 12
    empty = np.zeros((2, 8, 8), np.uint8)
    cases = [
        Case.from_arrays("a", np.zeros((1, 4, 8, 8), np.float32), with_tumour),
        Case.from_arrays("b", np.zeros((1, 2, 8, 8), np.float32), empty),
    ]
    weights = slice_sampling_weights(cases)
    uniform = 1 / 11 / 4
    expected_a = [uniform, 10 / 11 * 4 / 16 + uniform, 10 / 11 * 12 / 16 + uniform, uniform]
    np.testing.assert_allclose(weights, np.array(expected_a + [0.5, 0.5]) / 2)
    assert weights.sum() == pytest.approx(1.0)


def test_edge_slices_get_no_training_weight_unless_that_would_leave_none():
    label = np.zeros((5, 4, 4), np.uint8)
    label[0, 0, 0] = 1  # tumour on an edge slice: still never drawn for training
    short = np.zeros((2, 4, 4), np.uint8)
    cases = [
        Case.from_arrays("a", np.zeros((1, 5, 4, 4), np.float32), label),
        Case.from_arrays("b", np.zeros((1, 2, 4, 4), np.float32), short),
    ]
    weights = slice_sampling_weights(cases, edge_slices=1)
    np.testing.assert_allclose(weights[:5], [0, 1 / 6, 1 / 6, 1 / 6, 0])
    np.testing.assert_allclose(weights[5:], [0.25, 0.25])


def test_the_slice_dataset_serves_channels_first_tensors_drawn_by_weight():
    image = np.random.default_rng(0).normal(size=(3, 5, 8, 8)).astype(np.float32)
    label = np.zeros((5, 8, 8), np.uint8)
    label[3, 2:4, 2:4] = 1
    cases = [Case.from_arrays("a", image, label), Case.from_arrays("b", image, label)]
    only_slice_3_of_b = np.zeros(10)
    only_slice_3_of_b[8] = 1.0
    slices = SliceDataset(cases, only_slice_3_of_b)
    assert len(slices) == 10
    for sample in (0, 7, 123):
        x, y = slices[sample]
        assert x.shape == (3, 8, 8) and y.shape == (1, 8, 8)
        np.testing.assert_array_equal(x.numpy(), image[:, 3])
        assert int(y.sum()) == 4


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_slice_with_context_holds_its_neighbours_channels_in_order_and_repeats_the_edges(axis):
    image = np.random.default_rng(1).normal(size=(2, 5, 6, 7)).astype(np.float32)
    length = image.shape[axis + 1]
    np.testing.assert_array_equal(
        dataset.slice_with_context(image, 2, axis, 0), np.take(image, 2, axis=axis + 1)
    )
    for index in (0, 2, length - 1):
        stacked = dataset.slice_with_context(image, index, axis, 2)
        assert stacked.shape[0] == 2 * 5
        for offset in range(-2, 3):
            neighbour = np.take(image, min(max(index + offset, 0), length - 1), axis=axis + 1)
            for channel in range(2):
                np.testing.assert_array_equal(stacked[(offset + 2) * 2 + channel], neighbour[channel])


def test_the_slice_dataset_serves_the_neighbouring_slices_as_channels():
    image = np.random.default_rng(0).normal(size=(3, 5, 8, 8)).astype(np.float32)
    label = np.zeros((5, 8, 8), np.uint8)
    label[3, 2:4, 2:4] = 1
    only_slice_3 = np.zeros(5)
    only_slice_3[3] = 1.0
    x, y = SliceDataset([Case.from_arrays("a", image, label)], only_slice_3, context_slices=1)[0]
    assert x.shape == (9, 8, 8)
    np.testing.assert_array_equal(x.numpy(), np.concatenate([image[:, 2], image[:, 3], image[:, 4]]))
    np.testing.assert_array_equal(y[0].numpy(), label[3])


def test_a_training_sample_is_a_function_of_the_seed_and_its_number_only():
    label = np.zeros((12, 12, 12), np.uint8)
    label[4:8, 4:8, 4:8] = 1
    image = np.random.default_rng(0).normal(size=(1, 12, 12, 12)).astype(np.float32)
    case = Case.from_arrays("a", image, label)
    transform = dataset_transform()
    first = dataset.PatchDataset([case], (8, 8, 8), length=4, transform=transform, seed=3)
    again = dataset.PatchDataset([case], (8, 8, 8), length=4, transform=transform, seed=3)
    for sample in (5, 0, 5, 17):  # any order, any repetition
        np.testing.assert_array_equal(first[sample][0], again[sample][0])
    assert not torch.equal(first[5][0], first[6][0])
    other_seed = dataset.PatchDataset([case], (8, 8, 8), length=4, transform=transform, seed=4)
    assert not torch.equal(first[5][0], other_seed[5][0])


def dataset_transform():
    from transform import build_transform

    return build_transform(scale=0.1, degrees=20, intensity=0.1)


def test_the_epoch_sampler_splits_every_global_batch_between_ranks():
    single = dataset.EpochSampler(steps=3, batch_size=4)
    single.set_epoch(2)
    assert list(single) == list(range(24, 36))
    ranks = [dataset.EpochSampler(steps=3, batch_size=4, rank=r, world_size=2) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(2)
    first, second = list(ranks[0]), list(ranks[1])
    assert first == [24, 25, 28, 29, 32, 33] and second == [26, 27, 30, 31, 34, 35]
    with pytest.raises(ValueError, match="batch_size 3 must be divisible by the number of processes 2"):
        dataset.EpochSampler(steps=1, batch_size=3, world_size=2)


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
    case = Case.from_arrays("a", image, label)
    always = dataset.PatchDataset([case], (8, 8, 8), length=20, foreground_ratio=1.0)
    assert all(int(always[i][1].sum()) > 0 for i in range(len(always)))
    never = dataset.PatchDataset([case], (8, 8, 8), length=200, foreground_ratio=0.0)
    hits = sum(int(never[i][1].sum()) > 0 for i in range(len(never)))
    assert hits < 30  # a patch placed uniformly inside covers the 2³ corner cube in about 3% of draws
    x, y = always[0]
    assert x.shape == (1, 8, 8, 8) and y.shape == (1, 8, 8, 8) and y.dtype == torch.int64


def test_a_foreground_voxel_is_the_patch_centre_or_jittered_around_it():
    label = np.zeros((40, 40, 40), np.uint8)
    label[20, 20, 20] = 1  # one voxel, far from the edges: no clipping moves the patch
    case = Case.from_arrays("a", np.zeros((1, 40, 40, 40), np.float32), label)

    def places(jitter: float) -> np.ndarray:
        patches = dataset.PatchDataset(
            [case], (8, 12, 16), length=400, foreground_ratio=1.0, foreground_jitter=jitter
        )
        return np.array([np.argwhere(patches[i][1][0].numpy())[0] for i in range(len(patches))])

    assert (places(0.0) == [4, 6, 8]).all()
    for jitter, spans in [(0.5, [(2, 6), (3, 9), (4, 12)]), (1.0, [(0, 7), (0, 11), (0, 15)])]:
        spread = places(jitter)  # always inside the patch, at every offset of the span on each axis
        for axis, (first, last) in enumerate(spans):
            assert set(spread[:, axis]) == set(range(first, last + 1))


def test_a_rotated_patch_inside_the_volume_is_filled_with_the_volume_around_it():
    from transform import build_transform

    label = np.zeros((48, 48, 48), np.uint8)
    label[24, 24, 24] = 1  # the patch is centred here, with room on every side for what a rotation reads
    image = np.random.default_rng(0).uniform(1, 2, size=(1, 48, 48, 48)).astype(np.float32)
    case = Case.from_arrays("a", image, label)
    augment = build_transform(scale=0.1, degrees=30, flip_prob=0.5, patch_size=(12, 16, 12))
    assert max(augment.input_size()) <= 48  # the box read around the centred patch lies inside the volume
    patches = dataset.PatchDataset([case], (12, 16, 12), length=30, foreground_ratio=1.0, transform=augment)
    corner_zeros = []
    for x, y in (patches[i] for i in range(30)):
        assert x.shape == (1, 12, 16, 12) and y.shape == (1, 12, 16, 12)
        corner_zeros.append(int((x == 0).sum()))
    assert max(corner_zeros) == 0
    zero_filled = build_transform(scale=0.1, degrees=30, flip_prob=0.5)  # the patch alone, rotated
    alone = dataset.PatchDataset([case], (12, 16, 12), length=30, foreground_ratio=1.0, transform=zero_filled)
    assert max(int((alone[i][0] == 0).sum()) for i in range(30)) > 0


def test_a_transform_returning_another_size_than_the_patch_is_refused():
    from transform import build_transform

    case = Case.from_arrays("a", np.ones((1, 20, 20, 20), np.float32), np.ones((20, 20, 20), np.uint8))
    other = build_transform(patch_size=(6, 6, 6))
    patches = dataset.PatchDataset([case], (8, 8, 8), length=2, transform=other)
    with pytest.raises(ValueError, match=r"returned \(6, 6, 6\) patches, not \(8, 8, 8\)"):
        patches[0]


def test_a_volume_smaller_than_the_patch_is_padded_with_one_warning_and_always_seen_whole():
    small = Case.from_arrays("small", np.ones((1, 4, 4, 4), np.float32), np.ones((4, 4, 4), np.uint8))
    with pytest.warns(UserWarning, match=r"1 case\(s\) smaller than the patch \(8, 8, 8\) are zero-padded"):
        patches = dataset.PatchDataset([small], (8, 8, 8), length=30, foreground_ratio=0.5)
    offsets = set()
    for x, y in (patches[i] for i in range(30)):
        assert x.shape == (1, 8, 8, 8) and int(y.sum()) == 64
        offsets.add(tuple(np.argwhere(y[0].numpy())[0]))
    assert len(offsets) > 1  # placed at random offsets, not always centred


def test_patches_of_a_larger_volume_lie_inside_it_on_the_long_axes():
    label = np.zeros((6, 20, 20), np.uint8)
    label[:, 0, 0] = 1  # foreground in a corner: centring there must not pad the patch
    case = Case.from_arrays("a", np.ones((1, 6, 20, 20), np.float32), label)
    with pytest.warns(UserWarning, match="zero-padded"):
        patches = dataset.PatchDataset([case], (8, 8, 8), length=40, foreground_ratio=0.5)
    for x, _ in (patches[i] for i in range(40)):
        assert int(x.sum()) == 6 * 8 * 8  # the whole short axis, and no padding on the long ones


def test_slices_can_be_taken_along_any_axis_and_padded_to_one_size():
    image = np.random.default_rng(0).normal(size=(1, 6, 7, 5)).astype(np.float32)
    label = np.zeros((6, 7, 5), np.uint8)
    label[:, 3, :] = 2
    case = Case.from_arrays("a", image, label)
    only_slice_3 = np.eye(7)[3]
    slices = SliceDataset([case], only_slice_3, axis=1, slice_size=(8, 8))
    assert len(slices) == 7
    x, y = slices[0]
    assert x.shape == (1, 8, 8) and y.shape == (1, 8, 8)
    np.testing.assert_array_equal(x.numpy()[0, 1:7, 1:6], image[0, :, 3, :])
    assert int((y == 2).sum()) == 30
    weights = slice_sampling_weights([case], axis=1)
    assert weights[3] == pytest.approx(10 / 11 + 1 / 11 / 7)


def test_a_slice_name_that_does_not_parse_is_named(tmp_path):
    folder = write_patient(tmp_path, "TCGA_CS_0010_20000101", slices=3)
    (folder / "TCGA_CS_0010_20000101_3 (copy).tif").write_bytes(
        (folder / "TCGA_CS_0010_20000101_3.tif").read_bytes()
    )
    with pytest.raises(ValueError, match=r"_3 \(copy\)\.tif: the slice name does not parse"):
        read_patient(folder)


def test_two_files_for_one_slice_number_are_named(tmp_path):
    folder = write_patient(tmp_path, "TCGA_CS_0011_20000101", slices=3)
    (folder / "TCGA_CS_0011_20000101_03.tif").write_bytes(
        (folder / "TCGA_CS_0011_20000101_3.tif").read_bytes()
    )
    with pytest.raises(
        ValueError, match=r"_03\.tif and .*_3\.tif are both slice 3|_3\.tif and .*_03\.tif are both"
    ):
        read_patient(folder)


def test_a_gap_in_the_slice_numbers_is_warned_about_and_kept_on_the_source_grid(tmp_path):
    folder = write_patient(tmp_path, "TCGA_CS_0012_20000101", slices=9)
    for suffix in ("", "_mask"):
        (folder / f"TCGA_CS_0012_20000101_8{suffix}.tif").unlink()
    with pytest.warns(UserWarning, match=r"slice number\(s\) \[8\] are missing"):
        (case,) = load_kaggle_3m(tmp_path, image_size=16)
    assert case.shape[0] == 8 and case.slice_names == ["1", "2", "3", "4", "5", "6", "7", "9"]
    assert case.source["shape"][0] == 9 and case.source["slice_index"][-1] == 8  # slice 9 is not next to 7
