import pytest
import torch
from torch import nn

from unet import ConvBlock, Encoder, UNet, check_spatial_size, layers

pytestmark = pytest.mark.usefixtures("single_thread")


def test_layers_picks_2d_or_3d_classes():
    assert layers(2) == (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.MaxPool2d)
    assert layers(3) == (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.MaxPool3d)


@pytest.mark.parametrize("spatial_dims", [1, 4])
def test_layers_rejects_other_dimensions(spatial_dims):
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        layers(spatial_dims)


def test_check_spatial_size_accepts_multiples():
    check_spatial_size((32, 48), 16, "UNet")
    check_spatial_size((16, 32, 64), 16, "UNet")


def test_check_spatial_size_message_names_network_and_shape_to_pad_to():
    with pytest.raises(ValueError) as error:
        check_spatial_size((100, 128), 16, "UNet")
    assert str(error.value) == (
        "UNet needs every spatial size divisible by 16, got (100, 128); pad to (112, 128)"
    )


def test_conv_block_keeps_spatial_size_and_has_no_bias_before_batch_norm():
    block = ConvBlock(3, 5, spatial_dims=3)
    assert block(torch.randn(2, 3, 6, 7, 8)).shape == (2, 5, 6, 7, 8)
    convolutions = [layer for layer in block if isinstance(layer, nn.Conv3d)]
    assert len(convolutions) == 2
    assert all(conv.bias is None and conv.kernel_size == (3, 3, 3) for conv in convolutions)


def test_encoder_returns_finest_first_and_stops_at_depth():
    encoder = Encoder(in_channels=1, init_features=4, spatial_dims=2)
    features = encoder(torch.randn(1, 1, 32, 32))
    assert [tuple(f.shape) for f in features] == [
        (1, 4, 32, 32),
        (1, 8, 16, 16),
        (1, 16, 8, 8),
        (1, 32, 4, 4),
        (1, 64, 2, 2),
    ]
    assert len(encoder(torch.randn(1, 1, 32, 32), depth=2)) == 3


def test_default_unet_has_the_reference_parameter_count():
    # brain-segmentation-pytorch's UNet(in_channels=3, out_channels=1, init_features=32)
    model = UNet()
    assert sum(p.numel() for p in model.parameters()) == 7_763_041
    assert model.spatial_dims == 2 and model.size_divisor == 16


def test_unet_gradient_reaches_first_layer():
    model = UNet(in_channels=1, out_channels=1, init_features=4)
    model(torch.randn(2, 1, 32, 32)).mean().backward()
    first_conv = model.encoder.blocks[0][0]
    assert first_conv.weight.grad is not None
    assert first_conv.weight.grad.abs().sum() > 0
