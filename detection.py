"""Lung-nodule detection on LUNA16 by segmentation: nodule masks from the annotations, candidates from the
network's probability map, in world coordinates.

The method (report.md says why): the suite's 3D networks learn a mask of balls of the annotated diameters
drawn around the annotated centres (`nodule_mask`); at inference the probability map's local maxima that
stand above `PEAK_THRESHOLD`, refined to a sub-voxel centre and thinned by 3D non-maximum suppression
(`find_candidates`), are the candidates, each scored by its peak probability and placed in world mm through
the grid's geometry. froc.py scores them as LUNA16 does. Preprocessing follows the field: the scan is
cropped to its lungs (seg-lungs-LUNA16) with a margin, windowed to -1200…600 HU and resampled (1 mm).
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.draw import ellipse_perimeter

from froc import Candidate, Finding, read_annotations, read_excluded
from volumes import Geometry, LunaCase, find_luna_cases, read_header

ANNOTATIONS, EXCLUDED = "annotations.csv", "annotations_excluded.csv"
NODULE_WINDOW = (-1200.0, 600.0)  # HU, as the seed detector (Liao et al. 2017)
LUNG_MARGIN_MM = 10.0  # kept around the lungs' bounding box: juxta-pleural nodules lie on its edge
PEAK_THRESHOLD = 0.05  # lowest peak probability kept as a candidate
SUPPRESSION_MM = 6.0  # two candidates closer than this are one (the lower-scored is dropped)
MAX_CANDIDATES = 100  # per scan, as the LUNA16 evaluation keeps at most


@dataclass(frozen=True)
class NoduleScan:
    """One LUNA16 series with its annotated nodules and irrelevant findings (world mm)."""

    case_id: str
    scan: LunaCase
    nodules: tuple[Finding, ...]
    excluded: tuple[Finding, ...]


def _check_inside(finding: Finding, scan: LunaCase) -> None:
    """ValueError naming the CSV line when an annotated centre lies outside its scan."""
    geometry, shape = read_header(scan.ct_path)
    index = geometry.world_to_index([finding.x, finding.y, finding.z])
    if np.any(index < -0.5) or np.any(index > np.array(shape) - 0.5):
        raise ValueError(
            f"{finding.where}: the finding at ({finding.x}, {finding.y}, {finding.z}) mm lies outside its "
            f"scan {scan.ct_path} (voxel (z, y, x) {np.round(index, 1).tolist()}, shape {list(shape)}): "
            "wrong series, or coordinates in voxels rather than world mm?"
        )


def find_nodule_scans(data_dir: str | Path, require_annotations: bool = True) -> list[NoduleScan]:
    """The LUNA16 series under data_dir with their findings from annotations.csv (required unless
    require_annotations is False: scans to predict only) and annotations_excluded.csv (optional); every
    finding is checked to lie on its scan.

    The official CSVs cover all ten subsets: rows on scans that are not under data_dir (subsets not
    downloaded) are left out with a warning, but a file none of whose rows is on a present scan is an
    error (the CSVs of another data set).
    """
    root = Path(data_dir)
    scans = {scan.case_id: scan for scan in find_luna_cases(root)}
    if not require_annotations and not (root / ANNOTATIONS).is_file():
        return [NoduleScan(uid, scan, (), ()) for uid, scan in scans.items()]
    if not (root / ANNOTATIONS).is_file():
        raise FileNotFoundError(
            f"{root} has no {ANNOTATIONS}: nodule detection needs the LUNA16 annotations "
            "(seriesuid,coordX,coordY,coordZ,diameter_mm, world mm) beside subset*/"
        )
    nodules = _on_present_scans(read_annotations(root / ANNOTATIONS), scans, root / ANNOTATIONS)
    excluded = (
        _on_present_scans(read_excluded(root / EXCLUDED), scans, root / EXCLUDED)
        if (root / EXCLUDED).is_file()
        else []
    )
    for finding in [*nodules, *excluded]:
        _check_inside(finding, scans[finding.seriesuid])
    return [
        NoduleScan(
            uid,
            scan,
            tuple(f for f in nodules if f.seriesuid == uid),
            tuple(f for f in excluded if f.seriesuid == uid),
        )
        for uid, scan in scans.items()
    ]


def _on_present_scans(findings: list[Finding], scans: Collection[str], path: Path) -> list[Finding]:
    present = [finding for finding in findings if finding.seriesuid in scans]
    if findings and not present:
        raise ValueError(
            f"{path}: none of its {len(findings)} rows is on a scan under {path.parent} (first series "
            f"{findings[0].seriesuid}): the annotations of another data set?"
        )
    if len(present) < len(findings):
        absent = sorted({finding.seriesuid for finding in findings} - set(scans))
        warnings.warn(
            f"{path}: {len(findings) - len(present)} rows on {len(absent)} series that are not under "
            f"{path.parent} (subsets not downloaded?) are left out, e.g. {absent[0]}",
            stacklevel=3,
        )
    return present


def lung_box(lungs: np.ndarray, spacing: Sequence[float], margin_mm: float = LUNG_MARGIN_MM) -> list[int]:
    """[z0, z1, y0, y1, x0, x1] of the lungs' bounding box grown by margin_mm, inside the array."""
    where = np.argwhere(lungs)
    if len(where) == 0:
        return [0, lungs.shape[0], 0, lungs.shape[1], 0, lungs.shape[2]]
    margin = [int(np.ceil(margin_mm / s)) for s in spacing]
    low = np.maximum(where.min(0) - margin, 0)
    high = np.minimum(where.max(0) + 1 + margin, lungs.shape)
    return [int(v) for pair in zip(low, high, strict=True) for v in pair]


def cropped_geometry(geometry: Geometry, box: Sequence[int]) -> Geometry:
    """The geometry of array[box]: the same voxels, the origin moved to the box's first voxel."""
    origin = geometry.index_to_world([box[0], box[2], box[4]])
    return Geometry(spacing=geometry.spacing, origin=tuple(origin), direction=geometry.direction)


def nodule_mask(findings: Sequence[Finding], geometry: Geometry, shape: Sequence[int]) -> np.ndarray:
    """uint8 (D, H, W): 1 inside a ball of each finding's diameter around its centre, on this grid."""
    mask = np.zeros(shape, np.uint8)
    spacing = np.array(geometry.spacing)
    for finding in findings:
        centre = geometry.world_to_index([finding.x, finding.y, finding.z])
        radius = finding.diameter_mm / 2
        reach = np.ceil(radius / spacing).astype(int) + 1
        low = np.maximum(np.floor(centre).astype(int) - reach, 0)
        high = np.minimum(np.ceil(centre).astype(int) + reach + 1, shape)
        if np.any(high <= low):
            continue
        grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high, strict=True)], indexing="ij")
        distance = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing, strict=True)))
        box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
        mask[box] |= (distance <= max(radius, 0.5 * spacing.min())).astype(np.uint8)
    return mask


def find_candidates(
    probability: np.ndarray,
    geometry: Geometry,
    seriesuid: str,
    threshold: float = PEAK_THRESHOLD,
    suppression_mm: float = SUPPRESSION_MM,
    limit: int = MAX_CANDIDATES,
) -> list[Candidate]:
    """Nodule candidates of one scan, highest probability first, in world mm.

    Local maxima of the probability map above `threshold`, each moved to the probability-weighted
    centre of its 3 × 3 × 3 neighbourhood (sub-voxel: a nodule of 3 mm is hit within 1.5 mm), then
    greedy non-maximum suppression: a candidate within suppression_mm of a higher one is dropped. A
    plateau of equal maxima (a confident network's sigmoid is exactly 1.0 across a nodule) is one
    candidate at its centre, not one per voxel from its corner.
    """
    if not threshold > 0:
        raise ValueError(f"find_candidates: threshold must be positive, got {threshold}")
    spacing = np.array(geometry.spacing)
    size = [max(3, 2 * int(round(suppression_mm / 2 / s)) + 1) for s in spacing]
    peaks = (probability == ndimage.maximum_filter(probability, size=size, mode="constant")) & (
        probability >= threshold
    )
    plateaus, _ = ndimage.label(peaks, structure=np.ones((3, 3, 3)))
    centres, scores = [], []
    for label, box in enumerate(ndimage.find_objects(plateaus), start=1):
        voxels = np.argwhere(plateaus[box] == label) + [part.start for part in box]
        centres.append(_refined_centre(probability, voxels[0]) if len(voxels) == 1 else voxels.mean(0))
        scores.append(float(probability[tuple(voxels[0])]))
    kept: list[np.ndarray] = []
    kept_scores: list[float] = []
    for index in np.argsort(-np.array(scores), kind="stable"):
        if any(np.linalg.norm((centres[index] - other) * spacing) < suppression_mm for other in kept):
            continue
        kept.append(centres[index])
        kept_scores.append(scores[index])
        if len(kept) == limit:
            break
    if not kept:
        return []
    world = geometry.index_to_world(np.array(kept))
    return [
        Candidate(seriesuid, *map(float, point), score)
        for point, score in zip(world, kept_scores, strict=True)
    ]


def _refined_centre(probability: np.ndarray, index: np.ndarray) -> np.ndarray:
    low = np.maximum(index - 1, 0)
    high = np.minimum(index + 2, probability.shape)
    block = probability[tuple(slice(a, b) for a, b in zip(low, high, strict=True))].astype(np.float64)
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high, strict=True)], indexing="ij")
    return np.array([(g * block).sum() / block.sum() for g in grids])


def circles(
    findings: Sequence, geometry: Geometry, shape: Sequence[int], radius_mm: float | None = None
) -> np.ndarray:
    """uint8 (D, H, W) with the outline, on every axial slice a finding crosses, of its cross-section.

    Each finding is drawn as a sphere of its diameter (or of radius_mm, e.g. for candidates), so that
    overlays show annotated nodules and detections where they are, slice by slice.
    """
    outlines = np.zeros(shape, np.uint8)
    spacing = np.array(geometry.spacing)
    for finding in findings:
        radius = radius_mm if radius_mm is not None else max(finding.diameter_mm, 3.0) / 2
        centre = geometry.world_to_index([finding.x, finding.y, finding.z])
        for z in range(max(0, int(np.ceil(centre[0] - radius / spacing[0]))), shape[0]):
            across = radius**2 - ((z - centre[0]) * spacing[0]) ** 2
            if across < 0:
                if z > centre[0]:
                    break
                continue
            rows, cols = ellipse_perimeter(
                int(round(centre[1])),
                int(round(centre[2])),
                max(1, int(round(np.sqrt(across) / spacing[1]))),
                max(1, int(round(np.sqrt(across) / spacing[2]))),
                shape=shape[1:],
            )
            outlines[z, rows, cols] = 1
    return outlines
