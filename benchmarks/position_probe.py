"""Does a detector find a nodule wherever it lies in its input window, or only at the window's centre?

For each annotated nodule of a run's training scans, one window of the run's patch size is cut with the
nodule's centre at the window's centre, then moved by `--shifts` voxels along every axis (the nodule
towards the window's corner); the network's highest probability inside the nodule is recorded. A network
trained on patches centred on their foreground voxel (nnU-Net's sampling) can learn that nodules lie only
at the centre; sliding-window inference then misses most of them.

    .venv/bin/python benchmarks/position_probe.py runs/benchmarks/luna-nodules-50-30min [more runs]

Writes benchmarks/results/position_probe.json: per run and shift, the mean of the per-nodule maxima and the
share of nodules above 0.5. Nodules whose shifted windows would leave the scan are skipped (counted).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model_speed import cpu_name  # noqa: E402
from run import commit  # noqa: E402

from dataset import find_sources, prepare_cases  # noqa: E402
from engine import class_probabilities, load_run  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "position_probe.json"


def probe(run_dir: Path, shifts: list[int], scans: int) -> dict:
    """The network's peak probability inside each training nodule, window by window shift."""
    config, args, model = load_run(run_dir, torch.device("cpu"))
    sources, _ = find_sources(config.dataset, config.data_dir)
    wanted = set(args["split"]["train"][:scans])
    cases = prepare_cases(
        [s for s in sources if s.case_id in wanted], args["plan"], args["info"], config.cache_dir, 1
    )
    patch = np.array(args["shapes"]["patch_size"])
    peaks: list[list[float]] = []
    skipped = 0
    for case in cases:
        image, label = np.asarray(case.image), np.asarray(case.label)
        label = label[0] if label.ndim == 4 else label
        nodules, count = ndimage.label(label > 0)
        for index in range(1, count + 1):
            centre = np.round(ndimage.center_of_mass(nodules == index)).astype(int)
            starts = [centre - patch // 2 + shift for shift in shifts]
            if any(np.any(s < 0) or np.any(s + patch > image.shape[1:]) for s in starts):
                skipped += 1
                continue
            row = []
            for start in starts:
                window = tuple(slice(int(a), int(a + p)) for a, p in zip(start, patch, strict=True))
                with torch.no_grad():
                    logits = model(
                        torch.from_numpy(np.ascontiguousarray(image[(slice(None), *window)]))[None]
                    )
                probability = class_probabilities(logits[0])[-1].numpy()
                row.append(float(probability[nodules[window] == index].max()))
            peaks.append(row)
    values = np.array(peaks)
    return {
        "run": run_dir.name,
        "foreground_jitter": config.foreground_jitter,
        "nodules": len(peaks),
        "skipped_near_edge": skipped,
        "shifts": shifts,
        "mean_peak": values.mean(0).round(3).tolist(),
        "share_above_half": (values > 0.5).mean(0).round(3).tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, nargs="+", help="detection run folders")
    parser.add_argument("--shifts", type=int, nargs="+", default=[0, 4, 8, 12, 16])
    parser.add_argument("--scans", type=int, default=15, help="training scans probed per run")
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    record = {
        "runs": [probe(run, args.shifts, args.scans) for run in args.runs],
        "device": cpu_name(),
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
    }
    for row in record["runs"]:
        print(
            f"{row['run']} (jitter {row['foreground_jitter']}): mean peak {row['mean_peak']} "
            f"at shifts {row['shifts']}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
