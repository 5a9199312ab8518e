"""The one place that maps network names to networks.

Notebooks and the training engine call ``build_model("unet", in_channels, out_channels, ...)``;
adding a network means adding one entry to ``MODELS``.
"""

import inspect
import math
from collections.abc import Callable, Sequence

from torch import nn

from attention_unet import AttentionUNet
from res_unet import ResUNet
from unet import UNet, check_spatial_size
from unet_pp import UNetPlusPlus
from vnet import VNet


def unet3d(in_channels: int = 1, out_channels: int = 1, init_features: int = 32) -> UNet:
    """3D U-Net (Çiçek et al. 2016): the UNet class with ``spatial_dims=3``."""
    return UNet(in_channels, out_channels, init_features, spatial_dims=3)


def res_unet3d(
    in_channels: int = 1,
    out_channels: int = 1,
    init_features: int = 16,
    depth: int = 4,
    norm: str = "batch",
    full_resolution: int = 0,
    deep_supervision: bool = False,
) -> ResUNet:
    """Residual U-Net (Kerfoot et al. 2018) for volumes: the ResUNet class with ``spatial_dims=3``."""
    return ResUNet(
        in_channels,
        out_channels,
        init_features,
        spatial_dims=3,
        depth=depth,
        norm=norm,
        full_resolution=full_resolution,
        deep_supervision=deep_supervision,
    )


MODELS: dict[str, Callable[..., nn.Module]] = {
    "unet": UNet,
    "unet3d": unet3d,
    "attention_unet": AttentionUNet,
    "unet_pp": UNetPlusPlus,
    "vnet": VNet,
    "res_unet": ResUNet,
    "res_unet3d": res_unet3d,
}


def build_model(name: str, in_channels: int, out_channels: int, **options) -> nn.Module:
    """Build the network called ``name``; ``options`` go to its constructor.

    Raises ValueError for an unknown name and TypeError for an option the network does not take
    (e.g. ``deep_supervision`` for "unet"), naming the network and the option.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    factory = MODELS[name]
    accepted = set(inspect.signature(factory).parameters) - {"in_channels", "out_channels"}
    for option in options:
        if option not in accepted:
            raise TypeError(
                f"model {name!r} does not accept option {option!r}; it accepts: {', '.join(sorted(accepted))}"
            )
    return factory(in_channels=in_channels, out_channels=out_channels, **options)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def check_input_size(model: nn.Module, spatial_shape: Sequence[int]) -> None:
    """ValueError naming the network unless it can train on inputs of this spatial size: every size a
    multiple of its divisor and, where it normalises per instance, more than one voxel at its deepest
    level (instance norm has nothing to normalise in one voxel). Called before training starts."""
    name = type(model).__name__
    check_spatial_size(spatial_shape, model.size_divisor, name)
    deepest = [int(size) // model.size_divisor for size in spatial_shape]
    instance_norms = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    if math.prod(deepest) == 1 and any(isinstance(m, instance_norms) for m in model.modules()):
        raise ValueError(
            f"{name} with instance norm cannot train on inputs of {tuple(spatial_shape)}: its deepest level "
            f"(1/{model.size_divisor} of the size) holds one voxel; make one axis at least "
            f"{2 * model.size_divisor} (patch_size), or use norm='batch'"
        )
