"""volumes.py: reading, writing, checking and resampling volumes, on files written here and on real data."""

import gzip
import json
import math
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import volumes
from volumes import (
    Geometry,
    LunaCase,
    NiftiCase,
    check_same_geometry,
    find_decathlon_cases,
    find_lits_cases,
    find_luna_cases,
    find_nifti_cases,
    load_image,
    load_label,
    lung_target,
    read_channels,
    read_dataset_info,
    read_luna_case,
    read_nifti_case,
    read_volume,
    resample,
    resample_to_shape,
    resampled_geometry,
    resampled_shape,
    window_ct,
    write_volume,
    zscore,
)

ROTATION_30_DEGREES_ABOUT_Z = (
    math.cos(math.pi / 6), -math.sin(math.pi / 6), 0.0,
    math.sin(math.pi / 6), math.cos(math.pi / 6), 0.0,
    0.0, 0.0, 1.0,
)  # fmt: skip
ANISOTROPIC = Geometry(
    spacing=(2.5, 0.7, 0.7), origin=(-120.5, 33.25, -301.0), direction=ROTATION_30_DEGREES_ABOUT_Z
)
LUNA_UID_260 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.105756658031515062000744821260"
LUNA_UID_492 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.108197895896446896160048741492"
LUNA_VOXEL_COUNTS = {  # from shared/data/README.md
    LUNA_UID_260: {3: 2_129_803, 4: 2_497_331, 5: 38_478},
    LUNA_UID_492: {3: 1_682_900, 4: 1_775_082, 5: 31_484},
}


def shared_data() -> Path:
    """../shared/data beside the repository (/work/shared/data); absent in a user's fresh clone."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def require_shared(name: str) -> Path:
    folder = shared_data() / name
    if not folder.is_dir():
        pytest.skip(f"real data folder {folder} is absent (only on the development machine)")
    return folder


def ramp(shape=(4, 5, 6), dtype=np.int16) -> np.ndarray:
    """Every voxel a different value, so a transposed or flipped axis cannot go unnoticed."""
    return (np.arange(math.prod(shape)).reshape(shape) - 50).astype(dtype)


def assert_same_geometry(actual: Geometry, expected: Geometry, tolerance=1e-5):
    np.testing.assert_allclose(actual.spacing, expected.spacing, atol=tolerance)
    np.testing.assert_allclose(actual.origin, expected.origin, atol=tolerance)
    np.testing.assert_allclose(actual.direction, expected.direction, atol=tolerance)


def header_fields(path: Path) -> dict[str, str]:
    return dict(line.split(" = ", 1) for line in path.read_text().splitlines())


# ---- reading and writing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "compress", "data_file"),
    [("scan.mhd", False, "scan.raw"), ("scan.mhd", True, "scan.zraw"), ("scan.nii.gz", True, None)],
)
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_written_volumes_read_back_with_the_same_values_dtype_and_geometry(
    tmp_path, name, compress, data_file, dtype
):
    array = ramp(dtype=dtype)
    write_volume(array, ANISOTROPIC, tmp_path / name, compress=compress)
    back, geometry = read_volume(tmp_path / name)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, array)
    assert_same_geometry(geometry, ANISOTROPIC)
    expected_files = {name} if data_file is None else {name, data_file}
    assert {p.name for p in tmp_path.iterdir()} == expected_files  # no temporary file left behind
    if data_file is not None:
        fields = header_fields(tmp_path / name)
        assert fields["ElementDataFile"] == data_file
        assert fields["CompressedData"] == str(compress)


def test_array_axes_are_z_y_x_and_spacing_is_in_array_order(tmp_path):
    write_volume(ramp((4, 5, 6)), ANISOTROPIC, tmp_path / "scan.mhd", compress=False)
    fields = header_fields(tmp_path / "scan.mhd")
    assert fields["DimSize"] == "6 5 4"  # MetaImage (x, y, z)
    assert [float(v) for v in fields["ElementSpacing"].split()] == pytest.approx([0.7, 0.7, 2.5])
    image = sitk.ReadImage(str(tmp_path / "scan.mhd"))
    array, geometry = read_volume(tmp_path / "scan.mhd")
    assert array.shape == (4, 5, 6) and geometry.spacing == pytest.approx((2.5, 0.7, 0.7))
    # Voxel [z, y, x] = [3, 1, 2] lies at origin + direction @ (x * 0.7, y * 0.7, z * 2.5).
    expected = np.array(ANISOTROPIC.origin) + np.reshape(ANISOTROPIC.direction, (3, 3)) @ [1.4, 0.7, 7.5]
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((2, 1, 3)), expected, atol=1e-9)
    assert array[3, 1, 2] == image[2, 1, 3]


def test_geometry_converts_to_and_from_itk_images():
    image = ANISOTROPIC.to_itk(sitk.Image(6, 5, 4, sitk.sitkUInt8))
    assert image.GetSpacing() == pytest.approx((0.7, 0.7, 2.5))
    assert image.GetOrigin() == ANISOTROPIC.origin
    assert Geometry.from_itk(image) == ANISOTROPIC
    assert ANISOTROPIC.voxel_volume == pytest.approx(2.5 * 0.7 * 0.7)
    with pytest.raises(ValueError, match="spacing"):
        Geometry(spacing=(1.0, 0.0, 1.0), origin=(0, 0, 0))


def test_a_4d_nifti_reads_as_channels_first_with_the_spatial_geometry(tmp_path):
    channels = np.stack([ramp(dtype=np.uint8), 2 * ramp(dtype=np.uint8)])
    image = sitk.JoinSeries([sitk.GetImageFromArray(c) for c in channels])
    image.SetSpacing((0.7, 0.7, 2.5, 1.0))
    image.SetOrigin((*ANISOTROPIC.origin, 0.0))
    sitk.WriteImage(image, str(tmp_path / "brain.nii.gz"))
    array, geometry = read_volume(tmp_path / "brain.nii.gz")
    assert array.shape == (2, 4, 5, 6) and array.dtype == np.uint8
    np.testing.assert_array_equal(array, channels)
    assert_same_geometry(geometry, Geometry((2.5, 0.7, 0.7), ANISOTROPIC.origin))
    as_float, _ = load_image(tmp_path / "brain.nii.gz")
    assert as_float.dtype == np.float32 and as_float.shape == (2, 4, 5, 6)


def test_load_image_gives_float32_channels_first_for_any_stored_dtype(tmp_path):
    write_volume(ramp(dtype=np.uint8), ANISOTROPIC, tmp_path / "a.nii.gz")
    image, geometry = load_image(tmp_path / "a.nii.gz")
    assert image.dtype == np.float32 and image.shape == (1, 4, 5, 6)
    np.testing.assert_array_equal(image[0], ramp(dtype=np.uint8))


def test_read_channels_stacks_channel_files_and_rejects_different_geometries(tmp_path):
    write_volume(ramp(), ANISOTROPIC, tmp_path / "case_0000.nii.gz")
    write_volume(ramp(dtype=np.uint8), ANISOTROPIC, tmp_path / "case_0001.nii.gz")
    image, geometry = read_channels([tmp_path / "case_0000.nii.gz", tmp_path / "case_0001.nii.gz"])
    assert image.shape == (2, 4, 5, 6) and image.dtype == np.float32
    np.testing.assert_array_equal(image[1], ramp(dtype=np.uint8))
    moved = Geometry(ANISOTROPIC.spacing, (0.0, 0.0, 0.0), ANISOTROPIC.direction)
    write_volume(ramp(), moved, tmp_path / "case_0001.nii.gz")
    with pytest.raises(ValueError, match=r"case_0000\.nii\.gz and .*case_0001\.nii\.gz differ: origin"):
        read_channels([tmp_path / "case_0000.nii.gz", tmp_path / "case_0001.nii.gz"])


def test_write_volume_overwrites_atomically_and_rejects_other_shapes(tmp_path):
    write_volume(ramp(), ANISOTROPIC, tmp_path / "out" / "p.mhd")
    write_volume(ramp() + 1, ANISOTROPIC, tmp_path / "out" / "p.mhd")
    np.testing.assert_array_equal(read_volume(tmp_path / "out" / "p.mhd")[0], ramp() + 1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p.mhd", "p.zraw"]
    with pytest.raises(ValueError, match="3D"):
        write_volume(np.zeros((2, 3)), ANISOTROPIC, tmp_path / "flat.nii.gz")
    with pytest.raises(ValueError, match="unsupported file type"):
        write_volume(ramp(), ANISOTROPIC, tmp_path / "p.png")


# ---- world and voxel coordinates -------------------------------------------------------------------------

FLIPPED_IN_PLANE = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
GEOMETRIES = {
    "identity": Geometry(spacing=(2.5, 0.7, 0.8), origin=(-120.5, 33.25, -301.0)),
    "flipped": Geometry(spacing=(2.5, 0.7, 0.8), origin=(180.0, 160.0, -301.0), direction=FLIPPED_IN_PLANE),
    "rotated": ANISOTROPIC,
}


def itk_image(geometry: Geometry) -> sitk.Image:
    return geometry.to_itk(sitk.Image(6, 5, 4, sitk.sitkUInt8))


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_index_to_world_agrees_with_itk_for_continuous_indices_in_array_order(name):
    geometry = GEOMETRIES[name]
    indices_zyx = np.random.default_rng(0).uniform(-2, 7, size=(2, 5, 3))
    world = geometry.index_to_world(indices_zyx)
    assert world.shape == (2, 5, 3)
    image = itk_image(geometry)
    for index, point in zip(indices_zyx.reshape(-1, 3), world.reshape(-1, 3), strict=True):
        expected = image.TransformContinuousIndexToPhysicalPoint(tuple(float(i) for i in index[::-1]))
        np.testing.assert_allclose(point, expected, atol=1e-9)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_world_to_index_is_the_exact_inverse_and_agrees_with_itk(name):
    geometry = GEOMETRIES[name]
    world = np.random.default_rng(1).uniform(-300, 300, size=(7, 3))
    indices = geometry.world_to_index(world)
    np.testing.assert_allclose(geometry.index_to_world(indices), world, atol=1e-9)
    image = itk_image(geometry)
    for point, index in zip(world, indices, strict=True):
        expected_xyz = image.TransformPhysicalPointToContinuousIndex(tuple(float(p) for p in point))
        np.testing.assert_allclose(index, expected_xyz[::-1], atol=1e-9)


def test_voxel_0_0_0_is_the_origin_and_one_step_along_x_moves_along_directions_first_column():
    geometry = GEOMETRIES["flipped"]
    np.testing.assert_allclose(geometry.index_to_world([0, 0, 0]), geometry.origin)
    np.testing.assert_allclose(geometry.index_to_world([0, 0, 1]) - geometry.origin, [-0.8, 0.0, 0.0])
    np.testing.assert_allclose(geometry.index_to_world([1, 0, 0]) - geometry.origin, [0.0, 0.0, 2.5])


def test_coordinates_without_three_components_are_refused():
    with pytest.raises(ValueError, match=r"index_zyx must have 3 coordinates .* shape \(4, 2\)"):
        ANISOTROPIC.index_to_world(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="world_xyz"):
        ANISOTROPIC.world_to_index(5.0)


# ---- bad files -------------------------------------------------------------------------------------------


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.nii.gz does not exist"):
        read_volume(tmp_path / "nowhere.nii.gz")


def test_an_mhd_whose_data_file_is_missing_names_both(tmp_path):
    write_volume(ramp(), ANISOTROPIC, tmp_path / "scan.mhd", compress=False)
    (tmp_path / "scan.raw").unlink()
    with pytest.raises(FileNotFoundError, match=r"scan\.mhd: its data file .*scan\.raw .*does not exist"):
        read_volume(tmp_path / "scan.mhd")


def test_a_truncated_raw_file_is_reported_with_its_expected_size(tmp_path):
    write_volume(ramp(), ANISOTROPIC, tmp_path / "scan.mhd", compress=False)
    data = (tmp_path / "scan.raw").read_bytes()
    assert len(data) == 4 * 5 * 6 * 2
    (tmp_path / "scan.raw").write_bytes(data[:100])
    with pytest.raises(ValueError, match=r"scan\.raw is truncated: 100 bytes, but scan\.mhd announces 240"):
        read_volume(tmp_path / "scan.mhd")


@pytest.mark.parametrize("damage", ["overwrite", "cut"])
def test_a_corrupt_or_truncated_zraw_file_is_reported(tmp_path, damage):
    write_volume(ramp(), ANISOTROPIC, tmp_path / "mask.mhd", compress=True)
    data = bytearray((tmp_path / "mask.zraw").read_bytes())
    if damage == "overwrite":
        data[10:20] = b"x" * 10  # SimpleITK alone would silently return garbage for this one
    else:
        data = data[: len(data) // 2]
    (tmp_path / "mask.zraw").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"mask\.zraw is truncated or corrupt"):
        read_volume(tmp_path / "mask.mhd")


def test_an_unreadable_file_is_named(tmp_path):
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti file" * 10)
    with pytest.raises(ValueError, match=r"could not read .*junk\.nii\.gz"):
        read_volume(tmp_path / "junk.nii.gz")


def test_check_same_geometry_states_every_difference_with_both_names():
    other = Geometry((2.5, 0.7, 0.8), (-120.5, 33.25, -300.0), ANISOTROPIC.direction)
    with pytest.raises(ValueError) as error:
        check_same_geometry(ANISOTROPIC, other, (4, 5, 6), (4, 5, 7), "ct.mhd", "mask.mhd")
    message = str(error.value)
    assert "ct.mhd and mask.mhd" in message
    assert "size (D, H, W) (4, 5, 6) vs (4, 5, 7)" in message
    assert "spacing (z, y, x) (2.5, 0.7, 0.7) mm vs (2.5, 0.7, 0.8) mm" in message
    assert "origin (x, y, z) (-120.5, 33.25, -301.0) mm vs (-120.5, 33.25, -300.0) mm" in message
    nearly = Geometry((2.5, 0.7, 0.7004), (-120.5, 33.25, -301.0005), ANISOTROPIC.direction)
    check_same_geometry(ANISOTROPIC, nearly, (1, 4, 5, 6), (4, 5, 6), "image", "label")


def nifti_with_ramp(path: Path) -> bytes:
    write_volume(ramp((4, 5, 6)), ANISOTROPIC, path)
    return path.read_bytes()


def test_a_truncated_nii_gz_is_reported_instead_of_read_with_zeros(tmp_path):
    data = nifti_with_ramp(tmp_path / "scan.nii.gz")
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.nii\.gz is truncated or corrupt \(gzip: .*end-of-stream"):
        read_volume(tmp_path / "cut.nii.gz")
    assert (tmp_path / "cut.nii.gz").read_bytes() == data[: len(data) // 2]  # the file is only read


def test_a_complete_gzip_stream_of_a_truncated_nifti_is_reported_with_both_sizes(tmp_path):
    raw = nifti_with_ramp(tmp_path / "scan.nii")
    assert len(raw) == 352 + 4 * 5 * 6 * 2  # header and extension flag, then the voxels
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw[:500]))
    with pytest.raises(
        ValueError, match=r"short\.nii\.gz is truncated: it decompresses to 500 bytes, .* 592"
    ):
        read_volume(tmp_path / "short.nii.gz")


def test_a_truncated_nii_is_reported_with_both_sizes(tmp_path):
    raw = nifti_with_ramp(tmp_path / "scan.nii")
    (tmp_path / "scan.nii").write_bytes(raw[:400])
    with pytest.raises(
        ValueError, match=r"scan\.nii is truncated: it holds 400 bytes, but its NIfTI header announces 592"
    ):
        read_volume(tmp_path / "scan.nii")


def nifti1_header(order: str, shape_xyz: tuple[int, ...], datatype: int, bitpix: int) -> bytes:
    """A minimal single-file NIfTI-1 header (352 bytes with the extension flag) in byte order `order`."""
    header = bytearray(352)
    struct.pack_into(f"{order}i", header, 0, 348)
    struct.pack_into(f"{order}8h", header, 40, len(shape_xyz), *shape_xyz, *[1] * (7 - len(shape_xyz)))
    struct.pack_into(f"{order}hh", header, 70, datatype, bitpix)
    struct.pack_into(f"{order}f", header, 108, 352.0)
    header[344:348] = b"n+1\0"
    return bytes(header)


@pytest.mark.parametrize("order", ["<", ">"])
def test_nifti_headers_of_either_byte_order_are_checked(tmp_path, order):
    float32 = 16
    voxels = np.arange(6 * 5 * 4, dtype=f"{order}f4")
    voxels[7] = np.inf
    header = nifti1_header(order, (6, 5, 4), float32, 32)
    (tmp_path / "cut.nii").write_bytes(header + voxels.tobytes()[:100])
    with pytest.raises(ValueError, match=r"cut\.nii is truncated: it holds 452 bytes, .* announces 832"):
        read_volume(tmp_path / "cut.nii")
    (tmp_path / "inf.nii.gz").write_bytes(gzip.compress(header + voxels.tobytes()))
    with pytest.raises(ValueError, match=r"inf\.nii\.gz: 1 of 120 voxels are NaN or infinite"):
        read_volume(tmp_path / "inf.nii.gz")


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.mhd"])
def test_nan_or_infinite_voxels_are_an_error_naming_the_file_and_their_count(tmp_path, name):
    image = ramp(dtype=np.float32)
    image[0, 0, :2], image[3, 4, 5] = np.nan, -np.inf
    write_volume(image, ANISOTROPIC, tmp_path / name)
    with pytest.raises(ValueError, match=rf"{re.escape(name)}: 3 of 120 voxels are NaN or infinite"):
        load_image(tmp_path / name)
    with pytest.raises(ValueError, match=rf"{re.escape(name)}: 3 of 120 voxels"):
        read_channels([tmp_path / name])


def test_a_luna_ct_with_nan_voxels_is_an_error_naming_it(tmp_path):
    write_luna(tmp_path, "1.2.3")
    ct = (ramp(dtype=np.int16) - 900).astype(np.float32)
    ct[1, 1, 1] = np.nan
    write_volume(ct, ANISOTROPIC, tmp_path / "subset0" / "1.2.3.mhd", compress=False)
    with pytest.raises(ValueError, match=r"subset0/1\.2\.3\.mhd: 1 of 120 voxels are NaN"):
        read_luna_case(find_luna_cases(tmp_path)[0])


def test_a_decathlon_image_with_fewer_channels_than_dataset_json_declares_is_named(tmp_path):
    write_decathlon(tmp_path, n_cases=1, modality={"0": "FLAIR", "1": "T1w"}, test=False)
    (case,) = find_decathlon_cases(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"case_000\.nii\.gz: the image has 1 channel\(s\) .* dataset\.json declares 2 in 'modality'",
    ):
        read_nifti_case(case, {0, 1, 2})


def test_a_luna_mask_without_the_requested_lung_labels_names_the_file_and_both_label_sets(tmp_path):
    write_luna(tmp_path, "1.2.3")
    mask = np.zeros((4, 5, 6), np.int16)
    mask[1:3, 1:4, 1:3], mask[1:3, 1:4, 3:5] = 1, 2
    write_volume(mask, ANISOTROPIC, tmp_path / "seg-lungs-LUNA16" / "1.2.3.mhd")
    case = find_luna_cases(tmp_path)[0]
    _, stored, _ = read_luna_case(case)
    with pytest.raises(
        ValueError,
        match=r"LUNA16/1\.2\.3\.mhd: the lung mask has no voxel labelled \[3, 4\] .* present are \[0, 1, 2\]",
    ):
        lung_target(stored, (3, 4), source=case.mask_path)
    with pytest.raises(ValueError, match=r"^The lung mask has no voxel labelled \[3, 4\]"):
        lung_target(stored)


# ---- labels and intensities ------------------------------------------------------------------------------


def test_labels_stored_as_float_are_rounded_to_uint8(tmp_path):
    label = np.zeros((4, 5, 6), np.float32)
    label[1:3, 2:4, 1:5] = 2.0
    label[0, 0, 0] = 1.0000001
    write_volume(label, ANISOTROPIC, tmp_path / "label.nii.gz")
    loaded = load_label(tmp_path / "label.nii.gz", {0, 1, 2})
    assert loaded.dtype == np.uint8
    assert np.bincount(loaded.ravel()).tolist() == [4 * 5 * 6 - 17, 1, 16]


def test_labels_outside_the_allowed_set_or_not_integral_are_errors_naming_the_file(tmp_path):
    label = np.zeros((4, 5, 6), np.uint8)
    label[0, 0, :3] = [1, 3, 7]
    write_volume(label, ANISOTROPIC, tmp_path / "label.nii.gz")
    with pytest.raises(
        ValueError, match=r"label\.nii\.gz: label values \[3, 7\] are not among .*\[0, 1, 2\]"
    ):
        load_label(tmp_path / "label.nii.gz", {0, 1, 2})
    write_volume(np.full((4, 5, 6), 0.5, np.float32), ANISOTROPIC, tmp_path / "soft.nii.gz")
    with pytest.raises(
        ValueError, match=r"soft\.nii\.gz: the label map has non-integer values such as \[0\.5\]"
    ):
        load_label(tmp_path / "soft.nii.gz", {0, 1})


def test_window_ct_clips_and_scales_hounsfield_units_to_unit_range():
    ct = np.array([-3024, -1000, -300, 400, 2000], dtype=np.int16)
    np.testing.assert_allclose(window_ct(ct), [0.0, 0.0, 0.5, 1.0, 1.0])
    assert window_ct(ct).dtype == np.float32
    np.testing.assert_allclose(window_ct(ct, low=-300, high=-200), [0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="low < high"):
        window_ct(ct, low=400, high=-1000)


def test_zscore_normalises_each_channel_separately():
    image = np.stack([np.arange(8.0).reshape(2, 2, 2), np.full((2, 2, 2), 7.0)]).astype(np.uint8)
    normalised = zscore(image)
    assert normalised.dtype == np.float32
    expected = (np.arange(8.0) - 3.5) / np.std(np.arange(8.0))
    np.testing.assert_allclose(normalised[0].ravel(), expected, rtol=1e-6)
    np.testing.assert_array_equal(normalised[1], 0.0)
    with pytest.raises(ValueError, match=r"\(C, D, H, W\)"):
        zscore(np.zeros((2, 2, 2)))


def test_lung_target_maps_both_lungs_to_one_and_the_airways_to_zero_by_default():
    mask = np.array([0, 3, 4, 5, 3], dtype=np.int16)
    assert lung_target(mask).tolist() == [0, 1, 1, 0, 1]
    assert lung_target(mask).dtype == np.uint8
    assert lung_target(mask, labels=(3, 4, 5)).tolist() == [0, 1, 1, 1, 1]


# ---- resampling ------------------------------------------------------------------------------------------


def test_resample_keeps_label_values_and_the_physical_size_of_an_object():
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:6, 2:6, 2:6] = 7
    label[0, 0, 0:2] = 2
    halved = resample(label, (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), order=0)
    assert halved.shape == (4, 4, 4) and halved.dtype == np.uint8
    assert set(np.unique(halved)) <= {0, 2, 7}
    assert np.count_nonzero(halved == 7) * 8 == np.count_nonzero(label == 7)  # 64 mm^3 both ways
    np.testing.assert_array_equal(np.argwhere(halved == 7).min(0), [1, 1, 1])


def test_resample_shape_follows_physical_extent_on_anisotropic_grids():
    volume = np.zeros((40, 100, 100), np.float32)
    assert resampled_shape(volume.shape, (2.5, 0.7, 0.7), (1.0, 1.0, 1.0)) == (100, 70, 70)
    assert resample(volume, (2.5, 0.7, 0.7), (1.0, 1.0, 1.0), order=1).shape == (100, 70, 70)
    channels = resample(np.zeros((3, 40, 100, 100), np.uint8), (2.5, 0.7, 0.7), (2.5, 1.4, 1.4), order=1)
    assert channels.shape == (3, 40, 50, 50) and channels.dtype == np.float32


def test_resample_of_an_image_interpolates_linearly_between_voxels():
    image = np.broadcast_to(np.arange(4, dtype=np.float32)[:, None, None], (4, 2, 2))
    doubled = resample(image, (2.0, 1.0, 1.0), (1.0, 1.0, 1.0), order=1)
    # New voxel centres sit at old index (i + 0.5) / 2 - 0.5; the ends are clamped to the edge voxels.
    np.testing.assert_allclose(doubled[:, 0, 0], [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])


def test_resample_to_shape_goes_back_to_the_original_grid():
    label = np.zeros((7, 30, 30), np.uint8)
    label[2:5, 9:18, 6:24] = 1  # in-plane edges on multiples of 3, so the round trip is exact
    coarse = resample(label, (2.5, 0.7, 0.7), (2.5, 2.1, 2.1), order=0)
    assert coarse.shape == (7, 10, 10)
    assert np.count_nonzero(coarse) == 3 * 3 * 6
    back = resample_to_shape(coarse, label.shape, order=0)
    np.testing.assert_array_equal(back, label)
    assert resample_to_shape(coarse, (7, 31, 29), order=0).shape == (7, 31, 29)
    with pytest.raises(ValueError, match="shape"):
        resample_to_shape(label, (7, 30), order=0)


def test_resampled_geometry_keeps_direction_and_the_physical_box():
    geometry = Geometry((1.0, 1.0, 1.0), (10.0, 20.0, 30.0))
    coarse = resampled_geometry(geometry, (8, 8, 8), (2.0, 2.0, 2.0))
    assert coarse.spacing == (2.0, 2.0, 2.0)
    assert coarse.origin == (10.5, 20.5, 30.5)  # first voxel centre moves half a new voxel in
    rotated = resampled_geometry(ANISOTROPIC, (40, 100, 100), (1.0, 1.0, 1.0))
    assert rotated.direction == ANISOTROPIC.direction and rotated.spacing == (1.0, 1.0, 1.0)

    def box_centre(g: Geometry, shape):
        half_extent_xyz = [(n - 1) * s / 2 for n, s in zip(reversed(shape), reversed(g.spacing), strict=True)]
        return np.array(g.origin) + np.reshape(g.direction, (3, 3)) @ half_extent_xyz

    np.testing.assert_allclose(box_centre(rotated, (100, 70, 70)), box_centre(ANISOTROPIC, (40, 100, 100)))


def test_a_prediction_written_after_resampling_back_carries_the_source_geometry(tmp_path):
    source = ramp((6, 20, 24), np.int16)
    write_volume(source, ANISOTROPIC, tmp_path / "scan.mhd", compress=False)
    scan, geometry = read_volume(tmp_path / "scan.mhd")
    coarse = resample(scan, geometry.spacing, (2.5, 1.4, 1.4), order=1)
    prediction = resample_to_shape((coarse > 100).astype(np.uint8), scan.shape, order=0)
    for name in ("prediction.nii.gz", "prediction.mhd"):
        write_volume(prediction, geometry, tmp_path / name)
        back, back_geometry = read_volume(tmp_path / name)
        np.testing.assert_array_equal(back, prediction)
        check_same_geometry(geometry, back_geometry, scan.shape, back.shape, "scan.mhd", name, tolerance=1e-5)


# ---- LUNA16 ----------------------------------------------------------------------------------------------


def write_luna(root: Path, uid: str, mask_geometry: Geometry = ANISOTROPIC, mask_shape=(4, 5, 6)) -> None:
    write_volume(ramp(dtype=np.int16) - 900, ANISOTROPIC, root / "subset0" / f"{uid}.mhd", compress=False)
    mask = np.zeros(mask_shape, np.int16)
    mask[1:3, 1:4, 1:3], mask[1:3, 1:4, 3:5], mask[0, 2, 2] = 3, 4, 5
    write_volume(mask, mask_geometry, root / volumes.LUNA_MASK_FOLDER / f"{uid}.mhd", compress=True)


def test_luna_cases_pair_each_ct_with_its_mask_and_ignore_masks_without_ct(tmp_path):
    write_luna(tmp_path, "1.2.3")
    write_luna(tmp_path, "1.2.4")
    (tmp_path / "subset0" / "1.2.4.mhd").unlink()
    (tmp_path / "subset0" / "1.2.4.raw").unlink()
    cases = find_luna_cases(tmp_path)
    assert cases == [
        LunaCase("1.2.3", tmp_path / "subset0" / "1.2.3.mhd", tmp_path / "seg-lungs-LUNA16" / "1.2.3.mhd")
    ]
    ct, mask, geometry = read_luna_case(cases[0])
    assert ct.dtype == np.int16 and ct.shape == mask.shape == (4, 5, 6)
    assert ct[0, 0, 0] == -950 and np.count_nonzero(lung_target(mask)) == 2 * (2 * 3 * 2)
    assert_same_geometry(geometry, ANISOTROPIC)


def test_a_ct_without_its_mask_is_an_error_naming_the_ct(tmp_path):
    write_luna(tmp_path, "1.2.3")
    (tmp_path / "seg-lungs-LUNA16" / "1.2.3.mhd").unlink()
    with pytest.raises(FileNotFoundError, match=r"no lung mask: .*subset0/1\.2\.3\.mhd"):
        find_luna_cases(tmp_path)


def test_cts_to_predict_need_no_mask_and_are_read_without_one(tmp_path):
    write_luna(tmp_path, "1.2.3")
    write_luna(tmp_path, "1.2.4")
    (tmp_path / "seg-lungs-LUNA16" / "1.2.4.mhd").unlink()
    with_mask, without = find_luna_cases(tmp_path, require_masks=False)
    assert with_mask.mask_path == tmp_path / "seg-lungs-LUNA16" / "1.2.3.mhd" and without.mask_path is None
    ct, mask, geometry = read_luna_case(without)
    assert mask is None and ct.shape == (4, 5, 6)
    assert_same_geometry(geometry, ANISOTROPIC)
    shutil.rmtree(tmp_path / "seg-lungs-LUNA16")
    assert [case.mask_path for case in find_luna_cases(tmp_path, require_masks=False)] == [None, None]


def test_a_folder_without_luna_files_explains_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no CT scans and no masks: expected the LUNA16 layout"):
        find_luna_cases(tmp_path)


@pytest.mark.parametrize(
    ("geometry", "shape", "difference"),
    [
        (ANISOTROPIC, (4, 5, 7), "size"),
        (Geometry((2.5, 0.75, 0.75), ANISOTROPIC.origin, ANISOTROPIC.direction), (4, 5, 6), "spacing"),
        (Geometry(ANISOTROPIC.spacing, (0.0, 0.0, 0.0), ANISOTROPIC.direction), (4, 5, 6), "origin"),
    ],
)
def test_a_ct_and_mask_on_different_grids_are_an_error_naming_both(tmp_path, geometry, shape, difference):
    write_luna(tmp_path, "1.2.3", mask_geometry=geometry, mask_shape=shape)
    with pytest.raises(
        ValueError, match=rf"subset0/1\.2\.3\.mhd and .*seg-lungs-LUNA16/1\.2\.3\.mhd differ: {difference}"
    ):
        read_luna_case(find_luna_cases(tmp_path)[0])


def test_real_luna_masks_have_the_documented_voxel_counts_and_keep_lung_volume_when_resampled():
    folder = require_shared("luna16-lung-masks")
    for uid, counts in LUNA_VOXEL_COUNTS.items():
        mask, geometry = read_volume(folder / f"{uid}.mhd")
        assert mask.dtype == np.int16 and mask.shape[1:] == (512, 512)
        assert geometry.spacing[0] == 2.5 and geometry.spacing[1] == pytest.approx(0.75, abs=0.02)
        found = np.bincount(mask.ravel())
        assert {label: int(found[label]) for label in (3, 4, 5)} == counts
        assert int(found.sum() - found[[0, 3, 4, 5]].sum()) == 0
        coarse = resample(mask, geometry.spacing, (2.5, 2.5, 2.5), order=0)
        coarse_geometry = resampled_geometry(geometry, mask.shape, (2.5, 2.5, 2.5))
        for lung in volumes.LUNA_LUNG_LABELS:
            before = counts[lung] * geometry.voxel_volume
            after = np.count_nonzero(coarse == lung) * coarse_geometry.voxel_volume
            assert abs(after - before) / before < 0.02, (uid, lung, before, after)


# ---- Decathlon and LiTS ----------------------------------------------------------------------------------


def write_decathlon(root: Path, n_cases=2, modality=None, test=True, label_values=(0, 1, 2)) -> None:
    """A tiny Decathlon folder: case_00k images (uint8) and labels using label_values."""
    description = {
        "name": "Tiny",
        "modality": modality or {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "training": [],
    }
    for k in range(n_cases):
        write_volume(ramp(dtype=np.uint8), ANISOTROPIC, root / "imagesTr" / f"case_00{k}.nii.gz")
        label = np.zeros((4, 5, 6), np.uint8)
        label[0, 0, : len(label_values)] = label_values
        write_volume(label, ANISOTROPIC, root / "labelsTr" / f"case_00{k}.nii.gz")
        description["training"].append(
            {"image": f"./imagesTr/case_00{k}.nii.gz", "label": f"./labelsTr/case_00{k}.nii.gz"}
        )
    if test:
        write_volume(ramp(dtype=np.uint8), ANISOTROPIC, root / "imagesTs" / "case_009.nii.gz")
        description["test"] = ["./imagesTs/case_009.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(description))


def test_decathlon_cases_come_from_dataset_json_with_the_test_images_unlabelled(tmp_path):
    write_decathlon(tmp_path)
    cases = find_nifti_cases(tmp_path)
    assert [c.case_id for c in cases] == ["case_000", "case_001", "case_009"]
    assert cases[0] == NiftiCase(
        "case_000", (tmp_path / "imagesTr" / "case_000.nii.gz",), tmp_path / "labelsTr" / "case_000.nii.gz"
    )
    assert cases[2].label_path is None
    info = read_dataset_info(tmp_path)
    assert info == {"name": "Tiny", "class_names": {1: "Anterior", 2: "Posterior"}, "channel_names": ["MRI"]}
    image, label, geometry = read_nifti_case(cases[0], {0, 1, 2})
    assert image.shape == (1, 4, 5, 6) and image.dtype == np.float32
    assert label.dtype == np.uint8 and label[0, 0, :3].tolist() == [0, 1, 2]
    image, label, _ = read_nifti_case(cases[2], {0, 1, 2})
    assert label is None and image.shape == (1, 4, 5, 6)


def test_without_a_test_list_the_images_in_imagesTs_are_the_unlabelled_cases(tmp_path):
    write_decathlon(tmp_path, test=False)
    write_volume(ramp(dtype=np.uint8), ANISOTROPIC, tmp_path / "imagesTs" / "case_042.nii.gz")
    cases = find_decathlon_cases(tmp_path)
    assert [(c.case_id, c.label_path is None) for c in cases][-1] == ("case_042", True)


def test_multichannel_decathlon_cases_read_from_a_4d_file_or_from_channel_files(tmp_path):
    modality = {"0": "FLAIR", "1": "T1w"}
    write_decathlon(tmp_path / "four_d", n_cases=1, modality=modality, test=False)
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(ramp(dtype=np.float32) * k) for k in (1, 2)])
    four_d.SetSpacing((0.7, 0.7, 2.5, 1.0))
    four_d.SetOrigin((*ANISOTROPIC.origin, 0.0))
    direction = np.eye(4)
    direction[:3, :3] = np.reshape(ANISOTROPIC.direction, (3, 3))
    four_d.SetDirection(tuple(direction.ravel()))
    sitk.WriteImage(four_d, str(tmp_path / "four_d" / "imagesTr" / "case_000.nii.gz"))
    write_decathlon(tmp_path / "split", n_cases=1, modality=modality, test=False)
    (tmp_path / "split" / "imagesTr" / "case_000.nii.gz").unlink()
    for k in (0, 1):
        path = tmp_path / "split" / "imagesTr" / f"case_000_000{k}.nii.gz"
        write_volume(ramp(dtype=np.float32) * (k + 1), ANISOTROPIC, path)
    for layout in ("four_d", "split"):
        (case,) = find_decathlon_cases(tmp_path / layout)
        image, label, geometry = read_nifti_case(case, {0, 1, 2})
        assert image.shape == (2, 4, 5, 6), layout
        np.testing.assert_array_equal(image[1], 2 * ramp(dtype=np.float32))
        assert_same_geometry(geometry, ANISOTROPIC)
    assert read_dataset_info(tmp_path / "split")["channel_names"] == ["FLAIR", "T1w"]


def test_channel_files_on_different_grids_are_an_error_naming_both(tmp_path):
    write_decathlon(tmp_path, n_cases=1, modality={"0": "FLAIR", "1": "T1w"}, test=False)
    (tmp_path / "imagesTr" / "case_000.nii.gz").unlink()
    write_volume(ramp(), ANISOTROPIC, tmp_path / "imagesTr" / "case_000_0000.nii.gz")
    write_volume(ramp((4, 5, 7)), ANISOTROPIC, tmp_path / "imagesTr" / "case_000_0001.nii.gz")
    (case,) = find_decathlon_cases(tmp_path)
    with pytest.raises(ValueError, match=r"case_000_0000\.nii\.gz and .*case_000_0001\.nii\.gz differ: size"):
        read_nifti_case(case, {0, 1, 2})


def test_a_folder_without_dataset_json_explains_the_decathlon_layout(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"has no dataset\.json: expected the Medical Segmentation Decathlon"
    ):
        find_decathlon_cases(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither dataset.json nor LiTS files"):
        find_nifti_cases(tmp_path)


def test_dataset_json_listing_missing_files_names_them(tmp_path):
    write_decathlon(tmp_path)
    (tmp_path / "labelsTr" / "case_001.nii.gz").unlink()
    (tmp_path / "imagesTs" / "case_009.nii.gz").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"lists 2 file\(s\) that do not exist: .*labelsTr/case_001\.nii\.gz; .*imagesTs/case_009",
    ):
        find_decathlon_cases(tmp_path)


def test_malformed_dataset_json_is_an_error_naming_it(tmp_path):
    (tmp_path / "dataset.json").write_text('{"labels": {"0": "background"}, "training": [')
    with pytest.raises(ValueError, match=r"dataset\.json is not valid JSON"):
        find_decathlon_cases(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "a"}}))
    with pytest.raises(ValueError, match="'training' list"):
        find_decathlon_cases(tmp_path)
    one_class = {"0": "b", "1": "a"}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": one_class, "training": [{"image": "x"}]}))
    with pytest.raises(ValueError, match="training entry 0 must have 'image' and 'label'"):
        find_decathlon_cases(tmp_path)


@pytest.mark.parametrize(
    "labels, message",
    [
        ({"0": "background"}, "no foreground class"),
        ({"0": "background", "1": "lesion", "2": "lesion"}, "its own name"),
        ({"0": "background", "1": "mean"}, "its own name"),
        ({"background": 0, "liver": 1, " ": 2}, "its own name"),
        ({"0": "background", "2": "tumour"}, r"1, 2, \.\.\. without gaps .*got \[2\]"),
        ({"0": "background", "1": "liver", "3": "tumour"}, r"without gaps .*got \[1, 3\]"),
    ],
)
def test_dataset_json_labels_that_would_share_a_metrics_column_are_refused(tmp_path, labels, message):
    write_decathlon(tmp_path, n_cases=1, test=False)
    description = json.loads((tmp_path / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({**description, "labels": labels}))
    with pytest.raises(ValueError, match=rf"dataset\.json: 'labels' .*{message}"):
        read_dataset_info(tmp_path)


def test_a_label_with_values_outside_dataset_json_labels_is_an_error(tmp_path):
    write_decathlon(tmp_path, label_values=(0, 1, 2, 4))
    info = read_dataset_info(tmp_path)
    case = find_decathlon_cases(tmp_path)[0]
    with pytest.raises(ValueError, match=r"labelsTr/case_000\.nii\.gz: label values \[4\] are not among"):
        read_nifti_case(case, {0, *info["class_names"]})


def test_lits_volumes_pair_with_segmentations_across_batch_folders(tmp_path):
    for number, batch in ((0, "Training Batch 1"), (12, "Training Batch 2")):
        write_volume(ramp(), ANISOTROPIC, tmp_path / batch / f"volume-{number}.nii")
        write_volume(
            np.zeros((4, 5, 6), np.uint8), ANISOTROPIC, tmp_path / batch / f"segmentation-{number}.nii"
        )
    write_volume(ramp(), ANISOTROPIC, tmp_path / "Test" / "test-volume-3.nii")
    cases = find_nifti_cases(tmp_path)
    assert [(c.case_id, c.label_path is not None) for c in cases] == [
        ("volume-0", True),
        ("volume-12", True),
        ("test-volume-3", False),
    ]
    assert cases[1].label_path == tmp_path / "Training Batch 2" / "segmentation-12.nii"
    assert read_dataset_info(tmp_path)["class_names"] == {1: "liver", 2: "tumour"}
    (tmp_path / "Training Batch 2" / "segmentation-12.nii").unlink()
    with pytest.raises(FileNotFoundError, match=r"volume-12\.nii \(no segmentation\)"):
        find_lits_cases(tmp_path)


def test_lits_files_are_found_below_a_parent_or_hidden_folder(tmp_path, monkeypatch):
    """Only hidden names below the data folder are skipped, not `..` or a hidden folder above it."""
    root = tmp_path / ".hidden" / "lits"
    write_volume(ramp(), ANISOTROPIC, root / "volume-0.nii")
    write_volume(np.zeros((4, 5, 6), np.uint8), ANISOTROPIC, root / "segmentation-0.nii")
    write_volume(ramp(), ANISOTROPIC, root / ".trash" / "volume-1.nii")
    monkeypatch.chdir(tmp_path / ".hidden" / "lits")
    for folder in (root, Path("..") / "lits"):
        assert [case.case_id for case in find_lits_cases(folder)] == ["volume-0"]


def test_all_real_hippocampus_cases_load_with_matching_shapes_and_labels():
    root = require_shared("msd-hippocampus")
    cases = find_nifti_cases(root)
    info = read_dataset_info(root)
    assert info["class_names"] == {1: "Anterior", 2: "Posterior"} and info["channel_names"] == ["MRI"]
    labelled = [c for c in cases if c.label_path is not None]
    assert len(labelled) == 260
    assert [c.case_id for c in cases if c.label_path is None] == ["hippocampus_118"]
    stored_image_dtypes, stored_label_dtypes = {}, {}
    for case in cases:
        image, label, geometry = read_nifti_case(case, {0, *info["class_names"]})
        assert image.dtype == np.float32 and image.shape[0] == 1
        if label is None:
            continue
        stored = read_volume(case.image_paths[0])[0].dtype.name
        stored_image_dtypes[stored] = stored_image_dtypes.get(stored, 0) + 1
        assert label.dtype == np.uint8 and label.shape == image.shape[1:]
        assert set(np.unique(label)) <= {0, 1, 2}
        stored = read_volume(case.label_path)[0].dtype.name
        stored_label_dtypes[stored] = stored_label_dtypes.get(stored, 0) + 1
    assert stored_image_dtypes == {"uint8": 55, "float32": 205}  # as the README says
    assert stored_label_dtypes == {"uint8": 258, "float32": 2}


def test_keeping_large_components_never_harms_a_real_lung_mask_and_keeps_both_generated_lungs(tmp_path):
    from synthetic import make_luna
    from utils import dice_coefficient, postprocess

    for path in sorted(require_shared("luna16-lung-masks").glob("*.mhd")):
        lungs = lung_target(read_volume(path)[0], (3, 4))
        assert dice_coefficient(postprocess(lungs, "large", [1]), lungs) == 1.0
    root = make_luna(tmp_path, n_cases=1, shape=(40, 64, 64), seed=2)
    (path,) = (root / "seg-lungs-LUNA16").glob("*.mhd")
    lungs = lung_target(read_volume(path)[0], (3, 4))  # two separate lungs, as in most scans
    assert dice_coefficient(postprocess(lungs, "largest", [1]), lungs) < 0.75  # one lung deleted
    assert dice_coefficient(postprocess(lungs, "large", [1]), lungs) == 1.0
