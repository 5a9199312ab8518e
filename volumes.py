"""Reading, checking, resampling and writing 3D medical volumes together with their geometry.

Three public layouts are found and read here: LUNA16 (MetaImage `.mhd` CT scans with `seg-lungs-LUNA16`
lung masks), the Medical Segmentation Decathlon (NIfTI listed by `dataset.json`, also the nnU-Net
`_0000`, `_0001` channel files) and LiTS (`volume-N.nii` with `segmentation-N.nii`). Everything is a
function on paths and numpy arrays; nothing is written except by `write_volume`. Files are checked
where SimpleITK would read them wrong without a word (truncated .raw/.zraw/.nii/.nii.gz data, NaN or
infinite voxels, which its NIfTI reader turns into 0): a ValueError names the file instead.

Axis orders, the one thing to keep straight:
- arrays are (z, y, x) = (D, H, W), as SimpleITK's GetArrayFromImage gives them; multi-channel volumes
  are (C, D, H, W);
- `Geometry.spacing` is in the same ARRAY order (z, y, x), in mm, so metrics can use it with the array;
- `Geometry.origin` (x, y, z) in mm and `Geometry.direction` (9 floats, row-major 3x3, columns are the
  physical directions of the x, y, z index axes) follow the ITK physical (LPS) convention unchanged.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike
from scipy import ndimage

VOLUME_SUFFIXES = (".mhd", ".nii.gz", ".nii")

LUNA_LUNG_LABELS = (3, 4)  # seg-lungs-LUNA16: 3 and 4 are the two lungs
LUNA_TRACHEA_LABEL = 5  # seg-lungs-LUNA16: trachea and main airways
LUNA_MASK_FOLDER = "seg-lungs-LUNA16"
LUNA_LAYOUT = (
    "expected the LUNA16 layout: <root>/subset*/<seriesuid>.mhd (+ .raw, the CT scans) and "
    f"<root>/{LUNA_MASK_FOLDER}/<seriesuid>.mhd (+ .zraw, the lung masks)"
)
DECATHLON_LAYOUT = (
    "expected the Medical Segmentation Decathlon layout: <root>/dataset.json listing "
    '"training": [{"image": "./imagesTr/<case>.nii.gz", "label": "./labelsTr/<case>.nii.gz"}, ...], '
    "optionally <root>/imagesTs/ for unlabelled cases"
)
LITS_LAYOUT = (
    "expected the LiTS layout: volume-<N>.nii with segmentation-<N>.nii (.nii.gz also accepted), "
    "anywhere below <root> (for example in 'Training Batch 1/')"
)
LITS_CLASS_NAMES = {1: "liver", 2: "tumour"}
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
LITS_FILE = re.compile(r"^(?P<kind>test-volume|volume|segmentation)-(?P<number>\d+)\.nii(\.gz)?$")

# Bytes per element of the MetaImage element types whose size does not depend on the platform.
METAIMAGE_ELEMENT_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
}
_DECOMPRESS_CHUNK = 1 << 24
_FINITE_CHECK_BLOCK = 1 << 22
GZIP_MAGIC = b"\x1f\x8b"
NIFTI1_HEADER_BYTES, NIFTI2_HEADER_BYTES = 348, 540


def _point_array(points: ArrayLike, name: str) -> np.ndarray:
    """Points as float64 (..., 3); ValueError when the last axis does not hold 3 coordinates."""
    array = np.asarray(points, dtype=np.float64)
    if array.ndim == 0 or array.shape[-1] != 3:
        raise ValueError(f"{name} must have 3 coordinates on its last axis, got shape {array.shape}")
    return array


@dataclass(frozen=True)
class Geometry:
    """Where a (z, y, x) voxel array lies in physical space.

    spacing: voxel size in mm in ARRAY order (z, y, x), i.e. ITK's GetSpacing() reversed.
    origin: physical position (x, y, z) in mm of voxel [0, 0, 0], ITK convention (GetOrigin()).
    direction: 3x3 direction cosines row-major, ITK convention (GetDirection()); column k is the
        physical direction of ITK index axis k (x, y, z), i.e. of array axis 2 - k.
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        spacing = tuple(float(s) for s in self.spacing)
        origin = tuple(float(o) for o in self.origin)
        direction = tuple(float(d) for d in self.direction)
        if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
            raise ValueError(f"spacing must be 3 positive numbers (z, y, x) in mm, got {self.spacing!r}")
        if len(origin) != 3:
            raise ValueError(f"origin must be 3 numbers (x, y, z) in mm, got {self.origin!r}")
        if len(direction) != 9:
            raise ValueError(f"direction must be 9 numbers (row-major 3x3), got {self.direction!r}")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel in mm^3."""
        return math.prod(self.spacing)

    def _direction_matrix(self) -> np.ndarray:
        return np.array(self.direction, dtype=np.float64).reshape(3, 3)

    def index_to_world(self, index_zyx: ArrayLike) -> np.ndarray:
        """World points (..., 3), (x, y, z) mm, of continuous voxel indices (..., 3) in ARRAY order (z, y, x).

        world = origin + direction @ (index_xyz * spacing_xyz), as ITK's
        TransformContinuousIndexToPhysicalPoint; integer indices are voxel centres.
        """
        index = _point_array(index_zyx, "index_zyx")
        scaled_xyz = index[..., ::-1] * np.array(self.spacing[::-1])
        return np.array(self.origin) + scaled_xyz @ self._direction_matrix().T

    def world_to_index(self, world_xyz: ArrayLike) -> np.ndarray:
        """Continuous voxel indices (..., 3) in ARRAY order (z, y, x) of world points (..., 3) (x, y, z) mm.

        The exact inverse of index_to_world (ITK's TransformPhysicalPointToContinuousIndex, axes reversed).
        """
        offset = _point_array(world_xyz, "world_xyz") - np.array(self.origin)
        scaled_xyz = offset @ np.linalg.inv(self._direction_matrix()).T
        return (scaled_xyz / np.array(self.spacing[::-1]))[..., ::-1]

    @classmethod
    def from_itk(cls, image: sitk.Image) -> Geometry:
        """Geometry of a 3D SimpleITK image, or of the three spatial axes of a 4D one (x, y, z, channel)."""
        dimension = image.GetDimension()
        if dimension not in (3, 4):
            raise ValueError(f"expected a 3D or 4D image, got {dimension}D")
        matrix = np.array(image.GetDirection()).reshape(dimension, dimension)[:3, :3]
        return cls(
            spacing=tuple(reversed(image.GetSpacing()[:3])),
            origin=image.GetOrigin()[:3],
            direction=tuple(matrix.ravel()),
        )

    def to_itk(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry on a 3D SimpleITK image (in place) and return it."""
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
        image.SetSpacing(tuple(reversed(self.spacing)))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def _volume_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{path}: unsupported file type; expected one of {', '.join(VOLUME_SUFFIXES)}")


def _read_metaimage_header(path: Path) -> dict[str, str]:
    """The `Key = Value` fields of a MetaImage header, up to ElementDataFile (always the last one)."""
    fields: dict[str, str] = {}
    try:
        with open(path, encoding="latin-1") as header:
            for line in header:
                key, separator, value = line.partition("=")
                if not separator:
                    continue
                fields[key.strip().lower()] = value.strip()
                if key.strip().lower() == "elementdatafile":
                    break
    except OSError as error:
        raise ValueError(f"could not read MetaImage header {path}: {error}") from error
    if "elementdatafile" not in fields or "dimsize" not in fields:
        raise ValueError(f"{path}: not a MetaImage header (no DimSize or ElementDataFile field)")
    return fields


def metaimage_data_file(path: str | Path, fields: dict[str, str] | None = None) -> Path | None:
    """The file that holds an .mhd's voxels (ElementDataFile; `fields`: its header, when already read);
    None when the voxels are in the header file itself (LOCAL) or split over several files (LIST, or a
    numbered pattern)."""
    path = Path(path)
    name = (fields or _read_metaimage_header(path))["elementdatafile"]
    if name.upper() in ("LOCAL", "LIST") or "%" in name:
        return None
    return path.parent / name


def _check_metaimage_data(path: Path) -> None:
    """Check that the data file of an .mhd exists and holds all the voxels its header announces.

    SimpleITK would read a truncated .raw with a misleading "No such file" message, and silently
    returns garbage for a corrupt .zraw, so both are checked here first: the .raw size against
    DimSize x channels x element size, the .zraw by decompressing it (zlib verifies its checksum).
    """
    fields = _read_metaimage_header(path)
    data_file = metaimage_data_file(path, fields)
    if data_file is None:
        return  # data inside the header file, or split over several files: left to SimpleITK
    if not data_file.is_file():
        raise FileNotFoundError(f"{path}: its data file {data_file} (ElementDataFile) does not exist")
    element_bytes = METAIMAGE_ELEMENT_BYTES.get(fields.get("elementtype", "").upper())
    try:
        voxels = math.prod(int(size) for size in fields["dimsize"].split())
        channels = int(fields.get("elementnumberofchannels", "1"))
        header_size = int(fields.get("headersize", "0"))
    except ValueError as error:
        raise ValueError(f"{path}: malformed MetaImage header ({error})") from error
    if element_bytes is None:
        return
    expected = voxels * channels * element_bytes
    if fields.get("compresseddata", "false").lower() == "true":
        _check_zlib_stream(data_file, expected)
        return
    actual = data_file.stat().st_size
    if header_size == -1:  # data at the end of the file, after a header of unknown size
        header_size = max(0, actual - expected)
    if actual < header_size + expected:
        raise ValueError(
            f"{data_file} is truncated: {actual} bytes, but {path.name} announces "
            f"{header_size + expected} (DimSize {fields['dimsize']} x {element_bytes} bytes)"
        )
    if actual > header_size + expected:
        raise ValueError(
            f"{data_file} has {actual} bytes, more than the {header_size + expected} that {path.name} "
            f"announces (DimSize {fields['dimsize']} x {element_bytes} bytes); wrong header?"
        )


def _check_zlib_stream(data_file: Path, expected: int) -> None:
    """Decompress a .zraw in chunks (little memory) and check it is complete and yields `expected` bytes."""
    decompressor = zlib.decompressobj()
    produced = 0
    try:
        with open(data_file, "rb") as stream:
            while chunk := stream.read(1 << 20):
                while chunk:
                    produced += len(decompressor.decompress(chunk, _DECOMPRESS_CHUNK))
                    chunk = decompressor.unconsumed_tail
            produced += len(decompressor.flush())
    except zlib.error as error:
        raise ValueError(f"{data_file} is truncated or corrupt (zlib: {error})") from error
    if not decompressor.eof or produced != expected:
        raise ValueError(
            f"{data_file} is truncated or corrupt: it decompresses to {produced} bytes, "
            f"expected {expected}{'' if decompressor.eof else ' (the compressed stream ends early)'}"
        )


# Where a single-file NIfTI header keeps what the data size needs: (header size, magic offset, magic,
# struct format and offset of dim[0..7], of datatype, of bitpix and of vox_offset).
NIFTI_LAYOUTS = (
    (NIFTI1_HEADER_BYTES, 344, b"n+1", ("8h", 40), ("h", 70), ("h", 72), ("f", 108)),
    (NIFTI2_HEADER_BYTES, 4, b"n+2", ("8q", 16), ("h", 12), ("h", 14), ("q", 168)),
)
NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64 voxels


@dataclass(frozen=True)
class _NiftiLayout:
    """Where a single-file NIfTI keeps its voxels, from its header."""

    vox_offset: int
    data_bytes: int
    float_dtype: np.dtype | None  # the voxels' dtype when they can be NaN or infinite

    @property
    def total_bytes(self) -> int:
        return self.vox_offset + self.data_bytes


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """The voxel layout of a single-file NIfTI-1/2 header in either byte order.

    None when the header is not one (a .hdr/.img pair, Analyze, garbage): left to SimpleITK.
    """
    for size, magic_at, magic, dim, datatype, bitpix, offset in NIFTI_LAYOUTS:
        if len(header) < size or header[magic_at : magic_at + 3] != magic:
            continue
        for order in "<>":
            if struct.unpack_from(f"{order}i", header)[0] != size:
                continue
            dims = struct.unpack_from(order + dim[0], header, dim[1])
            code = struct.unpack_from(order + datatype[0], header, datatype[1])[0]
            bits = struct.unpack_from(order + bitpix[0], header, bitpix[1])[0]
            vox_offset = struct.unpack_from(order + offset[0], header, offset[1])[0]
            rank = dims[0]
            if not 1 <= rank <= 7 or min(dims[1 : rank + 1]) < 1 or bits < 1 or not vox_offset >= 0:
                return None
            float_dtype = np.dtype(order + NIFTI_FLOAT_TYPES[code]) if code in NIFTI_FLOAT_TYPES else None
            data_bytes = math.ceil(math.prod(dims[1 : rank + 1]) * bits / 8)
            return _NiftiLayout(int(vox_offset), data_bytes, float_dtype)
    return None


class _NonFiniteCounter:
    """Counts the NaN and infinite voxels of a NIfTI byte stream fed block by block."""

    def __init__(self, layout: _NiftiLayout) -> None:
        self.layout, self.position, self.carry, self.count = layout, 0, b"", 0

    def feed(self, block: bytes) -> None:
        start, self.position = self.position, self.position + len(block)
        low = max(self.layout.vox_offset - start, 0)
        high = min(self.layout.total_bytes - start, len(block))
        if high <= low:
            return
        data = self.carry + block[low:high]
        usable = len(data) - len(data) % self.layout.float_dtype.itemsize
        values = np.frombuffer(
            data, dtype=self.layout.float_dtype, count=usable // self.layout.float_dtype.itemsize
        )
        self.count += int(values.size - np.count_nonzero(np.isfinite(values)))
        self.carry = data[usable:]


def _scan_nifti(path: Path, compressed: bool) -> tuple[int, _NiftiLayout | None, int]:
    """(bytes available, layout, NaN or infinite voxel count) of a NIfTI file, streamed in blocks.

    An uncompressed file whose voxels cannot be NaN is not read past its header. The gzip module
    checks the end-of-stream marker and the CRC, so an incomplete or damaged stream is a ValueError.
    """
    available, layout, counter = 0, None, None
    try:
        with (gzip.open if compressed else open)(path, "rb") as stream:
            while block := stream.read(_DECOMPRESS_CHUNK):
                if available == 0:
                    layout = _nifti_layout(block[:NIFTI2_HEADER_BYTES])
                    can_be_nan = layout is not None and layout.float_dtype is not None
                    if not compressed and not can_be_nan:
                        return path.stat().st_size, layout, 0
                    counter = _NonFiniteCounter(layout) if can_be_nan else None
                if counter is not None:
                    counter.feed(block)
                available += len(block)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ValueError(f"{path} is truncated or corrupt (gzip: {error})") from error
    return available, layout, 0 if counter is None else counter.count


def _check_nifti_data(path: Path) -> None:
    """Check that a .nii or .nii.gz holds all the voxels its header announces, and no NaN or infinite one.

    SimpleITK fills the missing part of a truncated .nii.gz with zeros without a word, and reads NaN
    and infinite voxels as 0, so the file is streamed (decompressed) first: its length is compared
    with the header's dimensions and float voxels are checked.
    """
    with open(path, "rb") as stream:
        compressed = stream.read(2) == GZIP_MAGIC
    available, layout, non_finite = _scan_nifti(path, compressed)
    if layout is None:
        return
    if available < layout.total_bytes:
        holds = "decompresses to" if compressed else "holds"
        raise ValueError(
            f"{path} is truncated: it {holds} {available} bytes, but its NIfTI header announces "
            f"{layout.total_bytes} (header and voxel data)"
        )
    if non_finite:
        raise ValueError(
            f"{path}: {non_finite} of {layout.data_bytes // layout.float_dtype.itemsize} voxels are NaN or "
            "infinite; expected finite intensities (SimpleITK would silently read them as 0)"
        )


def read_volume(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a .mhd (+ .raw or zlib .zraw), .nii or .nii.gz volume: (array, Geometry).

    The array keeps its stored dtype and is (D, H, W) for a 3D file; a 4D NIfTI (channels stacked
    along the 4th axis, as in multi-modal Decathlon tasks) or a vector-valued image comes back as
    (C, D, H, W), with the geometry of its three spatial axes. Missing, truncated or corrupt files
    raise FileNotFoundError / ValueError naming the file.
    """
    path = Path(path)
    suffix = _volume_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"volume file {path} does not exist")
    if suffix == ".mhd":
        _check_metaimage_data(path)
    else:
        _check_nifti_data(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1]
        raise ValueError(f"could not read {path}: unreadable, truncated or corrupt ({reason})") from error
    dimension, components = image.GetDimension(), image.GetNumberOfComponentsPerPixel()
    if dimension == 3 and components == 1:
        array = sitk.GetArrayFromImage(image)
    elif dimension == 3:
        array = np.moveaxis(sitk.GetArrayFromImage(image), -1, 0)
    elif dimension == 4 and components == 1:
        array = sitk.GetArrayFromImage(image)
    else:
        raise ValueError(
            f"{path}: expected a 3D volume or a 4D multi-channel one, got a {dimension}D image "
            f"with {components} component(s) per voxel"
        )
    return np.ascontiguousarray(array), Geometry.from_itk(image)


def _count_non_finite(array: np.ndarray) -> int:
    """Number of NaN or infinite values, counted block by block so the check needs little memory."""
    if not np.issubdtype(array.dtype, np.inexact):
        return 0
    flat = np.ravel(array)
    return sum(
        int(block.size - np.count_nonzero(np.isfinite(block)))
        for block in (
            flat[start : start + _FINITE_CHECK_BLOCK] for start in range(0, flat.size, _FINITE_CHECK_BLOCK)
        )
    )


def check_finite(array: np.ndarray, source: str | Path) -> None:
    """ValueError naming `source` and the count when an image has NaN or infinite voxels (ints never do)."""
    bad = _count_non_finite(array)
    if bad:
        raise ValueError(
            f"{source}: {bad} of {array.size} voxels are NaN or infinite; expected finite intensities "
            "(a broken export or conversion?)"
        )


def read_header(path: str | Path) -> tuple[Geometry, tuple[int, int, int]]:
    """A volume file's geometry and (D, H, W) shape from its header alone (no voxel is read)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ValueError(f"could not read the header of {path}: {error}") from error
    dimension = reader.GetDimension()
    matrix = np.array(reader.GetDirection()).reshape(dimension, dimension)[:3, :3]
    geometry = Geometry(
        spacing=tuple(reversed(reader.GetSpacing()[:3])),
        origin=reader.GetOrigin()[:3],
        direction=tuple(matrix.ravel()),
    )
    return geometry, tuple(int(s) for s in reversed(reader.GetSize()[:3]))


def check_headers_match(image_path: str | Path, label_path: str | Path) -> None:
    """ValueError naming both files when an image's header and its label's give different grids: found
    when the data folder is read, before any case is preprocessed (read_nifti_case and read_luna_case
    check the volumes again as they read them)."""
    geometry, shape = read_header(image_path)
    label_geometry, label_shape = read_header(label_path)
    check_same_geometry(geometry, label_geometry, shape, label_shape, str(image_path), str(label_path))


def load_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """An image file as float32 (C, D, H, W) whatever its stored dtype (uint8, int16, float32...).

    NaN or infinite voxels are a ValueError naming the file: they would silently poison training.
    """
    array, geometry = read_volume(path)
    check_finite(array, path)
    if array.ndim == 3:
        array = array[None]
    return array.astype(np.float32, copy=False), geometry


def read_channels(paths: Sequence[str | Path]) -> tuple[np.ndarray, Geometry]:
    """Stack single-channel files (nnU-Net `_0000`, `_0001`...) into float32 (C, D, H, W).

    Every file must be 3D, finite (no NaN or infinite voxel) and share the first file's geometry (size,
    spacing, origin, direction).
    """
    if not paths:
        raise ValueError("read_channels needs at least one file")
    channels, first_geometry = [], None
    for path in paths:
        array, geometry = read_volume(path)
        if array.ndim != 3:
            raise ValueError(f"{path}: a channel file must be a 3D volume, got shape {array.shape}")
        check_finite(array, path)
        if first_geometry is None:
            first_geometry = geometry
        else:
            check_same_geometry(
                first_geometry, geometry, channels[0].shape, array.shape, str(paths[0]), str(path)
            )
        channels.append(array.astype(np.float32, copy=False))
    return np.stack(channels), first_geometry


def _as_label_map(array: np.ndarray, allowed_labels: Iterable[int], source: str) -> np.ndarray:
    """Integral label values in allowed_labels as uint8; floats (a common storage mess) are rounded."""
    allowed = sorted({int(label) for label in allowed_labels})
    if not allowed or allowed[0] < 0 or allowed[-1] > 255:
        raise ValueError(f"allowed_labels must be integers in 0..255, got {allowed}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{source}: the label map has NaN or infinite values")
        rounded = np.rint(array)
        off = np.abs(array - rounded) > 1e-3
        if off.any():
            raise ValueError(
                f"{source}: the label map has non-integer values such as {np.unique(array[off])[:5].tolist()}"
            )
        array = rounded
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise ValueError(f"{source}: a label map must hold integers, got dtype {array.dtype}")
    # One comparison per allowed label, 2 bytes per voxel; np.isin takes 12 (0.9 GB for a CT).
    outside = np.ones(array.shape, bool)
    for label in allowed:
        outside &= array != label
    if outside.any():
        values = np.unique(array[outside])
        shown = [int(v) for v in values[:10]]
        raise ValueError(
            f"{source}: label values {shown}{' ...' if len(values) > 10 else ''} are not among the "
            f"allowed labels {allowed}"
        )
    return array.astype(np.uint8)


def load_label(path: str | Path, allowed_labels: Iterable[int]) -> np.ndarray:
    """A 3D label map as uint8 (D, H, W) class indices.

    Labels stored as floats are accepted when integral (and rounded); any value outside
    allowed_labels is a ValueError naming the file and the values.
    """
    array, _ = read_volume(path)
    if array.ndim != 3:
        raise ValueError(f"{path}: a label map must be a 3D volume, got shape {array.shape}")
    return _as_label_map(array, allowed_labels, str(path))


def write_volume(array: np.ndarray, geometry: Geometry, path: str | Path, compress: bool = True) -> Path:
    """Write a 3D (D, H, W) array with its geometry, so it overlays on its source scan in a viewer.

    `.mhd` writes a MetaImage header plus `.zraw` (zlib, compress=True) or `.raw`; `.nii.gz` and `.nii`
    write NIfTI (compressed by the name, not by `compress`). The dtype is kept (bool becomes uint8).
    The files are written under temporary names in a sibling folder and renamed into place (the data
    file before the header), so a reader never sees a half-written volume. Returns the path.
    """
    path = Path(path)
    suffix = _volume_suffix(path)
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"write_volume writes 3D (D, H, W) arrays, got shape {array.shape} for {path}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = geometry.to_itk(sitk.GetImageFromArray(array))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        staged = partial / path.name
        sitk.WriteImage(image, str(staged), useCompression=compress and suffix == ".mhd")
        if suffix == ".mhd":
            data_name = _read_metaimage_header(staged)["elementdatafile"]
            os.replace(partial / data_name, path.parent / data_name)
        os.replace(staged, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path


def check_same_geometry(
    a: Geometry,
    b: Geometry,
    shape_a: Sequence[int],
    shape_b: Sequence[int],
    name_a: str,
    name_b: str,
    tolerance: float = 1e-3,
) -> None:
    """ValueError naming both files when their grids differ in size, spacing, origin or direction.

    Shapes may include a leading channel axis; only the last three (D, H, W) are compared. Spacing and
    origin are compared in mm, direction cosines as numbers, all with the absolute tolerance.
    """
    differences = []
    if tuple(shape_a[-3:]) != tuple(shape_b[-3:]):
        differences.append(f"size (D, H, W) {tuple(shape_a[-3:])} vs {tuple(shape_b[-3:])}")
    if not np.allclose(a.spacing, b.spacing, rtol=0, atol=tolerance):
        differences.append(f"spacing (z, y, x) {a.spacing} mm vs {b.spacing} mm")
    if not np.allclose(a.origin, b.origin, rtol=0, atol=tolerance):
        differences.append(f"origin (x, y, z) {a.origin} mm vs {b.origin} mm")
    if not np.allclose(a.direction, b.direction, rtol=0, atol=tolerance):
        differences.append(f"direction {a.direction} vs {b.direction}")
    if differences:
        raise ValueError(f"geometry of {name_a} and {name_b} differ: " + "; ".join(differences))


def _spatial_triple(values: Sequence[float], name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3 or not all(v > 0 and math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be 3 positive numbers (z, y, x), got {values!r}")
    return values


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """(D, H, W) after resampling: round(shape x spacing / new_spacing), at least 1 voxel per axis."""
    spacing = _spatial_triple(spacing, "spacing")
    new_spacing = _spatial_triple(new_spacing, "new_spacing")
    return tuple(
        max(1, round(size * old / new))
        for size, old, new in zip(shape[-3:], spacing, new_spacing, strict=True)
    )


def resample_to_shape(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resample the spatial axes of (D, H, W) or (C, D, H, W) to `shape` (D, H, W) with scipy.ndimage.

    The old and new grids cover the same physical box (voxel edges aligned, not voxel centres), so
    resampling there and back is consistent and an object keeps its physical extent. order 0
    (nearest) keeps the dtype and the values (label maps); order >= 1 (1 for images) returns float32.
    """
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise ValueError(f"expected a (D, H, W) or (C, D, H, W) array, got shape {array.shape}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive sizes (D, H, W), got {shape!r}")
    if order < 0 or order > 5:
        raise ValueError(f"order must be 0..5 (0 for label maps, 1 for images), got {order}")
    if array.ndim == 4:
        return np.stack([resample_to_shape(channel, shape, order) for channel in array])
    if array.shape == shape:
        return array.copy() if order == 0 else array.astype(np.float32)
    source = array if order == 0 else array.astype(np.float32, copy=False)
    output = np.empty(shape, dtype=source.dtype)
    zoom = [new / old for new, old in zip(shape, array.shape, strict=True)]
    ndimage.zoom(source, zoom, output=output, order=order, mode="nearest", grid_mode=True)
    return output


def resample(
    array: np.ndarray, spacing: Sequence[float], new_spacing: Sequence[float], order: int
) -> np.ndarray:
    """Resample (D, H, W) or (C, D, H, W) from spacing to new_spacing (both (z, y, x) mm).

    The output shape is round(shape x spacing / new_spacing); see resample_to_shape for the grid and
    the dtype. Use order 1 for images and order 0 for label maps, which keep their values.
    """
    return resample_to_shape(array, resampled_shape(np.shape(array), spacing, new_spacing), order)


def resampled_geometry(geometry: Geometry, shape: Sequence[int], new_spacing: Sequence[float]) -> Geometry:
    """Geometry of resample(array of `shape`, geometry.spacing, new_spacing): same direction and box.

    The spacing is the exact one of the new grid, shape x spacing / new shape, which differs from
    new_spacing by the rounding of the shape (under half a voxel over the whole extent). The origin
    moves by half the spacing change along each axis, because the grids share their outer voxel
    edges: keeping the origin unchanged would shift the resampled volume by that much in a viewer.
    """
    new_shape = resampled_shape(shape, geometry.spacing, new_spacing)
    spacing = tuple(
        size * old / new for size, old, new in zip(shape[-3:], geometry.spacing, new_shape, strict=True)
    )
    shift_xyz = [
        (new - old) / 2 for new, old in zip(reversed(spacing), reversed(geometry.spacing), strict=True)
    ]
    direction = np.array(geometry.direction).reshape(3, 3)
    origin = np.array(geometry.origin) + direction @ np.array(shift_xyz)
    return Geometry(spacing=spacing, origin=tuple(origin), direction=geometry.direction)


def window_ct(
    ct: np.ndarray, low: float = -1000.0, high: float = 400.0, out: np.ndarray | None = None
) -> np.ndarray:
    """CT in Hounsfield units clipped to [low, high] and scaled to [0, 1], float32 (lung window default).

    `out` (float32, e.g. the CT itself) receives the result, so that a real-size scan is not copied.
    """
    if not high > low:
        raise ValueError(f"the CT window needs low < high, got low={low}, high={high}")
    windowed = np.clip(np.asarray(ct, dtype=np.float32), low, high, out=out)
    windowed -= np.float32(low)
    windowed /= np.float32(high - low)
    return windowed


def zscore(image: np.ndarray) -> np.ndarray:
    """(C, D, H, W) image normalised per channel to mean 0, standard deviation 1, float32 (MRI).

    A constant channel becomes all zeros.
    """
    image = np.asarray(image)
    if image.ndim != 4:
        raise ValueError(f"zscore expects a (C, D, H, W) image, got shape {image.shape}")
    normalised = np.empty(image.shape, dtype=np.float32)
    for channel, values in enumerate(image):
        values = values.astype(np.float64)
        std = values.std()
        normalised[channel] = (values - values.mean()) / (std if std > 0 else 1.0)
    return normalised


@dataclass(frozen=True)
class LunaCase:
    """One LUNA16 series: its CT (.mhd + .raw, int16 HU) and its seg-lungs-LUNA16 mask (.mhd + .zraw;
    None: a CT to predict, without a mask)."""

    case_id: str  # the series uid
    ct_path: Path
    mask_path: Path | None


def find_luna_cases(root: str | Path, require_masks: bool = True) -> list[LunaCase]:
    """The LUNA16 series under root, sorted by uid: root/subset*/<uid>.mhd with their masks.

    Every CT needs its mask (FileNotFoundError naming the CT) unless require_masks is False (CTs to
    predict: those without a mask get mask_path None, and the mask folder may be absent); masks
    without a CT are ignored, since the mask folder covers all 888 scans while a user may have
    downloaded only some subsets.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LUNA16 folder {root} does not exist: {LUNA_LAYOUT}")
    mask_folder = root / LUNA_MASK_FOLDER
    scans = sorted(root.glob("subset*/*.mhd"))
    if not scans:
        found = f"{mask_folder} but no CT scans" if mask_folder.is_dir() else "no CT scans and no masks"
        raise FileNotFoundError(f"{root} has {found}: {LUNA_LAYOUT}")
    if require_masks and not mask_folder.is_dir():
        raise FileNotFoundError(f"{root} has CT scans but no mask folder {mask_folder}: {LUNA_LAYOUT}")
    cases: dict[str, LunaCase] = {}
    missing = []
    for scan in scans:
        uid = scan.name[: -len(".mhd")]
        if uid in cases:
            raise ValueError(f"series {uid} is in two subsets: {cases[uid].ct_path} and {scan}")
        mask = mask_folder / scan.name
        if not mask.is_file():
            missing.append(f"{scan} (expected {mask})")
        cases[uid] = LunaCase(uid, scan, mask if mask.is_file() else None)
    if missing and require_masks:
        raise FileNotFoundError(f"{len(missing)} CT scan(s) have no lung mask: " + "; ".join(missing[:10]))
    return [cases[uid] for uid in sorted(cases)]


def read_luna_case(case: LunaCase) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """(CT in HU as stored (int16), mask as stored (labels 0, 3, 4, 5) or None, Geometry), (D, H, W).

    The CT and the mask must share size, spacing, origin and direction (ValueError naming both); a CT
    with NaN or infinite voxels is a ValueError naming it.
    """
    ct, ct_geometry = read_volume(case.ct_path)
    check_finite(ct, case.ct_path)
    if ct.ndim != 3:
        raise ValueError(f"{case.ct_path}: expected a 3D volume, got shape {ct.shape}")
    if case.mask_path is None:
        return ct, None, ct_geometry
    mask, mask_geometry = read_volume(case.mask_path)
    if mask.ndim != 3:
        raise ValueError(f"{case.mask_path}: expected a 3D volume, got shape {mask.shape}")
    check_same_geometry(
        ct_geometry, mask_geometry, ct.shape, mask.shape, str(case.ct_path), str(case.mask_path)
    )
    return ct, mask, ct_geometry


def lung_target(
    mask: np.ndarray, labels: Iterable[int] = LUNA_LUNG_LABELS, source: str | Path | None = None
) -> np.ndarray:
    """Binary lung target, uint8 0/1: 1 where the LUNA16 mask has one of `labels`.

    The default maps 3 and 4 (the two lungs) to 1 and everything else, the trachea/airways (5)
    included, to 0; pass labels=(3, 4, 5) to segment the airways with the lungs. A mask with no voxel
    of `labels` (masks labelled otherwise) is a ValueError naming `source` (the mask file), the labels
    asked for and those present, rather than an empty target that trains a network on nothing.
    """
    labels = tuple(int(label) for label in labels)
    target = np.isin(mask, labels)
    if not target.any():
        present = [int(value) for value in np.unique(mask)]
        where = f"{source}: the" if source is not None else "The"
        raise ValueError(
            f"{where} lung mask has no voxel labelled {list(labels)} (the lung_labels asked for); "
            f"the labels present are {present}"
        )
    return target.astype(np.uint8)


@dataclass(frozen=True)
class NiftiCase:
    """One NIfTI case: its image file(s) (one 3D/4D file, or one per channel) and label (None: unlabelled)."""

    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path | None
    # Channels dataset.json declares ('modality'); None: not checked. Not part of a case's identity.
    expected_channels: int | None = field(default=None, compare=False)


def _strip_nifti_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _nifti_suffix(name: str) -> str:
    return ".nii.gz" if name.endswith(".nii.gz") else ".nii"


def _load_dataset_json(root: Path) -> dict:
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist: {DECATHLON_LAYOUT}")
    path = root / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} has no dataset.json: {DECATHLON_LAYOUT}")
    try:
        description = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(description, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(description).__name__}")
    return description


def _class_names(labels: object, path: Path) -> dict[int, str]:
    """Foreground classes {index: name} from MSD ({"1": "name"}) or nnU-Net v2 ({"name": 1}) labels."""
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{path}: 'labels' must be an object mapping class indices to names")
    try:
        if all(str(key).isdigit() for key in labels):
            names = {int(key): str(name) for key, name in labels.items()}
        else:
            names = {int(index): str(name) for name, index in labels.items()}
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: 'labels' must map integer class indices to names ({error})") from error
    foreground = {index: name for index, name in sorted(names.items()) if index != 0}
    if not foreground:
        raise ValueError(f"{path}: 'labels' names no foreground class, only the background 0")
    if list(foreground) != list(range(1, len(foreground) + 1)):  # the network's output channels
        raise ValueError(
            f"{path}: 'labels' must number the foreground classes 1, 2, ... without gaps (as nnU-Net "
            f"requires), got {sorted(foreground)}; renumber the label maps"
        )
    names = list(foreground.values())
    if len(set(names)) < len(names) or any(name.strip() in ("", "mean") for name in names):
        raise ValueError(  # each name heads its own dsc_<name> column, beside dsc_mean
            f"{path}: 'labels' must give each foreground class its own name, not empty nor 'mean'; "
            f"got {foreground}"
        )
    return foreground


def _channel_names(description: dict, path: Path) -> list[str]:
    channels = description.get("modality", description.get("channel_names", {"0": "image"}))
    if not isinstance(channels, dict) or not channels:
        raise ValueError(f'{path}: \'modality\' must be an object like {{"0": "MRI"}}')
    try:
        return [str(channels[key]) for key in sorted(channels, key=int)]
    except ValueError as error:
        raise ValueError(f"{path}: 'modality' keys must be channel numbers ({error})") from error


def read_dataset_info(root: str | Path) -> dict:
    """{"name", "class_names": {index: name} without background, "channel_names": [...]} of a dataset.

    From dataset.json for a Decathlon folder; fixed ({1: "liver", 2: "tumour"}, ["CT"]) for LiTS.
    """
    root = Path(root)
    if not (root / "dataset.json").is_file() and root.is_dir() and _lits_files(root):
        return {"name": "LiTS", "class_names": dict(LITS_CLASS_NAMES), "channel_names": ["CT"]}
    description = _load_dataset_json(root)
    path = root / "dataset.json"
    return {
        "name": str(description.get("name", root.name)),
        "class_names": _class_names(description.get("labels"), path),
        "channel_names": _channel_names(description, path),
    }


def _image_files(path: Path, n_channels: int) -> tuple[Path, ...] | None:
    """The file itself, else its nnU-Net channel files <case>_0000...; None when neither exists."""
    if path.is_file():
        return (path,)
    stem, suffix = _strip_nifti_suffix(path.name), _nifti_suffix(path.name)
    channels = tuple(path.with_name(f"{stem}_{k:04d}{suffix}") for k in range(n_channels))
    return channels if all(p.is_file() for p in channels) else None


def _listed_path(root: Path, entry: object, where: str, json_path: Path) -> Path:
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"{json_path}: {where} must be a relative file path, got {entry!r}")
    return root / entry


def _unlisted_test_cases(root: Path, n_channels: int) -> list[NiftiCase]:
    """Unlabelled cases from imagesTs/ when dataset.json has no test list: files grouped by case."""
    folder = root / "imagesTs"
    if not folder.is_dir():
        return []
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.endswith((".nii", ".nii.gz")):
            continue
        stem = _strip_nifti_suffix(path.name)
        match = CHANNEL_SUFFIX.match(stem)
        groups.setdefault(match["case"] if match else stem, []).append(path)
    for case_id, files in groups.items():
        if len(files) > 1 and len(files) != n_channels:
            raise ValueError(
                f"{folder}: case {case_id} has {len(files)} channel files, expected {n_channels}"
            )
    return [NiftiCase(case_id, tuple(files), None, n_channels) for case_id, files in groups.items()]


def find_decathlon_cases(root: str | Path) -> list[NiftiCase]:
    """The cases listed by root/dataset.json: training (labelled) cases, then test (unlabelled) ones.

    Listed images may be one file (3D, or 4D multi-channel) or nnU-Net channel files <case>_0000.nii.gz,
    <case>_0001.nii.gz... beside the listed name. Without a "test" list, the images in imagesTs/ are
    the unlabelled cases. Every listed file must exist (FileNotFoundError naming the missing ones).
    """
    root = Path(root)
    description = _load_dataset_json(root)
    json_path = root / "dataset.json"
    _class_names(description.get("labels"), json_path)
    n_channels = len(_channel_names(description, json_path))
    training = description.get("training")
    if not isinstance(training, list):
        raise ValueError(f"{json_path}: expected a 'training' list of {{'image': ..., 'label': ...}} entries")
    cases: list[NiftiCase] = []
    missing: list[str] = []
    for index, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise ValueError(
                f"{json_path}: training entry {index} must have 'image' and 'label', got {entry!r}"
            )
        image = _listed_path(root, entry["image"], f"training entry {index} 'image'", json_path)
        label = _listed_path(root, entry["label"], f"training entry {index} 'label'", json_path)
        files = _image_files(image, n_channels)
        if files is None:
            missing.append(str(image))
        if not label.is_file():
            missing.append(str(label))
        cases.append(NiftiCase(_strip_nifti_suffix(image.name), files or (image,), label, n_channels))
    test = description.get("test")
    if test is None:
        cases += _unlisted_test_cases(root, n_channels)
    elif isinstance(test, list):
        for index, entry in enumerate(test):
            entry = entry.get("image") if isinstance(entry, dict) else entry
            image = _listed_path(root, entry, f"test entry {index}", json_path)
            files = _image_files(image, n_channels)
            if files is None:
                missing.append(str(image))
            cases.append(NiftiCase(_strip_nifti_suffix(image.name), files or (image,), None, n_channels))
    else:
        raise ValueError(f"{json_path}: 'test' must be a list of image paths, got {type(test).__name__}")
    if missing:
        shown = "; ".join(missing[:10]) + (f"; and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise FileNotFoundError(f"{json_path} lists {len(missing)} file(s) that do not exist: {shown}")
    _check_unique_ids(cases, str(json_path))
    return cases


def _check_unique_ids(cases: Sequence[NiftiCase], source: str) -> None:
    seen: dict[str, NiftiCase] = {}
    for case in cases:
        if case.case_id in seen:
            raise ValueError(
                f"{source}: case {case.case_id} appears twice ({seen[case.case_id].image_paths[0]} "
                f"and {case.image_paths[0]})"
            )
        seen[case.case_id] = case


def _lits_files(root: Path) -> list[tuple[re.Match, Path]]:
    return [
        (match, path)
        for path in sorted(root.rglob("*.nii*"))
        if (match := LITS_FILE.match(path.name))
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]


def find_lits_cases(root: str | Path) -> list[NiftiCase]:
    """LiTS cases: volume-N.nii with segmentation-N.nii anywhere below root; test-volume-N.nii unlabelled.

    Sorted by N, labelled cases first. A volume without its segmentation, a segmentation without its
    volume, or a number found twice is an error naming the files.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LiTS folder {root} does not exist: {LITS_LAYOUT}")
    files: dict[str, dict[int, Path]] = {"volume": {}, "segmentation": {}, "test-volume": {}}
    for match, path in _lits_files(root):
        kind, number = match["kind"], int(match["number"])
        if number in files[kind]:
            raise ValueError(f"{kind}-{number} is found twice: {files[kind][number]} and {path}")
        files[kind][number] = path
    volumes, segmentations = files["volume"], files["segmentation"]
    if not volumes and not files["test-volume"]:
        raise FileNotFoundError(f"{root} has no volume-<N>.nii files: {LITS_LAYOUT}")
    unpaired = [str(volumes[n]) + " (no segmentation)" for n in sorted(set(volumes) - set(segmentations))]
    unpaired += [str(segmentations[n]) + " (no volume)" for n in sorted(set(segmentations) - set(volumes))]
    if unpaired:
        raise FileNotFoundError(f"{root}: unpaired LiTS files: " + "; ".join(unpaired[:10]))
    cases = [NiftiCase(f"volume-{n}", (volumes[n],), segmentations[n]) for n in sorted(volumes)]
    cases += [
        NiftiCase(f"test-volume-{n}", (path,), None) for n, path in sorted(files["test-volume"].items())
    ]
    return cases


def find_nifti_cases(root: str | Path) -> list[NiftiCase]:
    """Cases of a NIfTI dataset: a Decathlon folder (it has dataset.json) or a LiTS folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist: {DECATHLON_LAYOUT}; or {LITS_LAYOUT}")
    if (root / "dataset.json").is_file():
        return find_decathlon_cases(root)
    if _lits_files(root):
        return find_lits_cases(root)
    raise FileNotFoundError(
        f"{root} has neither dataset.json nor LiTS files: {DECATHLON_LAYOUT}; or {LITS_LAYOUT}"
    )


def read_nifti_case(
    case: NiftiCase, allowed_labels: Iterable[int]
) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """(image float32 (C, D, H, W), label uint8 (D, H, W) or None, Geometry) of a NIfTI case.

    Channel files must share their geometry, and the label must match the image's (ValueError naming
    both files); label values are checked against allowed_labels as in load_label. A case found in a
    Decathlon folder must have the number of channels its dataset.json declares (ValueError naming the
    file and both counts), and no image may hold NaN or infinite voxels.
    """
    if len(case.image_paths) == 1:
        image, geometry = load_image(case.image_paths[0])
    else:
        image, geometry = read_channels(case.image_paths)
    if case.expected_channels is not None and image.shape[0] != case.expected_channels:
        raise ValueError(
            f"{case.image_paths[0]}: the image has {image.shape[0]} channel(s) (shape {image.shape}), but "
            f"dataset.json declares {case.expected_channels} in 'modality'"
        )
    if case.label_path is None:
        return image, None, geometry
    label, label_geometry = read_volume(case.label_path)
    if label.ndim != 3:
        raise ValueError(f"{case.label_path}: a label map must be a 3D volume, got shape {label.shape}")
    check_same_geometry(
        geometry, label_geometry, image.shape, label.shape, str(case.image_paths[0]), str(case.label_path)
    )
    return image, _as_label_map(label, allowed_labels, str(case.label_path)), geometry
