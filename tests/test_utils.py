"""Tests for utils.py: metrics, tables, figures and run helpers, on tiny hand-made arrays."""

import json
import math
import random
import tracemalloc

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from medpy.metric.binary import hd95 as medpy_hd95
from scipy import ndimage

import utils

RED = (255, 0, 0)
GREEN = (0, 255, 0)
YELLOW = (255, 255, 0)
MAGENTA = (255, 0, 255)
CYAN = (0, 255, 255)


# ---------------------------------------------------------------------------------------------
# Dice
# ---------------------------------------------------------------------------------------------


def test_dice_counts_overlap_twice_over_the_sum_of_sizes():
    pred = np.array([1, 1, 1, 0], dtype=bool)
    truth = np.array([0, 1, 1, 1], dtype=bool)
    assert utils.dice_coefficient(pred, truth) == pytest.approx(2 * 2 / (3 + 3))


def test_dice_is_one_when_both_masks_are_empty_and_zero_when_one_is():
    empty = np.zeros((2, 3, 4), dtype=bool)
    full = np.ones((2, 3, 4), dtype=bool)
    assert utils.dice_coefficient(empty, empty) == 1.0
    assert utils.dice_coefficient(empty, full) == 0.0
    assert utils.dice_coefficient(full, empty) == 0.0


def test_dice_rejects_masks_of_different_shape():
    with pytest.raises(ValueError, match="same shape"):
        utils.dice_coefficient(np.zeros((2, 2)), np.zeros((2, 3)))


def test_dice_per_class_scores_each_label_separately():
    pred = np.array([[0, 1, 1], [2, 2, 3]])
    truth = np.array([[0, 1, 2], [2, 2, 0]])
    scores = utils.dice_per_class(pred, truth, classes=[1, 2, 3])
    assert scores[1] == pytest.approx(2 * 1 / (2 + 1))
    assert scores[2] == pytest.approx(2 * 2 / (2 + 3))
    assert scores[3] == 0.0


# ---------------------------------------------------------------------------------------------
# Largest connected component
# ---------------------------------------------------------------------------------------------


def test_largest_component_removes_the_smaller_blob():
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    labels[0:2, 0:2, 0:2] = 1
    labels[5, 5, 5] = 1
    kept = utils.largest_connected_component(labels)
    assert kept[0:2, 0:2, 0:2].all()
    assert kept[5, 5, 5] == 0
    assert kept.sum() == 8
    assert kept.dtype == np.uint8


def test_largest_component_joins_diagonal_neighbours_in_3d():
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    for i in range(3):
        labels[i, i, i] = 1  # touching only at corners: one 26-connected chain of 3 voxels
    labels[5, 5, 0] = 1
    labels[5, 4, 0] = 1  # a face-connected pair, larger than any single chain voxel
    kept = utils.largest_connected_component(labels)
    assert [kept[i, i, i] for i in range(3)] == [1, 1, 1]
    assert kept[5, 5, 0] == 0 and kept[5, 4, 0] == 0


def test_largest_component_treats_each_class_independently():
    labels = np.zeros((5, 7), dtype=np.uint8)
    labels[0:2, 0:3] = 1  # class 1, 6 pixels
    labels[4, 6] = 1  # class 1 stray pixel
    labels[4, 5] = 2  # class 2, its only component, touching the class-1 stray
    labels[2, 0] = 3
    labels[4, 0] = 3  # class 3: two single pixels, the first in raster order wins the tie
    kept = utils.largest_connected_component(labels)
    expected = labels.copy()
    expected[4, 6] = 0
    expected[4, 0] = 0
    np.testing.assert_array_equal(kept, expected)


def test_largest_component_only_touches_the_listed_classes():
    labels = np.zeros((3, 5), dtype=np.uint8)
    labels[0, 0:2] = 1
    labels[2, 4] = 1
    labels[0, 4] = 2
    labels[2, 0] = 2
    kept = utils.largest_connected_component(labels, classes=[1])
    assert kept[2, 4] == 0
    assert kept[0, 4] == 2 and kept[2, 0] == 2


def test_largest_component_keeps_booleans_boolean_and_empty_masks_empty():
    mask = np.zeros((4, 4), dtype=bool)
    assert not utils.largest_connected_component(mask).any()
    mask[0, 0] = mask[3, 3] = mask[3, 2] = True
    kept = utils.largest_connected_component(mask)
    assert kept.dtype == bool
    assert kept.sum() == 2 and kept[3, 3] and kept[3, 2]


# ---------------------------------------------------------------------------------------------
# Hausdorff 95
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shift_axis", "expected_mm"),
    [(0, 3 * 2.5), (2, 3 * 0.7)],
)
def test_hd95_of_shifted_cubes_uses_the_spacing_of_the_shifted_axis(shift_axis, expected_mm):
    # 2x2x2 cubes are all surface; shifted by 3 voxels, half the surface lies 2 voxels from the
    # other cube and half 3 voxels, so the 95th percentile of the 16 distances is 3 voxels.
    truth = np.zeros((10, 10, 10), dtype=bool)
    truth[2:4, 2:4, 2:4] = True
    pred = np.roll(truth, 3, axis=shift_axis)
    assert utils.hausdorff95(pred, truth, spacing=(2.5, 0.7, 0.7)) == pytest.approx(expected_mm)


def test_hd95_is_nan_when_a_mask_is_empty():
    mask = np.zeros((4, 4), dtype=bool)
    other = mask.copy()
    other[1, 1] = True
    assert math.isnan(utils.hausdorff95(mask, other, (1.0, 1.0)))
    assert math.isnan(utils.hausdorff95(other, mask, (1.0, 1.0)))
    assert math.isnan(utils.hausdorff95(mask, mask, (1.0, 1.0)))


@pytest.mark.parametrize(("shape", "spacing"), [((8, 12, 12), (3.0, 0.8, 1.1)), ((20, 16), (0.9, 1.3))])
def test_hd95_matches_medpy_on_irregular_blobs(shape, spacing):
    rng = np.random.default_rng(0)
    pred = rng.random(shape) > 0.7
    truth = rng.random(shape) > 0.6
    expected = medpy_hd95(pred, truth, voxelspacing=spacing)
    assert utils.hausdorff95(pred, truth, spacing) == pytest.approx(expected)


def test_hd95_of_small_masks_in_a_large_image_matches_medpy_and_works_on_their_box_only():
    # The truth touches the image's last face (an edge surface) and the prediction is 30 voxels away:
    # the box around both must give medpy's whole-image figure, and the distance transforms must not
    # be sized by the 4-million-voxel image (whole-image transforms would take over 80 MB).
    shape = (64, 256, 256)
    truth = np.zeros(shape, bool)
    truth[50:64, 100:130, 200:256] = True
    pred = np.zeros(shape, bool)
    pred[20:40, 90:120, 180:240] = True
    pred[30, 60, 60] = True
    spacing = (2.5, 0.7, 0.8)
    expected = medpy_hd95(pred, truth, voxelspacing=spacing)
    tracemalloc.start()
    found = utils.hausdorff95(pred, truth, spacing)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert found == pytest.approx(expected)
    assert peak < 40e6


def test_hd95_of_a_prediction_spread_over_the_whole_image_is_exact_in_less_memory_than_a_transform():
    # An untrained network's noise: the box is the whole image, so only the lean transform saves memory
    # (scipy's full distance transform of one surface takes about 49 bytes per voxel).
    shape = (48, 192, 192)
    pred = np.random.default_rng(1).random(shape) > 0.5
    truth = np.zeros(shape, bool)
    truth[10:20, 40:70, 50:90] = True
    spacing = (2.0, 0.7, 0.7)
    tracemalloc.start()
    ndimage.distance_transform_edt(~truth, sampling=spacing)
    transform_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    found = utils.hausdorff95(pred, truth, spacing)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert found == pytest.approx(medpy_hd95(pred, truth, voxelspacing=spacing), rel=1e-6)
    assert peak < 0.6 * transform_peak


def test_hd95_rejects_a_spacing_of_the_wrong_length():
    mask = np.ones((3, 3), dtype=bool)
    with pytest.raises(ValueError, match="spacing"):
        utils.hausdorff95(mask, mask, spacing=(1.0, 1.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Case metrics and slice regrouping
# ---------------------------------------------------------------------------------------------


def test_case_metrics_reports_scores_before_and_after_post_processing():
    truth = np.zeros((6, 8), dtype=np.uint8)
    truth[1:3, 1:3] = 1
    pred = truth.copy()
    pred[5, 7] = 1  # a stray pixel that post-processing removes
    row = utils.case_metrics("case-7", pred, truth, {1: "tumour"}, postprocessing="largest")
    assert list(row) == [
        "case",
        "dsc_tumour",
        "dsc_mean",
        "hd95_tumour",
        "missed_tumour",
        "fn_tumour",
        "fp_tumour",
        "voxels_tumour",
        "dsc_tumour_pp",
        "dsc_mean_pp",
        "hd95_tumour_pp",
        "missed_tumour_pp",
        "fn_tumour_pp",
        "fp_tumour_pp",
    ]
    assert row["case"] == "case-7"
    assert (row["fn_tumour"], row["fp_tumour"], row["voxels_tumour"]) == (0, 1, 4)
    assert (row["fn_tumour_pp"], row["fp_tumour_pp"]) == (0, 0)
    assert row["dsc_tumour"] == pytest.approx(2 * 4 / (5 + 4))
    assert row["dsc_mean"] == pytest.approx(2 * 4 / (5 + 4))
    # 8 distances of 0 and the stray pixel's sqrt(3^2 + 5^2): percentile index 0.95 * 8 = 7.6
    assert row["hd95_tumour"] == pytest.approx(0.6 * math.sqrt(34))
    assert row["dsc_tumour_pp"] == 1.0
    assert row["dsc_mean_pp"] == 1.0
    assert row["hd95_tumour_pp"] == 0.0
    given = utils.postprocess(pred, "largest", [1])
    assert utils.case_metrics("case-7", pred, truth, {1: "tumour"}, postprocessed=given) == row
    kept = utils.case_metrics("case-7", pred, truth, {1: "tumour"}, postprocessed=pred)  # taken as given
    assert kept["dsc_tumour_pp"] == row["dsc_tumour"]
    with pytest.raises(ValueError, match="same shape"):
        utils.case_metrics("case-7", pred, truth, {1: "tumour"}, postprocessed=pred[:5])


def test_case_metrics_averages_classes_and_scales_hd95_by_spacing():
    truth = np.zeros((1, 4, 6), dtype=np.uint8)
    truth[0, 0, 0:2] = 1
    truth[0, 3, 4:6] = 2
    pred = truth.copy()
    pred[0, 3, 4:6] = 0
    pred[0, 2, 4:6] = 2  # class 2 shifted one row: DSC 0, HD95 one row = 2 mm
    row = utils.case_metrics("c", pred, truth, {1: "liver", 2: "lesion"}, spacing=(5.0, 2.0, 1.0))
    assert row["dsc_liver"] == 1.0
    assert row["dsc_lesion"] == 0.0
    assert row["dsc_mean"] == pytest.approx(0.5)
    assert row["hd95_liver"] == 0.0
    assert row["hd95_lesion"] == pytest.approx(2.0)
    assert (row["fn_lesion"], row["fp_lesion"], row["voxels_lesion"]) == (2, 2, 2)
    assert (row["fn_liver"], row["fp_liver"], row["voxels_liver"]) == (0, 0, 2)
    assert row["dsc_mean_pp"] == pytest.approx(0.5)


def test_a_missed_structure_gets_the_image_diagonal_as_hd95_and_is_counted():
    truth = np.zeros((4, 6, 8), dtype=np.uint8)
    truth[1:3, 1:3, 1:3] = 1
    truth[2, 4, 6] = 2
    pred = truth.copy()
    pred[pred == 2] = 0  # class 2 missed
    spacing = (2.0, 1.0, 0.5)
    row = utils.case_metrics("c", pred, truth, {1: "a", 2: "b"}, spacing=spacing, postprocessing="none")
    diagonal = math.sqrt((4 * 2.0) ** 2 + (6 * 1.0) ** 2 + (8 * 0.5) ** 2)
    assert row["hd95_b"] == pytest.approx(diagonal) and row["missed_b"] == 1
    assert row["hd95_a"] == 0.0 and row["missed_a"] == 0
    spurious = utils.case_metrics("c", truth, pred, {1: "a", 2: "b"}, spacing=spacing)
    assert spurious["hd95_b"] == pytest.approx(diagonal) and spurious["missed_b"] == 1
    absent = utils.case_metrics("c", pred, pred, {1: "a", 2: "b"}, spacing=spacing)
    assert absent["hd95_b"] == 0.0 and absent["dsc_b"] == 1.0 and absent["missed_b"] == 0


def test_keeping_large_components_keeps_both_lungs_where_the_largest_only_deletes_one():
    lungs = np.zeros((10, 20, 30), dtype=np.uint8)
    lungs[2:8, 3:17, 2:13] = 1  # right lung
    lungs[2:8, 3:17, 16:28] = 1  # left lung, a little larger
    noisy = lungs.copy()
    noisy[0, 0, 0] = 1  # a stray voxel
    largest = utils.postprocess(noisy, "largest", [1])
    assert utils.dice_coefficient(largest, lungs) < 0.7  # one lung gone
    large = utils.postprocess(noisy, "large", [1])
    np.testing.assert_array_equal(large, lungs)
    np.testing.assert_array_equal(utils.postprocess(noisy, "none", [1]), noisy)
    with pytest.raises(ValueError, match="unknown post-processing 'biggest'"):
        utils.postprocess(noisy, "biggest", [1])


def test_case_metrics_rejects_background_in_class_names():
    labels = np.zeros((2, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match="background"):
        utils.case_metrics("c", labels, labels, {0: "background", 1: "tumour"})


def test_slices_to_volumes_regroups_interleaved_slices_in_index_order():
    case_ids = ["a", "b", "a", "b", "a"]
    indices = [2, 1, 0, 0, 1]
    slices = [np.full((2, 3), 10 * ord(c) + i) for c, i in zip(case_ids, indices, strict=True)]
    volumes = utils.slices_to_volumes(case_ids, indices, slices)
    assert list(volumes) == ["a", "b"]
    assert volumes["a"].shape == (3, 2, 3)
    assert volumes["b"].shape == (2, 2, 3)
    assert [int(v[0, 0]) for v in volumes["a"]] == [10 * ord("a") + i for i in range(3)]
    assert [int(v[0, 0]) for v in volumes["b"]] == [10 * ord("b") + i for i in range(2)]


def test_slices_to_volumes_rejects_duplicate_and_missing_slices():
    image = np.zeros((2, 2))
    with pytest.raises(ValueError, match="more than once"):
        utils.slices_to_volumes(["a", "a"], [0, 0], [image, image])
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        utils.slices_to_volumes(["a", "a"], [0, 2], [image, image])


# ---------------------------------------------------------------------------------------------
# Tables and figures
# ---------------------------------------------------------------------------------------------


def test_write_metrics_csv_round_trips_with_case_first_and_four_decimals(tmp_path):
    rows = [
        {"dsc_mean": 2 / 3, "case": "p1", "hd95_tumour": float("nan")},
        {"case": "p2", "dsc_mean": 0.5, "hd95_tumour": np.float32(1.25)},
    ]
    path = utils.write_metrics_csv(rows, tmp_path / "out" / "metrics.csv")
    lines = path.read_text().splitlines()
    assert lines == ["case,dsc_mean,hd95_tumour", "p1,0.6667,nan", "p2,0.5000,1.2500"]
    back = utils.read_metrics_csv(path)
    assert back[0]["case"] == "p1"
    assert back[0]["dsc_mean"] == pytest.approx(0.6667)
    assert math.isnan(back[0]["hd95_tumour"])
    assert back[1] == {"case": "p2", "dsc_mean": 0.5, "hd95_tumour": 1.25}


def test_a_metrics_table_interrupted_while_written_leaves_the_previous_one_whole(tmp_path):
    class Unprintable:
        def __str__(self) -> str:
            raise KeyboardInterrupt

    path = utils.write_metrics_csv([{"case": "p1", "dsc_mean": 0.5}], tmp_path / "dsc.csv")
    before = path.read_bytes()
    rows = [{"case": "p1", "dsc_mean": 0.7}, {"case": "p2", "dsc_mean": Unprintable()}]
    with pytest.raises(KeyboardInterrupt):
        utils.write_metrics_csv(rows, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["dsc.csv"]  # no temporary file left


def test_plot_dsc_writes_a_png_that_grows_with_the_number_of_cases(tmp_path):
    few = [{"case": f"c{i}", "dsc_mean": i / 5} for i in range(5)]
    many = [{"case": f"c{i}", "dsc_mean": (i % 10) / 10} for i in range(40)]
    small = iio.imread(utils.plot_dsc(few, tmp_path / "few.png"))
    large = iio.imread(utils.plot_dsc(many, tmp_path / "many.png", title="Validation"))
    assert small.ndim == 3
    assert large.shape[0] > small.shape[0]


def test_long_plot_titles_wrap_to_the_width_and_keep_their_text():
    title = "hippocampus-res_unet3d_fullres8_affine30_p32-20min-seed0-member0 (ensemble of 2)\nper-case DSC"
    wrapped = utils.wrap_title(title, width=40)
    assert [len(line) <= 40 for line in wrapped.splitlines()] == [True] * 4
    assert "".join(wrapped.split()) == "".join(title.split())
    assert utils.wrap_title("short\nper-case DSC") == "short\nper-case DSC"


def test_markdown_table_formats_floats_and_keeps_column_order():
    rows = [{"case": "a", "dsc_mean": 0.5, "n": 3}, {"case": "b", "dsc_mean": 0.25, "n": 4}]
    assert utils.markdown_table(rows, ["case", "dsc_mean"]).splitlines() == [
        "| case | dsc_mean |",
        "|---|---|",
        "| a | 0.5000 |",
        "| b | 0.2500 |",
    ]


def test_plot_history_draws_both_panels_and_refuses_an_empty_history(tmp_path):
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_mean_dsc": 1 - 1 / e} for e in range(1, 6)
    ]
    picture = iio.imread(utils.plot_history(history, tmp_path / "history.png"))
    assert picture.shape[1] > picture.shape[0]
    with pytest.raises(ValueError, match="no epochs"):
        utils.plot_history([], tmp_path / "empty.png")


def test_plot_dsc_names_a_missing_column(tmp_path):
    with pytest.raises(ValueError, match="dsc_liver"):
        utils.plot_dsc([{"case": "a", "dsc_mean": 1.0}], tmp_path / "x.png", column="dsc_liver")


def _gray_ramp(size: int = 7) -> np.ndarray:
    return np.arange(size * size, dtype=np.float32).reshape(size, size)


def _grey(gray: np.ndarray, row: int, col: int, vmax: float) -> tuple[int, int, int]:
    value = round(float(gray[row, col]) / vmax * 255)
    return (value, value, value)


def test_overlay_draws_prediction_red_truth_green_and_leaves_insides_grey():
    gray = _gray_ramp()
    pred = np.zeros((7, 7), dtype=bool)
    pred[1:4, 1:4] = True  # outline: the 8 border pixels, (2, 2) inside
    truth = np.zeros((7, 7), dtype=bool)
    truth[2:6, 2:6] = True  # outline: the 12 border pixels, (3:5, 3:5) inside
    image = utils.overlay(gray, pred, truth, vmin=0.0, vmax=48.0)
    assert image.shape == (7, 7, 3) and image.dtype == np.uint8
    assert tuple(image[1, 1]) == RED
    assert tuple(image[3, 3]) == RED  # pred corner over truth interior
    assert tuple(image[2, 2]) == GREEN  # truth corner over pred interior
    assert tuple(image[2, 3]) == RED  # both outlines: the prediction is drawn on top
    assert tuple(image[5, 5]) == GREEN
    assert tuple(image[4, 4]) == _grey(gray, 4, 4, 48.0)
    assert tuple(image[0, 0]) == (0, 0, 0)
    assert tuple(image[6, 6]) == (255, 255, 255)


def test_overlay_scales_grey_by_percentiles_by_default_and_skips_empty_masks():
    gray = np.zeros((20, 20))
    gray[10:, :] = 1.0
    gray[0, 0] = 1e6  # one outlier in 400 pixels lies above the 99th percentile (1.0)
    empty = np.zeros((20, 20), dtype=np.uint8)
    image = utils.overlay(gray, empty, empty.astype(bool))
    assert tuple(image[0, 0]) == (255, 255, 255)
    assert tuple(image[19, 19]) == (255, 255, 255)
    assert tuple(image[1, 1]) == (0, 0, 0)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_overlay_colours_each_class_of_a_label_map():
    gray = np.zeros((8, 8))
    pred = np.zeros((8, 8), dtype=np.uint8)
    pred[0:3, 0:3] = 2
    pred[5:8, 5:8] = 3
    truth = np.zeros((8, 8), dtype=np.uint8)
    truth[0:3, 5:8] = 2
    image = utils.overlay(gray, pred, truth)
    assert tuple(image[0, 0]) == YELLOW
    assert tuple(image[7, 7]) == MAGENTA
    assert tuple(image[0, 7]) == CYAN
    assert tuple(image[1, 1]) == (0, 0, 0)


def test_save_case_figures_writes_one_png_per_slice_and_a_gif_frame_per_slice(tmp_path):
    depth = 3
    rng = np.random.default_rng(1)
    gray = rng.random((depth, 8, 8)).astype(np.float32)
    pred = np.zeros((depth, 8, 8), dtype=np.uint8)
    truth = np.zeros((depth, 8, 8), dtype=np.uint8)
    for d in range(depth):
        pred[d, d : d + 3, 1:4] = 1
        truth[d, 2:5, d : d + 3] = 1
    out_dir = tmp_path / "figures" / "case"
    paths = utils.save_case_figures("p1", gray, pred, truth, out_dir=out_dir)
    assert [p.name for p in paths] == ["p1-1.png", "p1-2.png", "p1-3.png", "p1.gif"]
    assert all(p.is_file() for p in paths)
    vmin, vmax = np.percentile(gray, 1), np.percentile(gray, 99)
    expected_second = utils.overlay(gray[1], pred[1], truth[1], vmin=vmin, vmax=vmax)
    np.testing.assert_array_equal(iio.imread(paths[1]), expected_second)
    frames = iio.imread(paths[-1], index=None)
    assert frames.shape[0] == depth
    assert iio.immeta(paths[-1])["loop"] == 0


def test_the_gif_keeps_one_frame_per_slice_even_when_slices_are_identical(tmp_path):
    volume = np.zeros((4, 6, 10))
    paths = utils.save_case_figures("same", volume, volume.astype(np.uint8), out_dir=tmp_path)
    frames = iio.imread(paths[-1], index=None)
    assert frames.shape[0] == 4
    bar_lengths = [int((frame[-1, :, 0] == 255).sum()) for frame in frames]
    assert bar_lengths == [2, 5, 8, 10]


def test_save_case_figures_uses_the_given_slice_names(tmp_path):
    volume = np.zeros((2, 4, 4))
    paths = utils.save_case_figures(
        "x", volume, volume.astype(np.uint8), out_dir=tmp_path, slice_names=["s10", "s11"]
    )
    assert [p.name for p in paths] == ["x-s10.png", "x-s11.png", "x.gif"]


# ---------------------------------------------------------------------------------------------
# Run helpers
# ---------------------------------------------------------------------------------------------


def test_seed_everything_repeats_python_numpy_and_torch_draws():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    utils.seed_everything(123)
    first = draw()
    utils.seed_everything(123)
    assert draw() == first


def test_select_device_returns_cpu_and_refuses_missing_cuda(monkeypatch):
    assert utils.select_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert utils.select_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        utils.select_device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        utils.select_device("banana")


def test_save_checkpoint_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    utils.save_checkpoint_atomic({"weight": torch.zeros(2)}, path)
    utils.save_checkpoint_atomic({"weight": torch.ones(2)}, path)
    assert torch.equal(torch.load(path)["weight"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]


def test_atomic_writes_follow_the_umask_like_a_plain_open(tmp_path):
    utils.write_json_atomic({"epoch": 1}, tmp_path / "atomic.json")
    (tmp_path / "plain.json").write_text("{}")
    assert (tmp_path / "atomic.json").stat().st_mode & 0o777 == (
        tmp_path / "plain.json"
    ).stat().st_mode & 0o777


def test_write_json_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "history.json"
    utils.write_json_atomic({"epoch": 1}, path)
    with pytest.raises(TypeError):
        utils.write_json_atomic({"epoch": object()}, path)
    assert json.loads(path.read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["history.json"]


def test_radiological_view_turns_flipped_scans_to_anterior_up_and_patient_right_on_the_left():
    assert utils.radiological_view(None) == ((0, 1, 2), (False, False, False))
    assert utils.radiological_view((1, 0, 0, 0, 1, 0, 0, 0, 1)) == ((0, 1, 2), (False, False, False))
    # a CT stored with direction diag(-1, -1, 1): rows run back to front, columns left to right
    view = utils.radiological_view((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert view == ((0, 1, 2), (False, True, True))
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    np.testing.assert_array_equal(utils.to_view(array, view), array[:, ::-1, ::-1])  # rotated 180° in-plane
    # a sagittal acquisition: array axis 2 (ITK x) runs foot to head, axis 0 (ITK z) right to left
    sagittal = (0, 0, 1, 0, 1, 0, 1, 0, 0)
    order, flips = utils.radiological_view(sagittal)
    assert order == (2, 1, 0) and flips == (False, False, False)
    assert utils.to_view(array, (order, flips)).shape == (4, 3, 2)


def test_the_bootstrap_p_value_doubles_the_smaller_tail_with_add_one_smoothing():
    # 9 resampled differences, 2 of them at or below 0: p = 2 * (2 + 1) / (9 + 1)
    differences = np.array([-0.1, 0.0, 0.2, 0.3, 0.1, 0.4, 0.5, 0.2, 0.1])
    assert utils.bootstrap_p_value(differences) == pytest.approx(0.6)
    assert utils.bootstrap_p_value(np.full(99, 0.5)) == pytest.approx(2 / 100)  # never 0
    assert utils.bootstrap_p_value(np.zeros(5)) == 1.0  # capped: both tails hold every zero
