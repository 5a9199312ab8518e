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


@pytest.mark.parametrize(
    ("patch", "degrees", "scale", "spacing"),
    [((20, 24), 30, 0.2, None), ((12, 16, 10), 15, 0.05, None), ((8, 16, 16), 20, 0.1, (3.0, 1.0, 1.0))],
)
def test_a_patch_rotated_with_its_surroundings_has_no_voxel_from_outside_the_box_it_reads(
    patch, degrees, scale, spacing
):
    # the same draws on a box much larger than input_size() give the same centre: every voxel of the output
    # came from inside input_size(), none from the zeros beyond it
    context = RandomAffine(scale, degrees, flip_prob=0.5, spacing=spacing, output_size=patch)
    read = np.array(context.input_size())
    wide = read + 2 * 6
    volume = np.random.default_rng(0).uniform(1, 2, size=(2, *wide)).astype(np.float32)
    labels = (volume[0] > 1.5).astype(np.uint8)
    box = tuple(slice(6, 6 + n) for n in read)
    without_context = RandomAffine(scale, degrees, flip_prob=0.5, spacing=spacing)
    for seed in range(20):
        image, label = context(volume[(slice(None), *box)], labels[box], rng(seed))
        wide_image, wide_label = without_context(volume, labels, rng(seed))
        centre = tuple(slice((w - p) // 2, (w - p) // 2 + p) for w, p in zip(wide, patch, strict=True))
        assert image.shape == (2, *patch) and label.shape == patch
        np.testing.assert_allclose(image, wide_image[(slice(None), *centre)], atol=1e-5)
        np.testing.assert_array_equal(label, wide_label[centre])
        assert image.min() >= 1  # no zero corners


def test_a_patch_without_rotation_reads_no_surroundings_and_keeps_its_voxels():
    assert RandomAffine(scale=0, degrees=0, output_size=(6, 8)).input_size() == (6, 8)
    assert RandomAffine(affine_prob=0, output_size=(6, 8)).input_size() == (6, 8)
    assert RandomAffine().input_size() is None
    image = np.arange(2 * 10 * 12, dtype=np.float32).reshape(2, 10, 12)
    label = (image[0] % 3).astype(np.uint8)
    flip_only = RandomAffine(flip_prob=1.0, affine_prob=0.0, output_size=(6, 8))
    flipped, flipped_label = flip_only(image, label, rng(0))
    np.testing.assert_array_equal(flipped, image[:, 2:8, 2:10][:, :, ::-1])
    np.testing.assert_array_equal(flipped_label, label[2:8, 2:10][:, ::-1])


def test_an_input_without_a_centred_output_box_is_refused():
    augment = RandomAffine(output_size=(8, 8))
    with pytest.raises(ValueError, match="centred"):
        augment(np.zeros((1, 9, 10), np.float32), np.zeros((9, 10), np.uint8), rng(0))
    with pytest.raises(ValueError, match="centred"):
        augment(np.zeros((1, 6, 10), np.float32), np.zeros((6, 10), np.uint8), rng(0))
