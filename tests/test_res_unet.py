import pytest
import torch
from torch import nn

from res_unet import ResidualUnit, ResUNet
from unet import UNet

pytestmark = pytest.mark.usefixtures("single_thread")


def test_residual_unit_is_identity_plus_body_when_shapes_match():
    unit = ResidualUnit(4, 4, spatial_dims=2).eval()
    assert isinstance(unit.shortcut, nn.Identity)
    x = torch.randn(1, 4, 8, 8)
    assert torch.allclose(unit(x), unit.body(x) + x)


@pytest.mark.parametrize(("stride", "kernel_size"), [(1, 1), (2, 3)])
def test_residual_unit_projects_the_shortcut_when_width_or_resolution_changes(stride, kernel_size):
    unit = ResidualUnit(2, 6, spatial_dims=3, stride=stride)
    assert unit.shortcut.kernel_size == (kernel_size,) * 3 and unit.shortcut.stride == (stride,) * 3
    assert unit(torch.randn(1, 2, 8, 8, 8)).shape == (1, 6, 8 // stride, 8 // stride, 8 // stride)


def test_encoder_halves_resolution_at_every_level_and_never_convolves_at_full_size():
    model = ResUNet(in_channels=1, out_channels=3, init_features=4, spatial_dims=3)
    sizes = []
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            module.register_forward_hook(lambda _, __, output: sizes.append(output.shape[2:]))
    model(torch.randn(1, 1, 32, 32, 32))
    assert max(size[0] for size in sizes) == 16
    assert [unit.body[0].stride for unit in model.down] == [(2, 2, 2)] * 4
    assert model.head(torch.randn(1, 8, 16, 16, 16)).shape == (1, 3, 32, 32, 32)


def test_res_unet_costs_a_fraction_of_the_unet_of_the_same_widths():
    def multiply_adds(model: nn.Module) -> int:
        total = 0

        def count(module, _, output):
            nonlocal total
            total += module.weight.numel() * output[0, 0].numel() * output.shape[0]

        for module in model.modules():
            if isinstance(module, nn.Conv3d | nn.ConvTranspose3d):
                module.register_forward_hook(count)
        with torch.no_grad():
            model(torch.randn(1, 1, 32, 32, 32))
        return total

    residual = multiply_adds(ResUNet(1, 3, init_features=8, spatial_dims=3))
    plain = multiply_adds(UNet(1, 3, init_features=8, spatial_dims=3))
    assert residual < plain / 3


def test_depth_sets_the_levels_and_the_size_divisor():
    shallow = ResUNet(in_channels=1, out_channels=3, init_features=4, spatial_dims=3, depth=3)
    assert shallow.size_divisor == 8 and len(shallow.down) == 3 and len(shallow.up) == 2
    assert shallow(torch.randn(1, 1, 40, 56, 40)).shape == (1, 3, 40, 56, 40)
    with pytest.raises(ValueError, match="divisible by 8"):
        shallow(torch.randn(1, 1, 36, 56, 40))
    with pytest.raises(ValueError, match="depth must be at least 2"):
        ResUNet(depth=1)
