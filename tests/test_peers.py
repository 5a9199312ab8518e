"""The peers: a quick MONAI run on real hippocampus cases, the reference program on generated brain data."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from medpy.filter.binary import largest_connected_component
from skimage.transform import rescale

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import peers  # noqa: E402

from synthetic import make_kaggle_3m  # noqa: E402

needs_hippocampus = pytest.mark.skipif(
    not (peers.HIPPOCAMPUS / "dataset.json").is_file(),
    reason=f"the real MSD hippocampus data is not at {peers.HIPPOCAMPUS} (in CI, not in a user's clone)",
)
needs_reference = pytest.mark.skipif(
    not (peers.REFERENCE / "train.py").is_file(),
    reason=f"the reference course program is not at {peers.REFERENCE} (it is in CI, not in a user's clone)",
)


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> Path:
    """Six generated patients of 12 or 13 slices at 64 px."""
    folder = tmp_path_factory.mktemp("kaggle")
    return make_kaggle_3m(folder, n_patients=6, slices_per_patient=(12, 14), image_size=64, seed=1)


def patients_of(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.is_dir())


@needs_hippocampus
def test_a_quick_monai_run_writes_per_case_rows_for_exactly_the_requested_test_cases(tmp_path):
    test_ids = json.loads(peers.SPLIT.read_text())["test"][2:5]
    output = tmp_path / "monai.json"
    arguments = ["monai", "--quick", "--budget", "0.05", "--test-ids", *test_ids, "--output", str(output)]
    assert peers.main(arguments) == 0
    (record,) = json.loads(output.read_text())
    assert record["peer"] == "monai" and record["quick"]
    assert [row["case"] for row in record["rows"]] == test_ids
    for row in record["rows"]:
        assert 0.0 <= row["dsc_Anterior"] <= 1.0 and 0.0 <= row["dsc_Posterior"] <= 1.0
        assert row["dsc_mean"] == pytest.approx((row["dsc_Anterior"] + row["dsc_Posterior"]) / 2)
    assert record["dsc_mean"] == pytest.approx(np.mean([row["dsc_mean"] for row in record["rows"]]))
    assert record["test_cases"] == 3 and record["epochs"] == record["best_epoch"] == 1
    assert 0.0 <= record["best_val_dsc"] <= 1.0
    assert record["samples_per_second"] > 0 and record["seconds"] > record["train_seconds"] > 0
    assert record["monai"] and record["torch"] and record["device"] and record["cpu"]
    split = record["split"]
    assert (len(split["train"]), len(split["validation"])) == (4, 2)
    assert set(split["test"]).isdisjoint(split["train"] + split["validation"])


@needs_hippocampus
def test_the_monai_peer_uses_the_projects_split_and_refuses_cases_outside_its_test_list(tmp_path):
    split = peers.hippocampus_split(peers.HIPPOCAMPUS)
    assert split["test"] == json.loads(peers.SPLIT.read_text())["test"]
    assert [len(split[subset]) for subset in ("train", "validation", "test")] == [188, 20, 52]
    with pytest.raises(ValueError, match="not test cases of the project's split"):
        peers.chosen_test_cases(split, [split["train"][0]])
    other = tmp_path / "split.json"
    other.write_text(json.dumps({"test": split["train"][:52]}))
    with pytest.raises(ValueError, match="other test cases"):
        peers.hippocampus_split(peers.HIPPOCAMPUS, other)


def test_a_missing_data_folder_is_skipped_with_a_clear_message_and_no_record(tmp_path, capsys):
    output = tmp_path / "monai.json"
    assert peers.main(["monai", "--data", str(tmp_path / "absent"), "--output", str(output)]) == 0
    assert "skipping the MONAI peer" in capsys.readouterr().err
    assert not output.exists()


@needs_reference
def test_the_reference_reports_preprocessing_throughput_and_dsc_for_the_requested_patients(kaggle):
    patients = patients_of(kaggle)
    # The validation patient is also tested: its test DSC must reproduce the DSC its own loop validated.
    split = {"train": patients[:3], "validation": [patients[3]], "test": [patients[3], patients[5]]}
    record = peers.run_reference(kaggle, split, epochs=1, image_size=64)
    assert record["peer"] == "reference"
    assert [row["case"] for row in record["rows"]] == split["test"]
    assert all(0.0 <= row["dsc"] <= 1.0 and row["slices"] > 0 for row in record["rows"])
    assert record["rows"][0]["dsc"] == pytest.approx(record["best_val_dsc"])
    assert set(record["preprocessing_by_subset"]) == {"train", "validation", "test"}
    assert record["preprocessing_seconds"] == pytest.approx(sum(record["preprocessing_by_subset"].values()))
    assert record["preprocessing_seconds_per_patient"] == pytest.approx(record["preprocessing_seconds"] / 6)
    (epoch,) = record["history"]
    assert epoch["slices"] > 0 and epoch["slices"] % 16 == 0  # whole batches of 16: its loader drops the rest
    assert record["slices_per_second"] == pytest.approx(epoch["slices"] / epoch["seconds"])
    assert (record["settings"]["batch_size"], record["settings"]["lr"]) == (16, 1e-4)
    assert "own grid" in record["dsc_metric"]


@needs_reference
def test_the_reference_preprocessing_alone_is_timed_on_a_folder(kaggle):
    timing = peers.time_reference_preprocessing(kaggle, image_size=64)
    images = [path for path in kaggle.rglob("*.tif") if not path.name.endswith("_mask.tif")]
    assert timing["patients"] == 6
    assert timing["slices"] == len(images) - 2 * 6  # it drops each volume's first and last slice
    assert timing["seconds"] > 0 and timing["seconds_per_patient"] == pytest.approx(timing["seconds"] / 6)


def test_the_linked_folders_hold_links_to_the_chosen_patients_only(kaggle, tmp_path):
    chosen = patients_of(kaggle)[:2]
    folder = peers.linked_patients(kaggle, chosen, tmp_path / "linked")
    assert patients_of(folder) == chosen
    files = sorted((folder / chosen[0]).iterdir())
    assert files and all(path.is_symlink() for path in files)
    assert sorted(path.name for path in files) == sorted(
        path.name for path in (kaggle / chosen[0]).glob("*.tif")
    )


def test_the_workarounds_accept_the_removed_argument_an_empty_mask_and_0_255_masks():
    image = np.random.default_rng(0).random((8, 8, 3))
    assert peers.rescale_with_channel_axis(rescale)(image, (2, 2), multichannel=True).shape == (16, 16, 3)
    safe = peers.empty_safe(largest_connected_component)
    assert not safe(np.zeros((3, 4, 4), int)).any()
    two_blobs = np.zeros((1, 6, 6), int)
    two_blobs[0, :2, :2], two_blobs[0, 4:, 3:] = 1, 1
    assert safe(two_blobs).sum() == 6
    resize = peers.binarised_masks(lambda sample, size: sample)
    _, mask = resize((image, np.array([0, 255, 255], np.uint8)), size=8)
    assert mask.tolist() == [0.0, 1.0, 1.0]
