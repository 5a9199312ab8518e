"""Whole-image and whole-volume inference for networks trained on patches.

A 3D network trained on 64^3 patches cannot see a 155x240x240 brain MRI in one pass (memory, and the
network wants sizes divisible by its ``size_divisor``), so ``sliding_window_inference`` tiles the
volume with overlapping windows, predicts each window and blends the windows into one logit map.
``predict_padded`` is the simpler 2D case: pad a slice to the divisor, predict, crop back.

Choices:

- Logits are blended, not probabilities: a weighted mean of logits is what the windows agree on before
  the sigmoid/softmax, and callers (losses, metrics, argmax) all take logits.
- Gaussian importance weighting (the idea of nnU-Net, Isensee et al. 2021): a voxel near a window's
  border was predicted with a truncated receptive field (zero padding inside the network), so each
  window's logits are weighted by a Gaussian centred in the window. Where windows overlap, the window
  that has the voxel near its centre dominates and no seams appear at window borders. The map has a
  small positive floor so that every voxel has a non-zero total weight.
- Windows are spread evenly with the last one flush with the image end (no window hangs over the edge),
  and the image is zero-padded only when it is smaller than the patch.
- Windows are cut from the image and their weighted logits summed on the network's device, in float32
  whatever precision the network runs in, so a GPU never waits for the host between windows; only the
  blended result comes back to the CPU.
- ``mirror`` is test-time augmentation: the prediction is the mean over all flips of the chosen spatial
  axes (``True``: all of them, 4 flips in 2D, 8 in 3D), each flipped back before averaging. Mirror only
  the axes training mirrored: a network never shown upside-down images gains nothing from them.
"""

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMPORTANCE_FLOOR = 1e-3
"""Smallest value of the Gaussian importance map (its maximum is 1)."""


def _per_axis(value: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    """``value`` repeated for every spatial axis, or checked to have one entry per axis."""
    values = (value,) * spatial_dims if isinstance(value, int) else tuple(value)
    if len(values) != spatial_dims:
        raise ValueError(f"{name} needs one entry per spatial axis ({spatial_dims}), got {value!r}")
    return tuple(int(item) for item in values)


def pad_to_multiple(
    tensor: torch.Tensor,
    divisor: int | Sequence[int],
    minimum: Sequence[int] | None = None,
    mode: str = "constant",
    value: float = 0.0,
) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial dims of ``tensor`` (N, C, *spatial) up to a multiple of ``divisor``.

    Each spatial size becomes the smallest multiple of its divisor that is at least the size and at
    least ``minimum`` (if given). Padding is split evenly between both sides, the odd voxel at the end.
    ``mode`` and ``value`` are those of ``torch.nn.functional.pad``.

    Returns ``(padded, crop_slices)``; ``output[crop_slices]`` cuts an output with the padded spatial
    size (any N and C) back to the original spatial size.
    """
    if tensor.ndim < 3:
        raise ValueError(f"tensor must be (N, C, *spatial), got shape {tuple(tensor.shape)}")
    spatial_shape = tuple(tensor.shape[2:])
    spatial_dims = len(spatial_shape)
    divisors = _per_axis(divisor, spatial_dims, "divisor")
    if any(div < 1 for div in divisors):
        raise ValueError(f"divisor must be positive, got {divisor!r}")
    minimums = (0,) * spatial_dims if minimum is None else _per_axis(minimum, spatial_dims, "minimum")

    crop_slices = [slice(None), slice(None)]
    pads_per_axis = []
    for size, div, least in zip(spatial_shape, divisors, minimums, strict=True):
        target = math.ceil(max(size, least) / div) * div
        before = (target - size) // 2
        after = target - size - before
        pads_per_axis.append((before, after))
        crop_slices.append(slice(before, before + size))
    if any(before or after for before, after in pads_per_axis):
        # F.pad lists pads from the last axis backwards.
        flat_pads = [pad for pair in reversed(pads_per_axis) for pad in pair]
        if mode == "constant":
            tensor = F.pad(tensor, flat_pads, mode=mode, value=value)
        else:
            tensor = F.pad(tensor, flat_pads, mode=mode)
    return tensor, tuple(crop_slices)


def _check_spatial_dims(model: nn.Module, spatial_dims: int, what: str) -> None:
    expected = getattr(model, "spatial_dims", None)
    if expected is not None and expected != spatial_dims:
        raise ValueError(f"{what} has {spatial_dims} spatial dims but the network is {expected}D")


def predict_padded(
    model: nn.Module, batch: torch.Tensor, mirror: bool | Sequence[int] = False
) -> torch.Tensor:
    """Float32 logits of ``model`` for ``batch`` (N, C, *spatial) of any spatial size, on the CPU.

    Zero-pads to a multiple of ``model.size_divisor`` (1 when the network has none), runs the network
    and crops the logits back, e.g. for 50x36 hippocampus slices and a U-Net that needs multiples of
    16. ``mirror`` averages over flips of the spatial axes (test-time augmentation, as in
    ``sliding_window_inference``). The
    network's mode and autograd are left to the caller.
    """
    if batch.ndim < 3:
        raise ValueError(f"batch must be (N, C, *spatial), got shape {tuple(batch.shape)}")
    _check_spatial_dims(model, batch.ndim - 2, "batch")
    padded, crop_slices = pad_to_multiple(batch, getattr(model, "size_divisor", 1))
    return _predict_windows(model, padded, _flip_axis_sets(batch.ndim - 2, mirror))[crop_slices].cpu()


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Float32 weights of shape ``patch_size``: a Gaussian centred in the patch, maximum 1.

    The standard deviation along each axis is ``sigma_scale`` times the patch size along it. Values
    below ``IMPORTANCE_FLOOR`` are raised to it, so the map has no zeros (a 3D Gaussian underflows in
    the corners) and every voxel of a tiled image gets a positive total weight.
    """
    sizes = tuple(int(size) for size in patch_size)
    if not sizes or any(size < 1 for size in sizes):
        raise ValueError(f"patch_size must be positive sizes, got {patch_size!r}")
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be positive, got {sigma_scale}")
    weights = torch.ones((), dtype=torch.float64)
    for axis, size in enumerate(sizes):
        offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        profile = torch.exp(-0.5 * (offsets / (sigma_scale * size)) ** 2)
        shape = [1] * len(sizes)
        shape[axis] = size
        weights = weights * profile.reshape(shape)
    weights = weights / weights.max()
    return weights.clamp_min(IMPORTANCE_FLOOR).float()


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start offsets of windows of length ``patch`` that cover ``[0, size)``.

    Neighbouring windows overlap by about ``overlap`` of the patch (the step is at most
    ``round(patch * (1 - overlap))``); the windows are spread evenly, the first starts at 0 and the
    last ends exactly at ``size``. One window (start 0) when ``size <= patch``.
    """
    if size < 1 or patch < 1:
        raise ValueError(f"size and patch must be positive, got size={size}, patch={patch}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= patch:
        return [0]
    span = size - patch
    step = max(1, round(patch * (1 - overlap)))
    intervals = math.ceil(span / step)
    return [index * span // intervals for index in range(intervals + 1)]


def _flip_axis_sets(spatial_dims: int, mirror: bool | Sequence[int]) -> list[tuple[int, ...]]:
    """Tensor axes to flip for each test-time augmentation; ``()`` is the unflipped image.

    ``mirror``: False (no flips), True (every spatial axis) or the spatial axes to mirror (0 = the
    first spatial axis, -1 = the last).
    """
    if mirror is False:
        return [()]
    spatial_axes = range(spatial_dims) if mirror is True else mirror
    if any(not -spatial_dims <= axis < spatial_dims for axis in spatial_axes):
        raise ValueError(
            f"mirror axes {list(spatial_axes)} are not all spatial axes of a {spatial_dims}D input"
        )
    axes = sorted({2 + axis % spatial_dims for axis in spatial_axes})
    return [subset for count in range(len(axes) + 1) for subset in itertools.combinations(axes, count)]


def _predict_windows(
    model: nn.Module, windows: torch.Tensor, flip_sets: list[tuple[int, ...]]
) -> torch.Tensor:
    """Float32 logits for a batch of windows, on their device, averaged over the flips in ``flip_sets``."""
    total = None
    for axes in flip_sets:
        flipped = windows.flip(axes) if axes else windows
        logits = model(flipped)
        logits = (logits.flip(axes) if axes else logits).float()
        total = logits if total is None else total + logits
    return total / len(flip_sets)


def sliding_window_inference(
    model: nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 4,
    mirror: bool | Sequence[int] = False,
    gaussian: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Logits of ``model`` for a whole image (N, C, *spatial) or (C, *spatial), window by window.

    Windows of ``patch_size`` (2D or 3D by its length) overlap by about ``overlap``; they run through
    the network in batches of ``batch_size`` on ``device`` (default: the model's device) with the
    network in eval mode (its previous mode is restored afterwards). Each window's logits are
    weighted by a Gaussian importance map (uniform with ``gaussian=False``) and the weighted sum is
    divided by the summed weights. ``mirror`` averages over flips: True, every spatial axis; a
    sequence, those spatial axes (-1 = the last).

    An image smaller than the patch is zero-padded and the result cropped back, so the output always
    has the input's spatial size: float32 on the CPU, (N, K, *spatial) or (K, *spatial) like the input.
    Raises ValueError when ``patch_size`` is not divisible by the network's ``size_divisor``.
    """
    patch = tuple(int(size) for size in patch_size)
    spatial_dims = len(patch)
    if spatial_dims not in (2, 3) or any(size < 1 for size in patch):
        raise ValueError(f"patch_size must be 2 or 3 positive sizes, got {patch_size!r}")
    if image.ndim not in (spatial_dims + 1, spatial_dims + 2):
        raise ValueError(
            f"image must be (N, C, *spatial) or (C, *spatial) with {spatial_dims} spatial dims "
            f"(from patch_size {patch}), got shape {tuple(image.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    _check_spatial_dims(model, spatial_dims, "patch_size")
    divisor = getattr(model, "size_divisor", 1)
    if any(size % divisor for size in patch):
        suggestion = tuple(math.ceil(size / divisor) * divisor for size in patch)
        raise ValueError(
            f"patch_size {patch} must be divisible by the network's size_divisor {divisor}; "
            f"use e.g. {suggestion}"
        )
    if device is None:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")

    unbatched = image.ndim == spatial_dims + 1
    batch = image.unsqueeze(0) if unbatched else image
    padded, crop_slices = pad_to_multiple(batch.to(device, non_blocking=True), 1, minimum=patch)
    padded_shape = tuple(padded.shape[2:])

    importance = (gaussian_importance_map(patch) if gaussian else torch.ones(patch)).to(device)
    starts_per_axis = [
        window_starts(size, length, overlap) for size, length in zip(padded_shape, patch, strict=True)
    ]
    window_slices = [
        tuple(slice(start, start + length) for start, length in zip(starts, patch, strict=True))
        for starts in itertools.product(*starts_per_axis)
    ]
    weight_sum = torch.zeros(padded_shape, dtype=torch.float32, device=device)
    for slices in window_slices:
        weight_sum[slices] += importance

    jobs = [(item, slices) for item in range(padded.shape[0]) for slices in window_slices]
    flip_sets = _flip_axis_sets(spatial_dims, mirror)
    logit_sum = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, len(jobs), batch_size):
                chunk = jobs[first : first + batch_size]
                windows = torch.stack([padded[item][(slice(None), *slices)] for item, slices in chunk])
                logits = _predict_windows(model, windows, flip_sets)
                if tuple(logits.shape[2:]) != patch:
                    raise ValueError(
                        f"the network returned spatial size {tuple(logits.shape[2:])} for windows of "
                        f"{patch}; sliding-window inference needs size-preserving networks"
                    )
                if logit_sum is None:
                    logit_sum = torch.zeros(
                        (padded.shape[0], logits.shape[1], *padded_shape), dtype=torch.float32, device=device
                    )
                for (item, slices), window_logits in zip(chunk, logits, strict=True):
                    logit_sum[(item, slice(None), *slices)] += window_logits * importance
    finally:
        model.train(was_training)

    output = logit_sum.div_(weight_sum)[crop_slices].cpu()
    return output[0] if unbatched else output
