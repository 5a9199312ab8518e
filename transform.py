"""Data augmentation applied identically to an image and its label map, in 2D or 3D.

The reference's augmentation (random scale ±5%, rotation ±15°, horizontal flip with p = 0.5) as one
affine resampling, so image and label move together: the image is interpolated linearly, the label map by
nearest neighbour, so it keeps its class values. Rotations and scaling act in millimetres, not voxels, when
the voxel spacing is given: on anisotropic voxels (e.g. 0.7 × 0.7 × 2.5 mm) a voxel-space rotation would
shear the anatomy. A 3D training patch is rotated with the volume around it, as nnU-Net does: the dataset
reads the larger box `RandomAffine.input_size()` and the transform returns its centre, so the patch's corners
hold anatomy, not zeros the network never sees at test time. Every transform draws its random numbers from
the generator it is given (one per training sample, `dataset.sample_rng`), so augmentation is exactly
reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import affine_transform


def _rotation(rng: np.random.Generator, spatial_dims: int, max_degrees: float) -> np.ndarray:
    """A random rotation: in-plane for 2D, about each axis in turn for 3D."""
    if spatial_dims == 2:
        angle = math.radians(rng.uniform(-max_degrees, max_degrees))
        cos, sin = math.cos(angle), math.sin(angle)
        return np.array([[cos, -sin], [sin, cos]])
    matrix = np.eye(3)
    for axes in ((1, 2), (0, 2), (0, 1)):
        angle = math.radians(rng.uniform(-max_degrees, max_degrees))
        plane = np.eye(3)
        plane[np.ix_(axes, axes)] = [
            [math.cos(angle), -math.sin(angle)],
            [math.sin(angle), math.cos(angle)],
        ]
        matrix = plane @ matrix
    return matrix


def _rotation_bound(spatial_dims: int, max_degrees: float) -> np.ndarray:
    """An upper bound on the magnitude of each entry of every matrix `_rotation` can draw."""
    sine = 1.0 if max_degrees >= 90 else math.sin(math.radians(max_degrees))
    if spatial_dims == 2:
        return np.array([[1.0, sine], [sine, 1.0]])
    bound = np.eye(3)
    for axes in ((1, 2), (0, 2), (0, 1)):
        plane = np.eye(3)
        plane[np.ix_(axes, axes)] = [[1.0, sine], [sine, 1.0]]
        bound = plane @ bound  # |A B| <= |A| |B| entry by entry
    return np.minimum(bound, 1.0)


def _centre(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """The centred box of `size` in the trailing axes of `array`."""
    lead = array.ndim - len(size)
    box = [slice(None)] * lead
    box += [slice((n - k) // 2, (n - k) // 2 + k) for n, k in zip(array.shape[lead:], size, strict=True)]
    return array[tuple(box)]


class RandomAffine:
    """Random scale, rotation and flips about the centre, for (C, *spatial) images and (*spatial) labels.

    scale: relative range (0.05 → factor in [0.95, 1.05]); degrees: maximum rotation per axis;
    flip_prob: probability of mirroring each axis in `flip_axes` (spatial axes, -1 = width);
    affine_prob: probability of the scale and rotation. Below 1, as in nnU-Net, the other samples keep
    their voxels exactly (flips only): no interpolation blur the test images never have, and no
    resampling cost. spacing: the voxel size per spatial axis (mm), so that rotations are rigid in
    physical space; None treats voxels as isotropic. output_size: return this centred box of a larger input
    (read `input_size()` voxels), so that every voxel of a rotated or scaled output comes from the input;
    None returns the input's size, zero where the rotation leaves it.
    """

    def __init__(
        self,
        scale: float = 0.05,
        degrees: float = 15.0,
        flip_prob: float = 0.5,
        flip_axes: Sequence[int] = (-1,),
        affine_prob: float = 1.0,
        spacing: Sequence[float] | None = None,
        output_size: Sequence[int] | None = None,
    ):
        if not 0 <= scale < 1:
            raise ValueError(f"scale must be in [0, 1), got {scale}")
        self.scale = scale
        self.degrees = degrees
        self.flip_prob = flip_prob
        self.flip_axes = tuple(flip_axes)
        self.affine_prob = affine_prob
        self.spacing = None if spacing is None else np.asarray(spacing, np.float64)
        self.output_size = None if output_size is None else tuple(int(n) for n in output_size)

    def input_size(self) -> tuple[int, ...] | None:
        """The box to read around `output_size` so that no scale and rotation this draws leaves it; None
        without an output_size (any input, returned at its size)."""
        if self.output_size is None:
            return None
        output = np.array(self.output_size)
        if not (self.scale or self.degrees) or self.affine_prob <= 0:
            return self.output_size
        spacing = np.ones(len(output)) if self.spacing is None else self.spacing
        stretch = spacing[None, :] / spacing[:, None] / (1 - self.scale)
        reach = _rotation_bound(len(output), self.degrees) * stretch
        half = (output - 1) / 2
        needed = reach @ half + 1  # linear interpolation reads the next voxel too
        margin = np.maximum(0, np.ceil(needed - half)).astype(int)
        return tuple(int(n) for n in output + 2 * margin)

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        spatial_dims = label.ndim
        output = self.output_size or label.shape
        surplus = np.array(label.shape) - output
        if len(output) != spatial_dims or np.any(surplus < 0) or np.any(surplus % 2):
            raise ValueError(f"a {label.shape} input has no centred {output} box (read input_size())")
        for axis in self.flip_axes:
            if rng.random() < self.flip_prob:
                image = np.flip(image, axis=axis if axis < 0 else axis + 1)
                label = np.flip(label, axis=axis)
        if not (self.scale or self.degrees) or rng.random() >= self.affine_prob:
            image, label = _centre(image, output), _centre(label, output)
            return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)
        factor = rng.uniform(1 - self.scale, 1 + self.scale)
        matrix = _rotation(rng, spatial_dims, self.degrees) / factor
        if self.spacing is not None:
            if len(self.spacing) != spatial_dims:
                raise ValueError(f"spacing {tuple(self.spacing)} has not one entry per axis of {label.shape}")
            matrix = np.diag(1 / self.spacing) @ matrix @ np.diag(self.spacing)
        offset = (np.array(label.shape) - 1) / 2 - matrix @ ((np.array(output) - 1) / 2)
        warped_image = np.stack(
            [
                affine_transform(channel, matrix, offset, output_shape=output, order=1, mode="constant")
                for channel in image
            ]
        )
        warped_label = affine_transform(label, matrix, offset, output_shape=output, order=0, mode="constant")
        return warped_image.astype(np.float32), warped_label


class IntensityJitter:
    """Random per-channel gain and shift of a normalised image (labels untouched).

    context_copies: the image holds this many neighbouring slices of the same channels (2.5D input, in
    the order of `dataset.slice_with_context`); they share each channel's gain and shift, since they
    come from one scan.
    """

    def __init__(self, gain: float = 0.1, shift: float = 0.1, prob: float = 0.5, context_copies: int = 1):
        self.gain = gain
        self.shift = shift
        self.prob = prob
        self.context_copies = context_copies

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        if rng.random() >= self.prob:
            return image, label
        channels, remainder = divmod(len(image), self.context_copies)
        if remainder:
            raise ValueError(f"{len(image)} channels are not {self.context_copies} copies of the same ones")
        gains = rng.uniform(1 - self.gain, 1 + self.gain, channels)
        shifts = rng.uniform(-self.shift, self.shift, channels)
        gains, shifts = (np.tile(v, self.context_copies).astype(np.float32) for v in (gains, shifts))
        expand = (slice(None),) + (None,) * (image.ndim - 1)
        return image * gains[expand] + shifts[expand], label


class Compose:
    """Apply transforms in order to (image, label) with one generator."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def input_size(self) -> tuple[int, ...] | None:
        """The box the first transform reads to return its output size, None if it takes any size."""
        first = self.transforms[0] if self.transforms else None
        return first.input_size() if isinstance(first, RandomAffine) else None

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        for transform in self.transforms:
            image, label = transform(image, label, rng)
        return image, label


def build_transform(
    scale: float = 0.05,
    degrees: float = 15.0,
    flip_prob: float = 0.5,
    flip_axes: Sequence[int] = (-1,),
    intensity: float = 0.0,
    affine_prob: float = 1.0,
    spacing: Sequence[float] | None = None,
    context_copies: int = 1,
    patch_size: Sequence[int] | None = None,
) -> Compose | None:
    """The training augmentation from its settings; None when every setting is off.

    context_copies: slices per sample that share their channels' intensity jitter (2.5D input).
    patch_size: the training patch, rotated and scaled with the volume around it (`Compose.input_size`)."""
    transforms = []
    if scale or degrees or flip_prob:
        affine = RandomAffine(scale, degrees, flip_prob, flip_axes, affine_prob, spacing, patch_size)
        transforms.append(affine)
    if intensity:
        transforms.append(IntensityJitter(gain=intensity, shift=intensity, context_copies=context_copies))
    return Compose(transforms) if transforms else None
