import math

import pytest
import torch

from attention_unet import AttentionGate, AttentionUNet

pytestmark = pytest.mark.usefixtures("single_thread")


def set_unit_gate(gate: AttentionGate, psi_bias: float = 0.0) -> None:
    """One channel everywhere, weights 1: alpha = sigmoid(relu(x + g) + psi_bias)."""
    with torch.no_grad():
        for conv in (gate.skip_projection, gate.gate_projection, gate.psi):
            conv.weight.fill_(1.0)
        gate.gate_projection.bias.zero_()
        gate.psi.bias.fill_(psi_bias)


def test_gate_computes_additive_attention_by_hand():
    gate = AttentionGate(skip_channels=1, gate_channels=1, inter_channels=1)
    set_unit_gate(gate)
    skip = torch.tensor([[[[1.0, 1.0, 2.0]]]])
    gating = torch.tensor([[[[-3.0, 1.0, 0.0]]]])
    gated, alpha = gate(skip, gating)
    # relu(x + g) = (0, 2, 2)
    expected_alpha = torch.tensor([0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-2))])
    torch.testing.assert_close(alpha.flatten(), expected_alpha)
    torch.testing.assert_close(gated.flatten(), expected_alpha * skip.flatten())


def test_gate_can_close_a_skip_completely():
    gate = AttentionGate(skip_channels=1, gate_channels=1, inter_channels=1, spatial_dims=3)
    set_unit_gate(gate, psi_bias=-1e4)
    gated, alpha = gate(torch.ones(1, 1, 2, 2, 2), torch.ones(1, 1, 2, 2, 2))
    assert torch.all(alpha == 0) and torch.all(gated == 0)


def test_attention_maps_are_finest_first_with_skip_shapes_and_values_in_unit_interval():
    model = AttentionUNet(in_channels=1, out_channels=1, init_features=4)
    model(torch.randn(2, 1, 32, 64))
    shapes = [tuple(alpha.shape) for alpha in model.attention_maps]
    assert shapes == [(2, 1, 32, 64), (2, 1, 16, 32), (2, 1, 8, 16), (2, 1, 4, 8)]
    for alpha in model.attention_maps:
        assert alpha.min() >= 0 and alpha.max() <= 1
        assert not alpha.requires_grad


def test_attention_maps_in_3d_have_volume_shapes():
    model = AttentionUNet(in_channels=1, out_channels=1, init_features=4, spatial_dims=3).eval()
    model(torch.randn(1, 1, 32, 16, 32))
    shapes = [tuple(alpha.shape) for alpha in model.attention_maps]
    assert shapes == [(1, 1, 32, 16, 32), (1, 1, 16, 8, 16), (1, 1, 8, 4, 8), (1, 1, 4, 2, 4)]


def test_attention_maps_are_replaced_on_every_forward():
    model = AttentionUNet(in_channels=1, out_channels=1, init_features=4).eval()
    model(torch.randn(1, 1, 32, 32))
    model(torch.randn(3, 1, 16, 16))
    assert [alpha.shape[0] for alpha in model.attention_maps] == [3, 3, 3, 3]


def test_gradients_reach_first_layer_and_every_gate():
    model = AttentionUNet(in_channels=1, out_channels=1, init_features=4)
    model(torch.randn(2, 1, 32, 32)).mean().backward()
    first_conv = model.encoder.blocks[0][0]
    assert first_conv.weight.grad.abs().sum() > 0
    for decoder in model.decoders:
        assert decoder.gate.psi.weight.grad.abs().sum() > 0
