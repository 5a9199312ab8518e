"""Synthetic stand-in datasets, written in the exact layout of the real public ones.

The data made here is synthetic: no real patient is in it. `make_kaggle_3m` writes a stand-in for the
Kaggle "LGG MRI segmentation" set, folder kaggle_3m (Buda et al. 2019, Computers in Biology and
Medicine; Mazurowski et al. 2017, Journal of Neuro-Oncology), so the demo and the tests can train
without downloading anything. It copies that set's layout: one TCGA_<site>_<number>_<date> folder per
patient holding <patient>_<k>.tif (RGB uint8) and <patient>_<k>_mask.tif (0/255 uint8) for k = 1..n,
and a data.csv with a made-up clinical row per patient beside the folders.

What it simulates, per patient: a volume of axial slices from the top of the head down whose three
channels are co-registered pre-contrast, FLAIR and post-contrast sequences; a head that grows and
shrinks over the volume, with a bright scalp, a dark skull and grey/white-matter-like brain texture;
dark ventricles in the middle slices; per-patient gain, smooth bias field and noise level (noise on a
magnitude image, so the background is a dark speckle); one irregular lower-grade-glioma-like blob,
FLAIR-hyperintense by a per-patient amount from subtle to strong, over several adjacent slices but never
the first or last, sometimes ring-enhancing, sometimes against the skull; and FLAIR-bright structures
that are not tumour (scalp, periventricular rims, small white-matter spots), so that no FLAIR threshold
segments it. Most slices have no tumour, as in the real set.

`make_luna` writes a LUNA16 stand-in (Setio et al. 2017, Medical Image Analysis): real-sized chest
CT scans (about 300 x 350 x 350 mm, litres of lung) as subset0/<uid>.mhd + .raw (int16 HU) with
seg-lungs-LUNA16/<uid>.mhd + .zraw lung masks (3 and 4 the lungs, 5 the airways), lung nodules
listed in annotations.csv and the findings the LUNA16 evaluation ignores in annotations_excluded.csv
(world mm, as the real files), with vessel-like decoys and calcified granulomas beside them.
`make_decathlon` writes a Medical Segmentation Decathlon Task04 Hippocampus stand-in (Simpson et al.
2019): small T1-like MRI crops in imagesTr/labelsTr/imagesTs with a dataset.json, labels 1 anterior
and 2 posterior, stored dtypes mixed as in the real set. `make_lits` writes a LiTS stand-in (Bilic et
al. 2023, Medical Image Analysis): abdominal CT volume-<N>.nii with segmentation-<N>.nii (1 liver, 2
tumour), 512 x 512 x 100-400 by default, so only on request.

Generate from the command line with `python synthetic.py kaggle_3m --out data --patients 20 --seed 0`,
`python synthetic.py luna --out data --cases 50`, `python synthetic.py msd --out data --cases 6` or
`python synthetic.py lits --out data --cases 2` (about 300 MB and 15-25 s per case).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from volumes import LUNA_MASK_FOLDER, LUNA_TRACHEA_LABEL, Geometry, write_volume

KAGGLE_3M_FOLDER = "kaggle_3m"
SITE_CODES = ("CS", "DU", "EZ", "FG", "HT")

# Radii in the head frame, where the head outline is the unit circle.
BRAIN_RADIUS = 0.83
CSF_SHELL_RADIUS = 0.86
SKULL_RADIUS = 0.915
LAYER_EDGES = (BRAIN_RADIUS, CSF_SHELL_RADIUS, SKULL_RADIUS, 1.0)

# Tissue intensities (pre-contrast, FLAIR, post-contrast) on a 0..1 scale, before gain, bias and noise.
WHITE_MATTER = np.array([0.50, 0.40, 0.52], dtype=np.float32)
GREY_MATTER = np.array([0.38, 0.52, 0.40], dtype=np.float32)
CSF = np.array([0.10, 0.07, 0.12], dtype=np.float32)
BONE = np.array([0.08, 0.10, 0.10], dtype=np.float32)

MIN_SLICES = 6
MAX_TUMOUR_REACH = 1.8  # largest noisy radius of the tumour, in units of its mean radius
MIN_IMAGE_SIZE = 32


def _soft_step(x: np.ndarray) -> np.ndarray:
    """Smooth 0-to-1 step over -3 < x < 3 with slope 1/4 at 0, like a sigmoid but cheaper."""
    t = np.minimum(np.maximum(0.5 + x / 6.0, 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


def _bump(x: np.ndarray) -> np.ndarray:
    """Smooth bump, 1 at x = 0 and 0 for |x| >= 1, a cheap stand-in for a Gaussian profile."""
    return np.maximum(1.0 - x * x, 0.0) ** 2


def _bump_basis(length: int, cells: int) -> np.ndarray:
    """(length, cells + 2) weights of Gaussian bumps spaced evenly over an axis and one beyond each end.

    Rows have unit norm, so a field built from independent unit-normal weights has unit variance.
    """
    spacing = length / cells
    centres = (np.arange(-1, cells + 1) + 0.5) * spacing - 0.5
    positions = np.arange(length)[:, None]
    basis = np.exp(-0.5 * ((positions - centres) / (0.7 * spacing)) ** 2)
    basis[basis < 1e-6] = 0.0  # far tails would be float32 denormals, which make matmul crawl
    return (basis / np.linalg.norm(basis, axis=1, keepdims=True)).astype(np.float32)


def _matmul_in_blocks(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """left @ right computed in row blocks small enough that OpenBLAS keeps each on one thread.

    OpenBLAS threads a matrix product once rows * columns * inner > 4 * 65536; on a busy machine its
    spinning threads made one such product 10-100x slower than single-threaded blocks.
    """
    rows_per_block = max(1, 4 * 65536 // max(1, right.shape[0] * right.shape[1]))
    out = np.empty((left.shape[0], right.shape[1]), dtype=np.result_type(left, right))
    for start in range(0, left.shape[0], rows_per_block):
        np.matmul(left[start : start + rows_per_block], right, out=out[start : start + rows_per_block])
    return out


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: tuple[int, ...]) -> np.ndarray:
    """Smooth random field of unit variance with about `cells` features along each axis (2D or more).

    A sum of Gaussian bumps on a coarse grid with random weights, built axis by axis with matrix
    products (leading axes first, while the array is still small): smooth like a spline-upsampled
    noise image but much faster than ndimage.zoom at order 3. The last axis ends up contiguous.
    """
    if len(shape) < 2 or len(cells) != len(shape):
        raise ValueError(f"shape and cells must have the same length >= 2, got {shape} and {cells}")
    bases = [_bump_basis(length, count) for length, count in zip(shape, cells, strict=True)]
    field = rng.standard_normal([c + 2 for c in cells], dtype=np.float32)
    for axis, basis in enumerate(bases):
        moved = np.moveaxis(field, axis, -1)
        product = _matmul_in_blocks(moved.reshape(-1, moved.shape[-1]), np.ascontiguousarray(basis.T))
        field = np.moveaxis(product.reshape(*moved.shape[:-1], len(basis)), -1, axis)
    return np.ascontiguousarray(field)


class _Head:
    """Per-slice head geometry on the bounding box of the head, where all the rendering happens.

    X (left-right) and Y (front-back) are head-frame coordinates of every box pixel, in which the head
    outline is the unit circle. The head size follows a smooth profile over the slices (small at the top
    of the head and at the base of the volume) with per-patient shape, tilt and position jitter, and a
    slightly irregular outline (radius).
    """

    def __init__(self, rng: np.random.Generator, n_slices: int, size: int) -> None:
        self.n_slices, self.size = n_slices, size
        self.z = np.linspace(0.0, 1.0, n_slices)
        top_scale, widest_at = rng.uniform(0.32, 0.45), rng.uniform(0.48, 0.56)
        half_height = widest_at / math.sqrt(1.0 - top_scale**2)
        scale = np.sqrt(np.clip(1.0 - ((self.z - widest_at) / half_height) ** 2, 0.05, None))
        half_width = rng.uniform(0.60, 0.70)
        half_length = min(half_width * rng.uniform(1.15, 1.3), 0.9)
        self.half_width = half_width * scale * size / 2
        self.half_length = half_length * scale * size / 2
        drift = self.z - 0.5
        self.centre_column = (1.0 + rng.uniform(-0.05, 0.05) + rng.uniform(-0.04, 0.04) * drift) * size / 2
        self.centre_row = (1.0 + rng.uniform(-0.06, 0.04) + rng.uniform(-0.04, 0.04) * drift) * size / 2
        self.tilt = rng.uniform(-0.12, 0.12)
        cos, sin = math.cos(self.tilt), math.sin(self.tilt)

        reach_x = 1.15 * np.hypot(self.half_width * cos, self.half_length * sin)
        reach_y = 1.15 * np.hypot(self.half_width * sin, self.half_length * cos)
        self.rows = self._span(self.centre_row - reach_y, self.centre_row + reach_y)
        self.columns = self._span(self.centre_column - reach_x, self.centre_column + reach_x)
        self.row_pixels = np.arange(self.rows.start, self.rows.stop, dtype=np.float32)
        self.column_pixels = np.arange(self.columns.start, self.columns.stop, dtype=np.float32)
        self.shape = (n_slices, len(self.row_pixels), len(self.column_pixels))

        dx = self.column_pixels[None, None, :] - self.centre_column[:, None, None].astype(np.float32)
        dy = self.row_pixels[None, :, None] - self.centre_row[:, None, None].astype(np.float32)
        self.X = (dx * cos + dy * sin) / self.half_width[:, None, None].astype(np.float32)
        self.Y = (dy * cos - dx * sin) / self.half_length[:, None, None].astype(np.float32)
        outline = self.noise(rng, max(2, n_slices // 6), 5)
        self.radius = np.sqrt(self.X**2 + self.Y**2) * (1.0 + 0.025 * outline)

    def _span(self, low: np.ndarray, high: np.ndarray) -> slice:
        return slice(max(0, int(low.min()) - 2), min(self.size, int(math.ceil(high.max())) + 3))

    def noise(self, rng: np.random.Generator, cells_z: int, cells_across_image: float) -> np.ndarray:
        """smooth_noise on the box, with a feature size set relative to the whole image."""
        cells = [max(2, round(cells_across_image * length / self.size)) for length in self.shape[1:]]
        return smooth_noise(rng, self.shape, (cells_z, *cells))

    def _at(self, values: np.ndarray, slice_index: float) -> float:
        return float(np.interp(slice_index, np.arange(self.n_slices), values))

    def to_pixels(self, slice_index: float, x: float, y: float) -> tuple[float, float]:
        """Image pixel (column, row) of head-frame point (x, y) on a (fractional) slice."""
        u, v = x * self._at(self.half_width, slice_index), y * self._at(self.half_length, slice_index)
        cos, sin = math.cos(self.tilt), math.sin(self.tilt)
        return (
            self._at(self.centre_column, slice_index) + u * cos - v * sin,
            self._at(self.centre_row, slice_index) + u * sin + v * cos,
        )

    def brain_half_axes(self, slice_index: float) -> tuple[float, float]:
        """Half axes of the brain ellipse in pixels on a (fractional) slice."""
        return (
            BRAIN_RADIUS * self._at(self.half_width, slice_index),
            BRAIN_RADIUS * self._at(self.half_length, slice_index),
        )


def _ventricles(rng: np.random.Generator, head: _Head, texture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Soft lateral-ventricle map (dark CSF, middle slices) and the periventricular rim around it."""
    middle, half_span = rng.uniform(0.40, 0.55), rng.uniform(0.15, 0.22)
    extent = np.sqrt(np.clip(1.0 - ((head.z - middle) / half_span) ** 2, 0.0, 1.0))
    size_factor = rng.uniform(0.8, 1.3)
    ventricles = np.zeros(head.shape, dtype=np.float32)
    rim = np.zeros(head.shape, dtype=np.float32)
    for index in np.flatnonzero(extent > 0.05):
        distance = np.full(head.shape[1:], np.inf, dtype=np.float32)
        for side in (-1.0, 1.0):
            cos, sin = math.cos(-side * 0.15), math.sin(-side * 0.15)
            x, y = head.X[index] - side * 0.1 * size_factor, head.Y[index] + 0.03
            across = (x * cos + y * sin) / (0.075 * size_factor * extent[index])
            along = (y * cos - x * sin) / (0.36 * size_factor * extent[index])
            distance = np.minimum(distance, across**2 + along**2)
        distance = np.sqrt(distance) * (1.0 + 0.12 * texture[index])
        ventricles[index] = _soft_step((1.0 - distance) / 0.06)
        rim[index] = _bump((distance - 1.35) / 0.35) * (0.4 + 0.6 * _soft_step(2.0 * texture[index]))
    return ventricles, rim


def _white_matter_spots(rng: np.random.Generator, head: _Head) -> np.ndarray:
    """A few small FLAIR-bright spots (white-matter-hyperintensity-like), one or two slices thick."""
    spots = np.zeros(head.shape, dtype=np.float32)
    for _ in range(int(rng.integers(1, 7))):
        first = int(rng.integers(1, head.n_slices - 1))
        angle, distance = rng.uniform(0, 2 * math.pi), BRAIN_RADIUS * rng.uniform(0.2, 0.8)
        x, y = distance * math.cos(angle), distance * math.sin(angle)
        radius_pixels = rng.uniform(1.5, 4.0) * head.size / 256 + 0.7
        brightness = rng.uniform(0.15, 0.4)
        for index in range(first, min(first + int(rng.integers(1, 3)), head.n_slices)):
            radius = radius_pixels / head.half_width[index]
            squared = (head.X[index] - x) ** 2 + (head.Y[index] - y) ** 2
            spots[index] += brightness * _bump(np.sqrt(squared) / (2.5 * radius))
    return spots


def _crop(centre: float, reach: float, length: int) -> slice:
    """Indices within reach of centre, clipped to 0..length."""
    return slice(max(0, int(centre - reach)), min(length, int(math.ceil(centre + reach)) + 1))


def _tumour_blob(rng: np.random.Generator, head: _Head, brain: np.ndarray) -> np.ndarray:
    """One irregular 3D blob (an ellipsoid whose radius is perturbed by smooth noise) inside the brain.

    It spans a run of adjacent slices that never includes the first or last slice and covers at most
    half of them; its largest cross-section is about 4-25% of the brain area on that slice, and about
    one patient in three has it against the skull. Returned on the head box, like brain.
    """
    n = head.n_slices
    most = min(12, n // 2)
    fewest = min(max(4, round(0.25 * n)), most)
    for _ in range(20):
        n_tumour = int(rng.integers(fewest, most + 1))
        first = int(rng.integers(1, n - n_tumour))
        centre_slice = first + (n_tumour - 1) / 2
        half_x, half_y = head.brain_half_axes(centre_slice)
        area_fraction = math.exp(rng.uniform(math.log(0.04), math.log(0.25)))
        mean_radius = math.sqrt(area_fraction * half_x * half_y)
        radius_in_head = BRAIN_RADIUS * math.sqrt(area_fraction)
        if rng.random() < 0.35:
            distance = BRAIN_RADIUS - 0.6 * radius_in_head
        else:
            distance = rng.uniform(0.0, max(0.0, BRAIN_RADIUS - 1.2 * radius_in_head))
        angle = rng.uniform(0, 2 * math.pi)
        column, row = head.to_pixels(centre_slice, distance * math.cos(angle), distance * math.sin(angle))

        aspect, orientation = rng.uniform(0.65, 1.0), rng.uniform(0, math.pi)
        radius_a, radius_b = mean_radius / math.sqrt(aspect), mean_radius * math.sqrt(aspect)
        reach_pixels = MAX_TUMOUR_REACH * radius_a + 2
        rows = _crop(row - head.rows.start, reach_pixels, head.shape[1])
        columns = _crop(column - head.columns.start, reach_pixels, head.shape[2])
        dx = head.column_pixels[None, columns] - np.float32(column)
        dy = head.row_pixels[rows, None] - np.float32(row)
        along_a = dx * math.cos(orientation) + dy * math.sin(orientation)
        along_b = dy * math.cos(orientation) - dx * math.sin(orientation)
        in_plane = np.sqrt((along_a / radius_a) ** 2 + (along_b / radius_b) ** 2)

        slices = slice(first, first + n_tumour)
        local_shape = (n_tumour, *in_plane.shape)
        features = [max(2, round(length / (0.7 * mean_radius))) for length in in_plane.shape]
        cells_z = max(2, n_tumour // 2)
        wobble = 0.8 * smooth_noise(rng, local_shape, (cells_z, *features))
        wobble += 0.4 * smooth_noise(rng, local_shape, (cells_z, *[2 * f for f in features]))
        reach = np.clip(1.0 + rng.uniform(0.15, 0.3) * wobble, 0.35, MAX_TUMOUR_REACH)
        envelope = np.sqrt(1.0 - ((np.arange(first, first + n_tumour) - centre_slice) / (n_tumour / 2)) ** 2)
        reach *= envelope.astype(np.float32)[:, None, None]

        labels, count = ndimage.label((in_plane[None] < reach) & brain[slices, rows, columns])
        if count == 0:
            continue
        largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        blob = np.zeros(brain.shape, dtype=bool)
        blob[slices, rows, columns] = labels == largest
        if np.count_nonzero(blob.any(axis=(1, 2))) >= 2:
            return blob
    raise RuntimeError("could not place a tumour inside the brain; is image_size too small?")


def render_patient(
    rng: np.random.Generator, n_slices: int, size: int
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """One synthetic patient: images (D, H, W, 3) uint8, masks (D, H, W) uint8 in {0, 255}, facts.

    The facts are the numbers the clinical table draws on (tumour side, FLAIR contrast). Everything
    but the background noise is rendered on the head's bounding box, one channel at a time as
    (D, H, W) arrays, which numpy handles much faster than channel-last ones.
    """
    head = _Head(rng, n_slices, size)
    coarse = head.noise(rng, max(2, n_slices // 4), 8)
    fine = head.noise(rng, max(2, n_slices // 3), 20)
    brain_radius = head.radius / BRAIN_RADIUS

    gyri = head.noise(rng, max(2, n_slices // 2), 32)
    cortex = _soft_step((brain_radius - 0.78 - 0.04 * coarse - 0.08 * gyri) / 0.03)
    deep_grey = _soft_step((-coarse - 1.1) / 0.2) * _soft_step((0.6 - brain_radius) / 0.05)
    grey = np.maximum(cortex, deep_grey)
    sulci = _soft_step((gyri - 0.8) / 0.15) * _soft_step((brain_radius - 0.84) / 0.03)
    ventricles, rim = _ventricles(rng, head, fine)
    midline_length = np.where(ventricles.max(axis=(1, 2), keepdims=True) > 0.5, 0.45, 0.0)
    fissure = _bump(head.X / 0.035) * _soft_step((np.abs(head.Y) - midline_length) / 0.04)
    csf = np.clip(ventricles + sulci + fissure, 0.0, 1.0)
    texture = (1.0 + 0.04 * fine) * (1.0 - csf)
    flair_extras = (1.0 - ventricles) * (rng.uniform(0.05, 0.3) * rim + _white_matter_spots(rng, head))

    blob = _tumour_blob(rng, head, head.radius < BRAIN_RADIUS)
    tumour_slices = np.flatnonzero(blob.any(axis=(1, 2)))
    span = slice(int(tumour_slices[0]), int(tumour_slices[-1]) + 1)
    tumour = ndimage.gaussian_filter(blob[span].astype(np.float32), sigma=(0, 1.2, 1.2))
    tumour_texture = 1.0 + 0.12 * fine[span]
    flair_contrast = 0.08 + 0.37 * rng.beta(1.5, 1.5)
    tumour_value = WHITE_MATTER + np.array(
        [-rng.uniform(0.0, 0.12), flair_contrast, rng.uniform(-0.02, 0.05)], dtype=np.float32
    )
    enhancement = rng.uniform(0.15, 0.35) if rng.random() < 0.3 else 0.0

    scalp = np.array([0.78, rng.uniform(0.5, 0.68), 0.80], dtype=np.float32)
    scalp_texture = 1.0 + 0.08 * coarse
    layer = sum((head.radius >= edge).astype(np.uint8) for edge in LAYER_EDGES)
    channels = np.empty((3, *head.shape), dtype=np.float32)
    for k in range(3):
        value = (WHITE_MATTER[k] + (GREY_MATTER[k] - WHITE_MATTER[k]) * grey) * texture + CSF[k] * csf
        if k == 1:
            value += flair_extras
        value[span] += tumour * (tumour_value[k] * tumour_texture - value[span])
        if k == 2 and enhancement:
            halo = ndimage.gaussian_filter(blob[span].astype(np.float32), sigma=(0, 2.0, 2.0))
            value[span] += enhancement * 4.0 * halo * (1.0 - halo)
        outside_brain = np.array([0.0, CSF[k], BONE[k], 0.0, 0.0], dtype=np.float32)[layer]
        value = np.where(layer == 0, value, outside_brain)
        channels[k] = np.where(layer == 3, scalp[k] * scalp_texture, value)

    channels = ndimage.gaussian_filter(channels, sigma=(0, 0, 0.6, 0.6), truncate=2.0)
    bias = 1.0 + rng.uniform(0.05, 0.18) * head.noise(rng, 2, 3)
    gain = rng.uniform(0.85, 1.15) * rng.uniform(0.85, 1.15, size=3)
    noise_level = rng.uniform(0.012, 0.04)
    full = np.zeros((3, n_slices, size, size), dtype=np.float32)
    for k in range(3):
        full[k, :, head.rows, head.columns] = channels[k] * bias * np.float32(gain[k] * 255.0)
    full += np.float32(noise_level * 255.0) * rng.standard_normal(full.shape, dtype=np.float32)
    np.abs(full, out=full)
    quantised = np.minimum(np.rint(full), 255).astype(np.uint8)
    images = np.ascontiguousarray(np.moveaxis(quantised, 0, -1))
    masks = np.zeros((n_slices, size, size), dtype=np.uint8)
    masks[:, head.rows, head.columns] = blob.astype(np.uint8) * 255

    facts = {
        "tumour_column": float(np.nonzero(masks)[2].mean()),
        "flair_contrast": float(flair_contrast),
    }
    return images, masks, facts


def _patient_ids(rng: np.random.Generator, n_patients: int) -> list[str]:
    """Unique TCGA-style ids: site code, 4-digit number and a plausible scan date."""
    first_day = datetime.date(1995, 1, 1).toordinal()
    last_day = datetime.date(2005, 12, 31).toordinal()
    ids: list[str] = []
    numbers: set[int] = set()
    while len(ids) < n_patients:
        number = int(rng.integers(1000, 10000))
        site = SITE_CODES[int(rng.integers(len(SITE_CODES)))]
        day = datetime.date.fromordinal(int(rng.integers(first_day, last_day + 1)))
        if number not in numbers:
            numbers.add(number)
            ids.append(f"TCGA_{site}_{number:04d}_{day:%Y%m%d}")
    return ids


def _clinical_row(rng: np.random.Generator, patient_id: str, size: int, facts: dict) -> dict:
    """A made-up clinical row in the style of the real data.csv (Patient is the id without the date)."""
    return {
        "Patient": patient_id.rsplit("_", 1)[0],
        "histological_type": int(rng.integers(1, 4)),
        "neoplasm_histologic_grade": 2 if facts["flair_contrast"] > 0.25 else 1,
        "laterality": "left" if facts["tumour_column"] >= size / 2 else "right",
        "gender": int(rng.integers(1, 3)),
        "age_at_initial_pathologic": int(rng.integers(20, 76)),
        "death01": int(rng.random() < 0.3),
    }


def _validate(n_patients: int, slices_per_patient: tuple[int, int], image_size: int) -> None:
    if not isinstance(n_patients, int) or n_patients < 1:
        raise ValueError(f"n_patients must be a positive integer, got {n_patients!r}")
    if (
        len(slices_per_patient) != 2
        or not all(isinstance(value, int) for value in slices_per_patient)
        or not MIN_SLICES <= slices_per_patient[0] <= slices_per_patient[1]
    ):
        raise ValueError(
            f"slices_per_patient must be (low, high) integers with {MIN_SLICES} <= low <= high, "
            f"got {slices_per_patient!r}"
        )
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")


def _refuse_non_empty(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not empty; not overwriting it")


def _write_kaggle_3m(
    root: Path, n_patients: int, slices_per_patient: tuple[int, int], image_size: int, seed: int
) -> None:
    id_seed, *patient_seeds = np.random.SeedSequence(seed).spawn(n_patients + 1)
    rows = []
    for patient_id, patient_seed in zip(
        _patient_ids(np.random.default_rng(id_seed), n_patients), patient_seeds, strict=True
    ):
        rng = np.random.default_rng(patient_seed)
        n_slices = int(rng.integers(slices_per_patient[0], slices_per_patient[1] + 1))
        images, masks, facts = render_patient(rng, n_slices, image_size)
        folder = root / patient_id
        folder.mkdir()
        for index in range(n_slices):
            stem = folder / f"{patient_id}_{index + 1}"
            tifffile.imwrite(f"{stem}.tif", images[index], photometric="rgb", metadata=None)
            tifffile.imwrite(f"{stem}_mask.tif", masks[index], photometric="minisblack", metadata=None)
        rows.append(_clinical_row(rng, patient_id, image_size, facts))
    with open(root / "data.csv", "w", newline="") as table:
        writer = csv.DictWriter(table, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def make_kaggle_3m(
    out_dir: str | Path,
    n_patients: int = 20,
    slices_per_patient: tuple[int, int] = (20, 30),
    image_size: int = 256,
    seed: int = 0,
) -> Path:
    """Write a synthetic kaggle_3m dataset to out_dir/kaggle_3m and return that path.

    Same arguments give byte-identical files. Refuses (FileExistsError) when out_dir/kaggle_3m exists
    and is not empty. Writes into a temporary sibling folder and renames it at the end, so an
    interrupted run leaves no half-written dataset.
    """
    if not isinstance(slices_per_patient, tuple | list):
        raise ValueError(f"slices_per_patient must be a (low, high) pair, got {slices_per_patient!r}")
    slices_per_patient = tuple(slices_per_patient)
    _validate(n_patients, slices_per_patient, image_size)
    out_dir = Path(out_dir)
    target = out_dir / KAGGLE_3M_FOLDER
    _refuse_non_empty(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{KAGGLE_3M_FOLDER}.partial-", dir=out_dir))
    try:
        _write_kaggle_3m(partial, n_patients, slices_per_patient, image_size, seed)
        _refuse_non_empty(target)
        if target.exists():
            target.rmdir()
        os.rename(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def kaggle_3m_once(out_dir: str | Path, n_patients: int, seed: int) -> Path:
    """out_dir/kaggle_3m: generated (make_kaggle_3m's other defaults) unless it already holds a set.

    For the generated sets that are made on first use and then reused (the demo's, the benchmarks'
    development and further patients); a folder that is there is complete, since make_kaggle_3m moves a
    set into place only once it is written.
    """
    target = Path(out_dir) / KAGGLE_3M_FOLDER
    if target.is_dir() and any(target.iterdir()):
        return target
    made = make_kaggle_3m(out_dir, n_patients=n_patients, seed=seed)
    print(f"generated {n_patients} synthetic patients (seed {seed}) in {made}", flush=True)
    return made


DEMO_DATA_DIR = Path("data") / KAGGLE_3M_FOLDER
DEMO_PATIENTS = 64  # 48 train, 8 validate, 8 test (chosen on development patients, report.md)


def ensure_demo_data(data_dir: str | Path = DEMO_DATA_DIR) -> Path:
    """Generate the demo set (DEMO_PATIENTS patients, seed 0) when data_dir is the demo folder and absent.

    Any other folder is the user's data: it is returned untouched, never generated or written. A demo folder
    that holds another number of patients (made by an earlier version, or the user's own data put there) is
    used as it is, with a warning, since its figures will not be the README's.
    """
    data_dir = Path(data_dir)
    if data_dir.resolve() != DEMO_DATA_DIR.resolve():
        return data_dir
    if not data_dir.exists():
        return kaggle_3m_once(data_dir.parent, DEMO_PATIENTS, seed=0)
    patients = sum(1 for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if patients != DEMO_PATIENTS:
        warnings.warn(
            f"{data_dir} holds {patients} patient folders, not the {DEMO_PATIENTS} that the demo generates: "
            f"using it as it is; delete it to have the demo set generated again",
            stacklevel=2,
        )
    return data_dir


def _generate_unless_present(target: Path, generate: Callable[[], Path], description: str) -> int:
    """What every dataset subcommand does: skip a non-empty target folder, else generate it and say where."""
    if target.is_dir() and any(target.iterdir()):
        print(f"{target} already exists; skipping")
        return 0
    path = generate()
    print(f"wrote {description} to {path}")
    return 0


def _add_dataset_parser(
    commands: argparse._SubParsersAction,
    name: str,
    description: str,
    folder: str,
    run: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """Subcommand ``name`` with the options every dataset takes: --out (where ``folder`` goes) and --seed."""
    parser = commands.add_parser(name, help=description)
    parser.add_argument("--out", default="data", help=f"folder to write {folder} into (default: data)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.set_defaults(run=run)
    return parser


def _run_kaggle_3m(args: argparse.Namespace) -> int:
    return _generate_unless_present(
        Path(args.out) / KAGGLE_3M_FOLDER,
        lambda: make_kaggle_3m(args.out, args.patients, tuple(args.slices), args.size, args.seed),
        f"synthetic kaggle_3m ({args.patients} patients)",
    )


def _add_kaggle_3m_command(commands: argparse._SubParsersAction) -> None:
    description = "synthetic brain-MRI LGG set in the kaggle_3m layout"
    parser = _add_dataset_parser(commands, "kaggle_3m", description, "kaggle_3m", _run_kaggle_3m)
    parser.add_argument("--patients", type=int, default=20, help="number of patients (default: 20)")
    parser.add_argument(
        "--slices", type=int, nargs=2, default=[20, 30], metavar=("MIN", "MAX"), help="slices per patient"
    )
    parser.add_argument("--size", type=int, default=256, help="image height and width (default: 256)")


def _write_atomically(out_dir: str | Path, folder: str, write: Callable[[Path], None]) -> Path:
    """Run write(partial folder) and rename it to out_dir/folder; refuse to replace a non-empty one."""
    out_dir = Path(out_dir)
    target = out_dir / folder
    _refuse_non_empty(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder}.partial-", dir=out_dir))
    try:
        write(partial)
        _refuse_non_empty(target)
        if target.exists():
            target.rmdir()
        os.rename(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def _validate_volume_arguments(n_cases: int, shape: tuple[int, ...], smallest: tuple[int, ...]) -> None:
    if not isinstance(n_cases, int) or n_cases < 1:
        raise ValueError(f"n_cases must be a positive integer, got {n_cases!r}")
    if (
        len(shape) != 3
        or not all(isinstance(size, int) for size in shape)
        or any(size < low for size, low in zip(shape, smallest, strict=True))
    ):
        raise ValueError(f"shape must be 3 integers (z, y, x) of at least {smallest}, got {shape!r}")


# ---- LUNA16 stand-in --------------------------------------------------------------------------------------

LUNA_FOLDER = "luna16"
LUNA_UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
MIN_LUNA_SHAPE = (16, 48, 48)
# Hounsfield units of the tissues, before partial volume, blur and noise.
HU_AIR, HU_LUNG, HU_FAT, HU_SOFT_TISSUE, HU_BLOOD, HU_BONE, HU_MARROW = -1000, -850, -100, 40, 45, 700, 250
HU_OUTSIDE_SCAN_CIRCLE = -3024  # padding value many LUNA16 scanners write outside the reconstructed disc
LUNA_FIELD_OF_VIEW = ((290.0, 310.0), (340.0, 360.0))  # mm, along z and in-plane, drawn per scan
FLIPPED_IN_PLANE_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
LUNA_ANNOTATIONS, LUNA_EXCLUDED_ANNOTATIONS = "annotations.csv", "annotations_excluded.csv"
ANNOTATION_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")


class _Chest:
    """Normalised coordinates of a chest volume: X (patient right to left) and Y (front to back) in units
    of the body half-width, T from the lung bases (0) to the top of the volume (1), and the physical
    voxel centres in in-plane voxel units (z scaled by the spacing ratio) to draw round tubes."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, ...]):
        depth, height, width = shape
        self.shape = shape
        self.half_width = width / 2 * rng.uniform(0.84, 0.94)
        self.aspect = rng.uniform(0.62, 0.74)
        self.centre_x = width / 2 + rng.uniform(-0.03, 0.03) * width
        self.centre_y = height / 2 + rng.uniform(-0.02, 0.04) * height
        self.z_scale = spacing[0] / spacing[2]
        self.spacing_ratio = spacing[1] / spacing[2]
        self.X = ((np.arange(width, dtype=np.float32) - self.centre_x) / self.half_width)[None, None, :]
        rows = (np.arange(height, dtype=np.float32) - self.centre_y) * self.spacing_ratio
        self.Y = (rows / self.half_width)[None, :, None]
        self.T = np.linspace(0.0, 1.0, depth, dtype=np.float32)[:, None, None]

    def point(self, t: float, x: float, y: float) -> np.ndarray:
        """Physical (z, y, x) position, in in-plane voxel units, of normalised coordinates."""
        return np.array(
            [
                t * (self.shape[0] - 1) * self.z_scale,
                self.centre_y * self.spacing_ratio + y * self.half_width,
                self.centre_x + x * self.half_width,
            ]
        )

    def tube(self, start: np.ndarray, end: np.ndarray, radius: float) -> tuple[tuple[slice, ...], np.ndarray]:
        """Signed distance (voxel units, negative inside) to the capsule start-end, on its bounding box."""
        reach = radius + 2.0
        scales = (self.z_scale, self.spacing_ratio, 1.0)
        box = tuple(
            slice(
                max(0, int(math.floor((min(a, b) - reach) / scale))),
                min(size, int(math.ceil((max(a, b) + reach) / scale)) + 1),
            )
            for a, b, scale, size in zip(start, end, scales, self.shape, strict=True)
        )
        grids = [
            (np.arange(s.start, s.stop, dtype=np.float32) * scale).reshape(
                [-1 if i == k else 1 for i in range(3)]
            )
            for k, (s, scale) in enumerate(zip(box, scales, strict=True))
        ]
        axis = end - start
        along = sum((grid - start[k]) * axis[k] for k, grid in enumerate(grids)) / max(
            float(axis @ axis), 1e-6
        )
        along = np.clip(along, 0.0, 1.0)
        squared = sum((grid - start[k] - along * axis[k]) ** 2 for k, grid in enumerate(grids))
        return box, np.sqrt(squared) - radius


def _lung_envelope(t: np.ndarray, base: float, widest: float, apex: float) -> np.ndarray:
    """Lung cross-section scale over height: a steep diaphragm dome at the base, a rounded apex."""
    rising = np.sqrt(np.clip((t - base) / (widest - base), 0.0, 1.0))
    falling = np.sqrt(np.clip(1.0 - ((t - widest) / (apex - widest)) ** 2, 0.0, 1.0))
    return np.where(t < widest, rising, falling)


def _vessel_tree(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    length: float,
    radius: float,
    depth: int,
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Segments (start, end, radius) of a binary tree; each branch forks in two thinner, shorter ones."""
    end = start + length * direction
    segments = [(start, end, radius)]
    if depth == 0:
        return segments
    for side in (-1.0, 1.0):
        turn = rng.standard_normal(3)
        turn -= (turn @ direction) * direction
        turn /= max(float(np.linalg.norm(turn)), 1e-6)
        angle = side * rng.uniform(0.35, 0.7)
        child = math.cos(angle) * direction + math.sin(angle) * turn
        child /= np.linalg.norm(child)
        scale = rng.uniform(0.65, 0.85)
        segments += _vessel_tree(rng, end, child, length * scale, radius * 0.72, depth - 1)
    return segments


# Lung lesions. LUNA16 annotates nodules of 3 mm and more (annotations.csv) and ignores other findings
# (annotations_excluded.csv), whose diameter LIDC readers did not measure: they marked nodules under
# 3 mm and non-nodules by their centre only, written -1 (the evaluation then matches them within 5 mm).
NODULE_KINDS = ("solid", "part-solid", "ground-glass")
MIN_ANNOTATED_DIAMETER = 3.0
NODULES_PER_SCAN_PROBABILITIES = (0.3, 0.3, 0.2, 0.12, 0.08)  # 0 to 4 nodules, about a third of scans none
UNMEASURED_DIAMETER = -1.0
HU_NODULE, HU_GROUND_GLASS, HU_CALCIFIED = (0.0, 60.0), (-700.0, -500.0), (300.0, 800.0)
MIN_SUBSOLID_DIAMETER = 6.0  # subsolid nodules smaller than this would hardly show on a coarse grid
SUBSAMPLES = (np.arange(3) - 1.0) / 3.0  # sub-voxel sample offsets, in voxels, for partial volume


@dataclass(frozen=True)
class Finding:
    """A lesion drawn in a synthetic chest CT.

    kind: "solid", "part-solid" or "ground-glass" (nodules), "calcified" (a granuloma, not a nodule
    for LUNA16). centre: continuous voxel index (z, y, x) on the array as rendered. diameter_mm: the
    diameter of the sphere of the same mean radius.
    """

    kind: str
    centre: tuple[float, float, float]
    diameter_mm: float

    @property
    def annotated(self) -> bool:
        """True for the annotations.csv reference (nodules of 3 mm or more), False for the excluded list."""
        return self.kind in NODULE_KINDS and self.diameter_mm >= MIN_ANNOTATED_DIAMETER


Inside = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _lobulated_ball(radius: float, lobes: np.ndarray, weights: np.ndarray) -> Inside:
    """Membership test of a sphere whose radius swells towards a few directions (lobes), offsets in mm.

    The radius along unit u is radius * (1 + sum w_k (max(u . n_k, 0)^4 - 1/10)); the swelling averages
    zero over all directions, so `radius` stays the mean radius.
    """

    def inside(dz: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
        distance = np.sqrt(dz * dz + dy * dy + dx * dx)
        safe = np.maximum(distance, 1e-6)
        reach = np.ones_like(distance)
        for (nz, ny, nx), weight in zip(lobes, weights, strict=True):
            along = np.maximum((dz * nz + dy * ny + dx * nx) / safe, 0.0)
            reach += weight * (along**4 - 0.1)
        return distance < radius * reach

    return inside


def _capsule(start: np.ndarray, end: np.ndarray, radius: float) -> Inside:
    """Membership test of the tube of `radius` around segment start-end (mm, relative to the paint centre)."""
    axis = end - start
    length_squared = max(float(axis @ axis), 1e-9)

    def inside(dz: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
        offsets = (dz - start[0], dy - start[1], dx - start[2])
        along = np.clip(sum(o * a for o, a in zip(offsets, axis, strict=True)) / length_squared, 0.0, 1.0)
        squared = sum((o - along * a) ** 2 for o, a in zip(offsets, axis, strict=True))
        return squared < radius * radius

    return inside


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    vector = rng.standard_normal(3)
    return vector / max(float(np.linalg.norm(vector)), 1e-9)


def _nodule_diameter(rng: np.random.Generator) -> float:
    """Diameter in mm, 3 to 30, most of them small (mean about 8, median about 6.5, as in LUNA16)."""
    return float(min(30.0, MIN_ANNOTATED_DIAMETER + rng.exponential(5.0)))


class _LungLesions:
    """Draws lesions into the lungs of a CT (in place) and records them as Findings.

    Positions and sizes are in mm along the array axes, (z, y, x) = voxel index x spacing. A lesion
    only raises the density of lung voxels, by its coverage of each voxel (sampled 3 x 3 x 3 times:
    partial volume), so one against the chest wall flattens on it, as a juxtapleural nodule does, and
    a vessel crossing a ground-glass nodule stays bright.
    """

    def __init__(self, ct: np.ndarray, lungs: np.ndarray, spacing: tuple[float, float, float]) -> None:
        self.ct, self.lungs = ct, lungs
        self.spacing = np.array(spacing)
        self.depth = ndimage.distance_transform_edt(lungs, sampling=spacing)  # mm to the nearest non-lung
        self.findings: list[Finding] = []

    def random_point(self, rng: np.random.Generator, nearest: float, farthest: float) -> np.ndarray | None:
        """A random point (mm) in a lung voxel lying nearest..farthest mm from the lung wall, or None.

        Lung voxels lie at least one voxel from the wall, so `nearest` must be positive.
        """
        candidates = np.flatnonzero((self.depth >= nearest) & (self.depth <= farthest))
        if not candidates.size:
            return None
        voxel = np.unravel_index(candidates[rng.integers(candidates.size)], self.depth.shape)
        return (np.array(voxel) + rng.uniform(-0.45, 0.45, 3)) * self.spacing

    def depth_at(self, point: np.ndarray) -> float:
        """mm from the lung wall of the voxel holding point; 0 outside the lungs or the volume."""
        voxel = np.rint(point / self.spacing).astype(int)
        if np.any(voxel < 0) or np.any(voxel >= self.depth.shape):
            return 0.0
        return float(self.depth[tuple(voxel)])

    def paint(self, centre: np.ndarray, reach: float, inside: Inside, value: float) -> None:
        """Raise the lung voxels within reach mm of centre towards value by their coverage of `inside`."""
        box = tuple(
            slice(max(0, math.floor((c - reach) / s)), min(n, math.ceil((c + reach) / s) + 1))
            for c, s, n in zip(centre, self.spacing, self.ct.shape, strict=True)
        )
        grids = [
            (np.arange(b.start, b.stop) * s - c)
            .astype(np.float32)
            .reshape([-1 if i == k else 1 for i in range(3)])
            for k, (b, s, c) in enumerate(zip(box, self.spacing, centre, strict=True))
        ]
        coverage = np.zeros([b.stop - b.start for b in box], dtype=np.float32)
        for oz, oy, ox in itertools.product(SUBSAMPLES, repeat=3):
            shifted = [
                grid + np.float32(o * s) for grid, o, s in zip(grids, (oz, oy, ox), self.spacing, strict=True)
            ]
            coverage += inside(*shifted)
        coverage *= self.lungs[box] / np.float32(len(SUBSAMPLES) ** 3)
        region = self.ct[box]
        region += coverage * np.maximum(np.float32(value) - region, 0.0)

    def nodule_centre(self, rng: np.random.Generator, radius: float, vessels: list) -> np.ndarray | None:
        """Centre of a new nodule: against the pleura, against a vessel or free in the parenchyma."""
        place = rng.choice(3, p=(0.25, 0.25, 0.5))
        if place == 0:  # juxtapleural: the sphere reaches the lung wall
            centre = self.random_point(rng, float(self.spacing.min()), 0.9 * radius)
        elif place == 1:
            centre = self._next_to_a_vessel(rng, radius, vessels)
        else:
            centre = None
        return centre if centre is not None else self.random_point(rng, radius + 2.0, np.inf)

    def _next_to_a_vessel(self, rng: np.random.Generator, radius: float, vessels: list) -> np.ndarray | None:
        """A centre whose sphere overlaps the side of a vessel segment inside a lung, or None."""
        for _ in range(10 if vessels else 0):
            start, end, vessel_radius = vessels[int(rng.integers(len(vessels)))]
            side = _random_unit(rng)
            axis = (end - start) / max(float(np.linalg.norm(end - start)), 1e-9)
            side -= (side @ axis) * axis
            side /= max(float(np.linalg.norm(side)), 1e-9)
            point = start + rng.uniform(0.2, 0.8) * (end - start)
            centre = point + (vessel_radius + rng.uniform(0.5, 0.9) * radius) * side
            if self.depth_at(centre) >= max(0.6 * radius, float(self.spacing.min())):
                return centre
        return None

    def add_nodule(self, rng: np.random.Generator, diameter: float, vessels: list) -> None:
        """A solid, part-solid or ground-glass nodule, round or lobulated (always solid under
        MIN_SUBSOLID_DIAMETER)."""
        radius = diameter / 2
        kind = "solid"
        if diameter >= MIN_SUBSOLID_DIAMETER and rng.random() < 0.35:
            kind = NODULE_KINDS[int(rng.integers(1, 3))]
        centre = self.nodule_centre(rng, radius, vessels)
        if centre is None:
            return
        lobes = np.array([_random_unit(rng) for _ in range(int(rng.integers(3, 6)))])
        weights = rng.uniform(0.1, 0.25, len(lobes))
        if rng.random() < 0.5:
            weights[:] = 0.0  # round
        outline = _lobulated_ball(radius, lobes, weights)
        reach = 1.3 * radius + float(self.spacing.max())
        if kind == "solid":
            self.paint(centre, reach, outline, rng.uniform(*HU_NODULE))
        else:
            self.paint(centre, reach, outline, rng.uniform(*HU_GROUND_GLASS))
        if kind == "part-solid":
            core = _lobulated_ball(radius * rng.uniform(0.3, 0.6), lobes, weights)
            self.paint(centre, reach, core, rng.uniform(*HU_NODULE))
        self.findings.append(Finding(kind, tuple(centre / self.spacing), diameter))

    def add_small_ball(self, rng: np.random.Generator, kind: str, diameter: float, hu: tuple) -> None:
        """A small round lesion free in the parenchyma: a nodule under 3 mm or a calcified granuloma."""
        centre = self.random_point(rng, diameter / 2 + 1.0, np.inf)
        if centre is None:
            return
        ball = _lobulated_ball(diameter / 2, np.zeros((0, 3)), np.zeros(0))
        self.paint(centre, diameter / 2 + float(self.spacing.max()), ball, rng.uniform(*hu))
        self.findings.append(Finding(kind, tuple(centre / self.spacing), diameter))

    def add_vessel_decoy(self, rng: np.random.Generator) -> None:
        """A short thick vessel-like tube, half of them forking: nodule-sized, but not a nodule."""
        start = self.random_point(rng, 8.0, np.inf)
        if start is None:
            return
        radius, length, heading = rng.uniform(1.5, 4.0), rng.uniform(8.0, 25.0), _random_unit(rng)
        segments = [(start, start + length * heading, radius)]
        if rng.random() < 0.5:
            turn = _random_unit(rng)
            turn -= (turn @ heading) * heading
            turn /= max(float(np.linalg.norm(turn)), 1e-9)
            for side in (-1.0, 1.0):
                angle = side * rng.uniform(0.4, 0.8)
                child = math.cos(angle) * heading + math.sin(angle) * turn
                end = segments[0][1]
                segments.append((end, end + length * rng.uniform(0.5, 0.8) * child, 0.8 * radius))
        for first, last, tube_radius in segments:
            middle = (first + last) / 2
            reach = float(np.linalg.norm(last - first)) / 2 + tube_radius + float(self.spacing.max())
            self.paint(middle, reach, _capsule(first - middle, last - middle, tube_radius), HU_BLOOD)


def _largest_piece(region: np.ndarray) -> np.ndarray:
    """The largest connected part of a boolean volume (a lung without the airway bits and islands)."""
    pieces, count = ndimage.label(region)
    if count == 0:
        return region
    return pieces == 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))


def _add_lung_lesions(
    rng: np.random.Generator,
    ct: np.ndarray,
    lungs: np.ndarray,
    spacing: tuple[float, float, float],
    vessels: list,
) -> list[Finding]:
    """Nodules (0 to 4, some scans none), nodules under 3 mm, calcified granulomas and vessel-like decoys."""
    lesions = _LungLesions(ct, lungs, spacing)
    for _ in range(int(rng.choice(len(NODULES_PER_SCAN_PROBABILITIES), p=NODULES_PER_SCAN_PROBABILITIES))):
        lesions.add_nodule(rng, _nodule_diameter(rng), vessels)
    for _ in range(int(rng.integers(0, 3))):
        lesions.add_small_ball(rng, "solid", rng.uniform(1.5, 2.9), HU_NODULE)
    for _ in range(int(rng.integers(0, 4))):
        lesions.add_small_ball(rng, "calcified", rng.uniform(2.0, 5.5), HU_CALCIFIED)
    for _ in range(int(rng.integers(1, 4))):
        lesions.add_vessel_decoy(rng)
    return lesions.findings


def render_chest_ct(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, list[Finding]]:
    """One synthetic chest CT: int16 HU (D, H, W), int16 mask (3 right lung, 4 left lung, 5 airways), and
    the lesions drawn in the lungs (Findings; nodules are lung in the mask).

    Array axes follow the LUNA16 scans: z from the lung bases up to the neck, y from front to back, x
    from the patient's right to left. Anatomy is sized relative to the body, which fills the field of
    view (shape x spacing); lesions are sized in mm.
    """
    chest = _Chest(rng, shape, spacing)
    X, Y, T = chest.X, chest.Y, chest.T
    coarse = smooth_noise(rng, shape, (3, 5, 5))
    fine = smooth_noise(rng, shape, (max(2, shape[0] // 4), 14, 14))
    radius = np.sqrt(X**2 + (Y / chest.aspect) ** 2) * (1.0 + 0.02 * coarse)
    angle = np.arctan2(Y, X)

    ct = np.full(shape, HU_SOFT_TISSUE, dtype=np.float32) + 8.0 * fine
    ct = np.where(_soft_step((fine - 1.3) / 0.3) > 0.5, HU_FAT, ct)  # fat pads in the mediastinum
    ct = np.where(radius > 0.88, HU_FAT + 10.0 * fine, ct)  # subcutaneous fat
    ct = np.where(radius > 0.985, HU_SOFT_TISSUE, ct)  # skin
    rib_count, rib_slant = int(rng.integers(9, 12)), rng.uniform(2.5, 4.0)
    ribs = (radius > 0.79) & (radius < 0.86) & (np.cos(rib_count * angle + rib_slant * math.tau * T) > 0.55)
    ribs &= ~((np.abs(X) < 0.2) & (Y > 0))  # no rib crosses the spine
    ct = np.where(ribs, HU_BONE, ct)
    sternum = (np.abs(X) < 0.09) & (Y < 0) & (radius > 0.8) & (radius < 0.87)
    ct = np.where(sternum, HU_MARROW + 150, ct)

    spine_y = chest.aspect * rng.uniform(0.52, 0.6)
    vertebra = np.sqrt(X**2 + (Y - spine_y) ** 2)
    canal = np.sqrt(X**2 + (Y - spine_y - 0.2) ** 2)
    ct = np.where(vertebra < 0.14, HU_BONE, ct)
    ct = np.where(vertebra < 0.11, HU_MARROW + 20.0 * fine, ct)
    ct = np.where((np.abs(X) < 0.035) & (Y - spine_y > 0) & (radius < 0.86), HU_BONE, ct)  # spinous process
    ct = np.where(canal < 0.065, HU_SOFT_TISSUE - 20, ct)

    heart_x, heart_top = rng.uniform(0.02, 0.14), rng.uniform(0.45, 0.6)
    heart_size = rng.uniform(0.26, 0.34)
    heart_scale = _lung_envelope(T, -0.1, 0.2, heart_top)
    heart = np.sqrt((X - heart_x) ** 2 + (Y + 0.12 * chest.aspect) ** 2) < heart_size * heart_scale
    ct = np.where(heart, HU_BLOOD + 5.0 * fine, ct)
    aorta = np.sqrt((X - 0.13) ** 2 + (Y - spine_y + 0.2) ** 2) < 0.08
    ct = np.where(aorta & (T > 0.2), HU_BLOOD, ct)

    base, widest, apex = rng.uniform(0.04, 0.12), rng.uniform(0.3, 0.4), rng.uniform(0.86, 0.94)
    envelope = _lung_envelope(T, base, widest, apex)
    mask = np.zeros(shape, dtype=np.int16)
    hila = []
    for label, side in ((3, -1.0), (4, 1.0)):
        centre_x = side * rng.uniform(0.4, 0.46)
        half_x, half_y = rng.uniform(0.36, 0.42), chest.aspect * rng.uniform(0.68, 0.76)
        shape_noise = 1.0 + 0.07 * coarse + 0.02 * fine
        distance = np.sqrt(((X - centre_x) / half_x) ** 2 + ((Y + 0.05 * chest.aspect) / half_y) ** 2)
        lung = (distance * shape_noise < envelope) & (radius < 0.78) & (side * X > 0.1)
        lung &= ~(heart | aorta | (vertebra < 0.2))
        mask[lung] = label
        hila.append(chest.point(widest + 0.25 * (apex - widest), side * 0.2, 0.0))
    lungs = mask > 0
    ct = np.where(lungs, HU_LUNG + 25.0 * fine + 10.0 * coarse, ct)

    vessels = np.zeros(shape, dtype=np.float32)
    vessel_segments = []  # (start, end, radius) in mm along the array axes
    for hilum, side in zip(hila, (-1.0, 1.0), strict=True):
        for rise in (-1.6, -0.6, 0.4, 1.4):  # trunks to the lower, middle and upper lung
            heading = np.array([rise + rng.uniform(-0.3, 0.3), rng.uniform(-0.4, 0.4), side])
            heading /= np.linalg.norm(heading)
            trunk_length, trunk_radius = 0.3 * chest.half_width, 0.055 * chest.half_width
            for start, end, vessel_radius in _vessel_tree(rng, hilum, heading, trunk_length, trunk_radius, 4):
                box, signed = chest.tube(start, end, vessel_radius)
                vessels[box] = np.maximum(vessels[box], _soft_step(-signed / 0.25))
                vessel_segments.append((start * spacing[2], end * spacing[2], vessel_radius * spacing[2]))
    ct += vessels * lungs * (HU_BLOOD - ct)

    carina_t = apex - rng.uniform(0.12, 0.2)
    trachea_y = chest.aspect * rng.uniform(-0.3, -0.15)
    carina = chest.point(carina_t, 0.0, trachea_y)
    airways = [(chest.point(1.05, 0.0, trachea_y), carina, 0.075 * chest.half_width)]
    airways += [(carina, hilum, 0.05 * chest.half_width) for hilum in hila]
    lumen = np.zeros(shape, dtype=bool)
    for start, end, airway_radius in airways:
        box, signed = chest.tube(start, end, airway_radius)
        wall = (signed < 0.12 * airway_radius + 1.0) & ~lungs[box]
        ct[box] = np.where(wall, HU_SOFT_TISSUE, ct[box])
        lumen[box] |= signed < 0
    ct = np.where(lumen, HU_AIR, ct)
    pieces, _ = ndimage.label(lumen & ~lungs)
    trachea = np.isin(pieces, np.unique(pieces[-1][pieces[-1] > 0]))  # connected to the top slice
    mask[trachea] = LUNA_TRACHEA_LABEL
    stray = (pieces > 0) & ~trachea  # bronchus bits that leave and re-enter a lung belong to that lung
    mask[stray] = np.where(np.broadcast_to(X < 0, shape)[stray], 3, 4)
    ct = np.where(radius < 1.0, ct, HU_AIR)

    ct = ndimage.gaussian_filter(ct, sigma=(0.4, 0.7, 0.7), truncate=2.0)
    parenchyma = _largest_piece((mask == 3) & ~lumen) | _largest_piece((mask == 4) & ~lumen)
    findings = _add_lung_lesions(rng, ct, parenchyma, spacing, vessel_segments)
    ct += rng.uniform(12.0, 30.0) * rng.standard_normal(shape, dtype=np.float32)
    if rng.random() < 0.5:
        rows = np.arange(shape[1])[:, None] - (shape[1] - 1) / 2
        columns = np.arange(shape[2])[None, :] - (shape[2] - 1) / 2
        ct[:, np.hypot(rows, columns) > min(shape[1:]) / 2] = HU_OUTSIDE_SCAN_CIRCLE
    return np.clip(np.rint(ct), HU_OUTSIDE_SCAN_CIRCLE, 3071).astype(np.int16), mask, findings


def _luna_uids(rng: np.random.Generator, n_cases: int) -> list[str]:
    """Unique series uids shaped like LUNA16's: the LIDC root and 30 digits."""
    uids: set[str] = set()
    while len(uids) < n_cases:
        digits = "".join(str(d) for d in rng.integers(0, 10, size=30))
        uids.add(LUNA_UID_PREFIX + str(int(rng.integers(1, 10))) + digits[1:])
    return sorted(uids)


def _luna_spacing(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[float, float, float]:
    """Spacing (z, y, x) mm that spreads shape over a chest CT's field of view (about 300 x 350 x 350 mm)."""
    along_z, in_plane = (rng.uniform(*extent) for extent in LUNA_FIELD_OF_VIEW)
    return (along_z / shape[0], in_plane / shape[1], in_plane / shape[2])


def _scan_geometry(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple, flipped: bool
) -> Geometry:
    """A scan's geometry: centred in x and y give or take 2 cm, slice 0 at z = -35..-25 cm as in LUNA16.

    A flipped scan has ITK direction diag(-1, -1, 1), so its array must be flipped along y and x to
    keep the anatomy in place; its origin is then the world position of the far corner voxel.
    """
    extent_x, extent_y = (shape[2] - 1) * spacing[2], (shape[1] - 1) * spacing[1]
    origin = np.array(
        [-extent_x / 2 + rng.uniform(-20, 20), -extent_y / 2 + rng.uniform(-20, 20), rng.uniform(-350, -250)]
    )
    if not flipped:
        return Geometry(spacing=spacing, origin=tuple(np.round(origin, 3)))
    origin += (extent_x, extent_y, 0.0)
    return Geometry(spacing=spacing, origin=tuple(np.round(origin, 3)), direction=FLIPPED_IN_PLANE_DIRECTION)


def _annotation_rows(
    uid: str, findings: list[Finding], geometry: Geometry, annotated: bool
) -> list[list[str]]:
    """CSV rows (seriesuid, coordX, coordY, coordZ, diameter_mm) in world mm of the findings of one kind."""
    rows = []
    for finding in findings:
        if finding.annotated != annotated:
            continue
        x, y, z = geometry.index_to_world(finding.centre)
        diameter = f"{finding.diameter_mm:.9f}" if annotated else f"{UNMEASURED_DIAMETER:g}"
        rows.append([uid, f"{x:.7f}", f"{y:.7f}", f"{z:.7f}", diameter])
    return rows


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as table:
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(ANNOTATION_HEADER)
        writer.writerows(rows)


def _flipped_in_plane(finding: Finding, shape: tuple[int, int, int]) -> Finding:
    """The finding on the array flipped along y and x."""
    z, y, x = finding.centre
    return Finding(finding.kind, (z, shape[1] - 1 - y, shape[2] - 1 - x), finding.diameter_mm)


def _write_luna(
    root: Path, n_cases: int, shape: tuple[int, int, int], spacing: tuple | None, seed: int
) -> None:
    uid_seed, *case_seeds = np.random.SeedSequence(seed).spawn(n_cases + 1)
    annotations, excluded = [], []
    uids = _luna_uids(np.random.default_rng(uid_seed), n_cases)
    for index, (uid, case_seed) in enumerate(zip(uids, case_seeds, strict=True)):
        rng = np.random.default_rng(case_seed)
        case_spacing = spacing or _luna_spacing(rng, shape)
        ct, mask, findings = render_chest_ct(rng, shape, case_spacing)
        flipped = index % 3 == 1
        geometry = _scan_geometry(rng, shape, case_spacing, flipped)
        if flipped:
            ct, mask = ct[:, ::-1, ::-1], mask[:, ::-1, ::-1]
            findings = [_flipped_in_plane(finding, shape) for finding in findings]
        write_volume(np.ascontiguousarray(ct), geometry, root / "subset0" / f"{uid}.mhd", compress=False)
        write_volume(
            np.ascontiguousarray(mask), geometry, root / LUNA_MASK_FOLDER / f"{uid}.mhd", compress=True
        )
        annotations += _annotation_rows(uid, findings, geometry, annotated=True)
        excluded += _annotation_rows(uid, findings, geometry, annotated=False)
    _write_csv(root / LUNA_ANNOTATIONS, annotations)
    _write_csv(root / LUNA_EXCLUDED_ANNOTATIONS, excluded)


def make_luna(
    out_dir: str | Path,
    n_cases: int = 4,
    shape: tuple[int, int, int] = (120, 128, 128),
    spacing: tuple[float, float, float] | None = None,
    seed: int = 0,
) -> Path:
    """Write a synthetic LUNA16 stand-in to out_dir/luna16 and return that path.

    Layout as the real set: subset0/<uid>.mhd + .raw (int16 HU CT, uncompressed),
    seg-lungs-LUNA16/<uid>.mhd + .zraw (int16 masks: 3 right lung, 4 left lung, 5 trachea and main
    bronchi), and the nodule lists annotations.csv and annotations_excluded.csv (seriesuid, coordX,
    coordY, coordZ in world mm, diameter_mm). Shape and spacing are in array order (z, y, x); without a
    spacing each scan spreads `shape` over a real chest CT field of view (about 300 mm along z,
    340-360 mm in-plane; (120, 128, 128) gives about 2.5 x 2.7 x 2.7 mm voxels). Each case has its own
    origin; cases 1, 4, 7... have ITK direction diag(-1, -1, 1) with their arrays flipped to match.

    The chest has air outside the body, skin, subcutaneous fat, muscle, ribs, sternum and spine, a
    heart and aorta in the mediastinum, two air-filled lungs (litres of them) with branching vessels,
    a trachea joining them from the top; in the lungs 0 to 4 nodules per scan (3-30 mm, mostly
    small; solid, part-solid or ground-glass; round or lobulated; some against the pleura or a
    vessel; annotations.csv), nodules under 3 mm and calcified granulomas (annotations_excluded.csv,
    diameter -1 as LUNA16 writes unmeasured findings) and unannotated vessel-like decoys; then blur and
    noise. Same arguments give byte-identical files; refuses (FileExistsError) a non-empty
    out_dir/luna16 and writes atomically (temporary folder, then rename).
    """
    shape = tuple(shape)
    _validate_volume_arguments(n_cases, shape, MIN_LUNA_SHAPE)
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or not all(s > 0 for s in spacing):
            raise ValueError(f"spacing must be 3 positive numbers (z, y, x) in mm, got {spacing!r}")
    return _write_atomically(
        out_dir, LUNA_FOLDER, lambda root: _write_luna(root, n_cases, shape, spacing, seed)
    )


# ---- Medical Segmentation Decathlon stand-in (Task04 Hippocampus) -----------------------------------------

DECATHLON_TASK = "Task04_Hippocampus"
TASK_NAME = re.compile(r"^Task\d{2,3}_(?P<name>[A-Za-z][A-Za-z0-9]*)$")
MIN_DECATHLON_SHAPE = (16, 24, 16)
HIPPOCAMPUS_LABELS = {"0": "background", "1": "Anterior", "2": "Posterior"}
# MSD Task04 geometry: 1 mm voxels, RAS-aligned axes (ITK direction diag(-1, -1, 1)).
HIPPOCAMPUS_GEOMETRY = Geometry(
    spacing=(1.0, 1.0, 1.0),
    origin=(-1.0, -1.0, 1.0),
    direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
)
# T1-weighted intensities on a 0..1 scale: white matter brightest, grey matter, cerebrospinal fluid.
T1_WHITE, T1_GREY, T1_CSF = 0.8, 0.55, 0.15


def render_hippocampus(
    rng: np.random.Generator, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic hippocampus crop: (T1-like image float32 around 0..1, labels uint8 (D, H, W)).

    The hippocampus is a curved tube along axis 1 (y), thick at its head and thinning to its tail;
    the anterior part (head) is class 1, the posterior part class 2, adjacent across a wavy cut. It
    has grey-matter intensity, like the unlabelled amygdala blob in front of its head and the grey
    patches of the white-matter/grey-matter texture around it, with a thin CSF cleft (temporal horn)
    along one side: intensity alone does not find it, shape and context do.
    """
    depth, height, width = shape
    samples = np.linspace(0.0, 1.0, 48)
    bend, lift = rng.uniform(-0.25, 0.25) * width, rng.uniform(0.1, 0.3) * depth
    start_y, end_y = rng.uniform(0.2, 0.26) * height, rng.uniform(0.82, 0.88) * height
    centre = np.stack(
        [
            depth * rng.uniform(0.42, 0.52) + lift * (samples**2 - 0.3),  # the tail curves up
            start_y + (end_y - start_y) * samples,
            width * rng.uniform(0.45, 0.55) + bend * (samples - 0.5) ** 2,
        ],
        axis=1,
    )
    size = min(depth, width) * rng.uniform(0.16, 0.2)
    radius = size * (0.75 + 0.4 * np.exp(-(((samples - 0.15) / 0.25) ** 2)))
    flatten = rng.uniform(0.7, 0.9)  # thinner from top to bottom than from side to side
    gap = (end_y - start_y) / (len(samples) - 1)

    z, y, x = (np.arange(n, dtype=np.float32) for n in shape)
    nearest = np.full(shape, np.inf, dtype=np.float32)
    position = np.zeros(shape, dtype=np.float32)
    for s, (cz, cy, cx), r in zip(samples, centre, radius, strict=True):
        d = (
            ((z - cz) / (flatten * r))[:, None, None] ** 2
            + ((y - cy) / max(r, 1.5 * gap))[None, :, None] ** 2
            + ((x - cx) / r)[None, None, :] ** 2
        )
        closer = d < nearest
        nearest = np.where(closer, d, nearest)
        position = np.where(closer, s, position)
    nearest = np.sqrt(nearest)
    texture = smooth_noise(rng, shape, (3, 4, 3))
    fine = smooth_noise(rng, shape, (6, 9, 7))
    hippocampus = nearest * (1.0 + 0.08 * fine) < 1.0
    cut = rng.uniform(0.36, 0.44) + 0.04 * texture
    labels = np.where(hippocampus, np.where(position < cut, 1, 2), 0).astype(np.uint8)

    grey_fraction = _soft_step((texture + 0.3 * fine + 0.4) / 0.35)
    image = T1_WHITE + (T1_GREY - T1_WHITE) * grey_fraction
    cleft = (
        _bump((nearest - 1.25) / 0.2)
        * (z[:, None, None] > centre[:, 0].mean())
        * _soft_step((fine - 0.4) / 0.3)
    )
    image = image + (T1_CSF - image) * cleft
    amygdala_centre = centre[0] + np.array([0.9 * radius[0], -1.4 * radius[0], 0.0])
    amygdala = np.sqrt(
        sum(
            ((axis_values - c) / (1.1 * radius[0])).reshape([-1 if i == k else 1 for i in range(3)]) ** 2
            for k, (axis_values, c) in enumerate(zip((z, y, x), amygdala_centre, strict=True))
        )
    )
    image = image + (T1_GREY - image) * _soft_step((1.0 - amygdala * (1 + 0.1 * fine)) / 0.1)
    image = image + (T1_GREY + 0.03 * fine - image) * _soft_step((1.0 - nearest * (1.0 + 0.08 * fine)) / 0.08)
    image = ndimage.gaussian_filter(image, 0.6, truncate=2.0)
    image *= 1.0 + rng.uniform(0.05, 0.15) * smooth_noise(rng, shape, (2, 2, 2))
    noise = rng.uniform(0.02, 0.04)
    real = image + noise * rng.standard_normal(shape, dtype=np.float32)
    imaginary = noise * rng.standard_normal(shape, dtype=np.float32)
    return np.sqrt(real**2 + imaginary**2).astype(np.float32), labels


def _decathlon_numbers(rng: np.random.Generator, count: int) -> list[int]:
    """Distinct case numbers with gaps, as in the real set (001, 003, 004...)."""
    return sorted(int(n) for n in rng.choice(np.arange(1, 400), size=count, replace=False))


def _stored_image(rng: np.random.Generator, image: np.ndarray, as_uint8: bool) -> np.ndarray:
    """The image as a scanner export would store it: uint8 0..255 or float32 in arbitrary units."""
    if as_uint8:
        return np.clip(np.rint(image * rng.uniform(120, 170)), 0, 255).astype(np.uint8)
    return (image * np.float32(rng.uniform(600, 1000))).astype(np.float32)


def _write_decathlon(root: Path, task: str, n_cases: int, shape: tuple[int, int, int], seed: int) -> None:
    prefix = TASK_NAME.match(task)["name"].lower()
    number_seed, *case_seeds = np.random.SeedSequence(seed).spawn(n_cases + 2)
    number_rng = np.random.default_rng(number_seed)
    numbers = _decathlon_numbers(number_rng, n_cases + 1)
    test_number = numbers.pop(int(number_rng.integers(n_cases + 1)))
    training = []
    for index, (number, case_seed) in enumerate(zip([*numbers, test_number], case_seeds, strict=True)):
        rng = np.random.default_rng(case_seed)
        case_shape = tuple(int(n + rng.integers(-2, 3)) for n in shape)
        image, labels = render_hippocampus(rng, case_shape)
        name = f"{prefix}_{number:03d}.nii.gz"
        folder = "imagesTs" if index == n_cases else "imagesTr"
        write_volume(_stored_image(rng, image, index % 3 == 0), HIPPOCAMPUS_GEOMETRY, root / folder / name)
        if index == n_cases:
            continue
        stored_labels = labels.astype(np.float32) if index == 1 else labels
        write_volume(stored_labels, HIPPOCAMPUS_GEOMETRY, root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    description = {
        "name": TASK_NAME.match(task)["name"],
        "description": f"Synthetic stand-in for the Medical Segmentation Decathlon {task}, by synthetic.py",
        "reference": "synthetic, no patient data",
        "licence": "CC0",
        "release": "synthetic.py",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": HIPPOCAMPUS_LABELS,
        "numTraining": n_cases,
        "numTest": 1,
        "training": training,
        "test": [f"./imagesTs/{prefix}_{test_number:03d}.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(description, indent=1) + "\n")


def make_decathlon(
    out_dir: str | Path,
    n_cases: int = 6,
    seed: int = 0,
    task: str = DECATHLON_TASK,
    shape: tuple[int, int, int] = (32, 48, 40),
) -> Path:
    """Write a synthetic Decathlon task like Task04 Hippocampus to out_dir/<task> and return that path.

    Layout as the real set: imagesTr/<name>_NNN.nii.gz, labelsTr/<name>_NNN.nii.gz (0 background,
    1 anterior, 2 posterior), one unlabelled imagesTs/ case and a dataset.json listing them; 1 mm
    voxels, shapes within 2 voxels of `shape` (z, y, x). Stored dtypes are mixed as in the real set:
    cases 0, 3, 6... have uint8 images, the others float32, and case 1's label is float32. Same
    arguments give byte-identical files; refuses (FileExistsError) a non-empty target and writes
    atomically (temporary folder, then rename).
    """
    shape = tuple(shape)
    _validate_volume_arguments(n_cases, shape, MIN_DECATHLON_SHAPE)
    if not isinstance(task, str) or not TASK_NAME.match(task):
        raise ValueError(f"task must look like 'Task04_Hippocampus', got {task!r}")
    return _write_atomically(out_dir, task, lambda root: _write_decathlon(root, task, n_cases, shape, seed))


def _run_luna(args: argparse.Namespace) -> int:
    return _generate_unless_present(
        Path(args.out) / LUNA_FOLDER,
        lambda: make_luna(args.out, args.cases, tuple(args.shape), seed=args.seed),
        f"synthetic LUNA16 ({args.cases} cases)",
    )


def _add_luna_command(commands: argparse._SubParsersAction) -> None:
    description = "synthetic chest CT with lung masks in the LUNA16 layout"
    parser = _add_dataset_parser(commands, "luna", description, "luna16", _run_luna)
    parser.add_argument("--cases", type=int, default=4, help="number of CT scans (default: 4)")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=[120, 128, 128], metavar=("Z", "Y", "X"), help="voxels per scan"
    )


def _run_msd(args: argparse.Namespace) -> int:
    return _generate_unless_present(
        Path(args.out) / args.task,
        lambda: make_decathlon(args.out, args.cases, args.seed, args.task),
        f"synthetic {args.task} ({args.cases} training cases + 1 test case)",
    )


def _add_msd_command(commands: argparse._SubParsersAction) -> None:
    description = "synthetic hippocampus MRI in the Medical Segmentation Decathlon layout"
    parser = _add_dataset_parser(commands, "msd", description, "the task folder", _run_msd)
    parser.add_argument("--cases", type=int, default=6, help="number of training cases (default: 6)")
    parser.add_argument(
        "--task", default=DECATHLON_TASK, help=f"task folder name (default: {DECATHLON_TASK})"
    )


# ---- LiTS stand-in (liver tumour CT) ----------------------------------------------------------------------

LITS_FOLDER = "lits"
MIN_LITS_SIZE, MIN_LITS_SLICES = 32, 8
LITS_PIXEL_MM = (0.6, 0.8)  # in-plane spacing of a 512-pixel slice; other sizes keep that field of view
LITS_SLICE_MM = (1.0, 2.5)
LITS_EXTENT_MM = (200.0, 500.0)  # coverage along z, from the lung bases down
LITS_SLAB = 16  # slices rendered at a time, so memory stays the output volume plus a few slabs
LIVER_LITRES = (1.2, 2.0)
HU_LIVER, HU_LIVER_TUMOUR_DROP = (55.0, 65.0), (25.0, 60.0)
HU_MUSCLE, HU_VISCERAL_FAT, HU_KIDNEY_CORTEX, HU_KIDNEY_MEDULLA, HU_SPLEEN = 50.0, -95.0, 150.0, 40.0, 48.0
HU_AORTA, HU_VEIN, HU_FLUID, HU_BOWEL, HU_DISC, HU_CANAL = 130.0, 110.0, 10.0, 35.0, 80.0, 20.0
HU_LITS_FLOOR = -1024


class _SlabNoise:
    """Smooth unit-variance noise over a whole volume (features about feature_mm apart), served by slab.

    The in-plane part of the bump expansion (see smooth_noise) is done once on the coarse z grid,
    (cells_z + 2, H, W); a slab is then one product with the z basis rows of its slices, so slabs
    fit together seamlessly without the whole field ever being in memory.
    """

    def __init__(self, rng: np.random.Generator, shape: tuple, spacing: tuple, feature_mm: float) -> None:
        cells = [max(2, round(n * s / feature_mm)) for n, s in zip(shape, spacing, strict=True)]
        weights = rng.standard_normal([c + 2 for c in cells], dtype=np.float32)
        rows, columns = _bump_basis(shape[1], cells[1]), _bump_basis(shape[2], cells[2])
        across_rows = np.matmul(rows, weights)  # (cells_z + 2, H, cells_x + 2), small
        flat = _matmul_in_blocks(across_rows.reshape(-1, cells[2] + 2), np.ascontiguousarray(columns.T))
        self.planes = flat.reshape(cells[0] + 2, -1)
        self.z_basis = _bump_basis(shape[0], cells[0])
        self.plane_shape = shape[1:]

    def slab(self, slices: slice) -> np.ndarray:
        return _matmul_in_blocks(self.z_basis[slices], self.planes).reshape(-1, *self.plane_shape)


def _ellipse_radius(dx: np.ndarray, dy: np.ndarray, half_x: float, half_y: float) -> np.ndarray:
    return np.sqrt((dx / half_x) ** 2 + (dy / half_y) ** 2)


@dataclass
class _LiverFrame:
    """The liver's shape: an ellipsoid (centre, semi-axes in mm, x y z) thinning towards the patient's
    left (taper: the fraction of thickness lost across its width, like the left lobe), slanting forward
    and domed at the sides (shears)."""

    centre: np.ndarray
    semi: np.ndarray
    taper: float
    slant: float
    dome: float

    def thickness(self, u: np.ndarray) -> np.ndarray:
        """Thickness factor across the width, u = -1 (patient right) to 1 (left)."""
        return 1.0 - self.taper * (u + 1.0) / 2.0

    def radius(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Normalised radius, below 1 inside the liver."""
        u = (x - self.centre[0]) / self.semi[0]
        thickness = self.thickness(u)
        v = ((y - self.centre[1]) / self.semi[1] - self.slant * u) / thickness
        w = ((z - self.centre[2]) / self.semi[2] - self.dome * u * u) / thickness
        return np.sqrt(u * u + v * v + w * w)

    def point(self, u: float, v: float, w: float) -> np.ndarray:
        """mm position (x, y, z) of normalised liver coordinates (the inverse of radius's mapping)."""
        thickness = float(self.thickness(np.float64(u)))
        return self.centre + self.semi * np.array(
            [u, v * thickness + self.slant * u, w * thickness + self.dome * u * u]
        )

    def column_per_mm(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Length of the liver along z over each (x, y), per mm of half-height: shears keep it, so the
        volume is linear in the half-height."""
        u = (x - self.centre[0]) / self.semi[0]
        thickness = self.thickness(u)
        v = ((y - self.centre[1]) / self.semi[1] - self.slant * u) / thickness
        return 2.0 * thickness * np.sqrt(np.clip(1.0 - u * u - v * v, 0.0, None))


class _Abdomen:
    """One synthetic abdomen in mm, rendered slab by slab into an int16 CT and a uint8 LiTS label map.

    Coordinates: x from the patient's right (-) to left (+), y from front (-) to back (+), both from
    the middle of the slice; z up from the lowest slice. What does not change along z (skin, fat,
    muscle wall, spine, aorta, paraspinal muscles) is drawn once as one slice; the organs (liver with
    tumours and gallbladder, kidneys, spleen, stomach, bowel, lung bases, ribs) only on the slices and
    the boxes they occupy.
    """

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple) -> None:
        self.rng, self.shape, self.spacing = rng, shape, spacing
        depth, height, width = shape
        self.x = ((np.arange(width) - (width - 1) / 2) * spacing[2]).astype(np.float32)[None, None, :]
        self.y = ((np.arange(height) - (height - 1) / 2) * spacing[1]).astype(np.float32)[None, :, None]
        self.z = (np.arange(depth) * spacing[0]).astype(np.float32)
        self.half_width = min(rng.uniform(140.0, 175.0), 0.46 * width * spacing[2])  # 28-35 cm wide
        self.half_depth = self.half_width * rng.uniform(0.7, 0.82)
        self.fat, self.muscle = rng.uniform(8.0, 25.0), rng.uniform(9.0, 14.0)
        self.spine_y = self.half_depth - 0.7 * self.fat - 55.0  # vertebral body centre
        self.texture = _SlabNoise(rng, shape, spacing, 40.0)
        self.bowel = _SlabNoise(rng, shape, spacing, 22.0)
        self.bubbles = _SlabNoise(rng, shape, spacing, 12.0)
        self.wall, self.cavity, self.marrow, self.ring = self._wall()
        # The liver stays out of the space around the aorta, in front of the spine and left of the cava.
        self.liver_room = self.cavity & ~((self.x[0] > -35.0) & (self.y[0] > self.spine_y - 50.0))
        self.ring_angle = np.broadcast_to(np.arctan2(self.y[0], self.x[0]), self.ring.shape)[self.ring]
        self._place_organs()

    def _wall(self) -> tuple[np.ndarray, ...]:
        """The slice drawn once: HU of the body wall, spine and great vessels; the open abdominal cavity;
        the vertebral marrow (discs replace it between vertebrae); the rib ring in the muscle wall."""
        x, y, rng = self.x[0], self.y[0], self.rng
        angle = np.arctan2(y, x)
        outline = 1.0 + 0.02 * np.cos(3 * angle + rng.uniform(0, math.tau)) + 0.015 * np.cos(5 * angle)
        radius = _ellipse_radius(x, y, self.half_width, self.half_depth) * outline
        along_ray = 1.0 / np.sqrt(
            (np.cos(angle) / self.half_width) ** 2 + (np.sin(angle) / self.half_depth) ** 2
        )
        depth = (1.0 - radius) * along_ray  # mm under the skin
        fat = self.fat * (1.0 - 0.3 * np.sin(angle))  # thicker at the front
        hu = np.full(depth.shape, HU_VISCERAL_FAT, dtype=np.float32)
        hu[depth < fat + self.muscle] = HU_MUSCLE
        hu[depth < fat] = HU_FAT
        hu[depth < 2.0] = HU_SOFT_TISSUE
        hu[depth < 0.0] = HU_AIR
        vertebra, canal = np.hypot(x, y - self.spine_y), np.hypot(x, y - self.spine_y - 30.0)
        paraspinal = _ellipse_radius(np.abs(x) - 38.0, y - self.spine_y - 50.0, 28.0, 24.0) < 1.0
        arch = ((canal > 8.0) & (canal < 13.0) & (y > self.spine_y + 18.0)) | (
            (np.abs(x) < 4.0) & (y > self.spine_y + 38.0) & (y < self.spine_y + 65.0)
        )
        aorta = np.hypot(x - 18.0, y - self.spine_y + 34.0) < 11.0
        vena_cava = np.hypot(x + 24.0, y - self.spine_y + 36.0) < 12.0
        hu[paraspinal & (depth > fat)] = HU_MUSCLE
        hu[(vertebra < 20.0) | arch] = HU_BONE
        hu[vertebra < 17.0] = HU_MARROW
        hu[canal < 8.0] = HU_CANAL
        hu[aorta] = HU_AORTA
        hu[vena_cava] = HU_VEIN
        cavity = (
            (depth > fat + self.muscle)
            & ~paraspinal
            & (vertebra > 22.0)
            & (canal > 15.0)
            & ~aorta
            & ~vena_cava
        )
        ring = (
            (depth > fat + 2.0) & (depth < fat + 9.0) & ~((np.abs(x) < 35.0) & ((y < 0) | (y > self.spine_y)))
        )
        return hu, cavity, vertebra < 17.0, ring

    def _place_organs(self) -> None:
        """Sizes and positions of the organs, drawn once per case (mm)."""
        rng, top = self.rng, float(self.z[-1])
        inner_width = self.half_width - self.fat - self.muscle
        self._place_liver(inner_width, top)
        self.room_depth = ndimage.distance_transform_edt(self.liver_room, sampling=self.spacing[1:])
        self.liver_hu = rng.uniform(*HU_LIVER)
        (x_l, y_l, z_l), (half_x, half_y, half_z) = self.liver.centre, self.liver.semi
        self.gallbladder = (
            np.array([x_l + 0.35 * half_x, y_l - 0.55 * half_y, z_l - 0.55 * half_z]),
            np.array([14.0, 14.0, 32.0]),
        )
        tumours = (self._tumour() for _ in range(int(rng.integers(0, 4))))
        self.tumours = [tumour for tumour in tumours if tumour is not None]
        kidney = np.array([rng.uniform(26.0, 30.0), rng.uniform(22.0, 26.0), rng.uniform(50.0, 58.0)])
        kidney_z = z_l - half_z * 0.6
        self.kidneys = [
            (np.array([side * rng.uniform(62.0, 72.0), self.spine_y - 5.0, kidney_z + rise]), kidney)
            for side, rise in ((-1.0, -15.0), (1.0, 5.0))
        ]
        self.spleen = (
            np.array([inner_width - 35.0, self.spine_y - 20.0, z_l + 0.3 * half_z]),
            np.array([28.0, 45.0, 55.0]),
        )
        self.stomach = (
            np.array([40.0, -0.35 * self.half_depth, z_l + 0.2 * half_z]),
            np.array([45.0, 32.0, 50.0]),
        )
        self.diaphragm = z_l + 0.75 * half_z
        self.bowel_top = z_l - 0.2 * half_z
        self.rib_bottom = z_l - 0.6 * half_z
        self.rib_count, self.rib_period = int(rng.integers(9, 12)), rng.uniform(25.0, 35.0)
        self.disc_phase = rng.uniform(0.0, 32.0)

    def _place_liver(self, inner_width: float, top: float) -> None:
        """The liver frame, holding LIVER_LITRES inside the abdominal cavity, in the right upper quadrant.

        The half-height is drawn (60-85 mm) and the width found by bisection; a cavity too small for
        the volume at the widest makes the liver taller instead. Its dome lies 15-40 mm under the top
        of the scan, lower when the scan is too short to hold all of it.
        """
        rng = self.rng
        litres, half_z = rng.uniform(*LIVER_LITRES), rng.uniform(60.0, 85.0)
        depth_ratio, offset, forward = rng.uniform(0.85, 1.0), rng.uniform(0, 8), rng.uniform(-15.0, 0.0)
        self.liver = _LiverFrame(
            centre=np.zeros(3),
            semi=np.ones(3),
            taper=rng.uniform(0.35, 0.55),
            slant=rng.uniform(-0.3, -0.1),
            dome=rng.uniform(0.15, 0.35),
        )
        x, y = self.x[0], self.y[0]

        def volume_per_mm(width_fraction: float) -> float:
            half_x = inner_width * width_fraction
            self.liver.semi = np.array([half_x, half_x * depth_ratio, 1.0])
            self.liver.centre = np.array([-inner_width + half_x + offset, forward, 0.0])
            columns = self.liver.column_per_mm(x, y)[self.liver_room]
            return float(columns.sum()) * self.spacing[1] * self.spacing[2]

        low, high = 0.45, 0.85
        for _ in range(20):
            middle = (low + high) / 2
            low, high = (middle, high) if volume_per_mm(middle) * half_z < litres * 1e6 else (low, middle)
        self.liver.semi[2] = max(half_z, litres * 1e6 / volume_per_mm(high))
        self.liver.centre[2] = max(
            top - rng.uniform(15.0, 40.0) - self.liver.semi[2], self.liver.semi[2] + 5.0
        )

    def _tumour(self) -> tuple[np.ndarray, float, float] | None:
        """(centre mm, radius mm, HU) of a hypodense tumour well inside the liver, or None.

        Diameters 6-45 mm, at most 0.3 of the liver's local half-thickness, centred within half its
        normalised radius and clear (by a pixel or 2 mm) of the cavity's edges, the vena cava and the
        gallbladder, so liver surrounds it on every slice. Gives up (None) after 20 tries.
        """
        margin = max(2.0, float(self.spacing[1]))
        gallbladder_centre, gallbladder_semi = self.gallbladder
        for _ in range(20):
            u, v, w = _random_unit(self.rng) * self.rng.uniform(0.0, 0.5)
            local_half_thickness = float(self.liver.semi.min() * self.liver.thickness(np.float64(u)))
            radius = min(
                math.exp(self.rng.uniform(math.log(3.0), math.log(22.5))), 0.3 * local_half_thickness
            )
            centre = self.liver.point(u, v, w)
            column = round(centre[0] / self.spacing[2] + (self.shape[2] - 1) / 2)
            row = round(centre[1] / self.spacing[1] + (self.shape[1] - 1) / 2)
            inside = 0 <= row < self.shape[1] and 0 <= column < self.shape[2]
            room = self.room_depth[row, column] if inside else 0.0
            gallbladder = float(np.linalg.norm((centre - gallbladder_centre) / gallbladder_semi))
            if room >= radius + margin and gallbladder >= 1.0 + (radius + margin) / gallbladder_semi.min():
                return centre, radius, self.liver_hu - self.rng.uniform(*HU_LIVER_TUMOUR_DROP)
        return None

    def _box(self, z: np.ndarray, centre: np.ndarray, semi: np.ndarray) -> tuple | None:
        """(slab rows, row slice, column slice) covering an ellipsoid on the slab's slices, or None."""
        rows = np.flatnonzero(np.abs(z - centre[2]) <= semi[2] * 1.5)
        if not rows.size:
            return None
        y_range = np.flatnonzero(np.abs(self.y[0, :, 0] - centre[1]) <= semi[1] * 1.5)
        x_range = np.flatnonzero(np.abs(self.x[0, 0] - centre[0]) <= semi[0] * 1.5)
        if not y_range.size or not x_range.size:
            return None
        return (
            slice(rows[0], rows[-1] + 1),
            slice(y_range[0], y_range[-1] + 1),
            slice(x_range[0], x_range[-1] + 1),
        )

    def render(self, slices: slice) -> tuple[np.ndarray, np.ndarray]:
        """(HU float32, labels uint8) of the slices in `slices`, before blur and noise."""
        z = self.z[slices]
        hu = np.repeat(self.wall[None], len(z), axis=0)
        discs = ((z + self.disc_phase) % 32.0) < 6.0  # intervertebral discs every 32 mm
        hu[discs[:, None, None] & self.marrow] = HU_DISC
        texture = self.texture.slab(slices)
        open_cavity = np.broadcast_to(self.cavity, hu.shape).copy()
        self._ribs(hu, z)
        labels = np.zeros(hu.shape, dtype=np.uint8)
        self._liver(hu, labels, open_cavity, z, texture)
        for centre, semi in self.kidneys:
            self._kidney(hu, open_cavity, z, centre, semi)
        self._solid_organ(hu, open_cavity, z, *self.spleen, HU_SPLEEN, texture)
        self._stomach(hu, open_cavity, z)
        self._bowel(hu, open_cavity, z, slices, texture)
        self._lung_bases(hu, open_cavity, z, texture)
        return hu, labels

    def _grids(self, z: np.ndarray, box: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, y, z (mm) of a box of the slab, broadcastable."""
        return self.x[..., box[2]], self.y[:, box[1]], z[box[0]][:, None, None]

    def _ellipsoid(self, z: np.ndarray, centre: np.ndarray, semi: np.ndarray) -> tuple | None:
        """(box, normalised radius on it) of an axis-aligned ellipsoid on the slab, or None."""
        box = self._box(z, centre, semi)
        if box is None:
            return None
        x, y, zz = self._grids(z, box)
        return box, np.sqrt(
            ((x - centre[0]) / semi[0]) ** 2
            + ((y - centre[1]) / semi[1]) ** 2
            + ((zz - centre[2]) / semi[2]) ** 2
        )

    def _ribs(self, hu: np.ndarray, z: np.ndarray) -> None:
        """Ribs in the muscle wall from the upper abdomen up, slanting as they run round the body."""
        for row in np.flatnonzero(z > self.rib_bottom):
            phase = self.rib_count * self.ring_angle + math.tau * z[row] / self.rib_period
            wall = hu[row][self.ring]
            hu[row][self.ring] = np.where(np.cos(phase) > 0.55, HU_BONE, wall)

    def _liver(self, hu, labels, cavity, z, texture) -> None:
        """The liver (label 1) with its hypodense tumours (label 2), less the gallbladder (fluid)."""
        box = self._box(z, self.liver.centre, self.liver.semi)
        if box is None:
            return
        x, y, zz = self._grids(z, box)
        room = cavity[box] & self.liver_room[box[1:]]
        liver = (self.liver.radius(x, y, zz) * (1.0 + 0.06 * texture[box]) < 1.0) & room
        centre, semi = self.gallbladder
        gallbladder = (
            _ellipse_radius(x - centre[0], y - centre[1], semi[0], semi[1]) ** 2
            + ((zz - centre[2]) / semi[2]) ** 2
            < 1.0
        )
        gallbladder &= cavity[box]
        liver &= ~gallbladder
        region = hu[box]
        region[gallbladder] = HU_FLUID
        region[liver] = self.liver_hu + 6.0 * texture[box][liver]
        box_labels = labels[box]
        box_labels[liver] = 1
        edge = max(float(self.spacing[1]), 1.0)
        for (cx, cy, cz), radius, tumour_hu in self.tumours:
            distance = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (zz - cz) ** 2)
            coverage = np.clip(0.5 - (distance - radius) / edge, 0.0, 1.0) * liver
            region += coverage * (tumour_hu + 5.0 * texture[box] - region)
            box_labels[(distance < radius) & liver] = 2
        cavity[box] &= ~(liver | gallbladder)

    def _kidney(self, hu, cavity, z, centre, semi) -> None:
        """An enhancing kidney: bright cortex around a darker medulla."""
        shape = self._ellipsoid(z, centre, semi)
        if shape is None:
            return
        box, radius = shape
        kidney = (radius < 1.0) & cavity[box]
        hu[box][kidney] = np.where(radius[kidney] > 0.65, HU_KIDNEY_CORTEX, HU_KIDNEY_MEDULLA)
        cavity[box] &= ~kidney

    def _solid_organ(self, hu, cavity, z, centre, semi, value, texture) -> None:
        """A textured ellipsoidal organ of about `value` HU (the spleen, close to the liver's density)."""
        shape = self._ellipsoid(z, centre, semi)
        if shape is None:
            return
        box, radius = shape
        organ = (radius * (1.0 + 0.05 * texture[box]) < 1.0) & cavity[box]
        hu[box][organ] = value + 5.0 * texture[box][organ]
        cavity[box] &= ~organ

    def _stomach(self, hu, cavity, z) -> None:
        """A stomach with a soft-tissue wall, fluid, and air in front (the patient lies on the back)."""
        centre, semi = self.stomach
        shape = self._ellipsoid(z, centre, semi)
        if shape is None:
            return
        box, radius = shape
        stomach = (radius < 1.0) & cavity[box]
        _, y, _ = self._grids(z, box)
        content = np.where(np.broadcast_to(y < centre[1] - 0.4 * semi[1], radius.shape), HU_AIR, HU_FLUID)
        hu[box][stomach] = np.where(radius[stomach] > 0.85, HU_SOFT_TISSUE, content[stomach])
        cavity[box] &= ~stomach

    def _bowel(self, hu, cavity, z, slices, texture) -> None:
        """Bowel loops (soft tissue with air bubbles) filling the cavity below the liver, fat between."""
        rows = z < self.bowel_top
        if not rows.any():
            return
        loops = (self.bowel.slab(slices)[rows] > 0.1) & cavity[rows]
        air = (self.bubbles.slab(slices)[rows] > 1.4) & loops
        region = hu[rows]
        region[loops] = HU_BOWEL + 8.0 * texture[rows][loops]
        region[air] = -900.0
        hu[rows] = region

    def _lung_bases(self, hu, cavity, z, texture) -> None:
        """Lung bases above the domed diaphragm, lowest at the sides and the back."""
        rows = z > self.diaphragm - 60.0
        if not rows.any():
            return
        inner_width = self.half_width - self.fat - self.muscle
        dome = (
            self.diaphragm
            - 40.0 * (self.x / inner_width) ** 2
            - 15.0 * np.maximum(self.y / self.half_depth, 0.0)
        )
        lungs = (z[rows][:, None, None] > dome) & (np.abs(self.x) > 45.0) & cavity[rows]
        region = hu[rows]
        region[lungs] = HU_LUNG + 20.0 * texture[rows][lungs]
        hu[rows] = region


def render_abdomen_ct(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    flip_in_plane: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic abdominal CT: int16 HU (D, H, W) and uint8 labels (0 background, 1 liver, 2 tumour).

    Rendered LITS_SLAB slices at a time in float32 (blur in-plane, noise) straight into the outputs, so
    a 512 x 512 x 400 case needs its 210 MB of HU, 105 MB of labels and a few slabs. Array axes: z from
    the feet up, y from front to back, x from the patient's right to left, or with y and x reversed
    when flip_in_plane (for a direction diag(-1, -1, 1)).
    """
    abdomen = _Abdomen(rng, shape, spacing)
    ct, labels = np.empty(shape, dtype=np.int16), np.empty(shape, dtype=np.uint8)
    noise, blur = rng.uniform(8.0, 20.0), 0.6
    for start in range(0, shape[0], LITS_SLAB):
        slices = slice(start, min(shape[0], start + LITS_SLAB))
        hu, slab_labels = abdomen.render(slices)
        hu = ndimage.gaussian_filter(hu, sigma=(0.0, blur, blur), truncate=2.0)
        hu += np.float32(noise) * rng.standard_normal(hu.shape, dtype=np.float32)
        if flip_in_plane:
            hu, slab_labels = hu[:, ::-1, ::-1], slab_labels[:, ::-1, ::-1]
        ct[slices] = np.clip(np.rint(hu), HU_LITS_FLOOR, 3071)
        labels[slices] = slab_labels
    return ct, labels


def _lits_grid(rng: np.random.Generator, size: int, slices: tuple[int, int]) -> tuple[tuple, tuple]:
    """(shape, spacing) of one case: 1-2.5 mm slices where the slice count allows a real coverage."""
    count = int(rng.integers(slices[0], slices[1] + 1))
    pixel = rng.uniform(*LITS_PIXEL_MM) * 512 / size
    low, high = (
        max(LITS_EXTENT_MM[0], count * LITS_SLICE_MM[0]),
        min(LITS_EXTENT_MM[1], count * LITS_SLICE_MM[1]),
    )
    if low > high:  # a tiny test volume: coarse slices over a real coverage
        low, high = LITS_EXTENT_MM
    return (count, size, size), (rng.uniform(low, high) / count, pixel, pixel)


def _write_lits(root: Path, n_cases: int, size: int, slices: tuple[int, int], seed: int) -> None:
    for number, case_seed in enumerate(np.random.SeedSequence(seed).spawn(n_cases)):
        rng = np.random.default_rng(case_seed)
        shape, spacing = _lits_grid(rng, size, slices)
        flipped = number % 3 == 1
        geometry = _scan_geometry(rng, shape, spacing, flipped)
        ct, labels = render_abdomen_ct(rng, shape, spacing, flipped)
        write_volume(ct, geometry, root / f"volume-{number}.nii")
        del ct  # its 210 MB (at 512 x 512 x 400) are free before the labels are written
        write_volume(labels, geometry, root / f"segmentation-{number}.nii")


def make_lits(
    out_dir: str | Path,
    n_cases: int = 2,
    seed: int = 0,
    size: int = 512,
    slices: tuple[int, int] = (100, 400),
) -> Path:
    """Write a synthetic LiTS (liver tumour CT) stand-in to out_dir/lits and return that path.

    Layout as the real set: volume-<N>.nii (int16 HU) and segmentation-<N>.nii (uint8: 0 background,
    1 liver, 2 tumour), uncompressed NIfTI, N = 0, 1, 2... Each case has `size` x `size` pixels over a
    307-410 mm field of view (0.6-0.8 mm at 512) and a slice count drawn from `slices`, 1-2.5 mm thick
    where that count allows a 200-500 mm coverage (coarser for tiny test volumes). An abdomen: air
    outside, skin, subcutaneous fat, muscle, spine with discs, ribs, aorta and vena cava, kidneys,
    spleen, stomach, bowel loops with air, lung bases, and a liver of 1.2-2 litres (about +60 HU)
    with 0 to 3 hypodense tumours (6-45 mm) and a gallbladder. Cases 1, 4, 7... have ITK direction
    diag(-1, -1, 1), arrays flipped to match. A real-size case is gigabytes of work: generate it on
    request only. Same arguments give byte-identical files; refuses (FileExistsError) a non-empty
    out_dir/lits and writes atomically.
    """
    if not isinstance(size, int) or size < MIN_LITS_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_LITS_SIZE}, got {size!r}")
    slices = tuple(slices)
    if (
        len(slices) != 2
        or not all(isinstance(n, int) for n in slices)
        or not MIN_LITS_SLICES <= slices[0] <= slices[1]
    ):
        raise ValueError(
            f"slices must be (low, high) integers with {MIN_LITS_SLICES} <= low <= high, got {slices!r}"
        )
    if not isinstance(n_cases, int) or n_cases < 1:
        raise ValueError(f"n_cases must be a positive integer, got {n_cases!r}")
    return _write_atomically(
        out_dir, LITS_FOLDER, lambda root: _write_lits(root, n_cases, size, slices, seed)
    )


def _run_lits(args: argparse.Namespace) -> int:
    return _generate_unless_present(
        Path(args.out) / LITS_FOLDER,
        lambda: make_lits(args.out, args.cases, args.seed, args.size, tuple(args.slices)),
        f"synthetic LiTS ({args.cases} cases)",
    )


def _add_lits_command(commands: argparse._SubParsersAction) -> None:
    description = "synthetic liver tumour CT in the LiTS layout (real size: about 300 MB per case)"
    parser = _add_dataset_parser(commands, "lits", description, "lits", _run_lits)
    parser.add_argument("--cases", type=int, default=2, help="number of CT volumes (default: 2)")
    parser.add_argument("--size", type=int, default=512, help="pixels per slice side (default: 512)")
    parser.add_argument(
        "--slices", type=int, nargs=2, default=[100, 400], metavar=("MIN", "MAX"), help="slices per volume"
    )


DATASET_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_kaggle_3m_command,
    _add_luna_command,
    _add_msd_command,
    _add_lits_command,
]


def main(argv: list[str] | None = None) -> int:
    """Command line: one subcommand per dataset kind; each generates if absent, else skips."""
    parser = argparse.ArgumentParser(description="Generate synthetic stand-in datasets.")
    commands = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for add_command in DATASET_COMMANDS:
        add_command(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
