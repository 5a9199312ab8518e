"""Nodule detection by segmentation: masks from the annotations, candidates in world mm, FROC end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dataset import find_sources, make_plan, prepare_cases
from detection import circles, find_candidates, find_nodule_scans, nodule_mask
from engine import TrainConfig, detection_score, evaluate, scan_candidates, train
from froc import Finding, read_candidates
from synthetic import make_luna
from volumes import Geometry, read_header

FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def luna(tmp_path_factory) -> Path:
    return make_luna(tmp_path_factory.mktemp("luna"), n_cases=6, shape=(48, 64, 64), seed=11)


@pytest.mark.parametrize("direction", [(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), FLIPPED])
def test_a_nodule_mask_is_a_ball_of_the_annotated_diameter_at_the_annotated_world_centre(direction):
    geometry = Geometry(spacing=(1.0, 0.5, 0.5), origin=(10.0, -20.0, 5.0), direction=direction)
    centre_index = np.array([20.0, 30.0, 44.0])
    x, y, z = geometry.index_to_world(centre_index)
    mask = nodule_mask([Finding("s", x, y, z, 8.0)], geometry, (40, 80, 90))
    volume = mask.sum() * math.prod(geometry.spacing)
    assert volume == pytest.approx(4 / 3 * math.pi * 4.0**3, rel=0.05)
    np.testing.assert_allclose(np.argwhere(mask).mean(0), centre_index, atol=0.1)


def test_candidates_are_the_peaks_at_sub_voxel_world_positions_suppressed_and_limited():
    geometry = Geometry(spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=FLIPPED)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (20, 40, 40)], indexing="ij"), -1).astype(float)
    probability = np.zeros((20, 40, 40), np.float32)
    for centre, height in (((5.0, 10.5, 10.0), 0.9), ((14.0, 30.0, 29.5), 0.6), ((5.0, 12.5, 10.0), 0.7)):
        distance = np.linalg.norm((grid - centre) * [2.0, 1.0, 1.0], axis=-1)
        probability = np.maximum(probability, height * np.exp(-0.5 * (distance / 1.5) ** 2))
    found = find_candidates(probability, geometry, "s", threshold=0.05, suppression_mm=6.0)
    half_voxel_off = math.exp(-0.5 * (0.5 / 1.5) ** 2)  # the grid misses each centre by half a voxel
    assert [c.probability for c in found] == pytest.approx(
        [0.9 * half_voxel_off, 0.6 * half_voxel_off], abs=1e-3
    )
    # the 0.7 blob, 2 mm from the 0.9 one, is suppressed
    expected = geometry.index_to_world([[5.0, 10.5, 10.0], [14.0, 30.0, 29.5]])
    for candidate, world in zip(found, expected, strict=True):
        assert np.linalg.norm(np.array([candidate.x, candidate.y, candidate.z]) - world) < 0.5
    assert len(find_candidates(probability, geometry, "s", suppression_mm=1.0, limit=1)) == 1
    assert find_candidates(probability, geometry, "s", threshold=0.95) == []


def test_a_saturated_nodule_is_one_candidate_at_its_centre():
    """A confident network's sigmoid is exactly 1.0 over a whole nodule: a plateau of equal maxima."""
    geometry = Geometry(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    grid = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij"), -1).astype(float)
    probability = (np.linalg.norm(grid - [20.0, 18.0, 22.0], axis=-1) <= 8).astype(np.float32)
    found = find_candidates(probability, geometry, "s", suppression_mm=6.0)
    assert len(found) == 1
    assert np.allclose([found[0].z, found[0].y, found[0].x], [20.0, 18.0, 22.0], atol=1e-6)
    with pytest.raises(ValueError, match="threshold must be positive, got 0"):
        find_candidates(probability, geometry, "s", threshold=0)


def test_a_perfect_probability_map_finds_every_nodule_in_world_mm_through_flipped_scans(luna, tmp_path):
    sources, info = find_sources("luna_nodules", luna)
    directions = {read_header(source.scan.ct_path)[0].direction for source in sources}
    assert FLIPPED in directions and len(directions) == 2
    plan = make_plan("luna_nodules", sources, info, spacing=2.0)
    cases = prepare_cases(sources, plan, info, tmp_path / "cache", workers=1)
    candidates = []
    for case in cases:
        perfect = np.asarray(case.label, np.float32)[None]
        candidates += scan_candidates(case, perfect)
    result = detection_score(cases, candidates)
    assert result.n_nodules == sum(len(s.nodules) for s in sources) > 0
    assert result.n_detected == result.n_nodules and result.n_false_positives == 0
    assert result.cpm == 1.0


def linked_copy_without_annotations(luna: Path, copy: Path) -> list[str]:
    """A folder linking every item of the LUNA16 stand-in but annotations.csv; that file's lines."""
    copy.mkdir()
    for item in luna.iterdir():
        if item.name != "annotations.csv":
            (copy / item.name).symlink_to(item)
    return (luna / "annotations.csv").read_text().splitlines()


def test_an_annotation_outside_its_scan_names_the_file_and_line(luna, tmp_path):
    copy = tmp_path / "copy"
    lines = linked_copy_without_annotations(luna, copy)
    uid = lines[1].split(",")[0]
    (copy / "annotations.csv").write_text(
        "\n".join([*lines[:2], f"{uid},9000.0,0.0,0.0,5.0", *lines[2:]]) + "\n"
    )
    with pytest.raises(
        ValueError, match=r"annotations\.csv, line 3: the finding at \(9000\.0, 0\.0, 0\.0\) mm"
    ):
        find_nodule_scans(copy)
    (copy / "annotations.csv").write_text(lines[0] + "\n1.2.3,0,0,0,5\n")
    with pytest.raises(ValueError, match=r"annotations\.csv: none of its 1 rows is on a scan under"):
        find_nodule_scans(copy)


def test_annotations_of_scans_not_downloaded_are_left_out_with_a_warning(luna, tmp_path):
    copy = tmp_path / "copy"
    lines = linked_copy_without_annotations(luna, copy)
    (copy / "annotations.csv").write_text(
        "\n".join([*lines, "9.9.9,1.0,2.0,3.0,6.0", "9.9.9,4,5,6,7"]) + "\n"
    )
    with pytest.warns(UserWarning, match=r"2 rows on 1 series that are not under .*e\.g\. 9\.9\.9"):
        scans = find_nodule_scans(copy)
    assert [scan.nodules for scan in scans] == [scan.nodules for scan in find_nodule_scans(luna)]


def test_circles_outline_every_slice_a_nodule_crosses():
    geometry = Geometry(spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    x, y, z = geometry.index_to_world([10.0, 20.0, 20.0])
    outline = circles([Finding("s", x, y, z, 8.0)], geometry, (20, 40, 40))
    assert [z for z in range(20) if outline[z].any()] == [8, 9, 10, 11, 12]
    assert outline[10, 20, 24] == 1 and outline[10, 20, 20] == 0  # the rim at 4 mm, not the centre


def test_the_detector_trains_and_writes_candidates_froc_and_sensitivities(luna, tmp_path):
    config = TrainConfig(
        run_name="detector",
        runs_dir=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache"),
        dataset="luna_nodules",
        data_dir=str(luna),
        spacing=3.0,
        model="res_unet3d",
        model_options={"depth": 2},
        init_features=4,
        patch_size=[32, 32, 32],
        patches_per_epoch=8,
        batch_size=4,
        validation_cases=2,
        test_cases=2,
        epochs=1,
        preprocess_workers=1,
        split_seed=1,
    )
    summary = train(config)
    assert summary["score"] == "CPM" and 0.0 <= summary["best_val_score"] <= 1.0
    output = evaluate(config.run_dir, subsets=["validation", "test"])
    folder = output["output_dir"]
    candidates = read_candidates(folder / "candidates.csv")
    split = json.loads((config.run_dir / "args.json").read_text())["split"]
    assert {c.seriesuid for c in candidates} <= set(split["validation"] + split["test"])
    for subset, result in output["froc"].items():
        assert (folder / f"froc-{subset}.png").is_file() and (
            folder / f"sensitivities-{subset}.csv"
        ).is_file()
        assert result.bootstrap.cpm_lower <= result.cpm <= result.bootstrap.cpm_upper
    for case in split["test"]:
        assert (folder / "predictions" / f"{case}.gif").is_file()
