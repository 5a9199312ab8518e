"""Residual U-Net (Kerfoot et al. 2018), the layout of MONAI's ``UNet`` with residual units.

Every encoder level is a residual unit whose first convolution has stride 2, and the last decoder step
is the transposed convolution that returns the logits, so no feature map is computed at full
resolution. That makes it several times cheaper than the max-pooling U-Net of the same widths, which
is what a CPU budget on small volumes needs (benchmarks/run.py, ``res_unet3d``). ``full_resolution``
adds a narrow full-resolution level for structures only a few voxels thick.
"""

import torch
import torch.nn.functional as F
from torch import nn

from unet import check_spatial_size, layers

NORMS = ("batch", "instance", "none")


def norm_layer(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """Batch norm (the reference's), instance norm with learned scale and shift (nnU-Net's, MONAI's),
    or none."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "none":
        return nn.Identity()
    if norm == "batch":
        return layers(spatial_dims)[2](channels)
    instance = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
    return instance(channels, affine=True)


class ResidualUnit(nn.Module):
    """``num_convs`` 3x3(x3) conv-BN-ReLU layers plus a shortcut; the first conv may stride by 2.

    The shortcut is the identity when shapes match, otherwise a convolution with the same stride
    (3x3 when it strides, 1x1 when only the width changes).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int,
        stride: int = 1,
        num_convs: int = 2,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        conv = layers(spatial_dims)[0]
        body: list[nn.Module] = []
        for index in range(num_convs):
            body += [
                conv(
                    in_channels if index == 0 else out_channels,
                    out_channels,
                    kernel_size=3,
                    stride=stride if index == 0 else 1,
                    padding=1,
                    bias=False,
                ),
                norm_layer(norm, spatial_dims, out_channels),
                nn.ReLU(inplace=True),
            ]
        self.body = nn.Sequential(*body)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            kernel_size = 3 if stride > 1 else 1
            self.shortcut = conv(
                in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class ResidualUpBlock(nn.Module):
    """Concatenate the skip, transposed conv (x2) to ``out_channels`` with BN-ReLU, residual unit."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int, norm: str = "batch") -> None:
        super().__init__()
        conv_transpose = layers(spatial_dims)[1]
        self.up = nn.Sequential(
            conv_transpose(in_channels, out_channels, kernel_size=2, stride=2, bias=False),
            norm_layer(norm, spatial_dims, out_channels),
            nn.ReLU(inplace=True),
        )
        self.refine = ResidualUnit(out_channels, out_channels, spatial_dims, num_convs=1, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.refine(self.up(torch.cat([x, skip], dim=1)))


class FullResolutionLevel(nn.Module):
    """A narrow output level at the input's resolution, for a network whose decoder stops at half.

    Upsamples the finest decoder output to ``width`` channels, adds features computed from the image
    at full size (one convolution and ReLU), refines the sum with one residual convolution and returns
    logits through a 1x1 convolution. Sums rather than concatenations, no normalisation, and an encoder
    that still reads the raw image keep the full-size work to three narrow convolutions (report.md,
    "a full-resolution level").
    """

    def __init__(
        self, in_channels: int, decoder_channels: int, width: int, out_channels: int, spatial_dims: int
    ) -> None:
        super().__init__()
        conv, conv_transpose, _, _ = layers(spatial_dims)
        self.features = conv(in_channels, width, kernel_size=3, padding=1)
        self.up = conv_transpose(decoder_channels, width, kernel_size=2, stride=2)
        self.refine = conv(width, width, kernel_size=3, padding=1)
        self.head = conv(width, out_channels, kernel_size=1)

    def forward(self, decoded: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.up(decoded) + torch.relu(self.features(image)))
        return self.head(x + torch.relu(self.refine(x)))


class ResUNet(nn.Module):
    """Residual U-Net for 2D images or 3D volumes (Kerfoot et al. 2018).

    Encoder: ``depth`` residual units of width ``f, 2f, 4f, ...`` (``f = init_features``), each
    halving the resolution, then a bottom unit of twice the last width (``16f`` at 1/16 for the
    default depth 4, MONAI's layout). Decoder: at each level the coarser output is concatenated with
    that level's encoder output, upsampled to the next finer width and refined by a one-conv residual
    unit; at the finest level a transposed conv returns the logits at full size.

    Args:
        in_channels: image channels.
        out_channels: logit channels (1 for binary, K classes including background).
        init_features: width ``f`` of the first level.
        spatial_dims: 2 for images (N, C, H, W), 3 for volumes (N, C, D, H, W).
        depth: stride-2 levels (at least 2). Small inputs such as hippocampus volumes need only 3,
            which lets patches be multiples of 8 rather than 16 (nnU-Net's 40x56x40 for that task).
        norm: "batch" or "instance" normalisation after every convolution.
        full_resolution: width of an extra level at the input's resolution (0: none, MONAI's layout),
            for structures only a few voxels thick: see ``FullResolutionLevel``.
        deep_supervision: in training mode also return logits from each coarser decoder level (a 1x1
            head each, interpolated to full size), as nnU-Net does, so the loss reaches the inner
            levels directly; ``supervision_weights`` halves per level.

    Every spatial size must be divisible by ``size_divisor`` (``2**depth``). ``forward`` returns logits,
    or in training with deep supervision a list of them, the full-resolution output first.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        init_features: int = 16,
        spatial_dims: int = 2,
        depth: int = 4,
        norm: str = "batch",
        full_resolution: int = 0,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"ResUNet depth must be at least 2, got {depth}")
        self.spatial_dims = spatial_dims
        self.size_divisor = 2**depth
        self.deep_supervision = deep_supervision
        widths = [init_features * 2**level for level in range(depth + 1)]
        block_inputs = [in_channels, *widths[: depth - 1]]
        self.down = nn.ModuleList(
            ResidualUnit(block_in, width, spatial_dims, stride=2, norm=norm)
            for block_in, width in zip(block_inputs, widths[:depth], strict=True)
        )
        self.bottom = ResidualUnit(widths[depth - 1], widths[depth], spatial_dims, norm=norm)
        up_inputs = [
            widths[depth] + widths[depth - 1],
            *(2 * width for width in reversed(widths[1 : depth - 1])),
        ]
        up_widths = list(reversed(widths[: depth - 1]))
        self.up = nn.ModuleList(
            ResidualUpBlock(up_in, up_out, spatial_dims, norm=norm)
            for up_in, up_out in zip(up_inputs, up_widths, strict=True)
        )
        conv, conv_transpose, _, _ = layers(spatial_dims)
        self.head: nn.Module = (
            FullResolutionLevel(in_channels, 2 * widths[0], full_resolution, out_channels, spatial_dims)
            if full_resolution
            else conv_transpose(2 * widths[0], out_channels, kernel_size=2, stride=2)
        )
        self.aux_heads = nn.ModuleList(
            conv(width, out_channels, kernel_size=1) for width in (up_widths if deep_supervision else [])
        )

    @property
    def supervision_weights(self) -> list[float]:
        """Loss weights of the training outputs, full resolution first, halving per level."""
        return [0.5**level for level in range(1 + len(self.aux_heads))]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_spatial_size(x.shape[2:], self.size_divisor, type(self).__name__)
        image = x
        skips = []
        for unit in self.down:
            x = unit(x)
            skips.append(x)
        x = self.bottom(x)
        decoded = []
        for block, skip in zip(self.up, reversed(skips[1:]), strict=True):
            x = block(x, skip)
            decoded.append(x)
        x = torch.cat([x, skips[0]], dim=1)
        logits = self.head(x, image) if isinstance(self.head, FullResolutionLevel) else self.head(x)
        if not (self.training and self.deep_supervision):
            return logits
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        coarse = [
            F.interpolate(head(feature), size=logits.shape[2:], mode=mode)
            for head, feature in zip(self.aux_heads, decoded, strict=True)
        ]
        return [logits, *reversed(coarse)]
