import itertools
import math

import pytest
import torch
from torch import nn

from models import build_model
from sliding_window import (
    IMPORTANCE_FLOOR,
    gaussian_importance_map,
    pad_to_multiple,
    predict_padded,
    sliding_window_inference,
    window_starts,
)


def tiny_unet(spatial_dims: int, out_channels: int = 2) -> nn.Module:
    """A real U-Net (size_divisor 16) with random weights, 2 features wide, in eval mode."""
    torch.manual_seed(0)
    name = "unet" if spatial_dims == 2 else "unet3d"
    return build_model(name, 1, out_channels, init_features=2).eval()


class PointwiseNet(nn.Sequential):
    """1x1(x1) convs and tanh: each output voxel depends on its own input voxel only."""

    def __init__(self, spatial_dims: int, size_divisor: int = 1) -> None:
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        torch.manual_seed(0)
        super().__init__(conv(1, 4, 1), nn.Tanh(), conv(4, 2, 1))
        self.spatial_dims = spatial_dims
        self.size_divisor = size_divisor


def conv_net(spatial_dims: int, padding_mode: str = "zeros") -> nn.Module:
    """Two random 3x3(x3) convolutions: translation invariant, not flip symmetric."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    torch.manual_seed(1)
    return nn.Sequential(
        conv(1, 3, 3, padding=1, padding_mode=padding_mode),
        nn.ReLU(),
        conv(3, 2, 3, padding=1, padding_mode=padding_mode),
    )


def random_image(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# pad_to_multiple and predict_padded


def test_pad_to_multiple_pads_symmetrically_with_the_odd_voxel_at_the_end():
    tensor = torch.ones(1, 2, 5, 7, 9)
    padded, crop = pad_to_multiple(tensor, (4, 8, 1), value=-1.0)
    assert padded.shape == (1, 2, 8, 8, 9)
    # 5 -> 8: 1 before, 2 after; 7 -> 8: 0 before, 1 after; 9 stays.
    assert crop == (slice(None), slice(None), slice(1, 6), slice(0, 7), slice(0, 9))
    assert torch.equal(padded[crop], tensor)
    assert (padded[:, :, 0] == -1).all() and (padded[:, :, 6:] == -1).all()
    assert (padded[:, :, :, 7] == -1).all()
    assert padded.sum() == tensor.sum() - (padded.numel() - tensor.numel())


def test_pad_to_multiple_honours_the_minimum_and_round_trips_on_an_output_with_other_channels():
    tensor = random_image(2, 1, 10, 33)
    padded, crop = pad_to_multiple(tensor, 16, minimum=(40, 8))
    assert padded.shape == (2, 1, 48, 48)
    assert torch.equal(padded[crop], tensor)
    output = torch.cat([padded, 2 * padded, 3 * padded], dim=1)
    assert torch.equal(output[crop], torch.cat([tensor, 2 * tensor, 3 * tensor], dim=1))


def test_pad_to_multiple_leaves_a_divisible_tensor_unchanged_and_supports_reflect_mode():
    tensor = random_image(1, 1, 16, 32)
    padded, crop = pad_to_multiple(tensor, 16)
    assert padded is tensor and torch.equal(padded[crop], tensor)
    row = torch.arange(5.0).reshape(1, 1, 1, 5)
    padded, _ = pad_to_multiple(row, (1, 8), mode="reflect")
    assert padded.flatten().tolist() == [1, 0, 1, 2, 3, 4, 3, 2]


def test_pad_to_multiple_rejects_a_divisor_per_axis_of_the_wrong_length():
    with pytest.raises(ValueError, match="divisor"):
        pad_to_multiple(torch.zeros(1, 1, 4, 4), (2, 2, 2))


def test_predict_padded_returns_the_input_size_for_a_50_by_36_slice_and_a_divisor_16_unet():
    model = tiny_unet(2, out_channels=3)
    batch = random_image(2, 1, 50, 36)
    with torch.inference_mode():
        logits = predict_padded(model, batch)
        padded, crop = pad_to_multiple(batch, 16)
        expected = model(padded)[crop]
    assert logits.shape == (2, 3, 50, 36)
    assert torch.allclose(logits, expected, atol=1e-6)


def test_predict_padded_crops_the_logits_where_the_input_was_placed():
    model = PointwiseNet(2, size_divisor=16)
    batch = random_image(3, 1, 50, 36)
    with torch.no_grad():
        assert torch.allclose(predict_padded(model, batch), model(batch), atol=1e-6)


# window_starts and the Gaussian map


def test_window_starts_spreads_windows_evenly_with_the_last_flush():
    assert window_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert window_starts(11, 4, 0.5) == [0, 1, 3, 5, 7]
    assert window_starts(12, 4, 0.0) == [0, 4, 8]
    assert window_starts(4, 4, 0.5) == [0]
    assert window_starts(3, 4, 0.5) == [0]


@pytest.mark.parametrize("patch", [1, 4, 7, 16])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_window_starts_cover_every_index_with_steps_no_longer_than_asked(patch, overlap):
    for size in range(1, 50):
        starts = window_starts(size, patch, overlap)
        covered = set()
        for start in starts:
            covered.update(range(start, min(start + patch, size)))
        assert covered == set(range(size))
        assert starts[0] == 0 and starts == sorted(set(starts))
        if size > patch:
            assert starts[-1] + patch == size
            steps = [later - earlier for earlier, later in itertools.pairwise(starts)]
            assert max(steps) <= max(1, round(patch * (1 - overlap)))


def test_window_starts_rejects_an_overlap_of_one():
    with pytest.raises(ValueError, match="overlap"):
        window_starts(10, 4, 1.0)


def test_gaussian_map_has_the_hand_computed_profile():
    # patch 8, sigma 1: centre at 3.5, so index 0 is 3.5 from it and the peak voxels are 0.5 away.
    weights = gaussian_importance_map((8,))
    assert weights.dtype == torch.float32
    assert weights[0].item() == pytest.approx(math.exp(-0.5 * (3.5**2 - 0.5**2)), rel=1e-6)
    assert weights[3].item() == weights[4].item() == 1.0


def test_gaussian_map_has_max_one_a_positive_floor_and_is_symmetric():
    weights = gaussian_importance_map((64, 48, 33))
    assert weights.shape == (64, 48, 33)
    assert weights.max().item() == 1.0
    assert weights.min().item() == pytest.approx(IMPORTANCE_FLOOR)
    assert weights[32, 24, 16].item() == 1.0
    for axis in range(3):
        assert torch.equal(weights, weights.flip(axis))


# Sliding-window inference


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_one_window_the_size_of_the_padded_image_equals_one_full_forward_pass(spatial_dims):
    model = tiny_unet(spatial_dims)
    shape = (13, 16, 10) if spatial_dims == 3 else (27, 30)
    patch = (16,) * spatial_dims if spatial_dims == 3 else (32, 32)
    image = random_image(2, 1, *shape)
    output = sliding_window_inference(model, image, patch)
    padded, crop = pad_to_multiple(image, 1, minimum=patch)
    with torch.no_grad():
        expected = model(padded)[crop]
    assert output.shape == (2, 2, *shape)
    assert torch.allclose(output, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_pointwise_network_shows_no_seams_between_many_overlapping_windows(spatial_dims):
    model = PointwiseNet(spatial_dims)
    shape = (40, 37) if spatial_dims == 2 else (21, 18, 25)
    patch = (8,) * spatial_dims
    image = random_image(1, 1, *shape)
    output = sliding_window_inference(model, image, patch, overlap=0.6)
    with torch.no_grad():
        expected = model(image)
    assert torch.allclose(output, expected, atol=1e-6)


def test_a_constant_image_gives_a_constant_output_for_a_translation_invariant_network():
    # Replicate padding keeps a constant input constant inside every window, so any variation in
    # the output would come from how the windows are blended.
    model = conv_net(3, padding_mode="replicate")
    image = torch.full((1, 1, 20, 23, 17), 0.7)
    output = sliding_window_inference(model, image, (8, 8, 8), overlap=0.5)
    with torch.no_grad():
        value = model(torch.full((1, 1, 4, 4, 4), 0.7))[0, :, 0, 0, 0]
    assert torch.allclose(output, value.reshape(1, 2, 1, 1, 1).expand_as(output), atol=1e-6)


def test_gaussian_weighting_changes_the_blend_of_a_network_with_border_effects():
    model = conv_net(2)
    image = random_image(1, 1, 24, 24)
    weighted = sliding_window_inference(model, image, (8, 8), overlap=0.5, gaussian=True)
    uniform = sliding_window_inference(model, image, (8, 8), overlap=0.5, gaussian=False)
    with torch.no_grad():
        full = model(image)
    assert not torch.allclose(weighted, uniform, atol=1e-3)
    assert (weighted - full).abs().mean() < (uniform - full).abs().mean()


@pytest.mark.parametrize(
    ("shape", "patch"),
    [((5, 6), (8, 8)), ((19, 3), (8, 8)), ((9, 14, 3), (4, 8, 4)), ((30, 13), (16, 16))],
)
def test_outputs_have_the_exact_input_size_for_small_and_odd_images(shape, patch):
    model = PointwiseNet(len(patch))
    image = random_image(1, *shape)
    output = sliding_window_inference(model, image, patch, overlap=0.3)
    assert output.shape == (2, *shape)
    with torch.no_grad():
        assert torch.allclose(output, model(image[None])[0], atol=1e-6)


def test_an_unbatched_image_gives_an_unbatched_float32_cpu_output():
    model = tiny_unet(2).double()
    image = random_image(1, 40, 20).double()
    output = sliding_window_inference(model, image, (16, 16))
    assert output.shape == (2, 40, 20)
    assert output.dtype == torch.float32 and output.device.type == "cpu"


def test_batch_size_and_the_number_of_images_do_not_change_the_result():
    model = tiny_unet(2)
    images = random_image(2, 1, 40, 44)
    results = [sliding_window_inference(model, images, (16, 16), batch_size=size) for size in (1, 3, 64)]
    for result in results[1:]:
        assert torch.allclose(result, results[0], atol=1e-5)
    alone = sliding_window_inference(model, images[1:], (16, 16))
    assert torch.allclose(alone, results[0][1:], atol=1e-5)


def test_mirroring_does_not_change_a_flip_equivariant_network():
    model = PointwiseNet(3)
    image = random_image(1, 1, 12, 10, 14)
    plain = sliding_window_inference(model, image, (8, 8, 8), mirror=False)
    mirrored = sliding_window_inference(model, image, (8, 8, 8), mirror=True)
    assert torch.allclose(mirrored, plain, atol=1e-6)


def test_mirroring_a_right_shift_network_averages_the_left_and_right_neighbours():
    # out[i] = x[i + 1] along W; flipped along W it becomes x[i - 1]; flips along H change nothing.
    model = nn.Conv2d(1, 1, (1, 3), padding=(0, 1), bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([0.0, 0.0, 1.0]).reshape(1, 1, 1, 3))
    image = random_image(1, 1, 6, 8)
    mirrored = sliding_window_inference(model, image, (6, 8), mirror=True)
    plain = sliding_window_inference(model, image, (6, 8), mirror=False)
    padded = nn.functional.pad(image, (1, 1))
    assert torch.allclose(plain, padded[..., 2:], atol=1e-6)
    assert torch.allclose(mirrored, (padded[..., 2:] + padded[..., :-2]) / 2, atol=1e-6)


def test_mirroring_averages_the_back_flipped_predictions_of_all_eight_3d_flips():
    model = conv_net(3)
    image = random_image(1, 1, 8, 8, 8)
    mirrored = sliding_window_inference(model, image, (8, 8, 8), mirror=True)
    plain = sliding_window_inference(model, image, (8, 8, 8), mirror=False)
    flips = [axes for count in range(4) for axes in itertools.combinations((2, 3, 4), count)]
    with torch.no_grad():
        expected = sum(model(image.flip(axes)).flip(axes) for axes in flips) / 8
    assert len(flips) == 8
    assert torch.allclose(mirrored, expected, atol=1e-6)
    assert not torch.allclose(mirrored, plain, atol=1e-3)


def test_a_patch_not_divisible_by_the_size_divisor_raises_a_clear_error():
    with pytest.raises(ValueError, match="divisible by the network's size_divisor 16"):
        sliding_window_inference(tiny_unet(2), random_image(1, 1, 40, 40), (24, 32))


def test_a_patch_with_the_wrong_number_of_axes_is_rejected():
    with pytest.raises(ValueError, match="spatial dims"):
        sliding_window_inference(tiny_unet(3), random_image(1, 1, 16, 16), (16, 16))


def test_the_model_runs_in_eval_mode_and_gets_its_training_mode_back():
    model = tiny_unet(2)
    image = random_image(1, 1, 32, 32)
    expected = sliding_window_inference(model, image, (16, 16))
    model.train()
    output = sliding_window_inference(model, image, (16, 16))
    assert model.training
    assert torch.allclose(output, expected, atol=1e-6)


def test_sliding_window_works_inside_inference_mode():
    model = PointwiseNet(2)
    image = random_image(1, 1, 20, 20)
    with torch.inference_mode():
        output = sliding_window_inference(model, image, (8, 8))
        expected = model(image)
    assert torch.allclose(output, expected, atol=1e-6)


@pytest.mark.parametrize(("mirror", "flips"), [((-1,), [(), (4,)]), ([0, 2], [(), (2,), (4,), (2, 4)])])
def test_mirroring_chosen_axes_averages_only_their_flips(mirror, flips):
    model = conv_net(3)
    image = random_image(1, 1, 8, 8, 8)
    mirrored = sliding_window_inference(model, image, (8, 8, 8), mirror=mirror)
    with torch.no_grad():
        expected = sum(model(image.flip(axes)).flip(axes) if axes else model(image) for axes in flips)
    assert torch.allclose(mirrored, expected / len(flips), atol=1e-6)


@pytest.mark.parametrize("mirror", [(3,), (-4,)])
def test_a_mirror_axis_beyond_the_spatial_axes_is_refused_not_wrapped(mirror):
    with pytest.raises(ValueError, match=r"not all spatial axes of a 3D input"):
        sliding_window_inference(conv_net(3), random_image(1, 1, 8, 8, 8), (8, 8, 8), mirror=mirror)


def test_predict_padded_mirrors_the_chosen_axes_of_the_unpadded_image():
    model = conv_net(2)
    model.size_divisor = 16
    batch = random_image(2, 1, 16, 32)
    with torch.no_grad():
        expected = (model(batch) + model(batch.flip(3)).flip(3)) / 2
        assert torch.allclose(predict_padded(model, batch, mirror=(-1,)), expected, atol=1e-6)
        assert not torch.allclose(predict_padded(model, batch), expected, atol=1e-3)
