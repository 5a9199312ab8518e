"""Parameter count and CPU forward+backward time per batch for every network.

2D networks run on 256x256 batches of 4, 3D networks on 64^3 batches of 1, and the hippocampus
benchmark's residual U-Nets on its patches, 4 at a time, channels-last, 3 classes (``--quick``: tiny
sizes with width 4, a smoke check only; ``--demo``: only the demo's 2D U-Net as make demo trains it,
batches of 16 three-channel 128 x 128 slices, channels-last, at the widths the demo selection compared).
Each case has 1 warm-up and ``--repeats`` timed training steps (forward, mean of the logits, backward);
the median is reported. Results go to benchmarks/results/model_speed.json (model_speed_quick.json,
model_speed_demo.json) and a markdown table is printed.

    .venv/bin/python benchmarks/model_speed.py [--repeats 3] [--quick | --demo] [--threads N]
"""

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import build_model, count_parameters  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# (label, model name, build options); every network has 1 input and 1 output channel and its
# default width unless the options say otherwise
CASES_2D = [
    ("unet", "unet", {}),
    ("attention_unet", "attention_unet", {}),
    ("unet_pp", "unet_pp", {}),
    ("unet_pp deep supervision", "unet_pp", {"deep_supervision": True}),
]
CASES_3D = [
    ("unet3d", "unet3d", {}),
    ("vnet", "vnet", {}),
    ("attention_unet 3d", "attention_unet", {"spatial_dims": 3, "init_features": 16}),
    ("unet_pp 3d", "unet_pp", {"spatial_dims": 3, "init_features": 16}),
    ("res_unet3d", "res_unet3d", {}),
    ("res_unet3d depth 3", "res_unet3d", {"depth": 3}),
]
# The hippocampus benchmark's networks as they train there: batches of 4 patches, 3 classes,
# channels-last; (label, options of res_unet3d, patch size)
CASES_HIPPOCAMPUS = [
    ("res_unet3d depth 3", {"depth": 3}, (40, 56, 40)),
    ("res_unet3d depth 3", {"depth": 3}, (32, 48, 32)),
    ("res_unet3d depth 3, full resolution 8", {"depth": 3, "full_resolution": 8}, (40, 56, 40)),
    ("res_unet3d depth 3, full resolution 8", {"depth": 3, "full_resolution": 8}, (32, 48, 32)),
    ("res_unet3d depth 3, full resolution 16", {"depth": 3, "full_resolution": 16}, (32, 48, 32)),
]
# The demo's U-Net (train.ipynb) at the first-level widths of demo selection rounds 8 and 9
CASES_DEMO = [
    ("unet, init_features 16", {"init_features": 16}),
    ("unet, init_features 8", {"init_features": 8}),
]
DEMO_BATCH = (16, 3, 128, 128)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else what ``platform`` reports.

    Family and model numbers tell apart CPUs sold under one name ("AMD EPYC"), and "bf16" says the CPU
    has bfloat16 units, which decide whether mixed precision speeds training up or slows it down.
    """
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return platform.processor() or platform.machine()
    first_processor = cpuinfo.read_text().split("\n\n")[0]
    fields = dict(line.split(":", 1) for line in first_processor.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    details = []
    if "cpu family" in fields and "model" in fields:
        details.append(f"family {fields['cpu family']} model {fields['model']}")
    if {"avx512_bf16", "amx_bf16"} & set(fields.get("flags", "").split()):
        details.append("bf16")
    name = fields.get("model name") or platform.machine()
    return f"{name} ({', '.join(details)})" if details else name


def time_training_step(model: torch.nn.Module, batch: torch.Tensor, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` forward+backward passes, after one warm-up pass."""
    model.train()
    times = []
    for step in range(repeats + 1):
        start = time.perf_counter()
        outputs = model(batch)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        sum(output.mean() for output in outputs).backward()
        model.zero_grad(set_to_none=True)
        if step > 0:
            times.append(time.perf_counter() - start)
    return times


def run_case(
    label: str,
    name: str,
    options: dict,
    shape: tuple[int, ...],
    repeats: int,
    out_channels: int = 1,
    channels_last: bool = False,
) -> dict:
    torch.manual_seed(0)
    model = build_model(name, in_channels=shape[1], out_channels=out_channels, **options)
    batch = torch.randn(shape)
    if channels_last:
        layout = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        model = model.to(memory_format=layout)
        batch = batch.contiguous(memory_format=layout)
    times = time_training_step(model, batch, repeats)
    return {
        "network": label,
        "model": name,
        "options": options,
        "input_shape": list(shape),
        "out_channels": out_channels,
        "channels_last": channels_last,
        "parameters": count_parameters(model),
        "median_seconds": statistics.median(times),
        "seconds": times,
    }


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| network | input (N, C, *spatial) | parameters | forward+backward s (median) |",
        "|---|---|---:|---:|",
    ]
    for result in results:
        shape = "x".join(str(size) for size in result["input_shape"])
        lines.append(
            f"| {result['network']} | {shape} | {result['parameters']:,} | {result['median_seconds']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per network")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny sizes and widths (smoke check)")
    mode.add_argument("--demo", action="store_true", help="only the demo's U-Net, at two widths")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    shape_2d, shape_3d = (
        ((2, 1, 32, 32), (1, 1, 32, 32, 32))
        if args.quick
        else (
            (4, 1, 256, 256),
            (1, 1, 64, 64, 64),
        )
    )
    results = []
    if args.demo:
        for label, options in CASES_DEMO:
            results.append(run_case(label, "unet", options, DEMO_BATCH, args.repeats, channels_last=True))
            print(f"{label}: {results[-1]['median_seconds']:.3f} s", file=sys.stderr)
    else:
        for cases, shape in ((CASES_2D, shape_2d), (CASES_3D, shape_3d)):
            for label, name, options in cases:
                if args.quick:
                    options = {**options, "init_features": 4}
                results.append(run_case(label, name, options, shape, args.repeats))
                print(f"{label}: {results[-1]['median_seconds']:.3f} s", file=sys.stderr)
        for label, options, patch in CASES_HIPPOCAMPUS:
            shape = (2, 1, 16, 24, 16) if args.quick else (4, 1, *patch)
            options = {**options, "init_features": 4} if args.quick else options
            results.append(run_case(label, "res_unet3d", options, shape, args.repeats, 3, channels_last=True))
            print(f"{label} {patch}: {results[-1]['median_seconds']:.3f} s", file=sys.stderr)

    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "quick": args.quick,
        "demo": args.demo,
        "repeats": args.repeats,
        "results": results,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else "_demo" if args.demo else ""
    output = RESULTS_DIR / f"model_speed{suffix}.json"
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(results))
    print(f"\nwritten to {output}")


if __name__ == "__main__":
    main()
