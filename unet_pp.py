"""UNet++ (Zhou et al. 2018): a U-Net whose skips are nested, dense convolution pathways.

Node ``X[i, j]`` sits at level ``i`` (``init_features * 2**i`` channels, 1/2**i of the input
size) and column ``j``. Column 0 is the ``unet.Encoder`` backbone; every other node is a
``ConvBlock`` over the concatenation of all earlier nodes of its level ``X[i, 0..j-1]`` and the
transposed-conv upsampling of ``X[i+1, j-1]`` (as in the authors' implementation). The top row
``X[0, 1..4]`` has a 1x1 head each, which is what makes deep supervision and pruning possible.
"""

import torch
from torch import nn

from unet import ConvBlock, UNetBase, layers

MAX_DEPTH = 4  # one column per pooling of the backbone


class UNetPlusPlus(UNetBase):
    """UNet++ (Zhou et al. 2018) for 2D images or 3D volumes.

    Args:
        in_channels: image channels.
        out_channels: logit channels (1 for binary, K classes including background).
        init_features: width ``f`` of level 0; the backbone has widths ``f .. 16f``.
        spatial_dims: 2 for images (N, C, H, W), 3 for volumes (N, C, D, H, W).
        deep_supervision: in training mode return the logits of all 4 heads (``X[0,1]`` ..
            ``X[0,4]``, each full resolution) as a list, so the loss can supervise each.
        inference_depth: which head (1..4) gives the single output otherwise. Below 4 this is
            the pruned network: only nodes ``X[i, j]`` with ``i + j <= depth`` are computed.
            It may be changed after training (``model.inference_depth = 2``).

    Training mode with deep supervision returns a list of 4 logits tensors; every other case
    (and eval mode always) returns one logits tensor. Every spatial size must be divisible by
    ``size_divisor`` (16).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        init_features: int = 32,
        spatial_dims: int = 2,
        deep_supervision: bool = False,
        inference_depth: int = MAX_DEPTH,
    ) -> None:
        super().__init__(in_channels, init_features, spatial_dims)
        _, conv_transpose, _, _ = layers(spatial_dims)
        self.deep_supervision = deep_supervision
        self.inference_depth = inference_depth
        widths = self.encoder.widths
        self.upsamples = nn.ModuleDict()
        self.nodes = nn.ModuleDict()
        for level, column in self._nested_nodes(MAX_DEPTH):
            self.upsamples[_key(level, column)] = conv_transpose(
                widths[level + 1], widths[level], kernel_size=2, stride=2
            )
            self.nodes[_key(level, column)] = ConvBlock(
                (column + 1) * widths[level], widths[level], spatial_dims
            )
        self.heads = nn.ModuleList(self.output_conv(out_channels) for _ in range(MAX_DEPTH))

    @property
    def inference_depth(self) -> int:
        return self._inference_depth

    @inference_depth.setter
    def inference_depth(self, depth: int) -> None:
        if not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"inference_depth must be 1..{MAX_DEPTH}, got {depth}")
        self._inference_depth = depth

    @property
    def trains_every_parameter(self) -> bool:
        """Whether a training step reaches every parameter: without deep supervision the heads of
        X[0, 1..3] get no gradient (DistributedDataParallel must then look for unused parameters)."""
        return self.deep_supervision

    @staticmethod
    def _nested_nodes(depth: int) -> list[tuple[int, int]]:
        """(level, column) of every non-backbone node a network of ``depth`` needs, in order."""
        return [(level, column) for column in range(1, depth + 1) for level in range(depth - column + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_input_size(x)
        supervise_all = self.training and self.deep_supervision
        depth = MAX_DEPTH if supervise_all else self.inference_depth
        grid = {(level, 0): feature for level, feature in enumerate(self.encoder(x, depth))}
        for level, column in self._nested_nodes(depth):
            key = _key(level, column)
            upsampled = self.upsamples[key](grid[level + 1, column - 1])
            same_level = [grid[level, earlier] for earlier in range(column)]
            grid[level, column] = self.nodes[key](torch.cat([*same_level, upsampled], dim=1))
        if supervise_all:
            return [head(grid[0, column + 1]) for column, head in enumerate(self.heads)]
        return self.heads[depth - 1](grid[0, depth])


def _key(level: int, column: int) -> str:
    return f"x{level}_{column}"
