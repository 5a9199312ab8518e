import pytest
import torch

from unet_pp import UNetPlusPlus

pytestmark = pytest.mark.usefixtures("single_thread")


def called_nodes(model: UNetPlusPlus, x: torch.Tensor) -> set[str]:
    """Names of the nested nodes X[i, j] (j >= 1) that one forward pass runs."""
    called = set()
    handles = [
        node.register_forward_hook(lambda *_, name=name: called.add(name))
        for name, node in model.nodes.items()
    ]
    model(x)
    for handle in handles:
        handle.remove()
    return called


def test_default_unet_pp_has_the_papers_parameter_count():
    # Zhou et al. 2018, table 1: UNet++ has 9.04 M parameters (widths 32 .. 512)
    model = UNetPlusPlus(in_channels=3, out_channels=1)
    assert abs(sum(p.numel() for p in model.parameters()) - 9.04e6) < 0.01e6


def test_deep_supervision_returns_four_full_size_logits_in_training():
    model = UNetPlusPlus(in_channels=1, out_channels=2, init_features=4, deep_supervision=True)
    outputs = model.train()(torch.randn(2, 1, 32, 32))
    assert isinstance(outputs, list)
    assert [tuple(output.shape) for output in outputs] == [(2, 2, 32, 32)] * 4


def test_deep_supervision_returns_one_tensor_in_eval_mode():
    model = UNetPlusPlus(in_channels=1, out_channels=2, init_features=4, deep_supervision=True)
    output = model.eval()(torch.randn(2, 1, 32, 32))
    assert isinstance(output, torch.Tensor) and output.shape == (2, 2, 32, 32)


def test_without_deep_supervision_training_returns_one_tensor():
    model = UNetPlusPlus(in_channels=1, out_channels=1, init_features=4)
    assert not model.deep_supervision
    assert isinstance(model.train()(torch.randn(2, 1, 32, 32)), torch.Tensor)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_pruned_network_computes_only_nodes_its_depth_needs(depth):
    model = UNetPlusPlus(in_channels=1, out_channels=1, init_features=4, inference_depth=depth)
    x = torch.randn(1, 1, 32, 32)
    expected = {f"x{i}_{j}" for i in range(5) for j in range(1, 5) if i + j <= depth}
    assert called_nodes(model.eval(), x) == expected
    assert model(x).shape == (1, 1, 32, 32)


def test_pruned_output_equals_the_matching_deep_supervision_head():
    # In training mode batch norm uses batch statistics, so both passes compute the same nodes.
    torch.manual_seed(0)
    model = UNetPlusPlus(in_channels=1, out_channels=1, init_features=4, deep_supervision=True)
    x = torch.randn(2, 1, 32, 32)
    all_heads = model.train()(x)
    model.deep_supervision = False
    for depth in (1, 2, 3):
        model.inference_depth = depth
        torch.testing.assert_close(model(x), all_heads[depth - 1])


def test_pruned_3d_network_returns_full_size_logits():
    model = UNetPlusPlus(1, 2, init_features=4, spatial_dims=3, inference_depth=2).eval()
    assert model(torch.randn(1, 1, 16, 32, 16)).shape == (1, 2, 16, 32, 16)


@pytest.mark.parametrize("depth", [0, 5, 2.0])
def test_inference_depth_outside_one_to_four_is_rejected(depth):
    with pytest.raises(ValueError, match="inference_depth must be 1..4"):
        UNetPlusPlus(1, 1, init_features=4, inference_depth=depth)


def test_gradients_reach_first_layer_and_every_head():
    model = UNetPlusPlus(in_channels=1, out_channels=1, init_features=4, deep_supervision=True)
    sum(output.mean() for output in model(torch.randn(2, 1, 32, 32))).backward()
    assert model.encoder.blocks[0][0].weight.grad.abs().sum() > 0
    for head in model.heads:
        assert head.weight.grad.abs().sum() > 0
