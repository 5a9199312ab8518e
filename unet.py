"""U-Net for 2D images and 3D volumes, and the blocks the other networks share.

The 2D network follows the reference course U-Net (Ronneberger et al. 2015, as written in
Buda et al.'s brain-segmentation-pytorch); with ``spatial_dims=3`` the same class is the 3D U-Net
of Çiçek et al. 2016. ``attention_unet.py`` and ``unet_pp.py`` build on ``UNetBase``,
``ConvBlock`` and ``UpBlock`` from here.
"""

from collections.abc import Sequence

import torch
from torch import nn


def layers(spatial_dims: int) -> tuple[type[nn.Module], ...]:
    """Conv, transposed conv, batch norm and max-pool classes for 2D or 3D."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if spatial_dims == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.MaxPool2d
    return nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.MaxPool3d


def check_spatial_size(spatial_shape: Sequence[int], divisor: int, network_name: str) -> None:
    """Raise ValueError unless every spatial size is a multiple of ``divisor``.

    Each max-pool halves the size, so a network that pools k times needs multiples of 2**k;
    the message gives the nearest larger shape to pad to.
    """
    shape = tuple(int(size) for size in spatial_shape)
    if all(size % divisor == 0 for size in shape):
        return
    padded = tuple(-(-size // divisor) * divisor for size in shape)
    raise ValueError(
        f"{network_name} needs every spatial size divisible by {divisor}, got {shape}; pad to {padded}"
    )


class ConvBlock(nn.Sequential):
    """Two 3x3(x3) convolutions, each followed by batch norm and ReLU (size preserving)."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2) -> None:
        conv, _, norm, _ = layers(spatial_dims)
        super().__init__(
            conv(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            norm(out_channels),
            nn.ReLU(inplace=True),
            conv(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            norm(out_channels),
            nn.ReLU(inplace=True),
        )


class Encoder(nn.Module):
    """Contracting path: a ConvBlock per level, 2x max-pool between levels.

    Level i has ``init_features * 2**i`` channels; with ``levels=5`` the last level is the
    bottleneck at 1/16 of the input size.
    """

    def __init__(self, in_channels: int, init_features: int, spatial_dims: int = 2, levels: int = 5) -> None:
        super().__init__()
        _, _, _, max_pool = layers(spatial_dims)
        self.widths = [init_features * 2**level for level in range(levels)]
        block_inputs = [in_channels, *self.widths[:-1]]
        self.blocks = nn.ModuleList(
            ConvBlock(block_in, width, spatial_dims)
            for block_in, width in zip(block_inputs, self.widths, strict=True)
        )
        self.pool = max_pool(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor, depth: int | None = None) -> list[torch.Tensor]:
        """Features of levels 0..depth (all levels by default), finest first."""
        last_level = len(self.blocks) - 1 if depth is None else depth
        features = []
        for level in range(last_level + 1):
            if level > 0:
                x = self.pool(x)
            x = self.blocks[level](x)
            features.append(x)
        return features


class UpBlock(nn.Module):
    """Expanding step: transposed conv (x2), concatenate the skip, ConvBlock."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2) -> None:
        super().__init__()
        _, conv_transpose, _, _ = layers(spatial_dims)
        self.up = conv_transpose(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = ConvBlock(2 * out_channels, out_channels, spatial_dims)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNetBase(nn.Module):
    """What the U-Net family shares: ``spatial_dims``, the five-level :class:`Encoder` (four
    poolings, so every spatial size must be divisible by ``size_divisor`` = 16), 1x1 output
    convolutions and the input size check.
    """

    size_divisor = 16

    def __init__(self, in_channels: int, init_features: int, spatial_dims: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.encoder = Encoder(in_channels, init_features, spatial_dims)

    def output_conv(self, out_channels: int) -> nn.Module:
        """A 1x1 convolution from the finest level's features to ``out_channels`` logits."""
        conv, _, _, _ = layers(self.spatial_dims)
        return conv(self.encoder.widths[0], out_channels, kernel_size=1)

    def check_input_size(self, x: torch.Tensor) -> None:
        """Raise ValueError, naming the network and the shape to pad to, unless x fits the pooling."""
        check_spatial_size(x.shape[2:], self.size_divisor, type(self).__name__)


class UNet(UNetBase):
    """U-Net (Ronneberger et al. 2015; 3D U-Net of Çiçek et al. 2016 with ``spatial_dims=3``).

    Four encoder levels with ``f, 2f, 4f, 8f`` features (``f = init_features``), a ``16f``
    bottleneck, max-pool down, transposed conv up, concatenated skips and a 1x1 output conv.

    Args:
        in_channels: image channels.
        out_channels: logit channels (1 for binary, K classes including background).
        init_features: width ``f`` of the first level; every parameter count scales with f**2.
        spatial_dims: 2 for images (N, C, H, W), 3 for volumes (N, C, D, H, W).

    Every spatial size must be divisible by ``size_divisor`` (16). ``forward`` returns logits.
    ``up_block`` is the decoder step; ``AttentionUNet`` swaps in one with a gated skip.
    """

    up_block: type[UpBlock] = UpBlock

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        init_features: int = 32,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(in_channels, init_features, spatial_dims)
        widths = self.encoder.widths
        self.decoders = nn.ModuleList(
            self.up_block(widths[level + 1], widths[level], spatial_dims)
            for level in reversed(range(len(widths) - 1))
        )
        self.head = self.output_conv(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x)
        *skips, x = self.encoder(x)
        for decoder, skip in zip(self.decoders, reversed(skips), strict=True):
            x = decoder(x, skip)
        return self.head(x)
