"""Residual U-Net (Kerfoot et al. 2018), the layout of MONAI's ``UNet`` with residual units.

Every encoder level is a residual unit whose first convolution has stride 2, and the last decoder step
is the transposed convolution that returns the logits, so no feature map is computed at full
resolution. That makes it several times cheaper than the max-pooling U-Net of the same widths, which
is what a CPU budget on small volumes needs (benchmarks/run.py, ``res_unet3d``).
"""

import torch
from torch import nn

from unet import check_spatial_size, layers


class ResidualUnit(nn.Module):
    """``num_convs`` 3x3(x3) conv-BN-ReLU layers plus a shortcut; the first conv may stride by 2.

    The shortcut is the identity when shapes match, otherwise a convolution with the same stride
    (3x3 when it strides, 1x1 when only the width changes).
    """

    def __init__(
        self, in_channels: int, out_channels: int, spatial_dims: int, stride: int = 1, num_convs: int = 2
    ) -> None:
        super().__init__()
        conv, _, norm, _ = layers(spatial_dims)
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
                norm(out_channels),
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

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int) -> None:
        super().__init__()
        _, conv_transpose, norm, _ = layers(spatial_dims)
        self.up = nn.Sequential(
            conv_transpose(in_channels, out_channels, kernel_size=2, stride=2, bias=False),
            norm(out_channels),
            nn.ReLU(inplace=True),
        )
        self.refine = ResidualUnit(out_channels, out_channels, spatial_dims, num_convs=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.refine(self.up(torch.cat([x, skip], dim=1)))


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

    Every spatial size must be divisible by ``size_divisor`` (``2**depth``). ``forward`` returns logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        init_features: int = 16,
        spatial_dims: int = 2,
        depth: int = 4,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"ResUNet depth must be at least 2, got {depth}")
        self.spatial_dims = spatial_dims
        self.size_divisor = 2**depth
        widths = [init_features * 2**level for level in range(depth + 1)]
        block_inputs = [in_channels, *widths[: depth - 1]]
        self.down = nn.ModuleList(
            ResidualUnit(block_in, width, spatial_dims, stride=2)
            for block_in, width in zip(block_inputs, widths[:depth], strict=True)
        )
        self.bottom = ResidualUnit(widths[depth - 1], widths[depth], spatial_dims)
        up_inputs = [
            widths[depth] + widths[depth - 1],
            *(2 * width for width in reversed(widths[1 : depth - 1])),
        ]
        self.up = nn.ModuleList(
            ResidualUpBlock(up_in, up_out, spatial_dims)
            for up_in, up_out in zip(up_inputs, reversed(widths[: depth - 1]), strict=True)
        )
        _, conv_transpose, _, _ = layers(spatial_dims)
        self.head = conv_transpose(2 * widths[0], out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_spatial_size(x.shape[2:], self.size_divisor, type(self).__name__)
        skips = []
        for unit in self.down:
            x = unit(x)
            skips.append(x)
        x = self.bottom(x)
        for block, skip in zip(self.up, reversed(skips[1:]), strict=True):
            x = block(x, skip)
        return self.head(torch.cat([x, skips[0]], dim=1))
