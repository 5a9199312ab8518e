"""Augmentation moves image and label together and keeps labels as class indices."""

import numpy as np
import pytest

from transform import IntensityJitter, RandomAffine, build_transform


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


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
    image, label = blob_pair(shape)
    warped_image, warped_label = RandomAffine(scale=0.05, degrees=15, flip_prob=0.5)(image, label, rng(0))
    assert warped_image.shape == image.shape and warped_label.shape == label.shape
    assert not np.array_equal(warped_label, label)
    agreement = (np.rint(warped_image[0]) == warped_label).mean()
    assert agreement > 0.97


def test_labels_keep_their_class_values():
    generator = rng(1)
    image, label = blob_pair((48, 48))
    for _ in range(5):
        _, warped = RandomAffine(scale=0.2, degrees=30)(image, label, generator)
        assert set(np.unique(warped)) <= {0, 1, 2}
        assert warped.dtype == label.dtype


def test_a_certain_flip_alone_mirrors_the_width_exactly():
    image = np.arange(2 * 6 * 8, dtype=np.float32).reshape(2, 6, 8)
    label = (image[0] > 20).astype(np.uint8)
    warped_image, warped_label = RandomAffine(scale=0, degrees=0, flip_prob=1.0)(image, label, rng(0))
    np.testing.assert_allclose(warped_image, image[:, :, ::-1])
    np.testing.assert_array_equal(warped_label, label[:, ::-1])


def test_augmentation_is_a_function_of_its_generator():
    image, label = blob_pair((32, 32))
    first = RandomAffine()(image, label, rng(5))
    second = RandomAffine()(image, label, rng(5))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], RandomAffine()(image, label, rng(6))[0])


def test_intensity_jitter_changes_each_channel_by_a_bounded_gain_and_shift():
    image = np.ones((2, 4, 4), np.float32)
    label = np.zeros((4, 4), np.uint8)
    jittered, same_label = IntensityJitter(gain=0.1, shift=0.1, prob=1.0)(image, label, rng(0))
    assert same_label is label
    for channel in jittered:
        assert np.all(channel == channel[0, 0])
        assert 0.8 <= channel[0, 0] <= 1.2
    assert jittered[0, 0, 0] != jittered[1, 0, 0]


def test_no_augmentation_builds_no_transform():
    assert build_transform(scale=0, degrees=0, flip_prob=0) is None
    assert build_transform() is not None


def test_affine_prob_leaves_the_other_samples_exact_and_warps_about_that_share():
    generator = rng(2)
    image, label = blob_pair((24, 32, 32))
    augment = RandomAffine(scale=0.1, degrees=20, flip_prob=0.0, affine_prob=0.3)
    warped = [not np.array_equal(augment(image, label, generator)[1], label) for _ in range(200)]
    assert 0.2 < np.mean(warped) < 0.4
    never = RandomAffine(scale=0.1, degrees=20, flip_prob=0.0, affine_prob=0.0)
    exact_image, exact_label = never(image, label, generator)
    np.testing.assert_array_equal(exact_image, image)
    np.testing.assert_array_equal(exact_label, label)


def test_rotations_act_in_millimetres_on_anisotropic_voxels():
    # a sphere of radius 6 mm on 1 x 1 x 3 mm voxels stays a sphere: its extent along each axis in mm
    # is unchanged by any rotation about its centre, as long as the rotation is rigid in physical space
    spacing = np.array([3.0, 1.0, 1.0])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (16, 40, 40)], indexing="ij"), -1)
    centre = (np.array([16, 40, 40]) - 1) / 2
    label = (np.linalg.norm((grid - centre) * spacing, axis=-1) <= 6.0).astype(np.uint8)
    image = label.astype(np.float32)[None]
    physical = RandomAffine(scale=0.0, degrees=40, flip_prob=0.0, spacing=spacing)
    voxel = RandomAffine(scale=0.0, degrees=40, flip_prob=0.0)

    def extents(mask):
        return [(np.ptp(np.nonzero(mask)[axis]) + 1) * spacing[axis] for axis in range(3)]

    for seed in range(3):
        _, rigid = physical(image, label, rng(seed))
        _, sheared = voxel(image, label, rng(seed))
        assert abs(int(rigid.sum()) - int(label.sum())) < 0.08 * label.sum()
        assert np.ptp(extents(rigid)) <= 3.0  # still round, to one voxel along z
        assert np.ptp(extents(sheared)) >= 6.0  # a voxel-space rotation stretches it by two z voxels or more


def test_neighbouring_slices_of_one_channel_share_its_intensity_jitter():
    image = np.ones((6, 4, 4), np.float32)  # 3 slices (2.5D) of 2 channels, in slice_with_context order
    label = np.zeros((4, 4), np.uint8)
    jittered, _ = IntensityJitter(gain=0.2, shift=0.2, prob=1.0, context_copies=3)(image, label, rng(1))
    np.testing.assert_array_equal(jittered[0], jittered[2])
    np.testing.assert_array_equal(jittered[0], jittered[4])
    np.testing.assert_array_equal(jittered[1], jittered[5])
    assert jittered[0, 0, 0] != jittered[1, 0, 0]


def test_one_slice_of_context_draws_the_same_jitter_as_before_context_existed():
    image = np.random.default_rng(0).normal(size=(3, 4, 4)).astype(np.float32)
    label = np.zeros((4, 4), np.uint8)
    plain, _ = IntensityJitter(gain=0.2, shift=0.2, prob=1.0)(image, label, rng(3))
    generator = rng(3)
    generator.random()
    gains = generator.uniform(0.8, 1.2, 3).astype(np.float32)
    shifts = generator.uniform(-0.2, 0.2, 3).astype(np.float32)
    np.testing.assert_array_equal(plain, image * gains[:, None, None] + shifts[:, None, None])


def test_channels_that_are_not_whole_copies_are_an_error():
    with pytest.raises(ValueError, match="5 channels are not 3 copies of the same ones"):
        IntensityJitter(prob=1.0, context_copies=3)(np.ones((5, 4, 4), np.float32), np.zeros((4, 4)), rng(0))
