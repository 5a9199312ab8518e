import pytest
import torch
from torch import nn

from attention_unet import AttentionUNet
from models import MODELS, build_model, count_parameters
from unet import UNet
from unet_pp import UNetPlusPlus
from vnet import VNet


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors run many times faster on one thread than on two contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


EXPECTED = {
    "unet": (UNet, 2),
    "unet3d": (UNet, 3),
    "attention_unet": (AttentionUNet, 2),
    "unet_pp": (UNetPlusPlus, 2),
    "vnet": (VNet, 3),
}


def test_registry_holds_exactly_the_five_networks():
    assert set(MODELS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_build_model_builds_each_name_with_its_dimensions(name):
    network_class, spatial_dims = EXPECTED[name]
    model = build_model(name, in_channels=2, out_channels=3, init_features=4)
    assert isinstance(model, network_class)
    assert model.spatial_dims == spatial_dims
    assert model.size_divisor == 16
    spatial = (16,) * spatial_dims
    with torch.no_grad():
        logits = model.eval()(torch.randn(1, 2, *spatial))
    assert logits.shape == (1, 3, *spatial)


def test_build_model_passes_options_through():
    model = build_model("unet_pp", 1, 1, init_features=4, spatial_dims=3, deep_supervision=True)
    assert model.spatial_dims == 3 and model.deep_supervision
    assert model.encoder.widths[0] == 4


def test_build_model_rejects_unknown_name_listing_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet'") as error:
        build_model("resnet", 1, 1)
    assert all(name in str(error.value) for name in EXPECTED)


@pytest.mark.parametrize(
    ("name", "option"),
    [("unet", "deep_supervision"), ("vnet", "spatial_dims"), ("unet3d", "spatial_dims")],
)
def test_build_model_rejects_option_the_network_does_not_take(name, option):
    with pytest.raises(TypeError, match=f"model '{name}' does not accept option '{option}'"):
        build_model(name, 1, 1, **{option: True})


def test_count_parameters_counts_weights_and_biases_by_hand():
    model = nn.Sequential(nn.Conv2d(2, 3, kernel_size=3), nn.Linear(4, 5))
    assert count_parameters(model) == (2 * 3 * 9 + 3) + (4 * 5 + 5)


def test_count_parameters_skips_frozen_parameters():
    model = nn.Linear(4, 5)
    model.bias.requires_grad_(False)
    assert count_parameters(model) == 20


def test_count_parameters_of_default_unet_matches_reference():
    assert count_parameters(build_model("unet", 3, 1)) == 7_763_041
