import pytest
import torch
from torch import nn

from vnet import InputStage, VNet

pytestmark = pytest.mark.usefixtures("single_thread")


def with_moved_running_statistics(model: VNet) -> VNet:
    """Run a few shifted training batches so eval-mode batch norm is not the identity."""
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(2.0 + 3.0 * torch.randn(2, 1, 16, 16, 16))
    return model.eval()


def zero_convolution(stage: InputStage) -> InputStage:
    """With the 5x5x5 conv zeroed (and fresh eval batch norm) only the residual remains."""
    with torch.no_grad():
        stage.conv[0].weight.zero_()
    return stage.eval()


def test_vnet_has_the_papers_stage_layout_of_5x5x5_convolutions():
    # input stage 1, down stages 2 + 3 + 3 + bottom 3, up stages 3 + 3 + 2 + 1
    model = VNet(init_features=4)
    convolutions = [m for m in model.modules() if type(m) is nn.Conv3d]
    assert sum(conv.kernel_size == (5, 5, 5) for conv in convolutions) == 21
    strided = [conv for conv in convolutions if conv.stride == (2, 2, 2)]
    assert [conv.out_channels for conv in strided] == [8, 16, 32, 64]
    transposed = [m for m in model.modules() if isinstance(m, nn.ConvTranspose3d)]
    assert [conv.out_channels for conv in transposed] == [32, 16, 8, 4]


def test_vnet_uses_plain_batch_norm_everywhere():
    model = VNet(init_features=4)
    norms = [m for m in model.modules() if "Norm" in type(m).__name__]
    assert norms and all(type(norm) is nn.BatchNorm3d for norm in norms)


@pytest.mark.parametrize("in_channels", [1, 2])
def test_input_stage_residual_tiles_the_input_over_channels(in_channels):
    stage = zero_convolution(InputStage(in_channels, out_channels=4))
    x = torch.rand(3, in_channels, 2, 3, 4) + 0.1  # positive: PReLU leaves it unchanged
    output = stage(x)
    assert output.shape == (3, 4, 2, 3, 4)
    for channel in range(4):
        torch.testing.assert_close(output[:, channel], x[:, channel % in_channels])


def test_input_stage_projects_when_width_is_not_a_multiple_of_input_channels():
    stage = InputStage(in_channels=3, out_channels=4)
    assert isinstance(stage.shortcut, nn.Conv3d) and stage.shortcut.kernel_size == (1, 1, 1)
    assert stage(torch.randn(2, 3, 4, 4, 4)).shape == (2, 4, 4, 4, 4)


@pytest.mark.parametrize("in_channels", [1, 2, 3])
def test_vnet_keeps_batch_size_for_any_input_channel_count(in_channels):
    model = VNet(in_channels=in_channels, out_channels=2, init_features=4).eval()
    assert model(torch.randn(3, in_channels, 16, 16, 16)).shape == (3, 2, 16, 16, 16)


def test_vnet_in_eval_mode_is_deterministic_even_with_dropout():
    model = with_moved_running_statistics(VNet(init_features=4, dropout=0.5))
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_vnet_eval_output_of_a_sample_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    model = with_moved_running_statistics(VNet(init_features=4))
    sample = torch.randn(1, 1, 16, 16, 16)
    others = 5.0 * torch.randn(3, 1, 16, 16, 16)
    with torch.no_grad():
        alone = model(sample)
        in_batch = model(torch.cat([sample, others]))[:1]
        torch.testing.assert_close(in_batch, alone, rtol=1e-4, atol=1e-5)
        # batch statistics (training mode, or the port's ContBatchNorm) would mix samples
        model.train()
        assert not torch.allclose(model(torch.cat([sample, others]))[:1], model(sample[[0, 0]])[:1])


def test_vnet_gradient_reaches_first_layer():
    model = VNet(in_channels=1, out_channels=1, init_features=4)
    model(torch.randn(2, 1, 16, 16, 16)).mean().backward()
    assert model.input_stage.conv[0].weight.grad.abs().sum() > 0
