"""Peak memory of 3D training and inference on real-size CT as the number of cases grows, today's code
(memory-mapped case cache) against the last commit before it (d8e582e: every case in RAM).

The data is the real-size LiTS stand-in (`synthetic.make_lits`: 512 x 512 x 100-400 int16 CT, several GB
for 40 cases), generated once into `--data` (outside the repository). Size N trains on the first N cases,
through a folder of links to them (nothing is copied), so a size reuses the cache entries of the smaller
sizes and preprocesses only its new cases. Each code version starts with an empty cache of its own.

Every training (`engine.train`) and inference (`engine.evaluate` on the test cases) runs in its own
process, the code version's folder first on sys.path, and is watched from outside: every 0.2 s the memory
of the process and of all its descendants (DataLoader and preprocessing workers) is read from /proc and
summed. Three figures per process, in MB:
- `peak_rss_mb`: the largest sum of VmRSS over the tree. Pages shared by several processes (a forked
  worker's view of its parent's arrays, a cache file mapped by every worker) count once per process;
- `peak_pss_mb`: the largest sum of Pss (smaps_rollup): shared pages divided among their sharers, so the
  sum is the memory the tree really holds;
- `ru_maxrss_children_mb`: what `getrusage(RUSAGE_CHILDREN).ru_maxrss` reports for that one process
  (os.wait4): the peak of its largest single process, workers not added up.
The data preparation inside the training process (`prepare_cases`, or `load_cases` in d8e582e) is timed
there and reported separately (`preprocessing_seconds`, `preprocessing_peak_rss_mb`), with the peak
outside it (`peak_rss_after_preprocessing_mb`). A process that runs out of memory or past `--time-limit`
is recorded with that status instead of stopping the benchmark; larger sizes of that code are then not run.

Settings (both versions, like for like): `dataset="msd"` on the LiTS folder, `res_unet3d` with 8 initial
features, 64 x 128 x 128 patches, batches of 2, 16 patches, 1 epoch, isotropic 2.0 mm spacing (d8e582e
takes a scalar only), the CT window -1000..400 HU (d8e582e's default; today's code then skips its CT
statistics pass), 2 validation and 2 test cases, 2 DataLoader workers; today's code preprocesses in 2
processes (d8e582e in the training process, one case after another).

    .venv/bin/python benchmarks/scale.py --data /tmp/lits-standin              # sizes 10 20 40, both versions
    .venv/bin/python benchmarks/scale.py --codes old --sizes 40                # one part again
    .venv/bin/python benchmarks/scale.py --quick --output /tmp/scale_quick.json   # 4 tiny cases, today's code

d8e582e is checked out with `git worktree add --detach /tmp/old-main d8e582e` when `--old-tree` does not
hold it yet. Records go to benchmarks/results/scale.json (scale_quick.json with --quick): one per code
version and size, replacing an earlier record of the same version, size and mode.

Only the standard library and numpy are imported at the top: a measured process imports its own code
version's modules (engine, dataset, volumes...) after putting that version first on sys.path, so nothing
of today's code may be loaded before; the parent imports today's modules inside the functions that need
them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CHILD = "_child"  # the hidden command a measured process runs
OLD_COMMIT = "d8e582e"
SAMPLE_SECONDS = 0.2


@dataclasses.dataclass(frozen=True)
class Code:
    """A code version: its name in the records, the commit and the folder it is imported from."""

    name: str
    commit: str | None  # None: this checkout
    preprocessing: str  # how it prepares the cases, for the record


CODES = {
    "new": Code("memory-mapped cache", None, "2 worker processes, memory-mapped on-disk cache"),
    "old": Code(f"{OLD_COMMIT} in-RAM", OLD_COMMIT, "in the training process, every case kept in RAM"),
}
# The training settings both versions share (TrainConfig fields of each).
COMMON = {
    "dataset": "msd",
    "model": "res_unet3d",
    "init_features": 8,
    "patch_size": [64, 128, 128],
    "spacing": 2.0,
    "hu_window": [-1000.0, 400.0],
    "loss": "dice_ce",
    "lr": 1e-3,
    "batch_size": 2,
    "patches_per_epoch": 16,
    "epochs": 1,
    "validation_cases": 2,
    "test_cases": 2,
    "num_workers": 2,
    "vis_freq": 1000,
    "device": "cpu",
    "seed": 0,
    "resume": False,
}
NEW_ONLY = {"preprocess_workers": 2}
# --quick: 4 cases of 64 x 64 x 12-20 voxels resampled coarsely, so that one size takes seconds.
QUICK = {
    "spacing": 8.0,
    "patch_size": [16, 32, 32],
    "patches_per_epoch": 4,
    "validation_cases": 1,
    "test_cases": 1,
}
QUICK_CASES = 4
SIZES = (10, 20, 40)
DATA = Path("/tmp/lits-standin")
WORK = Path("/tmp/scale-benchmark")
# Keys every record has (None where not measured): other tools read them.
KEYS = ("code", "cases", "status", "peak_rss_mb", "inference_peak_rss_mb", "seconds", "preprocessing_seconds")


# ---- watching a process tree from outside -----------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and every process below it, from the parent ids in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, then ppid
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _kilobytes(text: str, field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match[1]) if match else 0


def process_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, Pss) of one process in kB; zeros once it has exited."""
    try:
        rss = _kilobytes(Path(f"/proc/{pid}/status").read_text(), "VmRSS")
        pss = _kilobytes(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss")
    except OSError:
        return 0, 0
    return rss, pss


def tree_memory(root: int) -> tuple[float, int, int]:
    """(time, summed VmRSS, summed Pss) of a process tree now, in kB."""
    memory = [process_memory(pid) for pid in process_tree(root)]
    return time.time(), sum(rss for rss, _ in memory), sum(pss for _, pss in memory)


def kill_group(group: int) -> None:
    """SIGKILL the process group a measured process leads (its workers included), if any is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def outcome(exit_code: int, timed_out: bool, log: str) -> str:
    """ok, out of memory (killed by SIGKILL, MemoryError, a worker killed), timed out, or failed."""
    if timed_out:
        return "timed out"
    if exit_code == 0:
        return "ok"
    memory_signs = ("MemoryError", "killed by signal: Killed", "Cannot allocate memory")
    if exit_code == -signal.SIGKILL or any(sign in log for sign in memory_signs):
        return "out of memory"
    return f"failed (exit {exit_code})"


@dataclasses.dataclass
class Measured:
    """What watching one process gave: its outcome, memory samples and the result it wrote."""

    status: str
    exit_code: int
    seconds: float
    samples: np.ndarray  # (n, 3): time, summed VmRSS kB, summed Pss kB
    maxrss_kb: int
    result: dict | None
    log_tail: str

    def peak_mb(self, column: int, windows: list | None = None, inside: bool = True) -> float:
        """The largest sample of a column (1 RSS, 2 PSS) in MB, inside or outside time windows."""
        samples = self.samples
        if windows is not None:
            times = samples[:, 0]
            within = np.zeros(len(samples), bool)
            for start, end in windows:
                within |= (times >= start - SAMPLE_SECONDS) & (times <= end + SAMPLE_SECONDS)
            samples = samples[within == inside]
        return float(samples[:, column].max()) / 1024 if len(samples) else 0.0


def watch(command: list[str], log_path: Path, result_path: Path, limit_s: float) -> Measured:
    """Run a command in its own process group, sampling its tree's memory until it exits or times out."""
    started = time.time()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    samples, timed_out = [], False
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        samples.append(tree_memory(process.pid))
        if not timed_out and time.time() - started > limit_s:
            timed_out = True
            kill_group(process.pid)
        time.sleep(SAMPLE_SECONDS)
    process.returncode = os.waitstatus_to_exitcode(status)
    kill_group(process.pid)  # workers left behind by a killed process
    tail = log_path.read_text(errors="replace")[-3000:]
    status = outcome(process.returncode, timed_out, tail)
    if status == "ok" and not result_path.exists():
        status = "failed (no result)"
    return Measured(
        status=status,
        exit_code=process.returncode,
        seconds=time.time() - started,
        samples=np.array(samples or [(started, 0, 0)], np.float64),
        maxrss_kb=usage.ru_maxrss,
        result=json.loads(result_path.read_text()) if status == "ok" else None,
        log_tail=tail,
    )


# ---- the measured process ---------------------------------------------------------------------------------


def timed_preparation(engine) -> list[list[float]]:
    """Wrap the engine's data preparation (prepare_cases, or load_cases in d8e582e) to record its windows."""
    name = "prepare_cases" if hasattr(engine, "prepare_cases") else "load_cases"
    original, windows = getattr(engine, name), []

    def timed(*args, **kwargs):
        started = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            windows.append([started, time.time()])

    setattr(engine, name, timed)
    return windows


def import_engine(code_root: str):
    """The engine module of a code version, checked to come from its folder."""
    sys.path.insert(0, code_root)
    import engine

    if Path(engine.__file__).resolve().parent != Path(code_root).resolve():
        raise ImportError(f"engine was imported from {engine.__file__}, not from {code_root}")
    return engine


def child(kind: str, code_root: str, request_path: str, result_path: str) -> int:
    """A measured process: train, or evaluate the test cases, with one code version; write what it saw."""
    engine = import_engine(code_root)
    import torch

    request = json.loads(Path(request_path).read_text())
    windows = timed_preparation(engine)
    started = time.time()
    if kind == "train":
        summary = engine.train(engine.TrainConfig(**request["settings"]))
        history = summary["history"]
        details = {
            "epochs": len(history),
            "train_seconds": sum(entry["seconds"] for entry in history),
            "validation_seconds": sum(entry["validation_seconds"] for entry in history),
            "best_val_mean_dsc": summary["best_val_mean_dsc"],
        }
    else:
        rows = engine.evaluate(
            request["run_dir"], subsets=["test"], output_dir=request["output_dir"], device="cpu"
        )["rows"]
        details = {"test_cases": len(rows), "test_dsc_mean": float(np.mean([r["dsc_mean"] for r in rows]))}
    details |= {"seconds": time.time() - started, "threads": torch.get_num_threads()}
    details |= {"preparation_windows": windows, "preparation_seconds": sum(e - s for s, e in windows)}
    Path(result_path).write_text(json.dumps(details))
    return 0


def measure(kind: str, code_root: Path, request: dict, folder: Path, limit_s: float) -> Measured:
    """Run one measured process (train or evaluate) with its request and log in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    request_path, result_path = folder / f"{kind}-request.json", folder / f"{kind}-result.json"
    result_path.unlink(missing_ok=True)
    request_path.write_text(json.dumps(request))
    command = [sys.executable, str(Path(__file__).resolve()), CHILD, kind, str(code_root)]
    return watch(
        [*command, str(request_path), str(result_path)], folder / f"{kind}.log", result_path, limit_s
    )


# ---- data, code versions and settings -------------------------------------------------------------------


def ensure_lits(data_root: Path, count: int, quick: bool) -> Path:
    """The LiTS stand-in folder data_root/lits with at least `count` cases, generated when absent."""
    from synthetic import make_lits
    from volumes import find_lits_cases

    folder = data_root / "lits"
    if folder.exists():
        found = len([case for case in find_lits_cases(folder) if case.label_path is not None])
        if found < count:
            raise SystemExit(f"{folder} holds {found} cases, {count} are needed: give another --data folder")
        return folder
    if not quick:
        print(f"generating {count} real-size LiTS cases in {folder} (about 200 MB and 20 s each)", flush=True)
    tiny = {"size": 64, "slices": (12, 20)} if quick else {}
    return make_lits(data_root, count, seed=0, **tiny)


def linked_cases(lits: Path, count: int, folder: Path) -> Path:
    """A LiTS folder of links to the first `count` volume/segmentation pairs (nothing is copied)."""
    from volumes import find_lits_cases

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    labelled = [case for case in find_lits_cases(lits) if case.label_path is not None]
    for case in labelled[:count]:
        for path in (*case.image_paths, case.label_path):
            (folder / path.name).symlink_to(path.resolve())
    return folder


def source_megabytes(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.iterdir()) / 2**20


def cache_entries(cache: Path) -> int:
    """Complete cache entries (one per case) of either version: <kind>/<case>-<key>[.npz]."""
    return len([p for p in cache.glob("*/*") if not p.name.startswith(".")]) if cache.exists() else 0


def code_root(code: Code, old_tree: Path) -> Path:
    """This checkout, or a worktree of the old commit (created with `git worktree add` when absent)."""
    if code.commit is None:
        return REPO
    if not (old_tree / "engine.py").exists():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(old_tree), code.commit], cwd=REPO, check=True
        )
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=old_tree, capture_output=True, text=True, check=True
    ).stdout
    if not head.startswith(code.commit):
        raise SystemExit(f"{old_tree} is at {head[:12]}, not {code.commit}: give another --old-tree")
    return old_tree


def training_settings(key: str, data: Path, cache: Path, run_dir: Path, quick: bool) -> dict:
    """The TrainConfig fields of one training: the shared settings, paths and the version's own."""
    settings = {**COMMON, **(QUICK if quick else {}), **(NEW_ONLY if key == "new" else {})}
    paths = {"data_dir": str(data), "cache_dir": str(cache), "runs_dir": str(run_dir.parent)}
    return settings | paths | {"run_name": run_dir.name}


def environment() -> dict:
    """The CPU, this checkout's commit and the date."""
    from model_speed import cpu_name
    from run import commit

    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
        "checkout": commit(),
    }


# ---- records ----------------------------------------------------------------------------------------------


def training_fields(train: Measured) -> dict:
    """The training process's figures: time, memory overall, during and after data preparation."""
    fields = {"status": train.status, "exit_code": train.exit_code, "seconds": train.seconds}
    fields |= {"peak_rss_mb": train.peak_mb(1), "peak_pss_mb": train.peak_mb(2)}
    fields["ru_maxrss_children_mb"] = train.maxrss_kb / 1024
    if train.result is None:
        return fields | {"log_tail": train.log_tail}
    windows = train.result["preparation_windows"]
    fields |= {
        "preprocessing_seconds": train.result["preparation_seconds"],
        "preprocessing_peak_rss_mb": train.peak_mb(1, windows),
        "peak_rss_after_preprocessing_mb": train.peak_mb(1, windows, inside=False),
        "peak_pss_after_preprocessing_mb": train.peak_mb(2, windows, inside=False),
    }
    keys = ("epochs", "train_seconds", "validation_seconds", "best_val_mean_dsc", "threads")
    return fields | {key: train.result[key] for key in keys}


def inference_fields(inference: Measured) -> dict:
    """The inference process's figures, under inference_ keys."""
    fields = {"status": inference.status, "seconds": inference.seconds}
    fields |= {"peak_rss_mb": inference.peak_mb(1), "peak_pss_mb": inference.peak_mb(2)}
    fields["ru_maxrss_children_mb"] = inference.maxrss_kb / 1024
    if inference.result is not None:
        fields |= {key: inference.result[key] for key in ("test_cases", "test_dsc_mean")}
    else:
        fields["log_tail"] = inference.log_tail
    return {f"inference_{key}": value for key, value in fields.items()}


def measure_size(key: str, cases: int, args: argparse.Namespace, lits: Path, work: Path) -> dict:
    """Train on the first `cases` cases with one code version, then evaluate its test cases."""
    code = CODES[key]
    root = code_root(code, args.old_tree)
    data = linked_cases(lits, cases, work / "data" / f"lits-{cases}")
    cache, run_dir = work / f"cache-{key}", work / "runs" / f"{key}-{cases}"
    shutil.rmtree(run_dir, ignore_errors=True)
    settings = training_settings(key, data, cache, run_dir, args.quick)
    cached_before = cache_entries(cache)
    limit = 60 * args.time_limit
    train = measure("train", root, {"settings": settings}, work / "logs" / f"{key}-{cases}", limit)
    held_out = settings["validation_cases"] + settings["test_cases"]
    record = {"code": code.name, "commit": code.commit, "cases": cases, "train_cases": cases - held_out}
    record |= training_fields(train)
    record["preprocessed_cases"] = cache_entries(cache) - cached_before
    if train.status == "ok":
        request = {"run_dir": str(run_dir), "output_dir": str(run_dir / "inference")}
        record |= inference_fields(
            measure("evaluate", root, request, work / "logs" / f"{key}-{cases}", limit)
        )
        if record["inference_status"] != "ok":
            record["status"] = record["inference_status"]
    record["source_mb"] = source_megabytes(data)
    record["data"] = f"synthetic LiTS stand-in, first {cases} cases of {lits}"
    return record | {
        "preprocessing": code.preprocessing,
        "settings": settings,
        "time_limit_minutes": args.time_limit,
    }


def not_run(key: str, cases: int, failed: dict) -> dict:
    """The record of a size skipped because a smaller one of the same version failed."""
    reason = f"not run: {failed['cases']} cases already {failed['status']}"
    return {"code": CODES[key].name, "commit": CODES[key].commit, "cases": cases, "status": reason}


def save(record: dict, path: Path) -> None:
    """Add a record to the JSON list at `path`, replacing one of the same code version, size and mode."""

    def key(item: dict) -> tuple:
        return item["code"], item["cases"], item.get("quick", False)

    records = json.loads(path.read_text()) if path.exists() else []
    records = [old for old in records if key(old) != key(record)] + [record]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")


def summary_line(record: dict) -> str:
    if record["peak_rss_mb"] is None:
        return f"{record['code']}, {record['cases']} cases: {record['status']}"
    inference = record.get("inference_peak_rss_mb")
    return (
        f"{record['code']}, {record['cases']} cases: {record['status']}, training peak RSS "
        f"{record['peak_rss_mb']:.0f} MB (PSS {record['peak_pss_mb']:.0f}), {record['seconds']:.0f} s"
        + (f"; inference peak RSS {inference:.0f} MB" if inference is not None else "")
    )


def run_benchmark(args: argparse.Namespace, work: Path) -> None:
    """Every requested code version and size, smallest first, each version with an empty cache."""
    lits = ensure_lits(args.data or work / "lits-standin", max(args.sizes), args.quick)
    context = environment()
    for key in args.codes:
        shutil.rmtree(work / f"cache-{key}", ignore_errors=True)
        failed = None
        for cases in sorted(args.sizes):
            record = not_run(key, cases, failed) if failed else measure_size(key, cases, args, lits, work)
            record = dict.fromkeys(KEYS) | record | context | {"quick": args.quick}
            record["commit"] = record["commit"] or context["checkout"]
            save(record, args.output)
            print(summary_line(record), flush=True)
            if not failed and record["status"] != "ok":
                failed = record


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    main_parser.add_argument(
        "--data", type=Path, help=f"folder of lits/ (default {DATA}; --quick: in --work)"
    )
    main_parser.add_argument("--work", type=Path, help=f"links, caches, runs, logs (default {WORK})")
    main_parser.add_argument("--sizes", type=int, nargs="+", help=f"numbers of cases (default {SIZES})")
    main_parser.add_argument("--codes", nargs="+", choices=list(CODES), help="code versions (default both)")
    main_parser.add_argument("--old-tree", type=Path, default=Path("/tmp/old-main"), help="d8e582e worktree")
    main_parser.add_argument("--time-limit", type=float, default=120.0, help="minutes per process")
    main_parser.add_argument("--output", type=Path, help="results (default benchmarks/results/scale.json)")
    main_parser.add_argument("--quick", action="store_true", help=f"{QUICK_CASES} tiny cases, today's code")
    return main_parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD]:
        return child(*argv[1:5])
    sys.path[:0] = [p for p in (str(REPO), str(REPO / "benchmarks")) if p not in sys.path]  # today's modules
    args = parser().parse_args(argv)
    args.sizes = args.sizes or ([QUICK_CASES] if args.quick else list(SIZES))
    args.codes = args.codes or (["new"] if args.quick else list(CODES))
    args.output = args.output or RESULTS / ("scale_quick.json" if args.quick else "scale.json")
    if args.quick and args.work is None:
        with tempfile.TemporaryDirectory(prefix="scale-quick-") as work:
            run_benchmark(args, Path(work))
        return 0
    if not args.quick:
        args.data = args.data or DATA
    run_benchmark(args, args.work or WORK)
    return 0


if __name__ == "__main__":
    sys.exit(main())
