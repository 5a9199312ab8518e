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


def test_deep_supervision_adds_a_full_size_output_per_decoder_level_in_training_only():
    model = ResUNet(1, 3, init_features=4, spatial_dims=3, depth=3, deep_supervision=True)
    x = torch.randn(2, 1, 16, 24, 16)
    outputs = model(x)
    assert [output.shape for output in outputs] == [(2, 3, 16, 24, 16)] * 3
    assert model.supervision_weights == [1.0, 0.5, 0.25]
    model.eval()
    assert isinstance(model(x), torch.Tensor) and model(x).shape == (2, 3, 16, 24, 16)


def test_deep_supervision_heads_only_add_outputs_the_main_logits_are_unchanged():
    torch.manual_seed(0)
    plain = ResUNet(in_channels=1, out_channels=2, init_features=4, spatial_dims=2, depth=3)
    torch.manual_seed(0)
    supervised = ResUNet(1, 2, init_features=4, spatial_dims=2, depth=3, deep_supervision=True)
    x = torch.randn(2, 1, 16, 16)
    assert torch.allclose(supervised(x)[0], plain(x))
    assert plain.supervision_weights == [1.0]


def test_instance_norm_normalises_each_sample_alone():
    model = ResUNet(in_channels=1, out_channels=2, init_features=4, spatial_dims=3, depth=2, norm="instance")
    assert not any(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    model.eval()
    x = torch.randn(2, 1, 8, 8, 8)
    alone = model(x[:1])
    together = model(torch.cat([x[:1], 100 * x[1:]]))
    assert torch.allclose(alone, together[:1], atol=1e-5)
    with pytest.raises(ValueError, match="norm must be one of"):
        ResUNet(norm="group")


def test_a_full_resolution_level_convolves_at_the_input_size_and_keeps_the_output_shape():
    model = ResUNet(1, 3, init_features=4, spatial_dims=3, depth=3, full_resolution=6)
    sizes = []
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            module.register_forward_hook(lambda _, __, output: sizes.append(tuple(output.shape[1:])))
    assert model(torch.randn(2, 1, 16, 24, 16)).shape == (2, 3, 16, 24, 16)
    assert (6, 16, 24, 16) in sizes
    assert model.down[0].body[0].in_channels == 1, "the encoder reads the image itself"
    assert not any(isinstance(m, nn.BatchNorm3d) for m in model.head.modules())
    assert ResUNet(1, 3, init_features=4, spatial_dims=2, depth=2, full_resolution=4)(
        torch.randn(1, 1, 8, 8)
    ).shape == (1, 3, 8, 8)
