"""Benchmark networks and losses for a fixed training budget, each in its own process, under a protocol a
reviewer accepts.

Two suites. `hippocampus`: the real MSD Task04 data, one seeded split by case: 52 test cases (20%, written to
benchmarks/split.json), 20 validation cases and 188 training cases. `brain`: the generated demo kaggle_3m set
(synthetic), split as the demo (4 validation, 4 test patients). Each configuration trains for `--budget`
minutes of training time on this machine, then its best weights predict the validation and the test cases on
their source grids. The protocol (report.md, "How configurations are chosen"):
- the configuration is chosen by its mean validation DSC (the 20 validation cases, predicted as the test
  cases are), never by a test figure; anything derived from data (spacing, intensity statistics, the
  "foreground" patch size) comes from the training cases and is saved with the run;
- every mean has a 95% bootstrap interval over cases; a missed structure's HD95 is the image diagonal (mm);
- `--protocol` marks the chosen record (`"chosen": true`), pairs it with the peers trained in the same run
  (benchmarks/peers.py) on the same test cases, and writes the tables and the headline of report.md.
Records go to benchmarks/results/<suite>.json, one per configuration, seed and budget (replaced when re-run),
with a markdown table beside them (.md); records of the protocol before this one are frozen in
benchmarks/results/legacy/.

    .venv/bin/python benchmarks/run.py --budget 20 --tuned --configs res_unet3d_fullres8_affine30_pfg
    .venv/bin/python benchmarks/run.py --protocol        # chooses among the 20-minute runs
    .venv/bin/python benchmarks/run.py --protocol --results b.json   # another machine: b_protocol.json
    .venv/bin/python benchmarks/run.py --quick --cases 10 --budget 0.02 --results /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model_speed import cpu_name  # noqa: E402
from stats import bootstrap_ci, choose_by_validation, paired_difference, verdict  # noqa: E402

from dataset import split_cases  # noqa: E402
from engine import TrainConfig, evaluate, train  # noqa: E402
from synthetic import KAGGLE_3M_FOLDER, kaggle_3m_once  # noqa: E402
from volumes import find_decathlon_cases  # noqa: E402


def demo_set_folder(patients: int) -> Path:
    """Where the generated demo set of this many patients (seed 0, as make demo makes it) is kept."""
    return REPO / "data" / f"demo-{patients}" / KAGGLE_3M_FOLDER


SPLIT = REPO / "benchmarks" / "split.json"
# The generated brain set that report.md's brain benchmarks were measured on: the 24 patients that make demo
# generated before it grew to 64 (demo selection, round 8).
BRAIN_PATIENTS = 24
BRAIN_DATA = demo_set_folder(BRAIN_PATIENTS)
NNUNET = {"Anterior": 0.90, "Posterior": 0.89}  # Isensee et al. 2021, as quoted in the data README
UNET2D = {"model": "unet", "init_features": 16, "batch_size": 32}
# One loader worker keeps the 3D augmentation off the training step's critical path. Flips stay
# left-right (the default): anterior and posterior hippocampus differ by position along the other axes.
# The rows before commit 862b585 rotated a patch without the volume around it (zero corners); they keep
# that. It is also what a record written before the setting existed ran with (recorded_settings).
LEGACY_3D = {"aug_patch_context": False}
RES_UNET3D = {
    **LEGACY_3D,
    "model": "res_unet3d",
    "init_features": 16,
    "batch_size": 4,
    "patches_per_epoch": 200,
    "num_workers": 1,
}
# Three levels instead of four: patches of nnU-Net's 40x56x40 for this task (multiples of 8, not 16).
RES_UNET3D_SHALLOW = {**RES_UNET3D, "model_options": {"depth": 3}, "patch_size": [40, 56, 40]}
# nnU-Net's habit: scale and rotate a share of the patches only (it uses 0.2 for each), the rest stay exact.
LIGHT_AFFINE = {**RES_UNET3D_SHALLOW, "mirror_tta": True, "aug_affine_prob": 0.3}
LIGHT_AFFINE_BF16 = {**LIGHT_AFFINE, "amp": True}  # bfloat16 autocast: faster on CPUs with bf16 units
FULL_RESOLUTION = {**LIGHT_AFFINE, "model_options": {"depth": 3, "full_resolution": 8}}
# Patches of the foreground's size rather than the largest case's: 1.6 times the throughput. The size is the
# training cases' largest foreground box, derived by the run itself (earlier rows fixed 32 x 48 x 32, read off
# every label, test cases included).
SMALL_PATCHES = {**FULL_RESOLUTION, "patch_size": "foreground"}
# Half the patches scaled 0.75 to 1.25 in intensity (nnU-Net's brightness range) and shifted.
INTENSITY = {**SMALL_PATCHES, "aug_intensity": 0.25}
# Rotated and scaled patches filled with the volume around them, as nnU-Net does, not with zeros.
CONTEXT = {**INTENSITY, "aug_patch_context": True}
TUNED = {"channels_last": True, "lr_schedule": "poly"}  # the speed option that won, and nnU-Net's schedule


@dataclass(frozen=True)
class Suite:
    """A data set, its fixed split rule, the settings every configuration shares, and the configurations."""

    data: Path
    results: Path
    classes: tuple[str, ...]
    common: dict
    configs: dict[str, dict]


SUITES = {
    "hippocampus": Suite(
        data=REPO.parent / "shared" / "data" / "msd-hippocampus",
        results=REPO / "benchmarks" / "results" / "hippocampus.json",
        classes=("Anterior", "Posterior"),
        common={
            "dataset": "msd",
            "lr": 1e-3,
            "loss": "dice_ce",
            "vis_freq": 1000,
            "aug_angle": 10.0,
            "channels_last": False,
        },
        configs={
            "unet2d": UNET2D,
            "unet2d_poly": {**UNET2D, "lr_schedule": "poly"},
            "attention_unet2d": {**UNET2D, "model": "attention_unet"},
            "unet_pp2d_ds": {**UNET2D, "model": "unet_pp", "model_options": {"deep_supervision": True}},
            "unet3d": {
                **LEGACY_3D,
                "model": "unet3d",
                "init_features": 16,
                "batch_size": 4,
                "patches_per_epoch": 100,
            },
            "vnet": {
                **LEGACY_3D,
                "model": "vnet",
                "init_features": 8,
                "batch_size": 4,
                "patches_per_epoch": 100,
            },
            "res_unet3d": RES_UNET3D,
            "res_unet3d_tta": {**RES_UNET3D, "mirror_tta": True},
            "res_unet3d_shallow_tta": {**RES_UNET3D_SHALLOW, "mirror_tta": True},
            "res_unet3d_shallow_wide_tta": {**RES_UNET3D_SHALLOW, "init_features": 32, "mirror_tta": True},
            "res_unet3d_shallow_tta_affine30": LIGHT_AFFINE,
            "res_unet3d_shallow_tta_affine30_bf16": LIGHT_AFFINE_BF16,
            "res_unet3d_shallow_tta_affine30_bf16_ds": {
                **LIGHT_AFFINE_BF16,
                "model_options": {"depth": 3, "deep_supervision": True},
            },
            "res_unet3d_fullres8_affine30": FULL_RESOLUTION,
            "res_unet3d_fullres8_affine30_pfg": SMALL_PATCHES,
            # The earlier rows' fixed patch, read off every label: only to time the memory-mapped cache
            # against the in-RAM one of commit d8e582e like for like (cache_speed.sh); never a candidate.
            "res_unet3d_fullres8_affine30_p32_speed_only": {**FULL_RESOLUTION, "patch_size": [32, 48, 32]},
            # Wider at every level: for a CPU fast enough to reach the narrow network's plateau in 20 minutes.
            "res_unet3d_fullres8_affine30_pfg_f24": {**SMALL_PATCHES, "init_features": 24},
            # Dice per patch, as the metric is per case; the patches nearly always hold both structures.
            "res_unet3d_fullres8_affine30_pfg_sample_dice": {
                **SMALL_PATCHES,
                "loss_options": {"batch": False},
            },
            "res_unet3d_fullres8_affine30_pfg_intensity25": INTENSITY,
            # Two networks on half the budget each, probabilities averaged: one plateaus within 20 minutes.
            "res_unet3d_fullres8_affine30_pfg_intensity25_ensemble2": {**INTENSITY, "ensemble": 2},
            "res_unet3d_fullres8_affine30_pfg_intensity25_context": CONTEXT,
            "res_unet3d_fullres16_affine30_pfg": {
                **SMALL_PATCHES,
                "model_options": {"depth": 3, "full_resolution": 16},
            },
            "res_unet3d_shallow_tta_affine30_bf16_instnorm": {
                **LIGHT_AFFINE_BF16,
                "model_options": {"depth": 3, "norm": "instance"},
            },
            "res_unet3d_flip_all": {**RES_UNET3D, "aug_flip_axes": [0, 1, 2], "mirror_tta": True},
            "unet2d_dice": {**UNET2D, "loss": "dice"},
            "unet2d_dice_focal": {**UNET2D, "loss": "dice_focal"},
            "unet2d_tversky": {**UNET2D, "loss": "tversky"},
            "unet2d_workers2": {**UNET2D, "num_workers": 2},
            "unet2d_channels_last": {**UNET2D, "channels_last": True},
            "unet2d_amp_bf16": {**UNET2D, "amp": True},
            "unet2d_compile": {**UNET2D, "compile_model": True},
        },
    ),
    "brain": Suite(
        data=BRAIN_DATA,
        results=REPO / "benchmarks" / "results" / "brain.json",
        classes=("tumour",),
        common={
            "dataset": "kaggle_3m",
            "image_size": 128,
            "init_features": 16,
            "lr": 1e-3,
            "vis_freq": 1000,
            "channels_last": False,
        },
        configs={
            "unet": {"model": "unet"},
            "attention_unet": {"model": "attention_unet"},
            "unet_pp": {"model": "unet_pp"},
            "unet_pp_ds": {"model": "unet_pp", "model_options": {"deep_supervision": True}},
            "unet_dice_bce": {"model": "unet", "loss": "dice_bce"},
            "unet_dice_focal": {"model": "unet", "loss": "dice_focal"},
            "unet_tversky": {"model": "unet", "loss": "tversky"},
        },
    ),
}


def columns(suite: Suite) -> list[tuple[str, str]]:
    """The table's (record key, title) pairs; means are shown with their 95% bootstrap interval."""
    per_class = [(f"dsc_{name.lower()}", f"test DSC {name.lower()}") for name in suite.classes]
    return [
        ("config", "configuration"),
        ("seed", "seed"),
        ("budget_minutes", "budget (min)"),
        ("epochs", "epochs"),
        ("val_dsc_mean", "validation DSC [95% CI]"),
        ("dsc_mean", "test DSC [95% CI]"),
        *per_class,
        ("dsc_mean_pp", "test DSC post-processed"),
        ("hd95_mean", "HD95 (mm, misses = diagonal)"),
        ("missed", "missed structures"),
        *([("gap_to_nnunet", "gap to nnU-Net")] if suite.classes == tuple(NNUNET) else []),
        ("samples_per_second", "train samples/s"),
        ("data_wait_share", "data wait"),
        ("inference_seconds_per_volume", "inference s/volume"),
        ("peak_rss_mb", "peak RSS (MB)"),
        ("device", "device (2 threads)"),
        ("commit", "commit"),
    ]


def commit() -> str:
    """The checked-out commit, marked "+uncommitted" when code differs from it (results files may)."""
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    code = ["*.py", "*.ipynb"]
    changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *code], cwd=REPO).returncode
    return (result.stdout.strip() or "unknown") + ("+uncommitted" if changed else "")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {cpu_name()}, {torch.get_num_threads()} threads"


def split_counts(suite_name: str, data_dir: Path) -> tuple[int, int]:
    """(validation, test) case counts: the hippocampus rule (20 and 20%) or the brain demo's (4 and 4)."""
    if suite_name == "brain":
        return 4, 4
    count = sum(case.label_path is not None for case in find_decathlon_cases(data_dir))
    return min(20, max(1, count // 5)), round(0.2 * count)


def first_cases(data_dir: Path, count: int, folder: Path) -> Path:
    """A Decathlon folder linking to the first `count` labelled cases, for a quick run (nothing copied)."""
    description = json.loads((data_dir / "dataset.json").read_text())
    description["training"] = description["training"][:count]
    description["test"] = []
    for entry in description["training"]:
        for key in ("image", "label"):
            link = folder / entry[key]
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((data_dir / entry[key]).resolve())
    (folder / "dataset.json").write_text(json.dumps(description))
    return folder


def summarise(suite: Suite, rows: list[dict], history: list[dict]) -> dict:
    """Validation and test metrics per class and mean with 95% bootstrap intervals, the per-case test
    values (for paired tests), misses, and speed. Validation figures choose; test figures are reported."""
    validation = [row for row in rows if row["subset"] == "validation"]
    test = [row for row in rows if row["subset"] == "test"]

    def mean(column: str, chosen: list[dict] = test) -> float:
        return float(np.mean([row[column] for row in chosen]))

    train_seconds = sum(entry["seconds"] for entry in history)
    summary = {f"dsc_{name.lower()}": mean(f"dsc_{name}") for name in suite.classes}
    summary |= {f"dsc_{name.lower()}_pp": mean(f"dsc_{name}_pp") for name in suite.classes}
    summary |= {"dsc_mean": mean("dsc_mean"), "dsc_mean_pp": mean("dsc_mean_pp")}
    summary["dsc_mean_ci"] = list(bootstrap_ci([row["dsc_mean"] for row in test])[1:])
    summary["val_dsc_mean"] = mean("dsc_mean", validation)
    summary["val_dsc_mean_ci"] = list(bootstrap_ci([row["dsc_mean"] for row in validation])[1:])
    summary["test_dsc_mean"], summary["test_dsc_mean_ci"] = summary["dsc_mean"], summary["dsc_mean_ci"]
    summary["hd95_mean"] = float(np.mean([mean(f"hd95_{name}") for name in suite.classes]))
    summary["hd95_mean_pp"] = float(np.mean([mean(f"hd95_{name}_pp") for name in suite.classes]))
    summary["missed"] = int(sum(row[f"missed_{name}"] for row in test for name in suite.classes))
    if suite.classes == tuple(NNUNET):
        summary["gap_to_nnunet"] = float(np.mean(list(NNUNET.values()))) - summary["dsc_mean"]
    summary["best_val_dsc"] = max(entry["val_mean_dsc"] for entry in history)
    summary["samples_per_second"] = (
        sum(e["samples_per_second"] * e["seconds"] for e in history) / train_seconds
    )
    summary["data_wait_share"] = sum(entry["data_seconds"] for entry in history) / train_seconds
    summary["inference_seconds_per_volume"] = mean("seconds")
    summary["test_cases"], summary["validation_cases"] = len(test), len(validation)
    summary["rows"] = {
        subset: {
            row["case"]: {k: v for k, v in row.items() if k.startswith(("dsc", "hd95_", "missed"))}
            for row in chosen
        }
        for subset, chosen in (("validation", validation), ("test", test))
    }
    return summary


def run_one(suite_name: str, name: str, seed: int, args: argparse.Namespace, data_dir: Path) -> dict:
    """Train and test one configuration in this process; the record for the results file.

    A configuration with `"ensemble": n` trains n networks for a share of the budget each (seeds seed,
    seed + 100, ...) in `<run>-member<i>` folders and tests their ensemble into `<run>/inference`.
    """
    suite, budget, runs, quick = SUITES[suite_name], args.budget, args.runs, args.quick
    code_version = commit()  # now: the tree may change while the run trains
    validation, test = split_counts(suite_name, data_dir)
    settings = {**suite.common, **suite.configs[name], "data_dir": str(data_dir), "runs_dir": str(runs)}
    if args.tuned:
        settings |= TUNED
        name = f"{name}_tuned"
    run_name = f"{suite_name}-{name}-{budget:g}min-seed{seed}"  # one folder per row of the results
    settings |= {"run_name": run_name, "seed": seed, "split_seed": 0}
    settings["resume"] = False
    settings |= {
        "validation_cases": validation,
        "test_cases": test,
        "epochs": 1000,
        "time_budget_minutes": budget,
    }
    if quick:
        settings |= {"epochs": 1, "patches_per_epoch": 4, "batch_size": 2}
    members = settings.get("ensemble", 1)
    train_settings = {key: value for key, value in settings.items() if key != "ensemble"}
    fixed = json.loads(SPLIT.read_text())["test"] if SPLIT.exists() else None
    histories, run_dirs = [], []
    for member in range(members):
        member_settings = train_settings
        if members > 1:
            member_settings = train_settings | {
                "run_name": f"{run_name}-member{member}",
                "seed": seed + 100 * member,
                "time_budget_minutes": budget / members,
            }
        result = train(TrainConfig(**member_settings))
        if suite_name == "hippocampus" and not quick and result["split"]["test"] != fixed:
            raise RuntimeError("the run's test cases differ from benchmarks/split.json")
        histories.append(result["history"])
        run_dirs.append(Path(runs) / member_settings["run_name"])
    output = Path(runs) / run_name
    rows = evaluate(run_dirs, subsets=["validation", "test"], output_dir=output / "inference")["rows"]
    epochs = [len(history) for history in histories]
    record = {"config": name, "seed": seed, "budget_minutes": budget, "epochs": sum(epochs)}
    if members > 1:
        record["member_epochs"] = epochs
    record |= summarise(suite, rows, [entry for history in histories for entry in history])
    if settings.get("mirror_tta"):
        plain = evaluate(
            run_dirs, subsets=["validation"], output_dir=output / "inference-no-tta", mirror_tta=False
        )
        record["val_dsc_mean_no_tta"] = float(np.mean([row["dsc_mean"] for row in plain["rows"]]))
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        record["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    record |= {
        "settings": settings,
        "commit": code_version,
        "device": device_name(),
        "torch": torch.__version__,
    }
    record["date"] = datetime.date.today().isoformat()
    if args.quick or args.cases:
        record["quick"] = True  # a smoke check: never a candidate of the protocol
    return record


def recorded_settings(record: dict) -> dict:
    """The training settings a record ran with, including those added to TrainConfig since (LEGACY_3D)."""
    return {**LEGACY_3D, **record["settings"]}


def record_key(record: dict) -> tuple:
    """What a re-run replaces: the same configuration, seed and budget on the same device."""
    return record["config"], record["seed"], record["budget_minutes"], record["device"]


def _cell(record: dict, key: str) -> str:
    value = record.get(key)
    if key in ("val_dsc_mean", "dsc_mean") and value is not None:
        low, high = record[f"{key}_ci"]
        return f"{value:.3f} [{low:.3f}, {high:.3f}]"
    if key == "config":
        return f"**{value}** (chosen)" if record.get("chosen") else str(value)
    if key == "data_wait_share":
        return f"{100 * value:.1f}%"
    if key == "device":
        return value.removeprefix("CPU ").split(", 2 threads")[0]
    if key == "budget_minutes":
        return f"{value:g}"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


def markdown(suite: Suite, records: list[dict]) -> str:
    """The results as a markdown table, one row per configuration and seed."""
    keys = columns(suite)
    lines = ["| " + " | ".join(title for _, title in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(record, key) for key, _ in keys) + " |" for record in records]
    return "\n".join(lines)


PEER_MONAI = REPO / "benchmarks" / "results" / "peer_monai.json"
PROTOCOL = REPO / "benchmarks" / "results" / "protocol.json"


SELECTION_SEED = 0  # every configuration is trained with this seed; only those runs choose


def protocol_runs(records: list[dict], budget: float) -> list[dict]:
    """The project's runs at a budget that the protocol reads: no peer's, no smoke check's, one machine's
    (a ValueError names the machines when there are several: runs of two CPUs are no seeds of one)."""
    runs = [r for r in records if r["budget_minutes"] == budget and not r.get("peer") and not r.get("quick")]
    if not runs:
        budgets = sorted({r["budget_minutes"] for r in records if not r.get("peer") and not r.get("quick")})
        raise ValueError(f"no runs of {budget:g} minutes to choose from; the results hold budgets {budgets}")
    devices = sorted({r["device"] for r in runs})
    if len(devices) > 1:
        raise ValueError(
            f"the runs of {budget:g} minutes come from {len(devices)} machines ({'; '.join(devices)}): the "
            "protocol compares the runs of one machine, so keep each machine's in its own file (--results)"
        )
    return runs


def selection_runs(records: list[dict], budget: float, seed: int = SELECTION_SEED) -> list[dict]:
    """The project's runs at a budget with the selection seed: one per configuration."""
    return [r for r in protocol_runs(records, budget) if r["seed"] == seed]


def choose(records: list[dict], budget: float, seed: int = SELECTION_SEED) -> str:
    """The configuration with the best validation DSC at a budget, from one run of each (the same seed
    for all, so that a configuration run more often has no advantage); test figures are never read."""
    summaries = [
        {"config": r["config"], "validation": r["val_dsc_mean"]}
        for r in selection_runs(records, budget, seed)
    ]
    if not summaries:
        raise ValueError(f"no seed-{seed} runs of {budget:g} minutes to choose from")
    return choose_by_validation(summaries, key="validation")["config"]


def per_case(records: list[dict], subset: str = "test") -> dict[str, float]:
    """Each case's mean DSC, averaged over the records (seeds) of one configuration."""
    cases = records[0]["rows"][subset]
    return {case: float(np.mean([r["rows"][subset][case]["dsc_mean"] for r in records])) for case in cases}


def candidate_comparisons(records: list[dict], chosen: str, budget: float) -> dict[str, dict]:
    """The chosen configuration against each other candidate on the test cases, paired over the cases,
    each case averaged over the seeds that both ran (the selection seed at least): reported after the
    choice, never used for it."""
    runs: dict[str, dict[int, dict]] = {}
    for record in protocol_runs(records, budget):
        runs.setdefault(record["config"], {})[record["seed"]] = record
    candidates = {record["config"] for record in selection_runs(records, budget)}
    comparisons = {}
    for config in sorted(candidates - {chosen}):
        seeds = sorted(set(runs[chosen]) & set(runs[config]))
        paired = paired_difference(
            per_case([runs[chosen][seed] for seed in seeds]), per_case([runs[config][seed] for seed in seeds])
        )
        comparisons[config] = {
            "seeds": seeds,
            "mean": paired.mean_difference,
            "ci": [paired.low, paired.high],
            "wilcoxon_p": paired.wilcoxon_p,
            "verdict": verdict(paired, "chosen", "other"),
        }
    return comparisons


def protocol_summary(records: list[dict], peers: list[dict], budget: float) -> dict:
    """The protocol's outcome from the records and the MONAI peer's records: which configuration the
    validation cases choose, its test figures with their interval, the paired comparison with the peer
    trained on the same split, budget and machine, and the report's headline sentence. Marks the records
    of the chosen configuration `"chosen": true` (the others false)."""
    chosen = choose(records, budget)
    counted = {id(r) for r in protocol_runs(records, budget)}
    for record in records:
        record["chosen"] = record["config"] == chosen and id(record) in counted
    mine = [r for r in records if r["chosen"]]
    seeds = [r["dsc_mean"] for r in mine]
    ours = per_case(mine)
    mean, low, high = bootstrap_ci(list(ours.values()))
    candidates = sorted({r["config"] for r in protocol_runs(records, budget)})
    headline = (
        f"Chosen by mean validation DSC among {len(candidates)} configurations trained for {budget:g} CPU "
        f"minutes: `{chosen}`, test mean DSC {mean:.3f} (95% CI {low:.3f}-{high:.3f}, {len(ours)} cases"
        + (f"; per seed {', '.join(f'{v:.3f}' for v in seeds)}, averaged per case" if len(seeds) > 1 else "")
        + ")"
    )
    summary = {"budget_minutes": budget, "chosen": chosen, "candidates": candidates, "seeds": seeds}
    summary |= {"test_dsc_mean": mean, "test_dsc_mean_ci": [low, high]}
    summary["against_candidates"] = candidate_comparisons(records, chosen, budget)
    same_run = [
        peer
        for peer in peers
        if peer["budget_minutes"] == budget and not peer.get("quick") and peer["device"] == mine[0]["device"]
    ]
    if same_run:
        monai = {row["case"]: row["dsc_mean"] for row in same_run[-1]["rows"]}
        paired = paired_difference(ours, monai)
        summary["monai"] = {
            "test_dsc_mean": float(np.mean(list(monai.values()))),
            "date": same_run[-1]["date"],
        }
        summary["paired_difference"] = {
            "mean": paired.mean_difference,
            "ci": [paired.low, paired.high],
            "wilcoxon_p": paired.wilcoxon_p,
            "bootstrap_p": paired.bootstrap_p,
        }
        headline += (
            f"; the plain MONAI 3D U-Net trained on the same split, machine and budget scores "
            f"{summary['monai']['test_dsc_mean']:.3f}: paired difference {paired.mean_difference:+.3f} "
            f"(95% CI {paired.low:+.3f} to {paired.high:+.3f}), {verdict(paired, 'ours', 'MONAI')}"
        )
    summary["headline"] = headline + "."
    return summary


def protocol_file(results: Path) -> Path:
    """Where the protocol's outcome for a results file goes: results/protocol.json for the suite's own
    file (the headline report.md quotes), <name>_protocol.json beside any other (another machine's)."""
    suite_files = {suite.results for suite in SUITES.values()}
    return PROTOCOL if results in suite_files else results.with_name(f"{results.stem}_protocol.json")


def protocol(suite_name: str = "hippocampus", budget: float = 20, results: Path | None = None) -> dict:
    """Apply the protocol to a results file (default: the suite's) and write it back with the chosen
    record marked, its table, and the outcome (protocol_file)."""
    suite = SUITES[suite_name]
    results = results or suite.results
    records = json.loads(results.read_text())
    peers = json.loads(PEER_MONAI.read_text()) if PEER_MONAI.exists() else []
    summary = {"suite": suite_name, **protocol_summary(records, peers, budget)}
    results.write_text(json.dumps(records, indent=1) + "\n")
    results.with_suffix(".md").write_text(markdown(suite, records) + "\n")
    protocol_file(results).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def generated_demo_set(patients: int) -> Path:
    """The generated demo set of this many patients (made once in demo_set_folder, then reused)."""
    return kaggle_3m_once(demo_set_folder(patients).parent, patients, seed=0)


def brain_data() -> Path:
    """The brain benchmarks' generated set."""
    return generated_demo_set(BRAIN_PATIENTS)


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--suite", choices=list(SUITES), default="hippocampus")
    parser.add_argument("--data", type=Path, help="the data folder (default: the suite's)")
    parser.add_argument("--configs", nargs="+", help="configurations to run (default: all of the suite's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--budget", type=float, help="training minutes per configuration (default 5; with --protocol, 20)"
    )
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "benchmarks")
    parser.add_argument("--results", type=Path, help="results file (default: the suite's)")
    parser.add_argument("--quick", action="store_true", help="one tiny epoch per configuration")
    parser.add_argument("--cases", type=int, help="use only the first N labelled cases (a smoke check)")
    parser.add_argument("--tuned", action="store_true", help="add channels-last and the poly schedule")
    parser.add_argument("--protocol", action="store_true", help="choose by validation, compare with peers")
    parser.add_argument(
        "--chosen",
        action="store_true",
        help="print the configuration the seed-0 runs choose (for make bench)",
    )
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.protocol or args.chosen:
        budget = 20.0 if args.budget is None else args.budget
        if args.chosen:
            records = json.loads((args.results or SUITES[args.suite].results).read_text())
            print(choose(records, budget).removesuffix("_tuned"))
        else:
            print(protocol(args.suite, budget, args.results)["headline"])
        return 0
    args.budget = 5.0 if args.budget is None else args.budget
    if (args.quick or args.cases) and args.results is None and not args.one:
        parser.error(
            "--quick and --cases are smoke checks: give --results <scratch file>, so that the "
            "committed results stay as measured"
        )
    suite = SUITES[args.suite]
    data = args.data or suite.data
    results = args.results or suite.results
    configs = args.configs or list(suite.configs)
    unknown = sorted(set(configs) - set(suite.configs))
    if unknown:
        parser.error(f"unknown configurations {unknown} for suite {args.suite}: {list(suite.configs)}")
    if args.suite == "brain" and data == suite.data:
        brain_data()
    if args.suite == "hippocampus" and not (data / "dataset.json").is_file():
        print(
            f"{data} is not the MSD hippocampus folder (no dataset.json): the benchmark needs the real "
            "data in ../shared/data/msd-hippocampus, or pass --data",
            file=sys.stderr,
        )
        return 2
    if args.one:
        (name,), (seed,) = configs, args.seeds
        print("RECORD " + json.dumps(run_one(args.suite, name, seed, args, data)))
        return 0
    if args.cases:
        data = first_cases(data, args.cases, Path(tempfile.mkdtemp(prefix="hippocampus-")))
    elif args.suite == "hippocampus" and results == suite.results:
        ids = [case.case_id for case in find_decathlon_cases(data) if case.label_path is not None]
        test = split_cases(ids, *split_counts(args.suite, data), seed=0)["test"]
        SPLIT.write_text(json.dumps({"seed": 0, "test": test}, indent=1) + "\n")
    records = json.loads(results.read_text()) if results.exists() else []
    for name in configs:
        for seed in args.seeds:
            command = [sys.executable, __file__, "--one", "--suite", args.suite, "--configs", name]
            command += ["--seeds", str(seed), "--budget", str(args.budget), "--data", str(data)]
            command += ["--runs", str(args.runs), *(["--quick"] if args.quick else [])]
            command += ["--cases", str(args.cases)] if args.cases else []
            command += ["--tuned"] if args.tuned else []
            with tempfile.TemporaryFile("w+") as log:
                finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
                log.seek(0)
                output = log.read()
            if finished.returncode:
                sys.stderr.write(output[-5000:])
                raise RuntimeError(f"{name} seed {seed} failed (exit {finished.returncode}), output above")
            line = next(line for line in output.splitlines() if line.startswith("RECORD "))
            record = json.loads(line.removeprefix("RECORD "))
            records = [r for r in records if record_key(r) != record_key(record)] + [record]
            results.write_text(json.dumps(records, indent=1) + "\n")
            results.with_suffix(".md").write_text(markdown(suite, records) + "\n")
            print(f"{record['config']} seed {seed}: test mean DSC {record['dsc_mean']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
