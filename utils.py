"""Metrics, tables, figures and small run helpers shared by the training and inference notebooks.

Metrics work on numpy arrays of one whole volume (or one 2D image); label maps hold integer class
indices with 0 as background, binary masks may be boolean or 0/1.
"""

import csv
import errno
import json
import math
import os
import random
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import imageio.v3 as iio
import numpy as np
import torch
from matplotlib.figure import Figure
from scipy import ndimage

# Outline colours (RGB) for classes 1..4; class c > 4 reuses colour (c - 1) % 4.
# Prediction: warm palette (red, yellow, magenta, orange).
PREDICTION_COLOURS = ((255, 0, 0), (255, 255, 0), (255, 0, 255), (255, 165, 0))
# Truth: cool palette (green, cyan, blue, lime).
TRUTH_COLOURS = ((0, 255, 0), (0, 255, 255), (0, 0, 255), (191, 255, 0))


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def _check_same_shape(pred: np.ndarray, truth: np.ndarray) -> None:
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth must have the same shape, got {pred.shape} and {truth.shape}")


def dice_coefficient(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice similarity coefficient 2|P∩T| / (|P| + |T|) of two binary masks of any shape.

    Rule for empty masks: both empty -> 1.0 (nothing to find, nothing found); exactly one empty
    -> 0.0.
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    _check_same_shape(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def dice_per_class(
    pred_labels: np.ndarray, truth_labels: np.ndarray, classes: Sequence[int]
) -> dict[int, float]:
    """Dice coefficient of each class in `classes`, comparing the masks `labels == class`."""
    pred_labels = np.asarray(pred_labels)
    truth_labels = np.asarray(truth_labels)
    _check_same_shape(pred_labels, truth_labels)
    return {int(c): dice_coefficient(pred_labels == c, truth_labels == c) for c in classes}


def largest_connected_component(labels: np.ndarray, classes: Sequence[int] | None = None) -> np.ndarray:
    """Keep only the largest connected component of each foreground class; the rest becomes 0.

    Connectivity is full (8-neighbourhood in 2D, 26 in 3D), so voxels touching diagonally belong
    to the same component. `classes` defaults to every non-zero value present; classes not listed
    are left untouched. Components are found per class, so touching objects of different classes
    do not merge. On a tie the component met first in C (raster) order wins. A boolean mask is
    treated as class 1 and a boolean mask is returned.
    """
    return keep_large_components(labels, classes, min_fraction=None)


def keep_large_components(
    labels: np.ndarray, classes: Sequence[int] | None = None, min_fraction: float | None = 0.1
) -> np.ndarray:
    """Keep, per class, the components of at least `min_fraction` of that class's largest component.

    min_fraction None keeps the largest component only. A fraction suits targets made of several
    large parts, such as the two lungs, which "largest only" would halve. Same connectivity, class
    handling and boolean behaviour as largest_connected_component.
    """
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return keep_large_components(labels.astype(np.uint8), classes, min_fraction).astype(bool)
    if classes is None:
        classes = [int(c) for c in np.unique(labels) if c != 0]
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    result = labels.copy()
    for c in classes:
        mask = labels == c
        components, count = ndimage.label(mask, structure=structure)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())[1:]
        if min_fraction is None:
            kept = np.zeros(count + 1, bool)
            kept[int(np.argmax(sizes)) + 1] = True
        else:
            kept = np.concatenate([[False], sizes >= min_fraction * sizes.max()])
        result[mask & ~kept[components]] = 0
    return result


POSTPROCESSING = {
    "none": "the network's labels unchanged",
    "largest": "the largest connected component of each class",
    "large": "per class, the components of at least 10% of its largest (e.g. both lungs)",
}


def postprocess(labels: np.ndarray, method: str, classes: Sequence[int]) -> np.ndarray:
    """A label map post-processed by one of POSTPROCESSING's methods (chosen on validation cases)."""
    if method == "none":
        return labels
    if method == "largest":
        return largest_connected_component(labels, classes)
    if method == "large":
        return keep_large_components(labels, classes, 0.1)
    raise ValueError(f"unknown post-processing {method!r}: expected one of {list(POSTPROCESSING)}")


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a mask: voxels with a face-neighbour outside (the image edge counts)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _union_box(first: np.ndarray, second: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of two masks' union, one voxel wider on each side where the image allows.

    Every surface voxel of either mask lies inside it, and the extra voxel keeps each surface what it is
    in the whole image, so distances between surfaces computed within the box are exact. On a real-size
    CT the box of a liver is a few times smaller than the scan, and the work shrinks with it.
    """
    union = first | second
    box = []
    for axis in range(union.ndim):
        present = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(present[0]) - 1, 0), int(present[-1]) + 2))
    return tuple(box)


def hausdorff95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between the surfaces of two binary masks.

    Distances from every surface voxel of each mask to the nearest surface voxel of the other
    are pooled, and their 95th percentile (linear interpolation) is returned, in mm when
    `spacing` gives the voxel size per axis, in voxels when it is None (same definition as
    medpy.metric.binary.hd95). Returns NaN when either mask is empty: the distance is undefined.
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    _check_same_shape(pred, truth)
    if spacing is None:
        spacing = (1.0,) * pred.ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim or any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must hold {pred.ndim} positive voxel sizes (one per axis), got {spacing}")
    if not pred.any() or not truth.any():
        return float("nan")
    box = _union_box(pred, truth)
    pred_surface, truth_surface = _surface(pred[box]), _surface(truth[box])
    distances = np.concatenate(
        [
            surface_distances(pred_surface, truth_surface, spacing),
            surface_distances(truth_surface, pred_surface, spacing),
        ]
    )
    return float(np.percentile(distances, 95, overwrite_input=True))


DISTANCE_CHUNK = 1 << 18  # voxels scanned for points at once


def surface_distances(points: np.ndarray, surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Euclidean distance (spacing units, float32) from each voxel of the mask `points` to the nearest
    voxel of the mask `surface` (same shape), in C order of the points.

    scipy's transform gives the nearest surface voxel of every voxel (int32 indices, 4 bytes per voxel and
    axis); the distances are then computed at the points only, slab by slab, rather than for the whole
    volume (8 more bytes per voxel: 0.8 GB on a 512 x 512 x 400 CT).
    """
    nearest = ndimage.distance_transform_edt(
        ~surface, sampling=spacing, return_distances=False, return_indices=True
    )
    rows = max(1, DISTANCE_CHUNK // math.prod(points.shape[1:]))
    parts = []
    for first in range(0, points.shape[0], rows):
        where = np.nonzero(points[first : first + rows])
        where = (where[0] + first, *where[1:])
        squared = sum(
            ((nearest[axis][where] - index) * step) ** 2
            for axis, (index, step) in enumerate(zip(where, spacing, strict=True))
        )
        parts.append(np.sqrt(squared).astype(np.float32))
    return np.concatenate(parts)


def hd95_penalty(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """The HD95 given to a structure missed or predicted where there is none: the image's diagonal.

    In mm with `spacing`, in voxels without; no distance between two voxels of the image can be larger.
    """
    spacing = (1.0,) * len(shape) if spacing is None else spacing
    return float(math.sqrt(sum((size * step) ** 2 for size, step in zip(shape, spacing, strict=True))))


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided p of a zero mean difference from its bootstrap resamples: twice the smaller tail beyond 0,
    add-one smoothed (never 0 from a finite number of resamples).

    It is below α exactly when 0 lies outside the (1 − α) percentile interval (up to the smoothing).
    """
    differences = np.asarray(differences)
    at_or_below = np.count_nonzero(differences <= 0.0)
    at_or_above = np.count_nonzero(differences >= 0.0)
    return float(min(1.0, 2.0 * (min(at_or_below, at_or_above) + 1) / (differences.size + 1)))


def case_metrics(
    case_id: str,
    pred_labels: np.ndarray,
    truth_labels: np.ndarray,
    class_names: dict[int, str],
    spacing: Sequence[float] | None = None,
    postprocessing: str = "largest",
    postprocessed: np.ndarray | None = None,
) -> dict[str, Any]:
    """One metrics-table row for a case, before and after post-processing (`postprocessed`: the labels
    already post-processed by the caller, who needs them too: a real-size CT is not processed twice).

    Columns, in order: `case`, `dsc_<name>` per class, `dsc_mean` (mean over the classes), then per
    class `hd95_<name>` (mm with `spacing`, voxels without), `missed_<name>` (1 when the class is in the
    truth but not predicted, or predicted but absent from the truth, else 0), `fn_<name>` and `fp_<name>`
    (voxels missed and voxels falsely predicted, as nnU-Net's summary counts them) and `voxels_<name>`
    (voxels in the truth), then the same columns but the truth's voxel count on the post-processed labels
    with suffix `_pp`. A missed class gets the HD95 penalty of `hd95_penalty` (the image diagonal) rather
    than NaN, so that misses count in the mean; a class absent from both gets HD95 0 (and DSC 1). Binary
    tasks pass class_names={1: "tumour"}.
    """
    if not class_names:
        raise ValueError("class_names must name at least one foreground class, e.g. {1: 'tumour'}")
    if 0 in class_names:
        raise ValueError("class_names must list foreground classes only; 0 is the background")
    pred_labels = np.asarray(pred_labels)
    truth_labels = np.asarray(truth_labels)
    _check_same_shape(pred_labels, truth_labels)
    classes = list(class_names)
    penalty = hd95_penalty(truth_labels.shape, spacing)
    row: dict[str, Any] = {"case": case_id}
    if postprocessed is None:
        postprocessed = postprocess(pred_labels, postprocessing, classes)
    else:
        _check_same_shape(np.asarray(postprocessed), truth_labels)
    for suffix, pred in (("", pred_labels), ("_pp", np.asarray(postprocessed))):
        dsc = dice_per_class(pred, truth_labels, classes)
        for c, name in class_names.items():
            row[f"dsc_{name}{suffix}"] = dsc[c]
        row[f"dsc_mean{suffix}"] = float(np.mean(list(dsc.values())))
        for c, name in class_names.items():
            predicted, true = pred == c, truth_labels == c
            if predicted.any() != true.any():
                row[f"hd95_{name}{suffix}"], row[f"missed_{name}{suffix}"] = penalty, 1
            else:
                distance = hausdorff95(predicted, true, spacing) if true.any() else 0.0
                row[f"hd95_{name}{suffix}"], row[f"missed_{name}{suffix}"] = distance, 0
            row[f"fn_{name}{suffix}"] = int(np.count_nonzero(true & ~predicted))
            row[f"fp_{name}{suffix}"] = int(np.count_nonzero(predicted & ~true))
            if not suffix:
                row[f"voxels_{name}"] = int(np.count_nonzero(true))
    return row


def slices_to_volumes(
    case_ids: Sequence[str], slice_indices: Sequence[int], slices: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
    """Regroup per-slice 2D arrays into one (D, H, W) volume per case, ordered by slice index.

    Input may come in any order and interleave cases. Each case must hold exactly the slice
    indices 0..D-1 (volume[d] is slice d); a duplicate or missing index raises ValueError.
    Cases keep the order in which they first appear.
    """
    if not len(case_ids) == len(slice_indices) == len(slices):
        raise ValueError(
            "case_ids, slice_indices and slices must have the same length, got "
            f"{len(case_ids)}, {len(slice_indices)} and {len(slices)}"
        )
    by_case: dict[str, dict[int, np.ndarray]] = {}
    for case_id, index, image in zip(case_ids, slice_indices, slices, strict=True):
        case_slices = by_case.setdefault(case_id, {})
        index = int(index)
        if index in case_slices:
            raise ValueError(f"case {case_id!r}: slice index {index} appears more than once")
        case_slices[index] = np.asarray(image)
    volumes = {}
    for case_id, case_slices in by_case.items():
        missing = sorted(set(range(len(case_slices))) - set(case_slices))
        if missing:
            raise ValueError(
                f"case {case_id!r}: slice indices must be 0..{len(case_slices) - 1}, missing {missing}"
            )
        shapes = {image.shape for image in case_slices.values()}
        if len(shapes) > 1:
            raise ValueError(f"case {case_id!r}: slices differ in shape: {sorted(shapes)}")
        volumes[case_id] = np.stack([case_slices[d] for d in range(len(case_slices))])
    return volumes


# ----------------------------------------------------------------------------------------------
# Tables and figures
# ----------------------------------------------------------------------------------------------


def _csv_columns(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    if "case" in columns:
        columns.remove("case")
        columns.insert(0, "case")
    return columns


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return f"{float(value):.4f}"
    return value


def write_metrics_csv(rows: list[dict], path: str | Path) -> Path:
    """Write one row per case to a CSV file, atomically (an interrupted evaluation leaves no half
    table); returns the path.

    Columns follow the key order of the rows (keys first seen in later rows are appended),
    with `case` first; floats are written with 4 decimals (NaN as `nan`), missing cells empty.
    """
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    columns = _csv_columns(rows)

    def write(file: IO) -> None:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_cell(value) for key, value in row.items()})

    return _write_atomic(path, "w", write, newline="")


def read_metrics_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read a table written by write_metrics_csv: `case` stays text, numeric cells become floats."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics table not found: {path}")
    rows = []
    with path.open(newline="") as file:
        for record in csv.DictReader(file):
            row: dict[str, Any] = {}
            for key, text in record.items():
                try:
                    row[key] = text if key == "case" else float(text)
                except ValueError:
                    row[key] = text
            rows.append(row)
    return rows


def markdown_table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    """Rows as a GitHub markdown table (floats with 4 decimals), for notebooks and the report."""
    columns = list(columns) if columns is not None else _csv_columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wrap_title(title: str, width: int = 75) -> str:
    """A title's lines wrapped to fit a 7-inch figure (long run names break after their hyphens)."""
    return "\n".join("\n".join(textwrap.wrap(line, width)) for line in title.splitlines())


def plot_dsc(rows: list[dict], path: str | Path, column: str = "dsc_mean", title: str | None = None) -> Path:
    """Horizontal bar chart of one metric per case, sorted so the worst case is at the bottom.

    Vertical lines mark the mean and the median (values in the legend, below the plot); NaN values
    are left out of both. The figure grows with the number of cases. Drawn on a standalone Agg
    figure, so it never changes the pyplot backend of a notebook. Returns the path.
    """
    if not rows:
        raise ValueError(f"no rows to plot into {path}")
    missing = [row.get("case", i) for i, row in enumerate(rows) if column not in row]
    if missing:
        raise ValueError(f"column {column!r} missing for cases {missing}")
    ranked = sorted(
        ((str(row.get("case", i)), float(row[column])) for i, row in enumerate(rows)),
        key=lambda item: -math.inf if math.isnan(item[1]) else item[1],
    )
    names = [name for name, _ in ranked]
    values = np.array([value for _, value in ranked])
    mean = float(np.nanmean(values)) if not np.isnan(values).all() else math.nan
    median = float(np.nanmedian(values)) if not np.isnan(values).all() else math.nan

    figure = Figure(figsize=(7.0, max(3.0, 0.28 * len(rows) + 1.2)), layout="constrained")
    axes = figure.subplots()
    positions = np.arange(len(rows))
    axes.barh(positions, np.nan_to_num(values), color="tab:blue", height=0.7)
    axes.axvline(mean, color="tab:red", linewidth=2, label=f"mean = {mean:.4f}")
    axes.axvline(median, color="tab:green", linewidth=2, label=f"median = {median:.4f}")
    axes.set_yticks(positions, names, fontsize=8)
    axes.set_ylim(-0.6, len(rows) - 0.4)
    if column.startswith("dsc"):
        axes.set_xlim(0.0, 1.0)
    axes.set_xlabel(column)
    figure.suptitle(wrap_title(title if title is not None else f"{column} per case"))  # centred on the figure
    figure.legend(loc="outside lower center", ncols=2)  # below the axes: inside, it hides the worst bars
    axes.grid(axis="x", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def plot_history(history: list[dict], path: str | Path) -> Path:
    """Training curves of a run: train and validation loss, and validation mean DSC, per epoch."""
    if not history:
        raise ValueError(f"no epochs to plot into {path}")
    epochs = [entry["epoch"] for entry in history]
    figure = Figure(figsize=(10.0, 3.5), layout="constrained")
    loss_axes, dsc_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [entry["train_loss"] for entry in history], label="train")
    loss_axes.plot(epochs, [entry["val_loss"] for entry in history], label="validation")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("loss")
    loss_axes.legend()
    dsc_axes.plot(epochs, [entry["val_mean_dsc"] for entry in history], color="tab:green")
    dsc_axes.set_xlabel("epoch")
    dsc_axes.set_ylabel("validation mean DSC (per volume)")
    dsc_axes.set_ylim(0.0, 1.0)
    for axes in (loss_axes, dsc_axes):
        axes.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def radiological_view(
    direction: Sequence[float] | None,
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How to show a (D, H, W) array of a scan in the standard radiological orientation.

    `direction` is ITK's row-major 3x3 direction matrix (None: the array is already so oriented, e.g.
    kaggle_3m slices). Returns the array axes to put first (the one nearest the patient's foot-to-head
    axis: axial slices), then as rows (front to back: anterior at the top) and as columns (patient's
    right to left: the patient's right on the viewer's left), and whether to reverse each so that
    slices run from foot to head, rows front to back and columns right to left (ITK's LPS axes).
    """
    if direction is None:
        return (0, 1, 2), (False, False, False)
    matrix = np.array(direction, np.float64).reshape(3, 3)
    physical_of_array = [matrix[:, 2 - axis] for axis in range(3)]  # array axis a is ITK index axis 2 - a
    order, flips = [], []
    for physical in (2, 1, 0):  # head-foot (z), front-back (y), right-left (x)
        axis = max((a for a in range(3) if a not in order), key=lambda a: abs(physical_of_array[a][physical]))
        order.append(axis)
        flips.append(bool(physical_of_array[axis][physical] < 0))
    return tuple(order), tuple(flips)


def to_view(array: np.ndarray, view: tuple[tuple[int, ...], tuple[bool, ...]]) -> np.ndarray:
    """A (D, H, W) array transposed and flipped as `radiological_view` says."""
    order, flips = view
    array = np.transpose(array, order)
    return array[tuple(slice(None, None, -1) if flip else slice(None) for flip in flips)]


def _outline(mask: np.ndarray) -> np.ndarray:
    """Inner boundary (1 px) of a 2D mask: mask pixels with a 4-neighbour outside or at the edge."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _draw_outlines(image: np.ndarray, labels: np.ndarray, palette: Sequence[tuple[int, int, int]]) -> None:
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    for c in np.unique(labels):
        if c <= 0:
            continue
        image[_outline(labels == c)] = palette[(int(c) - 1) % len(palette)]


def overlay(
    gray: np.ndarray,
    pred: np.ndarray,
    truth: np.ndarray | None = None,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """RGB uint8 (H, W, 3) picture of a 2D image with outlines of prediction and truth.

    The grey image is scaled linearly from [vmin, vmax] (default: its own 1st and 99th
    percentiles) to [0, 255] and clipped. Outlines are the inner 1-pixel boundaries of each
    class. Binary masks: prediction red, truth green. Label maps: prediction class 1..4 red,
    yellow, magenta, orange; truth class 1..4 green, cyan, blue, lime (higher classes cycle).
    Truth is drawn first, so where outlines coincide the prediction colour shows.
    """
    gray = np.asarray(gray, dtype=np.float64)
    if gray.ndim != 2:
        raise ValueError(f"gray must be a 2D (H, W) image, got shape {gray.shape}")
    pred = np.asarray(pred)
    _check_same_shape(pred, gray)
    if vmin is None:
        vmin = float(np.percentile(gray, 1))
    if vmax is None:
        vmax = float(np.percentile(gray, 99))
    span = vmax - vmin
    scaled = np.clip((gray - vmin) / span, 0.0, 1.0) if span > 0 else np.zeros_like(gray)
    image = np.repeat(np.round(scaled * 255).astype(np.uint8)[..., None], 3, axis=-1)
    if truth is not None:
        truth = np.asarray(truth)
        _check_same_shape(truth, gray)
        _draw_outlines(image, truth, TRUTH_COLOURS)
    _draw_outlines(image, pred, PREDICTION_COLOURS)
    return image


def _with_position_bar(frame: np.ndarray, index: int, count: int) -> np.ndarray:
    """A copy of a GIF frame with a white bar on its bottom row, (index + 1) / count of its width."""
    marked = frame.copy()
    marked[-1, : max(1, round(frame.shape[1] * (index + 1) / count))] = 255
    return marked


def save_case_figures(
    case_id: str,
    gray_volume: np.ndarray,
    pred: np.ndarray,
    truth: np.ndarray | None = None,
    *,
    out_dir: str | Path,
    slice_names: Sequence[str] | None = None,
    fps: float = 5,
) -> list[Path]:
    """Write one overlay PNG per slice and an animated GIF sweeping through the volume.

    Files: `out_dir/<case_id>-<slice_name>.png` (slice_name defaults to the 1-based slice index)
    and `out_dir/<case_id>.gif` (one frame per slice at `fps`, looping forever). Every frame
    uses the same grey scaling, the volume's 1st-99th percentiles, and carries a white bar along
    its bottom row whose length shows the slice's position in the volume; the bar also keeps
    frames distinct, since Pillow's GIF writer merges identical consecutive frames. Returns the
    PNG paths in slice order, then the GIF.
    """
    gray_volume = np.asarray(gray_volume)
    if not np.issubdtype(gray_volume.dtype, np.floating):
        gray_volume = gray_volume.astype(np.float32)
    if gray_volume.ndim != 3:
        raise ValueError(
            f"gray_volume must be (D, H, W), got shape {gray_volume.shape}; "
            "pick one channel of a (C, D, H, W) image first"
        )
    pred = np.asarray(pred)
    _check_same_shape(pred, gray_volume)
    if truth is not None:
        truth = np.asarray(truth)
        _check_same_shape(truth, gray_volume)
    depth = gray_volume.shape[0]
    if slice_names is None:
        slice_names = [str(d + 1) for d in range(depth)]
    if len(slice_names) != depth:
        raise ValueError(f"slice_names must hold {depth} names (one per slice), got {len(slice_names)}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vmin, vmax = (float(v) for v in np.percentile(gray_volume, [1, 99]))
    paths = []
    gif_path = out_dir / f"{case_id}.gif"
    with iio.imopen(gif_path, "w", extension=".gif") as gif:  # frames added one at a time, not stacked
        for d in range(depth):
            truth_slice = None if truth is None else truth[d]
            frame = overlay(gray_volume[d], pred[d], truth_slice, vmin=vmin, vmax=vmax)
            png_path = out_dir / f"{case_id}-{slice_names[d]}.png"
            iio.imwrite(png_path, frame)
            gif.write(_with_position_bar(frame, d, depth), is_batch=False, duration=1000.0 / fps, loop=0)
            paths.append(png_path)
    paths.append(gif_path)
    return paths


# ----------------------------------------------------------------------------------------------
# Run helpers
# ----------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's random, numpy and torch (all CUDA devices too) for repeatable runs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def select_device(name: str = "auto") -> torch.device:
    """`auto` -> CUDA when available, else CPU; otherwise the named device, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device {name!r} is not a torch device name ({error})") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available here")
    return device


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once, at import: setting it is process-wide, so not from worker threads


def _write_atomic(
    path: str | Path, mode: str, write: Callable[[IO], None], newline: str | None = None
) -> Path:
    """Write via a temporary file in the same folder, then os.replace it onto `path`.

    The replace is atomic, so readers see either the old file or the complete new one; on error
    the temporary file is removed and an existing file is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, mode, newline=newline) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~UMASK)  # mkstemp makes it private; a run folder may be shared
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if _disk_full(error, path.parent):
            raise OSError(errno.ENOSPC, f"No space left on the disk while writing {path}") from error
        raise
    return path


def _disk_full(error: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of disk space (torch.save reports it as 'unexpected pos ...')."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return isinstance(error, RuntimeError) and shutil.disk_usage(folder).free < 1 << 20


def save_checkpoint_atomic(state: Any, path: str | Path) -> Path:
    """torch.save `state` (a state_dict or any picklable object) atomically; returns the path."""
    return _write_atomic(path, "wb", lambda file: torch.save(state, file))


def write_json_atomic(obj: Any, path: str | Path) -> Path:
    """Write `obj` as indented JSON atomically; returns the path."""
    return _write_atomic(path, "w", lambda file: json.dump(obj, file, indent=2))
