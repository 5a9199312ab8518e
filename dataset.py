"""Datasets: the kaggle_3m, LUNA16 and Decathlon readers with preprocessing and cache, the split, the
slice dataset for 2D networks and the patch dataset for 3D ones.

The reader follows the reference course code (brain-segmentation-pytorch, Buda et al. 2019): one volume per
patient folder, preprocessed once (drop edge slices → crop to the head → pad to square → resize → normalise)
and cached on disk, then served to a 2D network slice by slice. Its known bugs are fixed: slices are ordered
by number (1, 2, 10), masks are binarised whatever their stored range, and a patient without tumour does not
divide by zero in the sampling weights. Volumetric sets (LUNA16 CT, Decathlon/LiTS NIfTI; file formats in
volumes.py) are normalised, optionally resampled, cached the same way and served as slices along any axis or
as foreground-biased 3D patches. Nothing is ever written inside the user's data folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
import torch
from skimage.transform import resize
from torch.utils.data import Dataset

from volumes import (
    LUNA_LUNG_LABELS,
    Geometry,
    find_luna_cases,
    find_nifti_cases,
    lung_target,
    read_dataset_info,
    read_luna_case,
    read_nifti_case,
    resample,
    resampled_geometry,
    window_ct,
    zscore,
)

KAGGLE_LAYOUT = (
    "expected the Kaggle kaggle_3m layout: <data_dir>/<patient>/<patient>_<n>.tif (RGB image) "
    "with <data_dir>/<patient>/<patient>_<n>_mask.tif (binary mask), one folder per patient"
)
SLICE_FILE = re.compile(r"^(?P<stem>.+)_(?P<number>\d+)(?P<mask>_mask)?\.tif$")
CACHE_VERSION = 1


@dataclass
class Case:
    """One preprocessed volume: image (C, D, H, W) float32, label (D, H, W) uint8 class indices or None."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # mm, array order (D, H, W)
    slice_names: list[str] = field(default_factory=list)
    source_geometry: Geometry | None = None  # the source scan's grid, to write predictions back onto it
    source_shape: tuple[int, int, int] | None = None


@dataclass
class DatasetInfo:
    """What a network and the figures need to know about a dataset."""

    class_names: dict[int, str]  # foreground classes; one class means a binary task
    in_channels: int
    display_channel: int = 0  # the channel shown in grey under the overlays


@dataclass
class SliceFiles:
    """The files of one slice of a patient folder; mask is None when the slice has none."""

    number: int
    image: Path
    mask: Path | None


def list_patient_folders(data_dir: str | Path) -> list[Path]:
    """Patient folders of a kaggle_3m folder, sorted; a clear error when there are none."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"Data folder {data_dir} does not exist: {KAGGLE_LAYOUT}")
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"Data folder {data_dir} has no patient folders: {KAGGLE_LAYOUT}")
    return folders


def list_slice_files(folder: Path, require_masks: bool = True) -> list[SliceFiles]:
    """The slices of a patient folder ordered by their number (1, 2, 10, not 1, 10, 2).

    With require_masks every image needs its mask; without it a folder may have no masks at all (an
    unlabelled case) but not some of them. A mask without its image is always an error.
    """
    images: dict[int, Path] = {}
    masks: dict[int, Path] = {}
    for path in folder.iterdir():
        match = SLICE_FILE.match(path.name)
        if match:
            (masks if match["mask"] else images)[int(match["number"])] = path
    if not images:
        raise FileNotFoundError(f"Patient folder {folder} has no slices: {KAGGLE_LAYOUT}")
    for number, mask in sorted(masks.items()):
        if number not in images:
            raise FileNotFoundError(f"Mask {mask} has no image: expected {mask.name[:-9]}.tif beside it")
    if masks or require_masks:
        for number, image in sorted(images.items()):
            if number not in masks:
                raise FileNotFoundError(
                    f"Image {image} has no mask: expected {image.stem}_mask.tif beside it"
                )
    return [SliceFiles(n, images[n], masks.get(n)) for n in sorted(images)]


def read_tif(path: Path) -> np.ndarray:
    """One tif as an array, with an error that names the file when it cannot be read."""
    try:
        return tifffile.imread(path)
    except Exception as error:
        raise ValueError(f"Cannot read {path}: not a readable tif ({error})") from error


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """Any non-zero value is foreground, whatever the stored range (0/1, 0/255) or dtype."""
    if mask.ndim == 3:
        mask = mask.max(axis=-1)
    return (mask != 0).astype(np.uint8)


def read_patient(folder: Path, require_masks: bool = True) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """A patient's volume (D, H, W, 3) uint8, its mask (D, H, W) uint8 0/1 or None, and slice names."""
    slices = list_slice_files(folder, require_masks)
    images, masks = [], []
    for item in slices:
        image = read_tif(item.image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"Image {item.image} has shape {image.shape}: expected (H, W, 3) RGB")
        if images and image.shape != images[0].shape:
            raise ValueError(
                f"Image {item.image} has shape {image.shape}, unlike {slices[0].image} {images[0].shape}"
            )
        images.append(image)
        if item.mask is not None:
            mask = binarize_mask(read_tif(item.mask))
            if mask.shape != image.shape[:2]:
                raise ValueError(
                    f"Mask {item.mask} has shape {mask.shape} but its image has {image.shape[:2]}: "
                    "expected the same height and width"
                )
            masks.append(mask)
    volume = np.stack(images)
    mask_volume = np.stack(masks) if masks else None
    return volume, mask_volume, [str(item.number) for item in slices]


def drop_edge_slices(volume: np.ndarray, mask, names: list[str], count: int):
    """Drop `count` slices at each end, as the reference does (they rarely show brain)."""
    if count == 0 or len(volume) <= 2 * count:
        return volume, mask, names
    keep = slice(count, len(volume) - count)
    return volume[keep], None if mask is None else mask[keep], names[keep]


def crop_to_head(volume: np.ndarray, mask):
    """Crop height and width to the bounding box of voxels brighter than 10% of the maximum."""
    foreground = volume.max(axis=-1) > 0.1 * volume.max()
    rows = np.flatnonzero(foreground.any(axis=(0, 2)))
    cols = np.flatnonzero(foreground.any(axis=(0, 1)))
    if rows.size == 0:
        return volume, mask
    box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return volume[box], None if mask is None else mask[box]


def pad_to_square(volume: np.ndarray, mask):
    """Zero-pad height or width symmetrically so that the slices are square."""
    height, width = volume.shape[1:3]
    diff = abs(height - width)
    before, after = diff // 2, diff - diff // 2
    in_plane = ((before, after), (0, 0)) if height < width else ((0, 0), (before, after))
    volume = np.pad(volume, ((0, 0), *in_plane, (0, 0)))
    return volume, None if mask is None else np.pad(mask, ((0, 0), *in_plane))


def resize_slices(volume: np.ndarray, mask, size: int):
    """Resize every slice to size × size: image quadratic, mask nearest neighbour (stays binary)."""
    depth, channels = volume.shape[0], volume.shape[-1]
    volume = resize(
        volume.astype(np.float32),
        (depth, size, size, channels),
        order=2,
        mode="constant",
        anti_aliasing=False,
        preserve_range=True,
    )
    if mask is not None:
        mask = resize(
            mask,
            (depth, size, size),
            order=0,
            mode="constant",
            anti_aliasing=False,
            preserve_range=True,
        ).astype(np.uint8)
    return volume, mask


def normalize_channels(volume: np.ndarray) -> np.ndarray:
    """Clip each channel to its 10th–99th percentile, then z-score it; returns (C, D, H, W) float32."""
    channels = []
    for channel in np.moveaxis(volume.astype(np.float32), -1, 0):
        low, high = np.percentile(channel, (10, 99))
        channel = np.clip(channel, low, high)
        channels.append((channel - channel.mean()) / max(float(channel.std()), 1e-8))
    return np.stack(channels).astype(np.float32)


def preprocess_patient(
    volume: np.ndarray, mask, names: list[str], image_size: int, edge_slices: int
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """The reference pipeline, one step per line: drop edges → crop → pad → resize → normalise."""
    volume, mask, names = drop_edge_slices(volume, mask, names, edge_slices)
    volume, mask = crop_to_head(volume, mask)
    volume, mask = pad_to_square(volume, mask)
    volume, mask = resize_slices(volume, mask, image_size)
    return normalize_channels(volume), mask, names


def _fingerprint(paths: Sequence[Path]) -> list[str]:
    """Path, size and modification time of each source file: a changed file changes the cache key."""
    return [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(paths)]


def _write_npz_atomic(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_case(path: Path, case: Case) -> None:
    geometry = None if case.source_geometry is None else dataclasses.asdict(case.source_geometry)
    meta = {"spacing": case.spacing, "source_shape": case.source_shape, "source_geometry": geometry}
    _write_npz_atomic(
        path,
        image=case.image,
        label=case.label if case.label is not None else np.zeros(0, np.uint8),
        has_label=case.label is not None,
        names=np.array(case.slice_names, dtype=str),
        meta=np.array(json.dumps(meta)),
    )


def _load_case(path: Path, case_id: str) -> Case:
    with np.load(path) as cached:
        meta = json.loads(str(cached["meta"]))
        geometry = meta["source_geometry"]
        return Case(
            case_id,
            cached["image"],
            cached["label"] if cached["has_label"] else None,
            spacing=tuple(meta["spacing"]),
            slice_names=[str(name) for name in cached["names"]],
            source_geometry=None if geometry is None else Geometry(**geometry),
            source_shape=None if meta["source_shape"] is None else tuple(meta["source_shape"]),
        )


def cached_case(
    cache_dir: str | Path | None,
    kind: str,
    case_id: str,
    sources: Sequence[Path],
    params: dict,
    build: Callable[[], Case],
) -> Case:
    """A preprocessed case from the on-disk cache, built (and stored) when its sources or params changed."""
    if cache_dir is None:
        return build()
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, params, _fingerprint(sources)]).encode())
    path = Path(cache_dir) / kind / f"{case_id}-{digest.hexdigest()[:20]}.npz"
    if path.exists():
        return _load_case(path, case_id)
    case = build()
    _save_case(path, case)
    return case


def load_kaggle_case(
    folder: Path,
    image_size: int = 256,
    edge_slices: int = 1,
    require_masks: bool = True,
    cache_dir: str | Path | None = ".cache",
) -> Case:
    """One preprocessed patient, from the on-disk cache when its files and parameters are unchanged."""

    def build() -> Case:
        volume, mask, names = read_patient(folder, require_masks)
        image, label, names = preprocess_patient(volume, mask, names, image_size, edge_slices)
        return Case(folder.name, image, label, slice_names=names)

    params = {"image_size": image_size, "edge_slices": edge_slices, "require_masks": require_masks}
    return cached_case(cache_dir, "kaggle_3m", folder.name, list(folder.glob("*.tif")), params, build)


def load_kaggle_3m(
    data_dir: str | Path,
    image_size: int = 256,
    edge_slices: int = 1,
    require_masks: bool = True,
    cache_dir: str | Path | None = ".cache",
    patients: Sequence[str] | None = None,
) -> list[Case]:
    """Every patient of a kaggle_3m folder (or only `patients`), preprocessed, in folder order."""
    folders = list_patient_folders(data_dir)
    if patients is not None:
        by_name = {folder.name: folder for folder in folders}
        missing = sorted(set(patients) - set(by_name))
        if missing:
            raise FileNotFoundError(f"Patients {missing} are not in {data_dir}: {KAGGLE_LAYOUT}")
        folders = [by_name[name] for name in patients]
    return [load_kaggle_case(f, image_size, edge_slices, require_masks, cache_dir) for f in folders]


def load_luna(
    data_dir: str | Path,
    spacing: float = 2.5,
    hu_window: Sequence[float] = (-1000.0, 400.0),
    lung_labels: Sequence[int] = LUNA_LUNG_LABELS,
    cache_dir: str | Path | None = ".cache",
) -> list[Case]:
    """LUNA16 CT scans with their lung masks: HU windowed to [0, 1], resampled to isotropic `spacing` mm.

    The target is the union of `lung_labels` of seg-lungs-LUNA16 (3 and 4, the two lungs; 5, the trachea,
    is background by default).
    """
    new_spacing = (float(spacing),) * 3
    params = {"spacing": spacing, "hu_window": list(hu_window), "lung_labels": list(lung_labels)}
    cases = []
    for series in find_luna_cases(data_dir):

        def build(series=series) -> Case:
            ct, mask, geometry = read_luna_case(series)
            image = resample(window_ct(ct, *hu_window), geometry.spacing, new_spacing, order=1)
            label = resample(lung_target(mask, lung_labels), geometry.spacing, new_spacing, order=0)
            return Case(
                series.case_id,
                image[None],
                label,
                spacing=resampled_geometry(geometry, ct.shape, new_spacing).spacing,
                source_geometry=geometry,
                source_shape=tuple(ct.shape),
            )

        sources = [series.ct_path, series.mask_path]
        cases.append(cached_case(cache_dir, "luna", series.case_id, sources, params, build))
    return cases


def _normalise(image: np.ndarray, channel_names: Sequence[str], hu_window: Sequence[float]) -> np.ndarray:
    """CT channels windowed to [0, 1], every other channel (MRI) z-scored."""
    return np.stack(
        [
            window_ct(channel, *hu_window) if name.upper() == "CT" else zscore(channel[None])[0]
            for channel, name in zip(image, channel_names, strict=True)
        ]
    )


def load_decathlon(
    data_dir: str | Path,
    spacing: float | None = None,
    hu_window: Sequence[float] = (-1000.0, 400.0),
    require_labels: bool = True,
    cache_dir: str | Path | None = ".cache",
) -> tuple[list[Case], dict]:
    """A Medical Segmentation Decathlon (or LiTS) folder: normalised, optionally resampled cases and info.

    With require_labels only the labelled cases; without it the unlabelled ones (imagesTs) as well.
    spacing None keeps each case's own grid.
    """
    info = read_dataset_info(data_dir)
    allowed = [0, *info["class_names"]]
    params = {"spacing": spacing, "hu_window": list(hu_window)}
    cases = []
    for entry in find_nifti_cases(data_dir):
        if entry.label_path is None and require_labels:
            continue

        def build(entry=entry) -> Case:
            image, label, geometry = read_nifti_case(entry, allowed)
            source_shape = tuple(image.shape[1:])
            image = _normalise(image, info["channel_names"], hu_window)
            grid = geometry
            if spacing is not None:
                new_spacing = (float(spacing),) * 3
                grid = resampled_geometry(geometry, source_shape, new_spacing)
                image = resample(image, geometry.spacing, new_spacing, order=1)
                label = None if label is None else resample(label, geometry.spacing, new_spacing, order=0)
            return Case(
                entry.case_id,
                image.astype(np.float32),
                label,
                spacing=grid.spacing,
                source_geometry=geometry,
                source_shape=source_shape,
            )

        sources = [*entry.image_paths, *([entry.label_path] if entry.label_path else [])]
        cases.append(cached_case(cache_dir, "nifti", entry.case_id, sources, params, build))
    return cases, info


DATASETS = ("kaggle_3m", "luna", "msd")


def load_dataset(
    name: str,
    data_dir: str | Path,
    image_size: int = 256,
    edge_slices: int = 1,
    cache_dir: str | Path | None = ".cache",
    require_labels: bool = True,
    spacing: float | None = None,
    hu_window: Sequence[float] = (-1000.0, 400.0),
    lung_labels: Sequence[int] = LUNA_LUNG_LABELS,
) -> tuple[list[Case], DatasetInfo]:
    """A dataset's preprocessed cases by its name, with its description.

    kaggle_3m uses image_size and edge_slices; luna and msd use spacing (luna default 2.5 mm, msd: the
    cases' own) and hu_window; luna uses lung_labels.
    """
    if name == "kaggle_3m":
        cases = load_kaggle_3m(data_dir, image_size, edge_slices, require_labels, cache_dir)
        return cases, DatasetInfo(class_names={1: "tumour"}, in_channels=3, display_channel=1)
    if name == "luna":
        cases = load_luna(data_dir, spacing or 2.5, hu_window, lung_labels, cache_dir)
        return cases, DatasetInfo(class_names={1: "lung"}, in_channels=1)
    if name == "msd":
        cases, info = load_decathlon(data_dir, spacing, hu_window, require_labels, cache_dir)
        return cases, DatasetInfo(info["class_names"], in_channels=len(info["channel_names"]))
    raise ValueError(f"Unknown dataset {name!r}: expected one of {list(DATASETS)}")


def split_cases(case_ids: Sequence[str], validation: int, test: int, seed: int = 42) -> dict[str, list[str]]:
    """A seeded split by case into train, validation and test (test is never used to choose a model)."""
    ids = sorted(case_ids)
    if validation + test >= len(ids):
        raise ValueError(
            f"Cannot hold out {validation} validation and {test} test cases from {len(ids)}: "
            "at least one case must remain for training"
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    return {
        "train": sorted(shuffled[validation + test :]),
        "validation": sorted(shuffled[:validation]),
        "test": sorted(shuffled[validation : validation + test]),
    }


def slice_sampling_weights(cases: Sequence[Case], axis: int = 0) -> np.ndarray:
    """Per-slice weights: each case equally likely; within it 10/11 by foreground area, 1/11 uniform.

    The reference's weighting, kept finite for a case without foreground (then uniform within it).
    axis is the spatial axis the slices are taken along.
    """
    weights = []
    for case in cases:
        other_axes = tuple(a for a in range(3) if a != axis)
        area = (case.label > 0).sum(axis=other_axes).astype(np.float64)
        uniform = np.full(len(area), 1.0 / len(area))
        within = uniform if area.sum() == 0 else (10 / 11) * area / area.sum() + (1 / 11) * uniform
        weights.append(within / len(cases))
    return np.concatenate(weights)


def center_pad_or_crop(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Zero-pad or crop the trailing len(shape) axes of an array, centred, to `shape`."""
    lead = array.ndim - len(shape)
    pads, crops = [(0, 0)] * lead, [slice(None)] * lead
    for size, target in zip(array.shape[lead:], shape, strict=True):
        pad = max(target - size, 0)
        start = max(size - target, 0) // 2
        pads.append((pad // 2, pad - pad // 2))
        crops.append(slice(start, start + min(size, target)))
    return np.pad(array[tuple(crops)], pads)


class SliceDataset(Dataset):
    """The 2D slices of a list of cases along a spatial axis, as (image, label) tensors.

    image is (C, H, W) float32, label (1, H, W) int64; `slice_size` pads or crops every slice (centred) to
    one size so that volumes of different sizes batch together. `transform` gets and returns numpy
    (image, label).
    """

    def __init__(
        self,
        cases: Sequence[Case],
        transform: Callable | None = None,
        axis: int = 0,
        slice_size: Sequence[int] | None = None,
    ):
        self.cases = list(cases)
        self.transform = transform
        self.axis = axis
        self.slice_size = slice_size
        self.index = [(c, d) for c, case in enumerate(self.cases) for d in range(case.label.shape[axis])]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        case_number, depth = self.index[item]
        case = self.cases[case_number]
        image = np.take(case.image, depth, axis=self.axis + 1)
        label = np.take(case.label, depth, axis=self.axis)
        if self.slice_size is not None:
            image, label = (
                center_pad_or_crop(image, self.slice_size),
                center_pad_or_crop(label, self.slice_size),
            )
        if self.transform is not None:
            image, label = self.transform(image, label)
        return (
            torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))[None],
        )


class PatchDataset(Dataset):
    """Random 3D patches of a list of cases, a share of them centred on foreground (for 3D networks).

    Each item draws a case uniformly, then a patch position as nnU-Net does: with probability
    `foreground_ratio` the patch is centred on a random foreground voxel, otherwise placed uniformly;
    either way it is shifted so that, on every axis, the patch lies inside the volume or the volume
    inside the patch. So no patch is mostly padding, and a volume smaller than the patch is always
    seen whole (zero-padded, at a random offset; a warning says so once). `length` is the number of
    patches per epoch. Random numbers come from torch, which seeds every DataLoader worker.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        patch_size: Sequence[int],
        length: int,
        foreground_ratio: float = 0.33,
        transform: Callable | None = None,
    ):
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.length = length
        self.foreground_ratio = foreground_ratio
        self.transform = transform
        self.foreground = [np.argwhere(case.label > 0) for case in self.cases]
        small = [c.case_id for c in self.cases if np.any(np.array(c.label.shape) < self.patch_size)]
        if small:
            warnings.warn(
                f"{len(small)} case(s) smaller than the patch {self.patch_size} are zero-padded "
                f"(e.g. {small[0]})",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return self.length

    def _start(self, case_number: int) -> np.ndarray:
        """The patch's first voxel, between the volume's and the patch's extents on every axis."""
        patch = np.array(self.patch_size)
        slack = np.array(self.cases[case_number].label.shape) - patch
        low, high = np.minimum(slack, 0), np.maximum(slack, 0)
        foreground = self.foreground[case_number]
        if len(foreground) and float(torch.rand(())) < self.foreground_ratio:
            centre = foreground[int(torch.randint(len(foreground), ()))]
            return np.clip(centre - patch // 2, low, high)
        return np.array([int(torch.randint(lo, hi + 1, ())) for lo, hi in zip(low, high, strict=True)])

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= item < self.length:
            raise IndexError(f"patch {item} of an epoch of {self.length}")
        case_number = int(torch.randint(len(self.cases), ()))
        case = self.cases[case_number]
        start = self._start(case_number)
        image = extract_patch(case.image, start, self.patch_size)
        label = extract_patch(case.label, start, self.patch_size)
        if self.transform is not None:
            image, label = self.transform(image, label)
        return (
            torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))[None],
        )


def extract_patch(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The box [start, start + size) of the trailing spatial axes, zero where it leaves the array."""
    lead = array.ndim - len(size)
    patch = np.zeros(array.shape[:lead] + tuple(size), array.dtype)
    source, target = [slice(None)] * lead, [slice(None)] * lead
    for begin, length, extent in zip(start, size, array.shape[lead:], strict=True):
        low, high = max(begin, 0), min(begin + length, extent)
        source.append(slice(low, max(high, low)))
        target.append(slice(low - begin, low - begin + max(high - low, 0)))
    patch[tuple(target)] = array[tuple(source)]
    return patch
