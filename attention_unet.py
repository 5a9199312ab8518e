"""Attention U-Net (Oktay et al. 2018): a U-Net whose skip connections pass through attention gates.

Encoder, decoder blocks and output head are those of ``unet.UNet``; the only addition is an
additive attention gate that scales every skip feature by a learned map in [0, 1] before it is
concatenated, so the decoder can ignore irrelevant regions.
"""

import torch
from torch import nn

from unet import UNet, UpBlock, layers


class AttentionGate(nn.Module):
    """Additive attention gate: ``alpha = sigmoid(psi(relu(W_x x + W_g g)))``, output ``alpha * x``.

    ``x`` is the skip feature, ``g`` the gating signal. Here ``g`` is the coarser decoder level
    after its transposed convolution, so it already lies on the skip's grid and ``W_x``, ``W_g``
    and ``psi`` are all 1x1 convolutions (Oktay et al. compute the gate on the coarse grid with a
    strided ``W_x`` and resample ``alpha`` up; on one grid that resampling is the identity).
    """

    def __init__(
        self, skip_channels: int, gate_channels: int, inter_channels: int, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        conv, _, _, _ = layers(spatial_dims)
        self.skip_projection = conv(skip_channels, inter_channels, kernel_size=1, bias=False)
        self.gate_projection = conv(gate_channels, inter_channels, kernel_size=1)
        self.psi = conv(inter_channels, 1, kernel_size=1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the gated skip (same shape as ``skip``) and the map alpha (N, 1, *spatial)."""
        energy = torch.relu(self.skip_projection(skip) + self.gate_projection(gate))
        alpha = torch.sigmoid(self.psi(energy))
        return alpha * skip, alpha


class AttentionUpBlock(UpBlock):
    """UpBlock whose skip is gated by the upsampled coarser feature before concatenation."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2) -> None:
        super().__init__(in_channels, out_channels, spatial_dims)
        inter_channels = max(1, out_channels // 2)
        self.gate = AttentionGate(out_channels, out_channels, inter_channels, spatial_dims)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the decoded feature and the attention map applied to ``skip``."""
        upsampled = self.up(x)
        gated_skip, alpha = self.gate(skip, upsampled)
        return self.conv(torch.cat([upsampled, gated_skip], dim=1)), alpha


class AttentionUNet(UNet):
    """Attention U-Net (Oktay et al. 2018) for 2D images or 3D volumes.

    Same layout as ``unet.UNet`` (widths ``f .. 16f``, 4 poolings) with an attention gate on each
    of the 4 skip connections.

    Args:
        in_channels: image channels.
        out_channels: logit channels (1 for binary, K classes including background).
        init_features: width ``f`` of the first level.
        spatial_dims: 2 for images (N, C, H, W), 3 for volumes (N, C, D, H, W).

    After each forward, ``attention_maps`` holds the 4 gate maps, finest level first: map ``i``
    has shape (N, 1, *spatial / 2**i) with values in [0, 1]. They are detached copies kept for
    inspection and plotting. Every spatial size must be divisible by ``size_divisor`` (16).
    ``forward`` returns logits.
    """

    up_block = AttentionUpBlock

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        init_features: int = 32,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(in_channels, out_channels, init_features, spatial_dims)
        self.attention_maps: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x)
        *skips, x = self.encoder(x)
        maps = []
        for decoder, skip in zip(self.decoders, reversed(skips), strict=True):
            x, alpha = decoder(x, skip)
            maps.append(alpha.detach())
        self.attention_maps = maps[::-1]
        return self.head(x)
