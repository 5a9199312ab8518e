"""Everything this project measures and checks on a CUDA GPU, in one run of a few minutes.

On the generated kaggle_3m demo data (24 synthetic patients, made on first use) with the reference brain
configuration (2D U-Net, 256 × 256 slices, batch 16, init_features 32, Dice, Adam 1e-4), in order:
- `float32`, `bfloat16`, `float16`: training slices per second over a fixed number of steps (5 warm-up, 30
  timed; engine.train's step: autocast, GradScaler for float16, channels-last) on real augmented batches
  held on the GPU, then inference slices per second over every volume (`engine.predict_case`), with the peak
  GPU memory of each (reset between modes);
- `torchrun`: `torchrun --nproc_per_node=1 train.py --config ...` for 2 epochs (amp "auto", loader workers),
  its history's samples per second and its weights loaded on the CPU. With WORLD_SIZE=1 train() joins no
  process group, so `nccl` checks NCCL itself: an NCCL group of one under torchrun, an all-reduce and a
  DistributedDataParallel step;
- `pytest`: `pytest -m cuda tests/test_cuda.py`, its summary and every test's outcome;
- `compile`: the bfloat16 training steps with torch.compile, when at least 3 of the --minutes are left.
Every section is written, with its error if it failed, to one JSON file (and copied to $OUT when that is
set) as soon as it ends, so a run cut short keeps what it did. Exit status: 0 when every section passed, 1
when one failed, 2 without a CUDA device.

    .venv/bin/python benchmarks/gpu.py                          # about 5 minutes on one GPU
    .venv/bin/python benchmarks/gpu.py --quick                  # tiny data and steps, no compile
    .venv/bin/python benchmarks/gpu.py --output /tmp/gpu.json --minutes 8
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from brain_speed import QUICK, REFERENCE, synchronize  # noqa: E402
from run import commit  # noqa: E402

import distributed  # noqa: E402
from dataset import Case, DatasetInfo, split_cases  # noqa: E402
from engine import (  # noqa: E402
    TrainConfig,
    amp_dtype,
    data_shapes,
    load_cases,
    load_run,
    make_model,
    predict_case,
    training_data,
)
from loss import DeepSupervisionLoss, build_loss  # noqa: E402
from synthetic import DEMO_PATIENTS, make_kaggle_3m  # noqa: E402

OUTPUT = REPO / "benchmarks" / "results" / "gpu.json"
DEMO_DATA = REPO / "data" / "kaggle_3m"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, with this interpreter
CUDA_TESTS = "tests/test_cuda.py"  # where the tests marked cuda live
PRECISIONS = {"float32": False, "bfloat16": "bfloat16", "float16": "float16"}  # name: the amp setting
STEPS = {"warmup": 5, "timed": 30, "batches": 8}  # training steps; distinct batches cycled through
QUICK_STEPS = {"warmup": 1, "timed": 3, "batches": 2}
COMPILE_SECONDS = 180  # time left that the torch.compile section needs
QUICK_SETTINGS = {**QUICK, "validation_cases": 1, "test_cases": 1}  # for 6 tiny patients


@dataclasses.dataclass
class Data:
    """The prepared data set: every case, its description, the network's input sizes and training batches
    drawn once (augmented, from the real pinned-memory loader) and held on the GPU for every mode."""

    cases: list[Case]
    info: DatasetInfo
    shapes: dict
    batches: list[tuple[torch.Tensor, torch.Tensor]]


class Report:
    """The JSON record, written (and copied to $OUT) after every section, so a cut-short run keeps it."""

    def __init__(self, output: Path, minutes: float) -> None:
        self.output, self.started, self.deadline = output, time.perf_counter(), 60 * minutes
        self.record: dict = {}

    def left(self) -> float:
        """Seconds left of the time the run was given."""
        return self.deadline - (time.perf_counter() - self.started)

    def say(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:5.0f} s] {message}", flush=True)

    def write(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.output.write_text(json.dumps(self.record, indent=1) + "\n")
        copy = Path(os.environ["OUT"]) / self.output.name if os.environ.get("OUT") else None
        if copy is not None and copy.resolve() != self.output.resolve():
            shutil.copy(self.output, copy)

    def section(self, name: str, function: Callable[[], dict]) -> None:
        """Run one section; its result, or its error, goes into the record under `name`."""
        self.say(f"{name}: started")
        begun = time.perf_counter()
        try:
            result = function()
        except Exception:  # one failed section must not lose the others: it is recorded and reported
            result = {"ok": False, "error": traceback.format_exc()[-4000:]}
        self.record[name] = {**result, "section_seconds": time.perf_counter() - begun}
        self.write()
        shown = {k: v for k, v in result.items() if isinstance(v, bool | int | float) or k == "summary"}
        self.say(f"{name}: {'ok' if result.get('ok', True) else 'FAILED'} {shown}")
        if "error" in result:
            print(result["error"], file=sys.stderr, flush=True)

    def failed(self) -> list[str]:
        return [
            name
            for name, value in self.record.items()
            if isinstance(value, dict) and not value.get("ok", True)
        ]


def environment() -> dict:
    """The GPU, the software and the commit the figures belong to."""
    properties = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "gpu_memory_gb": properties.total_memory / 2**30,
        "gpus": torch.cuda.device_count(),
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cpus": os.cpu_count(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit(),
    }


def base_config(args: argparse.Namespace, data_dir: Path, scratch: Path, amp: bool | str) -> TrainConfig:
    """The reference settings (tiny ones with --quick) on CUDA with the given precision."""
    settings = {**REFERENCE, **(QUICK_SETTINGS if args.quick else {}), "data_dir": str(data_dir), "amp": amp}
    settings |= {"runs_dir": str(scratch / "runs"), "num_workers": args.workers, "device": "cuda"}
    settings["cache_dir"] = str(scratch / "cache" if args.quick else REPO / ".cache")
    return TrainConfig(**settings)


def data_folder(quick: bool, scratch: Path) -> Path:
    """The demo data (generated when absent), or 6 tiny patients with --quick."""
    if quick:
        return make_kaggle_3m(scratch, n_patients=6, slices_per_patient=(6, 7), image_size=64, seed=0)
    if not DEMO_DATA.exists():
        make_kaggle_3m(DEMO_DATA.parent, n_patients=DEMO_PATIENTS, seed=0)
    return DEMO_DATA


def prepare(config: TrainConfig, batches: int) -> Data:
    """Preprocessed cases (cached), the training cases' shapes and `batches` training batches on the GPU."""
    cases, info, plan = load_cases(config)
    by_id = {case.case_id: case for case in cases}
    split = split_cases(list(by_id), config.validation_cases, config.test_cases, config.seed)
    train_cases = [by_id[case_id] for case_id in split["train"]]
    shapes = data_shapes(train_cases, config, make_model(config, info).size_divisor)
    context = distributed.Context(device=torch.device("cuda"))
    loader, _ = training_data(train_cases, config, 2, shapes, plan, context)
    on_gpu = [
        (images.cuda().contiguous(memory_format=torch.channels_last), labels.cuda())
        for images, labels in itertools.islice(itertools.cycle(loader), batches)
    ]
    return Data(cases, info, shapes, on_gpu)


def training_speed(
    config: TrainConfig, data: Data, steps: dict, compiled: bool
) -> tuple[dict, torch.nn.Module]:
    """Slices per second of engine.train's step over fixed batches, and the trained network."""
    device = torch.device("cuda")
    torch.manual_seed(config.seed)
    model = make_model(config, data.info).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    precision = amp_dtype(config.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == torch.float16)
    base_loss = build_loss(config.loss, **config.loss_options)
    criterion = DeepSupervisionLoss(base_loss, getattr(model, "supervision_weights", None))
    step_model = torch.compile(model) if compiled else model
    torch.cuda.reset_peak_memory_stats()

    def run(count: int) -> tuple[float, float]:
        """(seconds, last loss) of `count` steps."""
        synchronize(device)
        started = time.perf_counter()
        for images, labels in itertools.islice(itertools.cycle(data.batches), count):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=precision, enabled=precision is not None):
                loss = criterion(step_model(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        synchronize(device)
        return time.perf_counter() - started, float(loss)

    model.train()
    warmup_seconds, _ = run(steps["warmup"])
    seconds, loss = run(steps["timed"])
    result = {
        "train_slices_per_second": steps["timed"] * config.batch_size / seconds,
        "warmup_seconds": warmup_seconds,
        "last_loss": loss,
        "loss_finite": math.isfinite(loss),
        "train_peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
        **({"grad_scale": scaler.get_scale()} if scaler.is_enabled() else {}),
    }
    return result, model


def inference_speed(model: torch.nn.Module, config: TrainConfig, data: Data) -> dict:
    """Slices per second of predict_case over every volume after one warm-up volume, and its peak memory."""
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    predict_case(model, data.cases[0].image, device, data.shapes, config)
    synchronize(device)
    started = time.perf_counter()
    logits = [predict_case(model, case.image, device, data.shapes, config) for case in data.cases]
    synchronize(device)
    return {
        "inference_slices_per_second": sum(case.shape[0] for case in data.cases)
        / (time.perf_counter() - started),
        "inference_peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
        "logits_finite": all(bool(torch.isfinite(x).all()) for x in logits),
    }


def precision_section(config: TrainConfig, data: Data, steps: dict) -> dict:
    """Training and inference in one precision; ok when its loss and logits are finite."""
    training, model = training_speed(config, data, steps, compiled=False)
    inference = inference_speed(model, config, data)
    del model
    torch.cuda.empty_cache()
    return {
        "amp": config.amp,
        **training,
        **inference,
        "ok": training["loss_finite"] and inference["logits_finite"],
    }


def compile_section(config: TrainConfig, data: Data, steps: dict, report: Report) -> dict:
    """The bfloat16 training steps through torch.compile (warm-up includes compiling), if time allows."""
    if report.left() < COMPILE_SECONDS:
        return {"skipped": f"{report.left():.0f} s left, torch.compile needs about {COMPILE_SECONDS} s"}
    training, model = training_speed(dataclasses.replace(config, amp="bfloat16"), data, steps, compiled=True)
    del model
    torch.cuda.empty_cache()
    return {**training, "ok": training["loss_finite"]}


def torchrun_section(config: TrainConfig, scratch: Path, quick: bool) -> dict:
    """A 1-GPU torchrun run of train.py (amp auto): its speed per epoch, and its weights on the CPU."""
    config = dataclasses.replace(config, run_name="torchrun-1gpu", epochs=1 if quick else 2, amp="auto")
    settings = config.save(scratch / "torchrun-1gpu.yaml")
    command = [
        *TORCHRUN,
        "--standalone",
        "--nproc_per_node=1",
        str(REPO / "train.py"),
        "--config",
        str(settings),
    ]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    if finished.returncode != 0:
        raise RuntimeError(f"torchrun train.py exited with {finished.returncode}:\n{finished.stderr[-3000:]}")
    history = json.loads((config.run_dir / "history.json").read_text())
    result = json.loads((config.run_dir / "result.json").read_text())
    _, args, model = load_run(config.run_dir, torch.device("cpu"))
    return {
        "wall_seconds": time.perf_counter() - started,
        "samples_per_second": [entry["samples_per_second"] for entry in history],
        "data_wait_share": [entry["data_seconds"] / entry["seconds"] for entry in history],
        "best_val_mean_dsc": result["best_val_mean_dsc"],
        "world_size": args["world_size"],
        "loads_on_cpu": next(model.parameters()).device.type == "cpu",
        "process_group": "none: with WORLD_SIZE=1 train() runs as a group of one (see the nccl section)",
        "ok": args["world_size"] == 1,
    }


def nccl_section() -> dict:
    """This script under `torchrun --nproc_per_node=1 ... --nccl-check`: an NCCL group of one works."""
    command = [
        *TORCHRUN,
        "--standalone",
        "--nproc_per_node=1",
        str(Path(__file__).resolve()),
        "--nccl-check",
    ]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    if finished.returncode != 0:
        raise RuntimeError(f"the NCCL check exited with {finished.returncode}:\n{finished.stderr[-3000:]}")
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    return {**result, "ok": result["all_reduce"] == result["world_size"] and result["ddp_gradient_finite"]}


def nccl_check() -> int:
    """Run by torchrun: join an NCCL group, all-reduce ones, take one DDP step; print the result as JSON."""
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    total = torch.ones(1, device=device)
    dist.all_reduce(total)
    model = DistributedDataParallel(torch.nn.Conv2d(1, 2, 3).to(device))
    model(torch.randn(4, 1, 16, 16, device=device)).square().mean().backward()
    finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    result = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "all_reduce": total.item()}
    print(json.dumps({**result, "ddp_gradient_finite": finite}), flush=True)
    dist.destroy_process_group()
    return 0


def junit_outcomes(path: Path) -> list[dict]:
    """Every test case of a JUnit XML report: its name, outcome, seconds and message."""
    tests = []
    for case in ElementTree.parse(path).iter("testcase"):
        marks = [child for child in case if child.tag in ("failure", "error", "skipped")]
        tests.append(
            {
                "test": f"{case.get('classname')}::{case.get('name')}",
                "outcome": marks[0].tag if marks else "passed",
                "seconds": float(case.get("time", 0)),
                "message": (marks[0].get("message") or "")[:500] if marks else "",
            }
        )
    return tests


def pytest_section(report: Report, scratch: Path) -> dict:
    """`pytest -m cuda` on tests/test_cuda.py (other test files may need packages a GPU machine lacks): ok
    when it passed, with each test's outcome."""
    xml = scratch / "pytest-cuda.xml"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", CUDA_TESTS, "-q", "-rA", f"--junitxml={xml}"]
    limit = max(60, report.left() - 30)
    try:
        finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as error:
        output = error.stdout.decode() if isinstance(error.stdout, bytes) else error.stdout or ""
        return {"ok": False, "error": f"pytest ran past {limit:.0f} s", "output_tail": output[-4000:]}
    lines = [line for line in finished.stdout.splitlines() if line.strip()]
    return {
        "returncode": finished.returncode,
        "summary": lines[-1] if lines else "",
        "tests": junit_outcomes(xml) if xml.exists() else [],
        "output_tail": (finished.stdout + finished.stderr)[-4000:],
        "ok": finished.returncode == 0,
    }


def no_cuda_message() -> str:
    return (
        f"benchmarks/gpu.py needs a CUDA GPU, and torch.cuda.is_available() is False here (torch "
        f"{torch.__version__}, built for CUDA {torch.version.cuda}): run it on a machine with an NVIDIA GPU"
    )


def measure(args: argparse.Namespace, report: Report, scratch: Path) -> None:
    """Every section in turn, each written to the report as it ends."""
    steps = QUICK_STEPS if args.quick else STEPS
    report.record["environment"] = environment()
    report.say(f"{report.record['environment']['device']}; preparing the data")
    data_dir = data_folder(args.quick, scratch)
    config = base_config(args, data_dir, scratch, False)
    data = prepare(config, steps["batches"])
    report.record["settings"] = {**dataclasses.asdict(config), "steps": steps, "quick": args.quick}
    held = sum(images.nbytes + labels.nbytes for images, labels in data.batches) / 2**20  # in every peak
    slices = sum(case.shape[0] for case in data.cases)
    report.record["data"] = {"cases": len(data.cases), "slices": slices, "gpu_batches_mb": held}
    for name, amp in PRECISIONS.items():
        report.section(
            name, lambda amp=amp: precision_section(dataclasses.replace(config, amp=amp), data, steps)
        )
    report.section("torchrun", lambda: torchrun_section(config, scratch, args.quick))
    report.section("nccl", nccl_section)
    report.section("pytest", lambda: pytest_section(report, scratch))
    if args.quick:
        report.record["compile"] = {"skipped": "--quick"}
    else:
        report.section("compile", lambda: compile_section(config, data, steps, report))


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the JSON file (also copied to $OUT)")
    parser.add_argument("--minutes", type=float, default=9.0, help="time the whole run may take")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers")
    parser.add_argument("--quick", action="store_true", help="tiny data and steps, no torch.compile")
    parser.add_argument("--nccl-check", action="store_true", help=argparse.SUPPRESS)  # run by nccl_section
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(no_cuda_message(), file=sys.stderr, flush=True)
        return 2
    if args.nccl_check:
        return nccl_check()
    report = Report(args.output, args.minutes)
    with tempfile.TemporaryDirectory(prefix="gpu-benchmark-") as scratch:
        try:
            measure(args, report, Path(scratch))
        except Exception:  # preparing the data failed: nothing else can run, but the record says why
            report.record["fatal"] = {"ok": False, "error": traceback.format_exc()[-4000:]}
            report.write()
            raise
    failed = report.failed()
    report.say(
        f"written to {args.output}" + (f"; FAILED: {', '.join(failed)}" if failed else "; every section ok")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
