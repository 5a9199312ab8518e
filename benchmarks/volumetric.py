"""Volumetric pipeline speed: LUNA16 preprocessing throughput and sliding-window inference time on CPU.

1. Preprocessing: a generated LUNA16 set (synthetic CT + masks in the real .mhd/.raw/.zraw layout) read,
   windowed and resampled to 2.5 mm, first with an empty cache, then again from the cache (volumes/second).
2. Sliding-window inference (untrained networks at their benchmark widths; the time does not depend on the
   weights): per generated CT volume at 2.5 mm (3D U-Net and V-Net, 96³ windows, overlap 0.5) and per real
   hippocampus volume (3D U-Net, one 48 × 64 × 48 window), when ../shared/data is present.

Writes benchmarks/results/volumetric.json and prints a markdown table.

    .venv/bin/python benchmarks/volumetric.py [--cases 6] [--shape 120 256 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataset import load_decathlon, load_luna  # noqa: E402
from models import build_model  # noqa: E402
from sliding_window import sliding_window_inference  # noqa: E402
from synthetic import make_luna  # noqa: E402

HIPPOCAMPUS = REPO.parent / "shared" / "data" / "msd-hippocampus"
OUTPUT = REPO / "benchmarks" / "results" / "volumetric.json"


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def inference_seconds(model: torch.nn.Module, volumes: list[np.ndarray], patch: list[int]) -> float:
    """Mean seconds of a whole-volume sliding-window prediction (after one warm-up volume)."""
    sliding_window_inference(model, torch.from_numpy(volumes[0]), patch, batch_size=2)
    seconds = [
        timed(lambda v=v: sliding_window_inference(model, torch.from_numpy(v), patch, batch_size=2))[1]
        for v in volumes
    ]
    return float(np.mean(seconds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=[120, 256, 256], help="CT size (z, y, x)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = make_luna(folder, n_cases=args.cases, shape=tuple(args.shape), spacing=(2.5, 0.7, 0.7))
        cache = Path(folder) / "cache"
        cases, cold = timed(lambda: load_luna(root, cache_dir=cache))
        _, warm = timed(lambda: load_luna(root, cache_dir=cache))
        shape = list(cases[0].image.shape[1:])
        size = "×".join(map(str, args.shape))
        rows.append(
            {
                "measure": f"LUNA preprocessing, {size} CT at 0.7×0.7×2.5 mm, first run",
                "value": args.cases / cold,
                "unit": "volumes/s",
            }
        )
        rows.append(
            {"measure": "LUNA preprocessing, cached run", "value": args.cases / warm, "unit": "volumes/s"}
        )
        volumes = [case.image for case in cases]
        for name, width in (("unet3d", 16), ("vnet", 8)):
            model = build_model(name, 1, 1, init_features=width)
            seconds = inference_seconds(model, volumes, [96, 96, 96])
            rows.append(
                {
                    "measure": f"sliding window, {name} f={width}, CT resampled to {shape}, 96³ windows",
                    "value": seconds,
                    "unit": "s/volume",
                }
            )
    if (HIPPOCAMPUS / "dataset.json").is_file():
        hippocampus, _ = load_decathlon(HIPPOCAMPUS, cache_dir=REPO / ".cache")
        model = build_model("unet3d", 1, 3, init_features=16)
        volumes = [case.image for case in hippocampus[:20]]
        seconds = inference_seconds(model, volumes, [48, 64, 48])
        rows.append(
            {
                "measure": "sliding window, unet3d f=16, hippocampus volume, 48×64×48 window",
                "value": seconds,
                "unit": "s/volume",
            }
        )
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    record = {"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads()}
    OUTPUT.write_text(json.dumps(record, indent=1) + "\n")
    print("| measure | value | unit |\n|---|---|---|")
    for row in rows:
        print(f"| {row['measure']} | {row['value']:.3f} | {row['unit']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
