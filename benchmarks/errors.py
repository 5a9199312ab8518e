"""Where a hippocampus run's test errors lie, and how large the labelled structures are.

For the predicted label maps that `engine.evaluate` wrote (`<run>/inference/labels/*.nii.gz`) against the
true labels: the voxel confusion matrix over all test cases, and the share of wrong voxels within one voxel
of the true foreground's boundary (inside or outside it). Then the size of each case's foreground bounding
box over the whole data set, which is what a training patch must hold. Printed, and written as JSON beside
the predictions (`<run>/inference/errors.json`).

    .venv/bin/python benchmarks/errors.py runs/benchmarks/<run folder>
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from volumes import read_volume  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "msd-hippocampus"


def boundary_band(foreground: np.ndarray) -> np.ndarray:
    """Voxels within one voxel (6-connected) of the foreground's surface, on either side."""
    return ndimage.binary_dilation(foreground) & ~ndimage.binary_erosion(foreground)


def error_summary(pairs: list[tuple[np.ndarray, np.ndarray]], classes: int) -> dict:
    """Confusion matrix (rows: truth, columns: prediction) and where the wrong voxels are."""
    confusion = np.zeros((classes, classes), np.int64)
    in_band = wrong = 0
    for predicted, truth in pairs:
        confusion += np.bincount(
            classes * truth.ravel().astype(np.int64) + predicted.ravel(), minlength=classes**2
        ).reshape(classes, classes)
        errors = predicted != truth
        wrong += int(errors.sum())
        in_band += int((errors & boundary_band(truth > 0)).sum())
    between_classes = int(confusion[1:, 1:].sum() - np.trace(confusion[1:, 1:]))
    return {
        "confusion": confusion.tolist(),
        "wrong_voxels": wrong,
        "share_within_one_voxel_of_the_boundary": in_band / wrong if wrong else 0.0,
        "share_between_foreground_classes": between_classes / wrong if wrong else 0.0,
    }


def bounding_box_sizes(labels: list[np.ndarray]) -> np.ndarray:
    """(cases, 3) extent of each case's foreground, in voxels."""
    sizes = []
    for label in labels:
        where = np.argwhere(label > 0)
        sizes.append(where.max(0) - where.min(0) + 1)
    return np.array(sizes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args(argv)
    predictions = sorted((args.run_dir / "inference" / "labels").glob("*.nii.gz"))
    if not predictions:
        parser.error(f"{args.run_dir}/inference/labels has no .nii.gz predictions: evaluate the run first")

    def truth(case_id: str) -> np.ndarray:
        return np.rint(read_volume(args.data / "labelsTr" / f"{case_id}.nii.gz")[0]).astype(np.int64)

    pairs = [
        (read_volume(path)[0].astype(np.int64), truth(path.name.removesuffix(".nii.gz")))
        for path in predictions
    ]
    summary = error_summary(pairs, classes=3)
    sizes = bounding_box_sizes(
        [
            truth(path.name.removesuffix(".nii.gz"))
            for path in sorted((args.data / "labelsTr").glob("*.nii.gz"))
        ]
    )
    summary["foreground_box"] = {
        "cases": len(sizes),
        "median": np.median(sizes, 0).tolist(),
        "95th_percentile": np.percentile(sizes, 95, axis=0).tolist(),
        "largest": sizes.max(0).tolist(),
    }
    (args.run_dir / "inference" / "errors.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
