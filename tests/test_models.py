import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attention_unet import AttentionUNet
from config import VOLUMETRIC_MODELS
from models import MODELS, build_model, count_parameters
from res_unet import ResUNet
from unet import UNet
from unet_pp import UNetPlusPlus
from vnet import VNet

pytestmark = pytest.mark.usefixtures("single_thread")


EXPECTED = {
    "unet": (UNet, 2),
    "unet3d": (UNet, 3),
    "attention_unet": (AttentionUNet, 2),
    "unet_pp": (UNetPlusPlus, 2),
    "vnet": (VNet, 3),
    "res_unet": (ResUNet, 2),
    "res_unet3d": (ResUNet, 3),
}
NETWORKS_2D = [UNet, AttentionUNet, UNetPlusPlus, ResUNet]
NETWORKS_3D = [UNet, AttentionUNet, UNetPlusPlus, VNet, ResUNet]


def network_3d(network_class: type[nn.Module], **options) -> nn.Module:
    """A 3D instance: VNet is 3D only, the U-Net family takes ``spatial_dims=3``."""
    if network_class is VNet:
        return VNet(**options)
    return network_class(spatial_dims=3, **options)


def blob_batch(batch: int, spatial: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random blobs: the target is where a low-resolution noise field is positive."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 1, *(size // 8 for size in spatial), generator=generator)
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    field = F.interpolate(coarse, size=spatial, mode=mode, align_corners=False)
    target = (field > 0).float()
    image = field + 0.3 * torch.randn(field.shape, generator=generator)
    return image, target


def overfit_losses(
    model: nn.Module, image: torch.Tensor, target: torch.Tensor, lr: float, steps: int = 60
) -> list[float]:
    """BCE losses of Adam steps on one batch, stopping once a loss is below 0.3 of the first.

    A model that returns a list of logits (deep supervision) is scored by the mean BCE of its outputs.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        outputs = model(image)
        if isinstance(outputs, torch.Tensor):
            loss = F.binary_cross_entropy_with_logits(outputs, target)
        else:
            loss = sum(F.binary_cross_entropy_with_logits(o, target) for o in outputs) / len(outputs)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if losses[-1] < 0.3 * losses[0]:
            break
    return losses


def test_registry_holds_exactly_the_expected_networks():
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


def test_the_settings_know_which_networks_are_3d():
    assert set(VOLUMETRIC_MODELS) == {name for name, (_, dims) in EXPECTED.items() if dims == 3}


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


@pytest.mark.parametrize("network_class", NETWORKS_2D)
@pytest.mark.parametrize("spatial", [(32, 32), (48, 64)])
def test_2d_networks_return_logits_of_input_size(network_class, spatial):
    model = network_class(in_channels=3, out_channels=2, init_features=4)
    assert model.spatial_dims == 2 and model.size_divisor == 16
    assert model(torch.randn(2, 3, *spatial)).shape == (2, 2, *spatial)


@pytest.mark.parametrize("network_class", NETWORKS_3D)
@pytest.mark.parametrize("spatial", [(16, 16, 16), (32, 16, 32)])
def test_3d_networks_return_logits_of_input_size(network_class, spatial):
    model = network_3d(network_class, in_channels=1, out_channels=3, init_features=4).eval()
    assert model.spatial_dims == 3 and model.size_divisor == 16
    assert model(torch.randn(1, 1, *spatial)).shape == (1, 3, *spatial)


@pytest.mark.parametrize(
    ("network_class", "spatial", "padded"),
    [
        (UNet, (40, 32), (48, 32)),
        (AttentionUNet, (20, 64), (32, 64)),
        (UNetPlusPlus, (32, 33), (32, 48)),
        (VNet, (16, 24, 16), (16, 32, 16)),
        (ResUNet, (16, 40), (16, 48)),
    ],
)
def test_networks_reject_size_not_divisible_by_16_naming_themselves_and_the_shape_to_pad_to(
    network_class, spatial, padded
):
    model = network_class(in_channels=1, out_channels=1, init_features=4)
    message = (
        f"{network_class.__name__} needs every spatial size divisible by 16, got {spatial}; pad to {padded}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        model(torch.randn(1, 1, *spatial))


@pytest.mark.parametrize(
    ("network_class", "options", "spatial", "lr"),
    [
        pytest.param(UNet, {}, (32, 32), 3e-2, id="unet_2d"),
        pytest.param(UNet, {"spatial_dims": 3}, (16, 16, 16), 3e-2, id="unet_3d"),
        pytest.param(AttentionUNet, {}, (32, 32), 3e-2, id="attention_unet"),
        pytest.param(UNetPlusPlus, {"deep_supervision": True}, (32, 32), 3e-2, id="unet_pp_deep_supervision"),
        pytest.param(VNet, {}, (16, 16, 16), 1e-2, id="vnet"),
        pytest.param(ResUNet, {"spatial_dims": 3}, (16, 16, 16), 1e-2, id="res_unet_3d"),
    ],
)
def test_networks_overfit_one_blob_batch(network_class, options, spatial, lr):
    torch.manual_seed(0)
    image, target = blob_batch(2, spatial)
    model = network_class(in_channels=1, out_channels=1, init_features=4, **options)
    losses = overfit_losses(model, image, target, lr=lr)
    assert losses[-1] < 0.3 * losses[0]
