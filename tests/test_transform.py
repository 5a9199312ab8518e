"""Augmentation moves image and label together and keeps labels as class indices."""

import numpy as np
import pytest
import torch

from transform import IntensityJitter, RandomAffine, build_transform


def blob_pair(shape):
    """An image whose single channel equals its label map (a class-2 square inside a class-1 square)."""
    label = np.zeros(shape, np.uint8)
    outer = tuple(slice(s // 4, 3 * s // 4) for s in shape)
    inner = tuple(slice(3 * s // 8, 5 * s // 8) for s in shape)
    label[outer] = 1
    label[inner] = 2
    return label.astype(np.float32)[None], label


@pytest.mark.parametrize("shape", [(64, 64), (24, 32, 32)])
def test_image_and_label_move_together(shape):
    torch.manual_seed(0)
    image, label = blob_pair(shape)
    warped_image, warped_label = RandomAffine(scale=0.05, degrees=15, flip_prob=0.5)(image, label)
    assert warped_image.shape == image.shape and warped_label.shape == label.shape
    assert not np.array_equal(warped_label, label)
    agreement = (np.rint(warped_image[0]) == warped_label).mean()
    assert agreement > 0.97


def test_labels_keep_their_class_values():
    torch.manual_seed(1)
    image, label = blob_pair((48, 48))
    for _ in range(5):
        _, warped = RandomAffine(scale=0.2, degrees=30)(image, label)
        assert set(np.unique(warped)) <= {0, 1, 2}
        assert warped.dtype == label.dtype


def test_a_certain_flip_alone_mirrors_the_width_exactly():
    image = np.arange(2 * 6 * 8, dtype=np.float32).reshape(2, 6, 8)
    label = (image[0] > 20).astype(np.uint8)
    warped_image, warped_label = RandomAffine(scale=0, degrees=0, flip_prob=1.0)(image, label)
    np.testing.assert_allclose(warped_image, image[:, :, ::-1])
    np.testing.assert_array_equal(warped_label, label[:, ::-1])


def test_augmentation_is_reproducible_under_a_torch_seed():
    image, label = blob_pair((32, 32))
    torch.manual_seed(5)
    first = RandomAffine()(image, label)
    torch.manual_seed(5)
    second = RandomAffine()(image, label)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_intensity_jitter_changes_each_channel_by_a_bounded_gain_and_shift():
    torch.manual_seed(0)
    image = np.ones((2, 4, 4), np.float32)
    label = np.zeros((4, 4), np.uint8)
    jittered, same_label = IntensityJitter(gain=0.1, shift=0.1, prob=1.0)(image, label)
    assert same_label is label
    for channel in jittered:
        assert np.all(channel == channel[0, 0])
        assert 0.8 <= channel[0, 0] <= 1.2
    assert jittered[0, 0, 0] != jittered[1, 0, 0]


def test_no_augmentation_builds_no_transform():
    assert build_transform(scale=0, degrees=0, flip_prob=0) is None
    assert build_transform() is not None


def test_affine_prob_leaves_the_other_samples_exact_and_warps_about_that_share():
    torch.manual_seed(2)
    image, label = blob_pair((24, 32, 32))
    augment = RandomAffine(scale=0.1, degrees=20, flip_prob=0.0, affine_prob=0.3)
    warped = [not np.array_equal(augment(image, label)[1], label) for _ in range(200)]
    assert 0.2 < np.mean(warped) < 0.4
    never = RandomAffine(scale=0.1, degrees=20, flip_prob=0.0, affine_prob=0.0)
    exact_image, exact_label = never(image, label)
    np.testing.assert_array_equal(exact_image, image)
    np.testing.assert_array_equal(exact_label, label)
