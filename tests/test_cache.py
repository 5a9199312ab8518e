"""The cache of preprocessed cases: read lazily, written atomically, never trusted when damaged or old."""

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

import cache
import dataset
from dataset import Case, PatchDataset, extract_patch, load_dataset
from synthetic import make_decathlon


@pytest.fixture(scope="module")
def decathlon(tmp_path_factory) -> Path:
    return make_decathlon(tmp_path_factory.mktemp("msd"), n_cases=3, seed=4)


def load(data: Path, cache_dir: Path, workers: int = 1):
    cases, _, _ = load_dataset("msd", data, cache_dir=cache_dir, workers=workers)
    return cases


def test_a_cached_case_is_memory_mapped_and_a_patch_equals_the_same_box_of_the_loaded_array(
    decathlon, tmp_path
):
    (case, *_) = load(decathlon, tmp_path / "cache")
    assert isinstance(case.image, np.memmap) and isinstance(case.label, np.memmap)
    in_memory = np.array(case.image)
    start, size = (3, -2, 5), (8, 16, 12)
    np.testing.assert_array_equal(
        extract_patch(case.image, start, size), extract_patch(in_memory, start, size)
    )


def test_a_patch_reads_only_its_box_from_disk(decathlon, tmp_path, monkeypatch):
    (case, *_) = load(decathlon, tmp_path / "cache")
    touched = []

    class CountingArray(np.ndarray):
        def __getitem__(self, key):
            result = super().__getitem__(key)
            touched.append(np.asarray(result).size)
            return result

    mapped = case.image
    monkeypatch.setattr(Case, "image", property(lambda self: mapped.view(CountingArray)))
    patches = PatchDataset([case], (8, 8, 8), length=1, foreground_ratio=1.0)
    patches[0]
    assert touched and max(touched) <= 8 * 8 * 8 < mapped.size / 10


def test_foreground_sampling_finds_a_50_voxel_class_in_a_200_cubed_volume_at_the_requested_ratio():
    label = np.zeros((200, 200, 200), np.uint8)
    label[20:180, 20:180, 20:180] = 1  # 4 million voxels of a large class
    label[100:102, 60:65, 60:65] = 2  # 50 voxels of a rare one, inside it
    case = Case.from_arrays("big", np.zeros((1, 1, 1, 1), np.float32), label)
    assert len(case.foreground(1)) == dataset.FOREGROUND_SAMPLES and len(case.foreground(2)) == 50
    patches = PatchDataset([case], (16, 16, 16), length=1, foreground_ratio=0.5)
    starts = [patches._start(case, dataset.sample_rng(0, n)) for n in range(2000)]
    rare = np.mean([np.all((s <= [100, 60, 60]) & (s + 16 >= [102, 65, 65])) for s in starts])
    assert rare == pytest.approx(0.25, abs=0.03)  # half the patches on foreground, half of those on class 2


def _build_in_process(data: str, cache_dir: str, barrier) -> str:
    barrier.wait()
    (case, *_) = load(Path(data), Path(cache_dir))
    return str(case.folder)


def test_two_processes_building_the_same_entry_at_once_leave_one_valid_entry(decathlon, tmp_path):
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager:
        barrier = manager.Barrier(2)
        with context.Pool(2) as pool:
            folders = pool.starmap(_build_in_process, [(str(decathlon), str(tmp_path), barrier)] * 2)
    assert folders[0] == folders[1]
    entries = [p for p in (tmp_path / "msd").iterdir()]
    assert len([p for p in entries if not p.name.startswith(".")]) == 3
    assert not [p for p in entries if p.name.startswith(".building")]
    reference = load(decathlon, tmp_path / "fresh")
    for case, again in zip(reference, load(decathlon, tmp_path), strict=True):
        np.testing.assert_array_equal(case.image, again.image)


def test_an_entry_another_process_stores_while_this_one_looks_is_kept(tmp_path, monkeypatch):
    """Process B's entry lands right after A's first look at the folder (whatever A looks with): A must
    return B's entry and leave its files alone (readers may have them mapped), not replace it."""
    folder = tmp_path / "msd" / "case-abc"
    real_open, real_rename, landed = cache.open_entry, os.rename, {}

    def land_b_once() -> None:
        if not landed:
            landed["now"] = True
            with monkeypatch.context() as plain:
                plain.setattr(cache, "open_entry", real_open)
                plain.setattr(os, "rename", real_rename)
                cache.write_entry(folder, {"image": np.full(4, 1, np.uint8)}, {"writer": "B"})
            landed["inode"] = (folder / "image.npy").stat().st_ino

    def looking(path: Path) -> dict | None:
        seen = real_open(path)
        if path == folder:
            land_b_once()
        return seen

    def renaming(source, target) -> None:
        if Path(target) == folder:
            land_b_once()
        real_rename(source, target)

    monkeypatch.setattr(cache, "open_entry", looking)
    monkeypatch.setattr(os, "rename", renaming)
    meta = cache.write_entry(folder, {"image": np.full(4, 2, np.uint8)}, {"writer": "A"})
    monkeypatch.undo()
    assert meta["writer"] == "B" and cache.open_entry(folder)["writer"] == "B"
    assert (folder / "image.npy").stat().st_ino == landed["inode"]
    assert [p.name for p in folder.parent.iterdir()] == ["case-abc"]  # A's build removed


def test_a_truncated_entry_is_rebuilt_not_loaded(decathlon, tmp_path):
    (case, *_) = load(decathlon, tmp_path)
    image_file = case.folder / "image.npy"
    expected = np.array(case.image)
    image_file.write_bytes(image_file.read_bytes()[: image_file.stat().st_size // 2])
    assert cache.open_entry(case.folder) is None
    (rebuilt, *_) = load(decathlon, tmp_path)
    np.testing.assert_array_equal(rebuilt.image, expected)


def test_entries_of_an_older_cache_version_are_rebuilt(decathlon, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "CACHE_VERSION", 1)
    (old, *_) = load(decathlon, tmp_path)
    monkeypatch.undo()
    assert cache.open_entry(old.folder) is None  # its meta.json says version 1
    (new, *_) = load(decathlon, tmp_path)
    assert new.folder != old.folder and cache.open_entry(new.folder)["version"] == cache.CACHE_VERSION


def test_parallel_preprocessing_gives_the_cases_of_one_process(decathlon, tmp_path):
    single = load(decathlon, tmp_path / "one", workers=1)
    parallel = load(decathlon, tmp_path / "two", workers=2)
    assert [c.case_id for c in single] == [c.case_id for c in parallel]
    for a, b in zip(single, parallel, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)


def test_a_rewritten_luna_raw_file_is_a_new_cache_entry(tmp_path):
    """The .mhd header alone does not key the entry: the voxels live in the .raw/.zraw it names."""
    from synthetic import make_luna
    from volumes import metaimage_data_file

    root = make_luna(tmp_path / "luna", n_cases=1, shape=(40, 64, 64), seed=3)
    (source,) = dataset.find_sources("luna", root)[0]
    first = dataset.source_paths(source)
    raw = metaimage_data_file(source.ct_path)
    assert raw in first and raw.suffix in (".raw", ".zraw")
    before = cache.entry_folder(tmp_path / "cache", "luna", source.case_id, {}, first)
    raw.write_bytes(raw.read_bytes()[::-1])  # same size, other voxels: only the data file changed
    after = cache.entry_folder(tmp_path / "cache", "luna", source.case_id, {}, dataset.source_paths(source))
    assert after != before


def _fails_first(index: int, done: str) -> int:
    if index == 0:
        raise ValueError("case 0 is bad")
    time.sleep(0.3)
    (Path(done) / str(index)).touch()
    return index


def test_the_first_bad_case_stops_parallel_preprocessing_without_building_the_rest(tmp_path):
    with pytest.raises(ValueError, match="case 0 is bad"):
        dataset.run_parallel(_fails_first, [(i, str(tmp_path)) for i in range(20)], 2, "preprocessing")
    assert len(list(tmp_path.iterdir())) < 10  # the jobs not yet started were cancelled
