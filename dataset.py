"""Datasets: the kaggle_3m, LUNA16 and Decathlon readers, their preprocessing plan and cache, the split, and
the slice and patch datasets that feed 2D and 3D networks.

The steps, in the order `engine.train` runs them:
1. `find_sources`: the cases of a data folder and their files, checked (cheap: no voxel is read);
2. `split_cases`: a seeded split by case;
3. `make_plan`: what depends on the data (target spacing, CT intensity statistics), decided from the
   training cases only and saved with the run, as nnU-Net's plan;
4. `prepare_cases`: every case preprocessed once, in parallel worker processes, into the on-disk cache
   (cache.py); a `Case` keeps only metadata in memory and reads voxels memory-mapped when asked.

The kaggle_3m reader follows the reference course code (brain-segmentation-pytorch, Buda et al. 2019): one
volume per patient folder, cropped to the head, padded to square, resized and normalised, then served to a
2D network slice by slice. Its known bugs are fixed: slices are ordered by number (1, 2, 10), masks are
binarised whatever their stored range, and a patient without tumour does not divide by zero in the sampling
weights. Volumetric sets (LUNA16 CT, Decathlon/LiTS NIfTI; file formats in volumes.py) are normalised and
resampled to the plan's spacing. Each case remembers how its grid maps back onto its source (`source`), so
that predictions are written and scored on the source grid. Nothing is ever written in the data folder.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
from skimage.transform import resize
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from cache import array_layout, cached, entry_folder, read_array
from detection import (
    LUNG_MARGIN_MM,
    NODULE_WINDOW,
    NoduleScan,
    cropped_geometry,
    find_nodule_scans,
    lung_box,
    nodule_mask,
)
from volumes import (
    LUNA_LUNG_LABELS,
    Geometry,
    LunaCase,
    NiftiCase,
    check_headers_match,
    find_luna_cases,
    find_nifti_cases,
    lung_target,
    metaimage_data_file,
    read_dataset_info,
    read_header,
    read_luna_case,
    read_nifti_case,
    resample,
    resample_to_shape,
    resampled_geometry,
    window_ct,
    zscore,
)

KAGGLE_LAYOUT = (
    "expected the Kaggle kaggle_3m layout: <data_dir>/<patient>/<patient>_<n>.tif (RGB image) "
    "with <data_dir>/<patient>/<patient>_<n>_mask.tif (binary mask), one folder per patient"
)
SLICE_FILE = re.compile(r"^(?P<stem>.+)_(?P<number>\d+)(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)
DATASETS = ("kaggle_3m", "luna", "msd", "luna_nodules")
FOREGROUND_SAMPLES = 10_000  # voxel positions kept per class for foreground sampling, as nnU-Net
LUNG_WINDOW = (-1000.0, 400.0)  # HU: the lung window, for lung segmentation
CT_PERCENTILES = (0.5, 99.5)  # nnU-Net's CT normalisation: clip to these foreground percentiles


@dataclass
class DatasetInfo:
    """What a network and the figures need to know about a dataset."""

    class_names: dict[int, str]  # foreground classes; one class means a binary task
    in_channels: int
    display_channel: int = 0  # the channel shown in grey under the overlays
    channel_names: tuple[str, ...] = ()
    task: str = "segmentation"  # or "detection": candidates scored by FROC (luna_nodules)


# ---- kaggle_3m: files -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceFiles:
    """The files of one slice of a patient folder; mask is None when the slice has none."""

    number: int
    image: Path
    mask: Path | None


@dataclass(frozen=True)
class KaggleCase:
    """One kaggle_3m patient folder and its slices, ordered by number."""

    case_id: str
    folder: Path
    slices: tuple[SliceFiles, ...]

    @property
    def has_label(self) -> bool:
        return all(item.mask is not None for item in self.slices)


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

    Every .tif must be named <patient>_<n>.tif or <patient>_<n>_mask.tif, and each number may appear
    once (`_3.tif` and `_03.tif` are the same slice). With require_masks every image needs its mask;
    without it a folder may have no masks at all (an unlabelled case) but not some of them. A mask
    without its image is always an error. A gap in the numbers gets a warning: the slices on both
    sides of it are not neighbours.
    """
    images: dict[int, Path] = {}
    masks: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in (".tif", ".tiff"):
            continue
        match = SLICE_FILE.match(path.name)
        if not match:
            raise ValueError(
                f"{path}: the slice name does not parse; expected {folder.name}_<n>.tif or "
                f"{folder.name}_<n>_mask.tif with n the slice number"
            )
        found = masks if match["mask"] else images
        number = int(match["number"])
        if number in found:
            raise ValueError(f"{found[number]} and {path} are both slice {number} of {folder}: keep one")
        found[number] = path
    if not images:
        raise FileNotFoundError(f"Patient folder {folder} has no slices: {KAGGLE_LAYOUT}")
    for number, mask in sorted(masks.items()):
        if number not in images:
            stem = SLICE_FILE.match(mask.name)
            raise FileNotFoundError(
                f"Mask {mask} has no image: expected {stem['stem']}_{stem['number']}{mask.suffix} beside it"
            )
    if masks or require_masks:
        for number, image in sorted(images.items()):
            if number not in masks:
                raise FileNotFoundError(
                    f"Image {image} has no mask: expected {image.stem}_mask{image.suffix} beside it"
                )
    numbers = sorted(images)
    missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    if missing:
        warnings.warn(
            f"{folder}: slice number(s) {missing[:10]} are missing; the slices on either side of a gap are "
            "treated as not adjacent (3D post-processing, HD95), but 2.5D input (context_slices) spans it",
            stacklevel=2,
        )
    return [SliceFiles(n, images[n], masks.get(n)) for n in numbers]


def find_kaggle_cases(data_dir: str | Path, require_masks: bool = True) -> list[KaggleCase]:
    """Every patient of a kaggle_3m folder with its checked slice files."""
    return [
        KaggleCase(folder.name, folder, tuple(list_slice_files(folder, require_masks)))
        for folder in list_patient_folders(data_dir)
    ]


def read_tif(path: Path) -> np.ndarray:
    """One tif as an array, with an error that names the file when it cannot be read."""
    try:
        return tifffile.imread(path)
    except Exception as error:
        raise ValueError(f"Cannot read {path}: not a readable tif ({error})") from error


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """Any non-zero value is foreground, whatever the stored range (0/1, 0/255) or dtype; of an RGB(A)
    mask only the colour channels count (an opaque alpha channel would make every pixel foreground)."""
    if mask.ndim == 3:
        mask = mask[..., :3].max(axis=-1)
    return (mask != 0).astype(np.uint8)


def read_slices(slices: Sequence[SliceFiles]) -> tuple[np.ndarray, np.ndarray | None]:
    """A patient's volume (D, H, W, 3) uint8 and its mask (D, H, W) uint8 0/1, or None without masks."""
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
    return np.stack(images), np.stack(masks) if len(masks) == len(images) else None


def read_patient(folder: Path, require_masks: bool = True) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """A patient's volume (D, H, W, 3) uint8, its mask (D, H, W) uint8 0/1 or None, and slice names."""
    slices = list_slice_files(folder, require_masks)
    volume, mask = read_slices(slices)
    return volume, mask, [str(item.number) for item in slices]


# ---- kaggle_3m: preprocessing (the reference pipeline) --------------------------------------------------


def crop_box(volume: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the voxels brighter than 10% of the maximum: the head."""
    foreground = volume.max(axis=-1) > 0.1 * volume.max()
    rows = np.flatnonzero(foreground.any(axis=(0, 2)))
    cols = np.flatnonzero(foreground.any(axis=(0, 1)))
    if rows.size == 0:
        return 0, volume.shape[1], 0, volume.shape[2]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def square_padding(height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric zero padding of rows and columns that makes a height × width slice square."""
    diff = abs(height - width)
    before, after = diff // 2, diff - diff // 2
    return ((before, after), (0, 0)) if height < width else ((0, 0), (before, after))


def resize_slices(volume: np.ndarray, mask, size: int):
    """Resize every slice to size × size: image quadratic, mask nearest neighbour (stays binary).

    Each slice and channel is resized in 2D, 30-40 times faster than the reference's one 4D spline over
    (D, H, W, C). That spline's prefilter also runs along the unchanged slice and channel axes, so near the
    first and last slices it mixes neighbours in (differences up to a few percent of the range there, a
    mean of about 0.001%); here a slice and a channel stay themselves.
    """
    resized = np.empty((volume.shape[0], size, size, volume.shape[-1]), np.float32)
    for d in range(volume.shape[0]):
        for c in range(volume.shape[-1]):
            resized[d, ..., c] = resize(
                volume[d, ..., c].astype(np.float32),
                (size, size),
                order=2,
                mode="constant",
                anti_aliasing=False,
                preserve_range=True,
            )
    if mask is not None:
        mask = np.stack(
            [
                resize(item, (size, size), order=0, mode="constant", anti_aliasing=False, preserve_range=True)
                for item in mask
            ]
        ).astype(np.uint8)
    return resized, mask


def normalize_channels(volume: np.ndarray) -> np.ndarray:
    """Clip each channel to its 10th–99th percentile, then z-score it; returns (C, D, H, W) float32."""
    channels = []
    for channel in np.moveaxis(volume.astype(np.float32), -1, 0):
        low, high = np.percentile(channel, (10, 99))
        channel = np.clip(channel, low, high)
        channels.append((channel - channel.mean()) / max(float(channel.std()), 1e-8))
    return np.stack(channels).astype(np.float32)


def preprocess_patient(
    volume: np.ndarray, mask, image_size: int
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """The reference pipeline, one step per line: crop → pad → resize → normalise.

    Returns the image (C, D, S, S), the label and where the S × S grid lies on the source slices
    ({"box": crop box, "padding": square padding}), to map predictions back.
    """
    top, bottom, left, right = crop_box(volume)
    volume = volume[:, top:bottom, left:right]
    mask = None if mask is None else mask[:, top:bottom, left:right]
    rows, cols = square_padding(*volume.shape[1:3])
    volume = np.pad(volume, ((0, 0), rows, cols, (0, 0)))
    mask = None if mask is None else np.pad(mask, ((0, 0), rows, cols))
    volume, mask = resize_slices(volume, mask, image_size)
    return (
        normalize_channels(volume),
        mask,
        {"box": [top, bottom, left, right], "padding": [list(rows), list(cols)]},
    )


# ---- cases: metadata in memory, voxels in the cache ------------------------------------------------------


def summarise_label(label: np.ndarray | None, seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """Per-class voxel counts, foreground area per slice along each axis, and sampled foreground positions.

    Up to FOREGROUND_SAMPLES positions per class (all of them for a small class) are kept as int32
    (n, 3), so that patch sampling finds a 50-voxel tumour next to a liver of millions without storing an
    index of every foreground voxel.
    """
    if label is None:
        return {"class_voxels": {}, "slice_areas": None}, {}
    rng = np.random.default_rng(seed)
    foreground = label > 0
    areas = [foreground.sum(axis=tuple(a for a in range(3) if a != axis)).tolist() for axis in range(3)]
    counts = np.bincount(label.ravel(), minlength=2)
    class_voxels, positions = {}, {}
    for c in np.flatnonzero(counts[1:]) + 1:
        where = np.flatnonzero(label.ravel() == c)
        if len(where) > FOREGROUND_SAMPLES:
            where = np.sort(rng.choice(where, FOREGROUND_SAMPLES, replace=False))
        positions[f"foreground_{c}"] = np.stack(np.unravel_index(where, label.shape), 1).astype(np.int32)
        class_voxels[str(int(c))] = int(counts[c])
    return {"class_voxels": class_voxels, "slice_areas": areas}, positions


class Case:
    """One preprocessed case: its metadata in memory, its voxels in the cache or (without one) in memory.

    `image` is (C, D, H, W) float32 and `label` (D, H, W) uint8 class indices or None. For a cached case
    both are opened memory-mapped on each access, so reading a patch reads that patch only and nothing
    stays mapped after use. `source` describes the source grid (see `to_source_grid`) and `origin` the
    files the case was read from, to read them again at source resolution for metrics and figures.
    """

    def __init__(self, meta: dict, folder: Path | None = None, arrays: dict | None = None, origin=None):
        self.meta = meta
        self.folder = folder
        self.arrays = arrays or {}
        self.origin = origin
        self.layouts: dict = {}  # where each cached array lies in its file, read once per process

    @classmethod
    def from_arrays(
        cls,
        case_id: str,
        image: np.ndarray,
        label: np.ndarray | None,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        source: dict | None = None,
        slice_names: Sequence[str] = (),
        origin=None,
    ) -> Case:
        """A case held in memory (no cache), e.g. in tests."""
        summary, positions = summarise_label(label)
        shape = list(label.shape if label is not None else image.shape[1:])
        meta = {
            "case_id": case_id,
            "shape": shape,
            "channels": int(image.shape[0]),
            "spacing": [float(s) for s in spacing],
            "has_label": label is not None,
            "slice_names": list(slice_names),
            "source": source,
            **summary,
        }
        arrays = {"image": image, **({"label": label} if label is not None else {}), **positions}
        return cls(meta, arrays=arrays, origin=origin)

    def _array(self, name: str) -> np.ndarray:
        if self.folder is None:
            return self.arrays[name]
        if name not in self.layouts:
            self.layouts[name] = array_layout(self.folder, name)
        return read_array(self.folder, name, self.layouts[name])

    @property
    def case_id(self) -> str:
        return self.meta["case_id"]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["shape"])

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.meta["spacing"])

    @property
    def slice_names(self) -> list[str]:
        return self.meta["slice_names"]

    @property
    def source(self) -> dict | None:
        return self.meta["source"]

    @property
    def classes(self) -> list[int]:
        """The foreground classes present in the label."""
        return sorted(int(c) for c in self.meta["class_voxels"])

    @property
    def image(self) -> np.ndarray:
        return self._array("image")

    @property
    def label(self) -> np.ndarray | None:
        return self._array("label") if self.meta["has_label"] else None

    def foreground(self, class_index: int) -> np.ndarray:
        """Sampled (n, 3) voxel positions of a class present in the label."""
        return self._array(f"foreground_{class_index}")

    def slice_areas(self, axis: int) -> np.ndarray:
        """Foreground voxels in each slice along a spatial axis."""
        return np.array(self.meta["slice_areas"][axis], np.float64)


# ---- plans: what depends on the data, decided from the training cases -----------------------------------


def _spacing_setting(spacing: float | Sequence[float]) -> list[float]:
    values = [float(spacing)] * 3 if isinstance(spacing, int | float) else [float(s) for s in spacing]
    if len(values) != 3 or not all(v > 0 for v in values):
        raise ValueError(
            f"spacing must be a positive number or 3 positive numbers (z, y, x) in mm, got {spacing}"
        )
    return values


def median_spacing(sources: Sequence[NiftiCase]) -> list[float]:
    """The median voxel spacing (z, y, x) of the cases, from their headers (nnU-Net's target spacing)."""
    spacings = np.array([read_header(source.image_paths[0])[0].spacing for source in sources])
    return [float(s) for s in np.median(spacings, axis=0)]


def _ct_fingerprint(source: NiftiCase, channel: int, allowed: list[int], seed: int) -> np.ndarray:
    """Up to FOREGROUND_SAMPLES intensities of one channel inside the labelled foreground of a case."""
    image, label, _ = read_nifti_case(source, allowed)
    values = image[channel][label > 0]
    if len(values) > FOREGROUND_SAMPLES:
        values = np.random.default_rng(seed).choice(values, FOREGROUND_SAMPLES, replace=False)
    return values.astype(np.float32)


def ct_statistics(sources: Sequence[NiftiCase], channel: int, allowed: list[int], workers: int) -> dict:
    """nnU-Net's CT normalisation from the training cases' foreground: clip percentiles, mean and std."""
    values = np.concatenate(
        run_parallel(
            _ct_fingerprint, [(s, channel, allowed, i) for i, s in enumerate(sources)], workers, "CT"
        )
    )
    if values.size == 0:
        raise ValueError("no training case has labelled foreground: cannot derive the CT normalisation")
    low, high = np.percentile(values, CT_PERCENTILES)
    clipped = np.clip(values, low, high)
    return {
        "scheme": "ct",
        "clip": [float(low), float(high)],
        "mean": float(clipped.mean()),
        "std": float(max(clipped.std(), 1e-8)),
    }


def make_plan(
    name: str,
    train_sources: Sequence,
    info: DatasetInfo,
    image_size: int = 256,
    spacing: float | Sequence[float] | None = None,
    hu_window: Sequence[float] | None = None,
    lung_labels: Sequence[int] = LUNA_LUNG_LABELS,
    workers: int | None = None,
) -> dict:
    """How to preprocess a data set, decided from its training cases only (nnU-Net's plan).

    kaggle_3m: the slice size. luna: the target spacing (2.5 mm isotropic unless given), the HU window
    (the lung window unless given) and the lung labels. msd / LiTS: the target spacing (the training cases'
    median unless given) and per channel either a fixed HU window (when hu_window is given), nnU-Net's CT
    normalisation (clip to the 0.5–99.5 percentiles of the training foreground, then z-score with its mean
    and standard deviation) for CT channels, or a per-case z-score for every other channel (MRI).
    """
    if name == "kaggle_3m":
        return {"dataset": name, "image_size": int(image_size)}
    if name == "luna":
        return {
            "dataset": name,
            "spacing": _spacing_setting(2.5 if spacing is None else spacing),
            "hu_window": [float(v) for v in (hu_window or LUNG_WINDOW)],
            "lung_labels": [int(v) for v in lung_labels],
        }
    if name == "luna_nodules":
        return {
            "dataset": name,
            "spacing": _spacing_setting(1.0 if spacing is None else spacing),
            "hu_window": [float(v) for v in (hu_window or NODULE_WINDOW)],
            "lung_labels": [int(v) for v in lung_labels],
            "margin_mm": LUNG_MARGIN_MM,
        }
    if name != "msd":
        raise ValueError(f"Unknown dataset {name!r}: expected one of {list(DATASETS)}")
    target = _spacing_setting(spacing) if spacing is not None else median_spacing(train_sources)
    allowed = [0, *info.class_names]
    channels = []
    for index, channel_name in enumerate(info.channel_names):
        if channel_name.upper() != "CT":
            channels.append({"name": channel_name, "scheme": "zscore"})
        elif hu_window is not None:
            channels.append(
                {"name": channel_name, "scheme": "window", "window": [float(v) for v in hu_window]}
            )
        else:
            statistics = ct_statistics(train_sources, index, allowed, resolve_workers(workers))
            channels.append({"name": channel_name, **statistics})
    return {"dataset": name, "spacing": target, "channels": channels}


def normalise_channels(image: np.ndarray, channels: Sequence[dict]) -> np.ndarray:
    """(C, D, H, W) float32 normalised per channel as the plan says, in place: a real-size CT is not
    copied (its reader's fresh array is overwritten and returned)."""
    if len(image) != len(channels):
        raise ValueError(f"the image has {len(image)} channel(s), the plan expects {len(channels)}")
    if image.dtype != np.float32 or not image.flags.writeable:
        image = image.astype(np.float32)
    for channel, rule in zip(image, channels, strict=True):
        if rule["scheme"] == "window":
            window_ct(channel, *rule["window"], out=channel)
        elif rule["scheme"] == "ct":
            np.clip(channel, *rule["clip"], out=channel)
            channel -= rule["mean"]
            channel /= rule["std"]
        else:
            channel[...] = zscore(channel[None])[0]
    return image


# ---- building cases ---------------------------------------------------------------------------------------


def source_paths(source) -> list[Path]:
    """The files a case is read from (they key its cache entry)."""
    if isinstance(source, KaggleCase):
        return [p for item in source.slices for p in (item.image, item.mask) if p is not None]
    scan = source.scan if isinstance(source, NoduleScan) else source
    if isinstance(scan, LunaCase):  # the headers and the .raw/.zraw files they name
        headers = [path for path in (scan.ct_path, scan.mask_path) if path is not None]
        return [*headers, *filter(None, map(metaimage_data_file, headers))]
    return [*source.image_paths, *([source.label_path] if source.label_path else [])]


def has_label(source) -> bool:
    if isinstance(source, KaggleCase):
        return source.has_label
    if isinstance(source, LunaCase):
        return source.mask_path is not None
    return isinstance(source, NoduleScan) or source.label_path is not None


def _build_kaggle(source: KaggleCase, plan: dict) -> tuple[dict, dict]:
    volume, mask = read_slices(source.slices)
    image, label, placement = preprocess_patient(volume, mask, plan["image_size"])
    numbers = [item.number for item in source.slices]
    grid = {
        "kind": "slices",
        "shape": [numbers[-1] - numbers[0] + 1, *volume.shape[1:3]],
        "slice_index": [n - numbers[0] for n in numbers],
        **placement,
    }
    meta = {"spacing": [1.0, 1.0, 1.0], "slice_names": [str(n) for n in numbers], "source": grid}
    return {"image": image, **({"label": label} if label is not None else {})}, meta


def _volume_grid(geometry: Geometry, shape: Sequence[int]) -> dict:
    return {"kind": "volume", "shape": [int(s) for s in shape], "geometry": dataclasses.asdict(geometry)}


def _build_luna(source: LunaCase, plan: dict) -> tuple[dict, dict]:
    ct, mask, geometry = read_luna_case(source)
    target = plan["spacing"]
    image = resample(window_ct(ct, *plan["hu_window"]), geometry.spacing, target, order=1)
    meta = {
        "spacing": list(resampled_geometry(geometry, ct.shape, target).spacing),
        "slice_names": [],
        "source": _volume_grid(geometry, ct.shape),
    }
    if mask is None:
        return {"image": image[None]}, meta
    lungs = lung_target(mask, plan["lung_labels"], source.mask_path)
    return {"image": image[None], "label": resample(lungs, geometry.spacing, target, order=0)}, meta


def _build_nodule_scan(source: NoduleScan, plan: dict) -> tuple[dict, dict]:
    """A scan for nodule detection: cropped to its lungs, windowed, resampled; label = nodule balls."""
    ct, mask, geometry = read_luna_case(source.scan)
    box = lung_box(
        lung_target(mask, plan["lung_labels"], source.scan.mask_path), geometry.spacing, plan["margin_mm"]
    )
    ct = ct[box[0] : box[1], box[2] : box[3], box[4] : box[5]]
    target = plan["spacing"]
    image = resample(window_ct(ct, *plan["hu_window"]), geometry.spacing, target, order=1)
    grid = resampled_geometry(cropped_geometry(geometry, box), ct.shape, target)
    meta = {
        "spacing": list(grid.spacing),
        "slice_names": [],
        "source": {**_volume_grid(geometry, mask.shape), "box": box},
        "grid_geometry": dataclasses.asdict(grid),
    }
    return {"image": image[None], "label": nodule_mask(source.nodules, grid, image.shape)}, meta


def _build_nifti(source: NiftiCase, plan: dict, allowed: list[int]) -> tuple[dict, dict]:
    image, label, geometry = read_nifti_case(source, allowed)
    source_shape = image.shape[1:]
    image = normalise_channels(image, plan["channels"])
    target = plan["spacing"]
    if not np.allclose(geometry.spacing, target, rtol=0, atol=1e-6):
        image = resample(image, geometry.spacing, target, order=1)
        label = None if label is None else resample(label, geometry.spacing, target, order=0)
    meta = {
        "spacing": list(resampled_geometry(geometry, source_shape, target).spacing),
        "slice_names": [],
        "source": _volume_grid(geometry, source_shape),
    }
    return {"image": image, **({"label": label} if label is not None else {})}, meta


def build_case(source, plan: dict, allowed: list[int]) -> tuple[dict, dict]:
    """The preprocessed arrays and metadata of one case (what the cache stores)."""
    if isinstance(source, KaggleCase):
        arrays, meta = _build_kaggle(source, plan)
    elif isinstance(source, LunaCase):
        arrays, meta = _build_luna(source, plan)
    elif isinstance(source, NoduleScan):
        arrays, meta = _build_nodule_scan(source, plan)
    else:
        arrays, meta = _build_nifti(source, plan, allowed)
    label = arrays.get("label")
    summary, positions = summarise_label(label)
    meta |= {
        "case_id": source.case_id,
        "shape": list(arrays["image"].shape[1:]),
        "channels": int(arrays["image"].shape[0]),
        "has_label": label is not None,
        **summary,
    }
    return arrays | positions, meta


def _prepare_one(source, plan: dict, allowed: list[int], cache_dir: str | None) -> Case:
    if cache_dir is None:
        arrays, meta = build_case(source, plan, allowed)
        return Case(meta, arrays=arrays, origin=source)
    params = {"plan": plan, "allowed": allowed}
    if isinstance(source, NoduleScan):  # the annotations draw the label: they key the entry too
        params["nodules"] = [[f.x, f.y, f.z, f.diameter_mm] for f in source.nodules]
    folder = entry_folder(cache_dir, plan["dataset"], source.case_id, params, source_paths(source))
    meta = cached(folder, lambda: build_case(source, plan, allowed))
    return Case(meta, folder=folder, origin=source)


def resolve_workers(workers: int | None) -> int:
    """The number of preprocessing processes: the CPUs this process may use unless set."""
    count = len(os.sched_getaffinity(0)) if workers is None else int(workers)
    if count < 1:
        raise ValueError(f"preprocess_workers must be at least 1, got {workers}")
    return count


def run_parallel(function: Callable, jobs: Sequence[tuple], workers: int, description: str) -> list:
    """function(*job) for every job, in `workers` processes when there are several; results in job order.

    Workers are forked (Linux's default start method, as PyTorch's DataLoader workers): no script needs
    an `if __name__ == "__main__"` guard, and the workers run numpy, SciPy and SimpleITK code only,
    never the parent's PyTorch threads or GPU.
    """
    if workers <= 1 or len(jobs) <= 1:
        return [function(*job) for job in tqdm(jobs, desc=description, leave=False)]
    results: list = [None] * len(jobs)
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        futures = {pool.submit(function, *job): index for index, job in enumerate(jobs)}
        try:
            for future in tqdm(as_completed(futures), total=len(jobs), desc=description, leave=False):
                results[futures[future]] = future.result()
        except BaseException:  # report a bad case now, not after every other case has been built
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def prepare_cases(
    sources: Sequence,
    plan: dict,
    info: DatasetInfo,
    cache_dir: str | Path | None = ".cache",
    workers: int | None = None,
) -> list[Case]:
    """Every case preprocessed as the plan says, from the cache when it holds it, in parallel processes.

    Without a cache_dir the cases are built in this process and kept in memory (small data, tests).
    """
    allowed = [0, *info.class_names]
    if cache_dir is None:
        return [_prepare_one(source, plan, allowed, None) for source in sources]
    jobs = [(source, plan, allowed, str(cache_dir)) for source in sources]
    return run_parallel(_prepare_one, jobs, resolve_workers(workers), "preprocessing")


def find_sources(name: str, data_dir: str | Path, require_labels: bool = True) -> tuple[list, DatasetInfo]:
    """The cases of a data folder (their files, checked; no voxel read: an image and its label must agree
    in size, spacing, origin and direction by their headers) and the data set's description."""
    if name == "kaggle_3m":
        sources = find_kaggle_cases(data_dir, require_labels)
        info = DatasetInfo(
            {1: "tumour"}, in_channels=3, display_channel=1, channel_names=("pre", "FLAIR", "post")
        )
    elif name == "luna":
        sources = find_luna_cases(data_dir, require_labels)
        info = DatasetInfo({1: "lung"}, in_channels=1, channel_names=("CT",))
    elif name == "luna_nodules":
        sources = find_nodule_scans(data_dir, require_labels)
        info = DatasetInfo({1: "nodule"}, in_channels=1, channel_names=("CT",), task="detection")
    elif name == "msd":
        description = read_dataset_info(data_dir)
        sources = [s for s in find_nifti_cases(data_dir) if s.label_path is not None or not require_labels]
        channels = tuple(description["channel_names"])
        info = DatasetInfo(description["class_names"], in_channels=len(channels), channel_names=channels)
    else:
        raise ValueError(f"Unknown dataset {name!r}: expected one of {list(DATASETS)}")
    for image_path, label_path in _image_label_pairs(sources):
        check_headers_match(image_path, label_path)
    return sources, info


def _image_label_pairs(sources: Sequence) -> list[tuple[Path, Path]]:
    """(image file, label file) of every labelled volume case, each channel file paired with its label."""
    pairs = []
    for source in sources:
        if isinstance(source, NoduleScan):
            source = source.scan
        if isinstance(source, LunaCase) and source.mask_path is not None:
            pairs.append((source.ct_path, source.mask_path))
        elif isinstance(source, NiftiCase) and source.label_path is not None:
            pairs.extend((path, source.label_path) for path in source.image_paths)
    return pairs


def load_dataset(
    name: str,
    data_dir: str | Path,
    image_size: int = 256,
    cache_dir: str | Path | None = ".cache",
    require_labels: bool = True,
    spacing: float | Sequence[float] | None = None,
    hu_window: Sequence[float] | None = None,
    lung_labels: Sequence[int] = LUNA_LUNG_LABELS,
    plan: dict | None = None,
    workers: int | None = None,
) -> tuple[list[Case], DatasetInfo, dict]:
    """A data set's preprocessed cases, its description and its plan (made from every labelled case when
    none is given: for tools and tests; training makes it from the training cases only)."""
    sources, info = find_sources(name, data_dir, require_labels)
    if plan is None:
        labelled = [source for source in sources if has_label(source)]
        plan = make_plan(name, labelled, info, image_size, spacing, hu_window, lung_labels, workers)
    return prepare_cases(sources, plan, info, cache_dir, workers), info, plan


# ---- back to the source grid ------------------------------------------------------------------------------


def to_source_grid(case: Case, probabilities: np.ndarray) -> np.ndarray:
    """Class probabilities (K, D, H, W) on the case's grid → class labels on its source grid.

    The probabilities, not the labels, are resampled (linearly, one class at a time) and then turned
    into labels, as nnU-Net does; K = 1 is a sigmoid probability thresholded at 0.5. Volumes resampled
    to the plan's spacing go back to the scan's own grid; kaggle_3m slices go back through the resize,
    the square padding and the head crop onto the original slices, missing slice numbers left empty.
    """
    grid = case.source
    if grid is None:
        return probabilities_to_labels(probabilities)
    if grid["kind"] == "volume":
        return _labels_by_channel(probabilities, lambda channel: _volume_to_source(channel, grid))
    return _labels_by_channel(probabilities, lambda channel: _slices_to_source(channel, grid))


def probabilities_to_labels(probabilities: np.ndarray) -> np.ndarray:
    """Labels uint8 from probabilities (K, *spatial): p > 0.5 for one channel, argmax otherwise."""
    if probabilities.shape[0] == 1:
        return (probabilities[0] > 0.5).astype(np.uint8)
    return probabilities.argmax(0).astype(np.uint8)


def _labels_by_channel(
    probabilities: np.ndarray, to_source: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Labels from probabilities mapped channel by channel: one source-size channel in memory at a time."""
    if probabilities.shape[0] == 1:
        return (to_source(probabilities[0]) > 0.5).astype(np.uint8)
    best = to_source(probabilities[0])
    labels = np.zeros(best.shape, np.uint8)
    for index in range(1, probabilities.shape[0]):
        channel = to_source(probabilities[index])
        better = channel > best
        labels[better] = index
        np.maximum(best, channel, out=best)
    return labels


def _volume_to_source(channel: np.ndarray, grid: dict) -> np.ndarray:
    """One class's probabilities resampled onto the scan's grid (or the box it was cropped to: 0 outside)."""
    box = grid.get("box")
    if box is None:
        return resample_to_shape(channel, grid["shape"], order=1)
    out = np.zeros(grid["shape"], np.float32)
    inside = tuple(slice(box[2 * axis], box[2 * axis + 1]) for axis in range(3))
    out[inside] = resample_to_shape(
        channel, [box[2 * axis + 1] - box[2 * axis] for axis in range(3)], order=1
    )
    return out


def _slices_to_source(channel: np.ndarray, grid: dict) -> np.ndarray:
    """One class's probabilities on the S × S slices → the original slices (outside the head: 0)."""
    top, bottom, left, right = grid["box"]
    (row_before, row_after), (col_before, col_after) = grid["padding"]
    padded = (bottom - top + row_before + row_after, right - left + col_before + col_after)
    out = np.zeros(grid["shape"], np.float32)
    for probabilities, index in zip(channel, grid["slice_index"], strict=True):
        square = resize(probabilities, padded, order=1, mode="edge", anti_aliasing=False, preserve_range=True)
        out[index, top:bottom, left:right] = square[
            row_before : padded[0] - row_after, col_before : padded[1] - col_after
        ]
    return out


@dataclass
class SourceCase:
    """A case read again at its source resolution: the displayed channel, the label and the geometry."""

    image: np.ndarray  # (D, H, W) float32, the displayed channel
    label: np.ndarray | None  # (D, H, W) uint8 class indices
    spacing: tuple[float, float, float] | None  # mm, array order; None: pixels (kaggle_3m)
    geometry: Geometry | None
    present: np.ndarray  # (D,) bool: False for missing slice numbers (kaggle_3m gaps)
    slice_names: list[str]


def read_source(case: Case, plan: dict, info: DatasetInfo) -> SourceCase:
    """The case's displayed channel and label at source resolution, read from its files again."""
    source, grid = case.origin, case.source
    if isinstance(source, KaggleCase):
        volume, mask = read_slices(source.slices)
        shape = grid["shape"]
        image = np.zeros(shape, np.float32)
        label = None if mask is None else np.zeros(shape, np.uint8)
        present = np.zeros(shape[0], bool)
        for d, index in enumerate(grid["slice_index"]):
            image[index] = volume[d, ..., info.display_channel]
            present[index] = True
            if label is not None:
                label[index] = mask[d]
        names = [""] * shape[0]
        for index, name in zip(grid["slice_index"], case.slice_names, strict=True):
            names[index] = name
        return SourceCase(image, label, None, None, present, names)
    if isinstance(source, LunaCase):
        ct, mask, geometry = read_luna_case(source)
        label = None if mask is None else lung_target(mask, plan["lung_labels"], source.mask_path)
        image = ct.astype(np.float32)
    elif isinstance(source, NoduleScan):
        ct, _, geometry = read_luna_case(source.scan)
        label = nodule_mask(source.nodules, geometry, ct.shape)
        image = ct.astype(np.float32)
    else:
        allowed = [0, *info.class_names]
        volume, label, geometry = read_nifti_case(source, allowed)
        image = volume[info.display_channel]
    names = [str(d) for d in range(image.shape[0])]
    return SourceCase(image, label, geometry.spacing, geometry, np.ones(image.shape[0], bool), names)


# ---- the split --------------------------------------------------------------------------------------------


def split_cases(
    case_ids: Sequence[str],
    validation: int | Sequence[str],
    test: int | Sequence[str],
    seed: int = 42,
    source: str | Path = "the data set",
) -> dict[str, list[str]]:
    """A split by case into train, validation and test (test is never used to choose a model).

    Each held-out part is a count, drawn at random with the seed, or a list of case ids taken as named (a
    published or an earlier split; MONAI datalists and nnU-Net's splits name their cases too). Named cases
    are set aside first and counts are drawn from the rest, so counts alone give the same split as before.
    `source` names where the case ids came from (the data folder) in the errors.
    """
    ids = sorted(case_ids)
    requested = {"validation": validation, "test": test}
    named = {part: list(value) for part, value in requested.items() if isinstance(value, list | tuple)}
    set_aside = set().union(*named.values())
    unknown = sorted(set_aside - set(ids))
    if unknown:
        raise ValueError(
            f"Held-out case(s) {unknown} are not in {source} (whose cases begin {ids[:3]}): "
            "validation_cases and test_cases name cases by id, or give how many to draw at random"
        )
    twice = sorted(set(named.get("validation", [])) & set(named.get("test", [])))
    if twice:
        raise ValueError(f"Case(s) {twice} are named both for validation and for test")
    sizes = {part: len(named[part]) if part in named else value for part, value in requested.items()}
    if sizes["validation"] < 1 or sizes["test"] < 0:
        raise ValueError(
            f"validation_cases must be at least 1 and test_cases at least 0, got {validation}, {test}"
        )
    if sizes["validation"] + sizes["test"] >= len(ids):
        raise ValueError(
            f"Cannot hold out {sizes['validation']} validation and {sizes['test']} test cases from "
            f"{len(ids)}: at least one case must remain for training"
        )
    rest = [case for case in ids if case not in set_aside]
    drawn = iter([rest[i] for i in np.random.default_rng(seed).permutation(len(rest))])
    held_out = {
        part: named[part] if part in named else [next(drawn) for _ in range(requested[part])]
        for part in requested
    }
    kept_out = set(held_out["validation"]) | set(held_out["test"])
    return {
        "train": [case for case in ids if case not in kept_out],
        "validation": sorted(held_out["validation"]),
        "test": sorted(held_out["test"]),
    }


# ---- training samples -------------------------------------------------------------------------------------


def sample_rng(seed: int, sample: int) -> np.random.Generator:
    """The random numbers of one training sample, a function of the run's seed and the sample's number.

    Every sample of every epoch has its own number, so a sample is the same whichever process, worker or
    rank draws it and whether or not the run was interrupted and resumed: resumes are exact and a
    multi-process run draws the very samples of a single-process one.
    """
    return np.random.default_rng([seed, sample])


class EpochSampler(Sampler[int]):
    """Sample numbers of one epoch, this rank's share of each global batch.

    An epoch is `steps` global batches of `batch_size` samples; sample numbers run on over the epochs
    (epoch e starts at e × steps × batch_size). With `world_size` ranks, rank r takes the r-th
    contiguous part of every global batch, so the ranks' parts make up exactly one process's batches.
    """

    def __init__(self, steps: int, batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} must be divisible by the number of processes {world_size}"
            )
        self.steps, self.batch_size = steps, batch_size
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.batch_size // self.world_size

    def __iter__(self) -> Iterator[int]:
        share = self.batch_size // self.world_size
        first = self.epoch * self.steps * self.batch_size
        for step in range(self.steps):
            start = first + step * self.batch_size + self.rank * share
            yield from range(start, start + share)


def slice_sampling_weights(cases: Sequence[Case], axis: int = 0, edge_slices: int = 0) -> np.ndarray:
    """Per-slice weights: each case equally likely; within it 10/11 by foreground area, 1/11 uniform.

    The reference's weighting, kept finite for a case without foreground (then uniform within it).
    axis is the spatial axis the slices are taken along; the first and last `edge_slices` slices of a
    case get no weight (a training choice of the reference: they rarely show brain), unless that would
    leave none.
    """
    weights = []
    for case in cases:
        area = case.slice_areas(axis)
        keep = np.ones(len(area), bool)
        if edge_slices and len(area) > 2 * edge_slices:
            keep[:edge_slices] = keep[len(area) - edge_slices :] = False
        area = area * keep
        uniform = keep / keep.sum()
        within = uniform if area.sum() == 0 else (10 / 11) * area / area.sum() + (1 / 11) * uniform
        weights.append(within / len(cases))
    return np.concatenate(weights)


def context_indices(index: int | np.ndarray, length: int, context_slices: int) -> np.ndarray:
    """Slice indices index - context_slices .. index + context_slices along an axis of `length`, edges
    repeated (a slice beyond the volume is its nearest slice); shape (2k + 1, *index.shape)."""
    offsets = np.arange(-context_slices, context_slices + 1).reshape(-1, *np.ndim(index) * [1])
    return np.clip(np.asarray(index) + offsets, 0, length - 1)


def slice_with_context(image: np.ndarray, index: int, axis: int, context_slices: int) -> np.ndarray:
    """Slice `index` of a (C, D, H, W) image along spatial `axis` with its neighbours as channels (2.5D).

    Returns ((2k + 1) · C, *in-plane): the channels of slice index - k first, then the next slice's, so
    that channel c of offset o is channel o · C + c. k = 0 is the plain slice.
    """
    if context_slices == 0:
        return np.take(image, index, axis=axis + 1)
    stack = np.take(image, context_indices(index, image.shape[axis + 1], context_slices), axis=axis + 1)
    stack = np.moveaxis(stack, axis + 1, 0)
    return stack.reshape(-1, *stack.shape[2:])


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


def _as_tensors(image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))[None],
    )


class SliceDataset(Dataset):
    """Random 2D training slices of a list of cases along a spatial axis, as (image, label) tensors.

    Item n is training sample number n (see `sample_rng`): a slice drawn with `weights` (one per slice
    of every case, e.g. `slice_sampling_weights`), padded or cropped (centred) to `slice_size` so that
    volumes of different sizes batch together, then augmented by `transform(image, label, rng)`. image is
    (C, H, W) float32, label (1, H, W) int64; with `context_slices` k the image also holds the k slices
    on each side as channels, ((2k + 1) · C, H, W) (`slice_with_context`). Only the drawn slices are read
    from the cache.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        weights: np.ndarray,
        transform: Callable | None = None,
        axis: int = 0,
        slice_size: Sequence[int] | None = None,
        seed: int = 0,
        context_slices: int = 0,
    ):
        self.cases = list(cases)
        self.context_slices = context_slices
        self.index = [(c, d) for c, case in enumerate(self.cases) for d in range(case.shape[axis])]
        if len(weights) != len(self.index):
            raise ValueError(f"{len(weights)} weights for {len(self.index)} slices")
        self.cumulative = np.cumsum(weights) / np.sum(weights)
        self.transform, self.axis, self.slice_size, self.seed = transform, axis, slice_size, seed

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = sample_rng(self.seed, sample)
        chosen = min(int(np.searchsorted(self.cumulative, rng.random(), side="right")), len(self.index) - 1)
        case_number, depth = self.index[chosen]
        case = self.cases[case_number]
        image = slice_with_context(case.image, depth, self.axis, self.context_slices)
        label = np.take(case.label, depth, axis=self.axis)
        if self.slice_size is not None:
            image, label = (
                center_pad_or_crop(image, self.slice_size),
                center_pad_or_crop(label, self.slice_size),
            )
        if self.transform is not None:
            image, label = self.transform(image, label, rng)
        return _as_tensors(image, label)


class PatchDataset(Dataset):
    """Random 3D training patches of a list of cases, a share of them on foreground.

    Item n is training sample number n (see `sample_rng`). It draws a case uniformly, then, with
    probability `foreground_ratio`, one of the classes present in that case uniformly and a random one of
    its stored foreground positions (so a rare small class is found as often as a large one, as in
    nnU-Net), otherwise a uniform patch position. The foreground voxel is the patch's centre, as in
    nnU-Net, or, with `foreground_jitter` j, uniformly within j × the patch around it (1: anywhere): a
    small object (a nodule) always at the centre ties the network's response to the window's centre
    (report.md measures both placements). With j = 0.5 the voxel lies in the patch's central half. Either
    way the patch is shifted so that, on every axis, it lies inside the volume or the volume inside it. So no
    patch is mostly padding, and a volume smaller than the patch is always seen whole (zero-padded, at a
    random offset; a warning says so once). `length` is the number of patches per
    epoch. Only the patch is read from the cache, with the box around it that the transform needs to
    rotate it (`transform.input_size()`, e.g. `build_transform(patch_size=...)`; nnU-Net reads such an
    enlarged patch too).
    """

    def __init__(
        self,
        cases: Sequence[Case],
        patch_size: Sequence[int],
        length: int,
        foreground_ratio: float = 0.33,
        transform: Callable | None = None,
        seed: int = 0,
        foreground_jitter: float = 0.0,
    ):
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.length = length
        self.foreground_ratio = foreground_ratio
        self.foreground_jitter = foreground_jitter
        self.transform = transform
        self.seed = seed
        read_size = transform.input_size() if hasattr(transform, "input_size") else None
        self.read_size = self.patch_size if read_size is None else tuple(read_size)
        small = [c.case_id for c in self.cases if np.any(np.array(c.shape) < self.patch_size)]
        if small:
            warnings.warn(
                f"{len(small)} case(s) smaller than the patch {self.patch_size} are zero-padded "
                f"(e.g. {small[0]})",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return self.length

    def _start(self, case: Case, rng: np.random.Generator) -> np.ndarray:
        """The patch's first voxel, between the volume's and the patch's extents on every axis."""
        patch = np.array(self.patch_size)
        slack = np.array(case.shape) - patch
        low, high = np.minimum(slack, 0), np.maximum(slack, 0)
        classes = case.classes
        if classes and rng.random() < self.foreground_ratio:
            positions = case.foreground(classes[int(rng.integers(len(classes)))])
            voxel = np.asarray(positions[int(rng.integers(len(positions)))])
            offset = patch // 2
            if self.foreground_jitter:
                reach = (self.foreground_jitter * patch / 2).astype(int)
                offset = np.clip(offset + [int(rng.integers(-r, r + 1)) for r in reach], 0, patch - 1)
            return np.clip(voxel - offset, low, high)
        return np.array([int(rng.integers(lo, hi + 1)) for lo, hi in zip(low, high, strict=True)])

    def __getitem__(self, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = sample_rng(self.seed, sample)
        case = self.cases[int(rng.integers(len(self.cases)))]
        start = self._start(case, rng) - (np.array(self.read_size) - self.patch_size) // 2
        image = extract_patch(case.image, start, self.read_size)
        label = extract_patch(case.label, start, self.read_size)
        if self.transform is not None:
            image, label = self.transform(image, label, rng)
        if label.shape != self.patch_size:
            raise ValueError(f"the transform returned {label.shape} patches, not {self.patch_size}")
        return _as_tensors(image, label)


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
