"""Preprocessing speed: kaggle_3m first runs beside the reference course program, the per-slice resize
against the 4D resize it replaced, and volumetric throughput.

1. kaggle_3m, on one generated set (`synthetic.make_kaggle_3m`, 24 patients of 256 x 256 tifs, seed 0):
   the project's first run (`find_sources`, `make_plan`, `prepare_cases` into a fresh, empty cache each
   repeat, so every case is really preprocessed) with 1 and 2 worker processes, against the reference
   course program building its dataset of the same folder (`peers.time_reference_preprocessing`, its own
   process), at image size 256 (the reference's) and 128 (the demo's): median seconds over the repeats,
   seconds per patient, and the ratio reference / project (target: at least 10). Then the resize alone on
   one patient, cropped and padded as the pipeline does: d8e582e's single 4D spline over (D, S, S, C)
   against today's per-slice 2D `dataset.resize_slices`, with the largest difference of their results.
2. Volumetric first runs and cached (second) runs in cases per minute, with 1 and 2 workers: a generated
   LUNA16 set (`synthetic.make_luna`, 8 cases of its default shape, a real chest's extent in mm) as
   `dataset="luna"` (2.5 mm), and the real MSD hippocampus data (../shared/data/msd-hippocampus, every
   labelled case, median spacing) when it is there (skipped with the reason printed otherwise).

The reference part is skipped, with its reason printed, when ../shared/peers is absent. Records (a JSON
list, rewritten after each part) go to benchmarks/results/preprocessing.json (preprocessing_quick.json
with --quick), each with the CPU, the date, the commit and its settings.

    .venv/bin/python benchmarks/preprocessing.py
    .venv/bin/python benchmarks/preprocessing.py --quick --output /tmp/preprocessing_quick.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from skimage.transform import resize

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from model_speed import cpu_name  # noqa: E402
from peers import HIPPOCAMPUS, REFERENCE, missing, time_reference_preprocessing  # noqa: E402
from run import commit, first_cases  # noqa: E402

from dataset import (  # noqa: E402
    crop_box,
    find_sources,
    list_patient_folders,
    make_plan,
    prepare_cases,
    read_patient,
    resize_slices,
    square_padding,
)
from synthetic import make_kaggle_3m, make_luna  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
TARGET_RATIO = 10.0  # the reference's preprocessing time over the project's
# The data and sizes of a full run and of --quick (tiny data, one repeat).
FULL = {"patients": 24, "slices": (20, 30), "generated_size": 256, "image_sizes": [256, 128]}
FULL |= {"luna_cases": 8, "luna_shape": [120, 128, 128]}
QUICK = {"patients": 3, "slices": (6, 8), "generated_size": 64, "image_sizes": [48], "repeats": 1}
QUICK |= {"luna_cases": 2, "luna_shape": [32, 64, 64]}


def timed(function: Callable) -> tuple[object, float]:
    """(result, seconds) of a call."""
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def environment() -> dict:
    """Where and when the records were measured, and the project's commit."""
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
    }


# ---- kaggle_3m: the project's first run against the reference's --------------------------------------------


def project_first_run(folder: Path, image_size: int, workers: int) -> tuple[float, int]:
    """Seconds from a kaggle_3m folder to its cached cases (listing, plan, preprocessing), and the slices.

    The cache is a new, empty folder, so every case is preprocessed.
    """
    with tempfile.TemporaryDirectory(prefix="preprocessing-cache-") as cache:
        started = time.perf_counter()
        sources, info = find_sources("kaggle_3m", folder)
        plan = make_plan("kaggle_3m", sources, info, image_size=image_size)
        cases = prepare_cases(sources, plan, info, cache_dir=cache, workers=workers)
        seconds = time.perf_counter() - started
    return seconds, sum(case.shape[0] for case in cases)


def reference_fields(folder: Path, image_size: int, repeats: int) -> dict:
    """The reference's timing of the same folder, or why there is none."""
    if missing(REFERENCE, "reference course program"):
        return {"reference": f"skipped: {REFERENCE} is absent"}
    timing = time_reference_preprocessing(folder, image_size, repeats)
    return {
        "reference": "brain-segmentation-pytorch BrainSegmentationDataset, its own process",
        "reference_seconds": timing["seconds"],
        "reference_runs": timing["runs"],
        "reference_seconds_per_patient": timing["seconds_per_patient"],
        "reference_slices": timing["slices"],
    }


def kaggle_records(folder: Path, image_sizes: list[int], workers: list[int], repeats: int) -> list[dict]:
    """One record per image size and worker count: the project's seconds and the reference's beside them."""
    patients = len(list_patient_folders(folder))
    records = []
    for image_size in image_sizes:
        reference = reference_fields(folder, image_size, repeats)
        for count in workers:
            runs = [project_first_run(folder, image_size, count) for _ in range(repeats)]
            seconds = statistics.median(run[0] for run in runs)
            record = {"benchmark": "kaggle_3m first run", "image_size": image_size, "workers": count}
            record |= {"patients": patients, "slices": runs[0][1], "seconds": seconds}
            record |= {"runs": [run[0] for run in runs], "seconds_per_patient": seconds / patients}
            record |= reference
            if "reference_seconds" in reference:
                record["ratio_reference_to_project"] = reference["reference_seconds"] / seconds
                record["meets_target"] = record["ratio_reference_to_project"] >= TARGET_RATIO
            record["settings"] = {"repeats": repeats, "target_ratio": TARGET_RATIO}
            records.append(record)
            print(kaggle_line(record), flush=True)
    return records


def kaggle_line(record: dict) -> str:
    line = (
        f"kaggle_3m {record['image_size']}px, {record['workers']} worker(s): {record['seconds']:.2f} s "
        f"({record['seconds_per_patient']:.3f} s/patient)"
    )
    if "ratio_reference_to_project" in record:
        line += (
            f"; reference {record['reference_seconds']:.2f} s, "
            f"{record['ratio_reference_to_project']:.1f}x slower"
        )
    return line


# ---- kaggle_3m: the resize alone ---------------------------------------------------------------------------


def resize_4d(volume: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """d8e582e's resize: one spline over (D, H, W, C) to (D, size, size, C); the mask nearest neighbour."""
    depth, channels = volume.shape[0], volume.shape[-1]
    image = resize(
        volume.astype(np.float32),
        (depth, size, size, channels),
        order=2,
        mode="constant",
        anti_aliasing=False,
        preserve_range=True,
    )
    mask = resize(
        mask, (depth, size, size), order=0, mode="constant", anti_aliasing=False, preserve_range=True
    ).astype(np.uint8)
    return image, mask


def cropped_patient(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """A patient's volume and mask cropped to the head and padded to square, as `preprocess_patient` does."""
    volume, mask, _ = read_patient(folder)
    top, bottom, left, right = crop_box(volume)
    volume, mask = volume[:, top:bottom, left:right], mask[:, top:bottom, left:right]
    rows, cols = square_padding(*volume.shape[1:3])
    return np.pad(volume, ((0, 0), rows, cols, (0, 0))), np.pad(mask, ((0, 0), rows, cols))


def resize_record(folder: Path, image_size: int) -> dict:
    """Seconds of the 4D and the per-slice resize of the first patient, and how much their results differ."""
    patient = list_patient_folders(folder)[0]
    volume, mask = cropped_patient(patient)
    (old_image, old_mask), old_seconds = timed(lambda: resize_4d(volume, mask, image_size))
    (new_image, new_mask), new_seconds = timed(lambda: resize_slices(volume, mask, image_size))
    record = {"benchmark": "kaggle_3m resize", "image_size": image_size, "patient": patient.name}
    record |= {"input_shape": list(volume.shape), "resize_4d_seconds": old_seconds}
    record |= {"resize_slices_seconds": new_seconds, "speedup": old_seconds / new_seconds}
    difference = np.abs(old_image - new_image)
    record |= {"max_abs_difference": float(difference.max()), "mean_abs_difference": float(difference.mean())}
    record["value_range"] = float(new_image.max() - new_image.min())
    record["mask_voxels_different"] = int((old_mask != new_mask).sum())
    record["settings"] = {"image": "order 2, mode constant, no anti-aliasing", "mask": "order 0"}
    print(
        f"resize to {image_size}px of {volume.shape}: 4D {old_seconds:.2f} s, per slice {new_seconds:.2f} s "
        f"({record['speedup']:.0f}x), max difference {record['max_abs_difference']:.2g}",
        flush=True,
    )
    return record


# ---- volumetric throughput ---------------------------------------------------------------------------------


def volumetric_records(name: str, dataset: str, folder: Path, workers: list[int]) -> list[dict]:
    """A first and a cached run of a volumetric set per worker count, in cases per minute."""
    records = []
    for count in workers:
        for run, timing in zip(("first", "cached"), first_and_cached(dataset, folder, count), strict=True):
            record = {"benchmark": "volumetric preprocessing", "data": name, "dataset": dataset}
            record |= {"run": run, "workers": count, **timing}
            record["cases_per_minute"] = 60 * timing["cases"] / timing["seconds"]
            records.append(record)
            print(
                f"{name}, {run} run, {count} worker(s): {record['cases_per_minute']:.1f} cases/min",
                flush=True,
            )
    return records


def first_and_cached(dataset: str, folder: Path, workers: int) -> list[dict]:
    """Seconds of `prepare_cases` into a new cache, then again from it; listing and plan timed apart.

    The plan reads headers only here (the spacing; no CT statistics: LUNA16 has a fixed window, the
    hippocampus is MRI).
    """
    with tempfile.TemporaryDirectory(prefix="preprocessing-cache-") as cache:
        started = time.perf_counter()
        sources, info = find_sources(dataset, folder)
        plan = make_plan(dataset, sources, info, workers=workers)
        common = {"cases": len(sources), "plan_seconds": time.perf_counter() - started}
        common["settings"] = {"spacing": plan["spacing"]}
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            prepare_cases(sources, plan, info, cache, workers=workers)
            timings.append({"seconds": time.perf_counter() - started, **common})
    return timings


def hippocampus_folder(work: Path, quick: bool) -> Path | None:
    """The real hippocampus data (its first 4 cases, linked, with --quick), or None after saying why not."""
    if missing(HIPPOCAMPUS / "dataset.json", "hippocampus throughput (no MSD hippocampus data)"):
        return None
    return first_cases(HIPPOCAMPUS, 4, work / "hippocampus") if quick else HIPPOCAMPUS


# ---- command line ------------------------------------------------------------------------------------------


def run_parts(args: argparse.Namespace, work: Path) -> None:
    """Generate the data, run both parts and write the records after each of them."""
    context = environment()
    records: list[dict] = []

    def write(new: list[dict], data: str) -> None:
        records.extend(record | {"data_set": data, **context, "quick": args.quick} for record in new)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(records, indent=1) + "\n")

    kaggle = make_kaggle_3m(work, args.patients, args.slices, args.generated_size, seed=0)
    tifs = f"{args.generated_size} x {args.generated_size}"
    kaggle_data = f"synthetic kaggle_3m, {args.patients} patients, {tifs} tifs, seed 0"
    write(kaggle_records(kaggle, args.image_sizes, args.workers, args.repeats), kaggle_data)
    write([resize_record(kaggle, size) for size in args.image_sizes], kaggle_data)
    luna = make_luna(work, n_cases=args.luna_cases, shape=tuple(args.luna_shape), seed=0)
    luna_data = f"synthetic LUNA16, {args.luna_cases} scans of {args.luna_shape} voxels"
    write(volumetric_records("LUNA16 stand-in", "luna", luna, args.workers), luna_data)
    hippocampus = hippocampus_folder(work, args.quick)
    if hippocampus is not None:
        write(volumetric_records("MSD hippocampus", "msd", hippocampus, args.workers), str(hippocampus))
    print(f"written to {args.output}")


def parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    main_parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    main_parser.add_argument("--repeats", type=int, default=3, help="kaggle_3m first runs per setting")
    main_parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="preprocessing processes")
    main_parser.add_argument("--output", type=Path, help="results (default benchmarks/results/...)")
    main_parser.add_argument("--quick", action="store_true", help="tiny data, one repeat (a smoke check)")
    return main_parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    vars(args).update(QUICK if args.quick else FULL)
    args.output = args.output or RESULTS / (
        "preprocessing_quick.json" if args.quick else "preprocessing.json"
    )
    with tempfile.TemporaryDirectory(prefix="preprocessing-benchmark-") as work:
        run_parts(args, Path(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
