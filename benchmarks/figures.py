"""The report's figures from one evaluated run: per-case DSC plot, best/median/worst overlays, a GIF.

Reads the test rows of `<run>/inference/dsc.csv` and the overlay PNGs and GIFs that `engine.evaluate`
wrote, plots the test cases' DSC, picks those with the best, median and worst mean DSC, and for each the
slice with the most predicted or true foreground, enlarged (nearest neighbour) so that small hippocampus
slices stay readable. Writes to report/.

    .venv/bin/python benchmarks/figures.py runs/benchmarks/hippocampus-unet2d-3min-seed0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils import plot_dsc, read_metrics_csv  # noqa: E402

SCALE = 4


def coloured_pixels(image: np.ndarray) -> int:
    """Pixels drawn as outlines (not grey): a proxy for how much of the structure a slice shows."""
    return int((np.ptp(image[..., :3].astype(int), axis=-1) > 0).sum())


def busiest_slice(predictions: Path, case_id: str) -> Path:
    slices = sorted(predictions.glob(f"{case_id}-*.png"))
    return max(slices, key=lambda path: coloured_pixels(iio.imread(path)))


def enlarge(image: np.ndarray) -> np.ndarray:
    return image.repeat(SCALE, axis=0).repeat(SCALE, axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "report")
    args = parser.parse_args(argv)
    inference = args.run_dir / "inference"
    rows = [row for row in read_metrics_csv(inference / "dsc.csv") if row.get("subset", "test") == "test"]
    if not rows:
        parser.error(f"{inference / 'dsc.csv'} has no test cases")
    rows.sort(key=lambda row: row["dsc_mean"])
    args.out.mkdir(parents=True, exist_ok=True)
    plot_dsc(rows, args.out / "dsc.png", title=f"{args.run_dir.name}\nper-case DSC, test ({len(rows)} cases)")
    picks = {"worst": rows[0], "median": rows[len(rows) // 2], "best": rows[-1]}
    for label, row in picks.items():
        source = busiest_slice(inference / "predictions", row["case"])
        iio.imwrite(args.out / f"overlay-{label}.png", enlarge(iio.imread(source)))
        print(
            f"{label}: {row['case']} (mean DSC {row['dsc_mean']:.4f}), slice {source.stem.rsplit('-', 1)[1]}"
        )
    frames = iio.imread(inference / "predictions" / f"{picks['median']['case']}.gif", index=None)
    iio.imwrite(args.out / "median-case.gif", np.stack([enlarge(f) for f in frames]), duration=200, loop=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
