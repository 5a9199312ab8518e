"""V-Net (Milletari et al. 2016): a 3D fully convolutional network built from residual stages.

Every stage is a stack of 5x5x5 convolutions whose input is added to its output before the last
PReLU. Resolution is halved by strided 2x2x2 convolutions (doubling channels) and restored by
transposed 2x2x2 convolutions. Two bugs of the popular PyTorch port are avoided: the input
stage's residual repeats the input along the channel axis (not the batch axis), and batch norm is
plain ``nn.BatchNorm3d``, so eval mode uses running statistics and a sample's output does not
depend on the rest of its batch.
"""

import torch
from torch import nn

from unet import check_spatial_size

# Convolutions per stage after the single-conv input stage: down to 2f, 4f, 8f and the 16f
# bottom, then up through 16f, 8f, 4f and 2f wide stages (Milletari et al., figure 1).
DOWN_STAGE_CONVS = (2, 3, 3, 3)
UP_STAGE_CONVS = (3, 3, 2, 1)


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> list[nn.Module]:
    """A 3D convolution without bias (batch norm follows) and its batch norm."""
    return [
        nn.Conv3d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2 if stride == 1 else 0,
            bias=False,
        ),
        nn.BatchNorm3d(out_channels),
    ]


class ResidualStage(nn.Module):
    """``num_convs`` 5x5x5 conv-BN layers (PReLU between), input added before the final PReLU."""

    def __init__(self, channels: int, num_convs: int) -> None:
        super().__init__()
        stack: list[nn.Module] = []
        for index in range(num_convs):
            stack += conv_bn(channels, channels, kernel_size=5)
            if index < num_convs - 1:
                stack.append(nn.PReLU(channels))
        self.convs = nn.Sequential(*stack)
        self.activation = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.convs(x) + x)


class ChannelRepeat(nn.Module):
    """Broadcast (N, C, ...) to (N, C * repeats, ...) by tiling the channels."""

    def __init__(self, repeats: int) -> None:
        super().__init__()
        self.repeats = repeats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, self.repeats, *([1] * (x.dim() - 2)))


class InputStage(nn.Module):
    """First stage: one 5x5x5 conv-BN from ``in_channels`` to ``out_channels``, input as residual.

    The input is tiled over channels to match (channel k gets input channel k mod in_channels);
    when ``out_channels`` is not a multiple of ``in_channels`` a 1x1x1 projection replaces it.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(*conv_bn(in_channels, out_channels, kernel_size=5))
        self.shortcut = (
            ChannelRepeat(out_channels // in_channels)
            if out_channels % in_channels == 0
            else nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=False)
        )
        self.activation = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv(x) + self.shortcut(x))


class DownStage(nn.Sequential):
    """Strided 2x2x2 conv doubling the channels, then a residual stage."""

    def __init__(self, in_channels: int, num_convs: int, dropout: float) -> None:
        out_channels = 2 * in_channels
        super().__init__(
            *conv_bn(in_channels, out_channels, kernel_size=2, stride=2),
            nn.PReLU(out_channels),
            nn.Dropout3d(dropout),
            ResidualStage(out_channels, num_convs),
        )


class UpStage(nn.Module):
    """Transposed 2x2x2 conv to the skip's width, concatenate the skip, residual stage."""

    def __init__(self, in_channels: int, skip_channels: int, num_convs: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose3d(in_channels, skip_channels, kernel_size=2, stride=2, bias=False),
            nn.BatchNorm3d(skip_channels),
            nn.PReLU(skip_channels),
        )
        self.dropout = nn.Dropout3d(dropout)
        self.stage = ResidualStage(2 * skip_channels, num_convs)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.stage(self.dropout(torch.cat([self.up(x), skip], dim=1)))


class VNet(nn.Module):
    """V-Net (Milletari et al. 2016) for volumes (N, C, D, H, W).

    Encoder stages of width ``f, 2f, 4f, 8f`` (``f = init_features``) with (1, 2, 3, 3)
    convolutions, a ``16f`` bottom stage with 3, and decoder stages of width ``16f, 8f, 4f, 2f``
    (upsampled half concatenated with the skip) with (3, 3, 2, 1); a 1x1x1 conv gives the logits.

    Args:
        in_channels: image channels.
        out_channels: logit channels (1 for binary, K classes including background).
        init_features: width ``f`` of the first stage (16 in the paper).
        dropout: channel dropout probability at the input of every stage after the first;
            0 disables it. Inactive in eval mode.

    Every spatial size must be divisible by ``size_divisor`` (16). ``forward`` returns logits.
    """

    spatial_dims = 3
    size_divisor = 16

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        init_features: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [init_features * 2**level for level in range(len(DOWN_STAGE_CONVS) + 1)]
        self.input_stage = InputStage(in_channels, init_features)
        self.down_stages = nn.ModuleList(
            DownStage(widths[level], num_convs, dropout) for level, num_convs in enumerate(DOWN_STAGE_CONVS)
        )
        up_inputs = [widths[-1], *(2 * width for width in reversed(widths[1:-1]))]
        self.up_stages = nn.ModuleList(
            UpStage(up_in, skip_width, num_convs, dropout)
            for up_in, skip_width, num_convs in zip(
                up_inputs, reversed(widths[:-1]), UP_STAGE_CONVS, strict=True
            )
        )
        self.head = nn.Conv3d(2 * init_features, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_spatial_size(x.shape[2:], self.size_divisor, type(self).__name__)
        x = self.input_stage(x)
        skips = []
        for down in self.down_stages:
            skips.append(x)
            x = down(x)
        for up, skip in zip(self.up_stages, reversed(skips), strict=True):
            x = up(x, skip)
        return self.head(x)
