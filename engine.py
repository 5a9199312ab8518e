"""Training and inference loops behind train.ipynb, train.py and inference.ipynb.

`train(config)` fits a 2D network on slices or a 3D network on patches, in one process or in each process of
a torchrun run, keeps the best weights by validation mean per-volume DSC, and resumes an interrupted run to
exactly the result it would have had; `evaluate(run_dir)` rebuilds the network from the run's `args.json`
and writes, on each case's source grid, the per-case metric table, its bar plot, overlays, GIFs and, for
scans, the predicted label maps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import distributed
from config import TrainConfig
from dataset import (
    Case,
    DatasetInfo,
    EpochSampler,
    PatchDataset,
    SliceDataset,
    center_pad_or_crop,
    context_indices,
    find_sources,
    has_label,
    make_plan,
    prepare_cases,
    probabilities_to_labels,
    read_source,
    slice_sampling_weights,
    split_cases,
    to_source_grid,
)
from detection import circles, find_candidates
from froc import Candidate, FrocResult, bootstrap_froc, froc, plot_froc, sensitivity_table, write_candidates
from logger import Logger
from loss import DeepSupervisionLoss, build_loss
from models import build_model, check_input_size
from runs import (
    ARGS,
    CHECKPOINT,
    RESULT,
    WEIGHTS,
    RunLock,
    clear_run,
    read_checkpoint,
    read_json,
    remove_leftovers,
    save_state,
)
from sliding_window import predict_padded, sliding_window_inference
from transform import build_transform
from utils import (
    POSTPROCESSING,
    case_metrics,
    dice_per_class,
    overlay,
    plot_dsc,
    postprocess,
    radiological_view,
    save_case_figures,
    seed_everything,
    select_device,
    to_view,
    write_json_atomic,
    write_metrics_csv,
)
from volumes import Geometry, write_volume

__all__ = ["TrainConfig", "evaluate", "load_run", "train"]

# Settings that may change between an interrupted run and its resumption without changing its result;
# except epochs and time_budget_minutes, which continue a finished run, and under the poly schedule also
# reshape the learning-rate curve of an unfinished one.
RESUMABLE = {
    "resume",
    "num_workers",
    "preprocess_workers",
    "device",
    "epochs",
    "vis_freq",
    "time_budget_minutes",
    "runs_dir",
    "run_name",
    "data_dir",
    "cache_dir",
}
# The settings that decide how a data set is prepared: ensemble members must agree on them.
PREPROCESSING = ("dataset", "plan")
TIMING = ("seconds", "data_seconds", "samples_per_second", "validation_seconds")  # wall-clock history fields


def load_cases(
    config: TrainConfig, data_dir: str | None = None, require_labels: bool = True, plan: dict | None = None
) -> tuple[list[Case], DatasetInfo, dict]:
    """A data set's preprocessed cases, its description (classes, channels) and its plan.

    Without `plan`, the plan is made from every labelled case (for tools and tests); training and
    evaluation pass the one decided from the run's training cases.
    """
    sources, info = find_sources(config.dataset, data_dir or config.data_dir, require_labels)
    if plan is None:
        plan = _plan(config, [source for source in sources if has_label(source)], info)
    return prepare_cases(sources, plan, info, config.cache_dir, config.preprocess_workers), info, plan


def _plan(config: TrainConfig, train_sources: Sequence, info: DatasetInfo) -> dict:
    return make_plan(
        config.dataset,
        train_sources,
        info,
        image_size=config.image_size,
        spacing=config.spacing,
        hu_window=config.hu_window,
        lung_labels=config.lung_labels,
        workers=config.preprocess_workers,
    )


def make_model(config: TrainConfig, info: DatasetInfo) -> torch.nn.Module:
    """The configured network; one output channel for binary tasks, one per class otherwise."""
    out_channels = 1 if len(info.class_names) == 1 else max(info.class_names) + 1
    return build_model(
        config.model,
        in_channels=info.in_channels * (2 * config.context_slices + 1),
        out_channels=out_channels,
        init_features=config.init_features,
        **config.model_options,
    )


def check_network_and_loss(config: TrainConfig) -> None:
    """Build the network (one channel in and out) and the loss once, so that a misspelt name or option,
    or a patch_size the network cannot take, is reported before the data are read and preprocessed
    (hours on LUNA16), not after."""
    model = build_model(config.model, 1, 1, init_features=config.init_features, **config.model_options)
    if model.spatial_dims == 3 and isinstance(config.patch_size, list | tuple):
        check_input_size(model, config.patch_size)
    build_loss(config.loss, **config.loss_options)


def _round_up(size: int, multiple: int) -> int:
    return int(math.ceil(size / multiple) * multiple)


def foreground_extent(case: Case) -> list[int]:
    """The size (D, H, W) of the bounding box of a case's foreground (0 where it has none)."""
    extent = []
    for axis in range(3):
        where = np.flatnonzero(case.slice_areas(axis))
        extent.append(int(where[-1] - where[0] + 1) if len(where) else 0)
    return extent


def data_shapes(cases: Sequence[Case], config: TrainConfig, divisor: int) -> dict:
    """Sizes decided from the training cases (nnU-Net's habit), saved in args.json for inference.

    slice_size: the largest in-plane size, rounded up to the network's divisor, so slices of every
    volume batch together. patch_size: as set; "foreground": the largest bounding box of the training
    cases' foreground, rounded up to the divisor (patches the size of the structures, never derived
    from validation or test cases); None: the largest volume rounded up, at most 96 per axis.
    """
    largest = np.max([case.shape for case in cases], 0)
    in_plane = [int(size) for axis, size in enumerate(largest) if axis != config.slice_axis]
    if config.patch_size == "foreground":
        extent = np.max([foreground_extent(case) for case in cases], 0)
        patch = [_round_up(max(int(size), 1), divisor) for size in extent]
    else:
        patch = config.patch_size or [min(_round_up(int(size), divisor), 96) for size in largest]
    return {
        "slice_size": [_round_up(size, divisor) for size in in_plane],
        "patch_size": [int(p) for p in patch],
    }


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Probabilities (K, *spatial) from logits: sigmoid for one channel, softmax over channels otherwise."""
    return torch.sigmoid(logits.float()) if logits.shape[0] == 1 else torch.softmax(logits.float(), 0)


def mean_probabilities(logits: Sequence[torch.Tensor]) -> np.ndarray:
    """The networks' mean probability per class (float32 numpy), for an ensemble or a single network.

    Probabilities rather than logits are averaged, as nnU-Net does: one network's overconfident logits
    cannot outvote the others.
    """
    return (sum(class_probabilities(x) for x in logits) / len(logits)).numpy()


def amp_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """The autocast precision of a setting on a device, None for full precision.

    "auto": bfloat16 on GPUs that support it (same range as float32, so no loss scaling), float16 on
    older GPUs, full precision on the CPU. True: the same, but bfloat16 on the CPU too.
    """
    if amp is False:
        return None
    if amp in ("bfloat16", "float16"):
        return getattr(torch, amp)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if amp is True else None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def slice_batch(slices: torch.Tensor, start: int, stop: int, context_slices: int) -> torch.Tensor:
    """Slices start..stop of a (D, C, H, W) stack as a batch, each with its neighbours as channels in
    the order of `dataset.slice_with_context`: (n, (2k + 1) · C, H, W)."""
    if not context_slices:
        return slices[start:stop]
    stop = min(stop, len(slices))
    rows = context_indices(np.arange(start, stop), len(slices), context_slices)
    return torch.cat([slices[torch.from_numpy(row)] for row in rows], dim=1)


@torch.inference_mode()
def predict_case(
    model: torch.nn.Module,
    image: np.ndarray,
    device: torch.device,
    shapes: dict,
    config: TrainConfig,
) -> torch.Tensor:
    """Logits (K, D, H, W), float32 on the CPU, for a (C, D, H, W) volume.

    2D networks: slice by slice along config.slice_axis, each slice padded to the network's divisor and
    given its config.context_slices neighbours on each side as channels, as in training.
    3D networks: Gaussian-weighted sliding windows of shapes["patch_size"]. With config.mirror_tta
    the logits are averaged over every flip of the axes training mirrors (config.aug_flip_axes).
    """
    model.eval()
    volume = torch.from_numpy(np.array(image, dtype=np.float32))  # a copy: cached cases are read-only
    mirror = config.aug_flip_axes if config.mirror_tta else False
    with _autocast(device, amp_dtype(config.amp, device)):
        if model.spatial_dims == 3:
            return sliding_window_inference(
                model,
                volume,
                shapes["patch_size"],
                overlap=config.overlap,
                batch_size=config.batch_size,
                mirror=mirror,
                device=device,
            )
        slices = volume.movedim(config.slice_axis + 1, 0)
        outputs = [
            predict_padded(
                model,
                slice_batch(slices, start, start + config.batch_size, config.context_slices).to(
                    device, non_blocking=True
                ),
                mirror,
            )
            for start in range(0, slices.shape[0], config.batch_size)
        ]
    return torch.cat(outputs).movedim(0, config.slice_axis + 1)


def _overlay_candidates(case: Case, predicted: np.ndarray, info: DatasetInfo, count: int) -> list:
    """(foreground area, overlay) of a case's `count` axial slices with the most foreground."""
    label = np.asarray(case.label)
    areas = (label > 0).sum(axis=(1, 2))
    image = case.image
    return [
        (int(areas[d]), overlay(np.asarray(image[info.display_channel, d]), predicted[d], label[d]))
        for d in np.argsort(-areas, kind="stable")[:count]
    ]


def _mean_dice(predicted: np.ndarray, label: np.ndarray, classes: list[int]) -> float:
    return float(np.mean(list(dice_per_class(predicted, label, classes).values())))


def scan_candidates(case: Case, probabilities: np.ndarray) -> list[Candidate]:
    """Nodule candidates (world mm) of a detection case from its probabilities on the case's grid."""
    return find_candidates(probabilities[0], Geometry(**case.meta["grid_geometry"]), case.case_id)


def detection_score(
    cases: Sequence[Case], candidates: list[Candidate], bootstrap: bool = False
) -> FrocResult:
    """LUNA16's FROC over the cases (NoduleScan sources), with a bootstrap interval when asked."""
    nodules = [f for case in cases for f in case.origin.nodules]
    excluded = [f for case in cases for f in case.origin.excluded]
    series = [case.case_id for case in cases]
    if bootstrap:
        return bootstrap_froc(candidates, nodules, excluded, series, iterations=1000, seed=0)
    return froc(candidates, nodules, excluded, series)


def validate(
    model: torch.nn.Module,
    cases: Sequence[Case],
    criterion: torch.nn.Module,
    info: DatasetInfo,
    context: distributed.Context,
    shapes: dict,
    config: TrainConfig,
    overlays: int = 0,
) -> dict:
    """Mean validation loss, mean per-volume DSC (over cases and classes) with every post-processing, the
    CPM for detection, and the overlays of the `overlays` slices with the most foreground (TensorBoard).

    On the cases' own (preprocessed) grid, one case in memory at a time, without test-time mirroring:
    validation only picks the best epoch and the post-processing. In a multi-process run each rank
    predicts its share of the cases and every rank gets the same gathered result.
    """
    config = dataclasses.replace(config, mirror_tta=False)
    classes = list(info.class_names)
    mine = []
    for number in range(context.rank, len(cases), context.world_size):
        case = cases[number]
        logits = predict_case(model, case.image, context.device, shapes, config)
        label = np.asarray(case.label)
        target = torch.from_numpy(label.astype(np.int64))[None, None]
        probabilities = class_probabilities(logits).numpy()
        predicted = probabilities_to_labels(probabilities)
        mine.append(
            {
                "number": number,
                "loss": float(criterion(logits[None], target)),
                "dsc": {
                    m: _mean_dice(postprocess(predicted, m, classes), label, classes) for m in POSTPROCESSING
                },
                "overlays": _overlay_candidates(case, predicted, info, overlays) if overlays else [],
                "candidates": scan_candidates(case, probabilities) if info.task == "detection" else [],
            }
        )
    results = sorted(
        (r for part in distributed.gather(context, mine) for r in part), key=lambda r: r["number"]
    )
    best_slices = sorted((c for r in results for c in r["overlays"]), key=lambda item: -item[0])[:overlays]
    summary = {
        "loss": float(np.mean([r["loss"] for r in results])),
        "dsc": float(np.mean([r["dsc"]["none"] for r in results])),
        "dsc_postprocessed": {m: float(np.mean([r["dsc"][m] for r in results])) for m in POSTPROCESSING},
        "overlays": _same_size([strip for _, strip in best_slices]),
    }
    if info.task == "detection":
        summary["cpm"] = detection_score(cases, [c for r in results for c in r["candidates"]]).cpm
    summary["score"] = summary.get("cpm", summary["dsc"])
    return summary


def _same_size(strips: list[np.ndarray]) -> list[np.ndarray]:
    """Overlays padded to one size so that TensorBoard shows them as one batch."""
    if not strips:
        return []
    size = np.max([strip.shape[:2] for strip in strips], axis=0)
    return [center_pad_or_crop(np.moveaxis(strip, -1, 0), size).transpose(1, 2, 0) for strip in strips]


def augmentation_spacing(plan: dict, spatial_dims: int, slice_axis: int) -> list[float] | None:
    """The voxel size of the training samples' axes, so that augmentation rotates in millimetres."""
    if "spacing" not in plan:
        return None
    spacing = plan["spacing"]
    return spacing if spatial_dims == 3 else [s for axis, s in enumerate(spacing) if axis != slice_axis]


def training_data(
    cases: Sequence[Case],
    config: TrainConfig,
    spatial_dims: int,
    shapes: dict,
    plan: dict | None = None,
    context: distributed.Context | None = None,
) -> tuple[DataLoader, EpochSampler]:
    """Slices for 2D networks (weighted by foreground area), foreground-biased patches for 3D ones.

    An epoch is max(1, samples // batch_size) global batches: samples is the number of training slices
    (as in the reference) or patches_per_epoch. The loader yields this process's share of each batch.
    """
    context = context or distributed.Context()
    transform = build_transform(
        config.aug_scale,
        config.aug_angle,
        config.aug_flip,
        config.aug_flip_axes,
        config.aug_intensity,
        config.aug_affine_prob,
        augmentation_spacing(plan or {}, spatial_dims, config.slice_axis),
        context_copies=2 * config.context_slices + 1 if spatial_dims == 2 else 1,
        patch_size=shapes["patch_size"] if spatial_dims == 3 and config.aug_patch_context else None,
    )
    if spatial_dims == 2:
        weights = slice_sampling_weights(cases, config.slice_axis, config.edge_slices)
        dataset = SliceDataset(
            cases,
            weights,
            transform,
            config.slice_axis,
            shapes["slice_size"],
            config.seed,
            config.context_slices,
        )
    else:
        dataset = PatchDataset(
            cases,
            shapes["patch_size"],
            config.patches_per_epoch,
            config.foreground_ratio,
            transform,
            config.seed,
            config.foreground_jitter,
        )
    steps = max(1, len(dataset) // config.batch_size)
    sampler = EpochSampler(steps, config.batch_size, context.rank, context.world_size)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size // context.world_size,
        sampler=sampler,
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        pin_memory=context.device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed),  # its seed draw leaves the global RNG alone
    )
    return loader, sampler


def set_learning_rate(optimizer: torch.optim.Optimizer, config: TrainConfig, progress: float) -> None:
    """The scheduled learning rate for a share `progress` of the training (epochs or time budget) done."""
    if config.lr_schedule not in ("constant", "poly"):
        raise ValueError(f"lr_schedule must be 'constant' or 'poly', got {config.lr_schedule!r}")
    factor = (1 - min(progress, 1.0)) ** 0.9 if config.lr_schedule == "poly" else 1.0
    for group in optimizer.param_groups:
        group["lr"] = config.lr * factor


def result_settings(config: TrainConfig) -> dict:
    """The settings that decide a run's result (everything but RESUMABLE), as saved (tuples as lists)."""
    return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(config))).items() if k not in RESUMABLE}


def _random_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _restore_random_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _resume_state(config: TrainConfig, case_ids: list[str], context: distributed.Context) -> dict | None:
    """The run's checkpoint when it may be resumed (None: start over); errors when it may not.

    The checkpoint itself records what the run was trained with, so a resumption with other settings,
    another case list or another number of processes is refused with what differs.
    """
    path = config.run_dir / CHECKPOINT
    if not config.resume or not path.exists():
        return None
    state = read_checkpoint(path)
    if "settings" not in state:
        raise ValueError(
            f"{path} was written by an older version of this program: set resume=False to start over"
        )
    changed = {
        k: (state["settings"].get(k), v)
        for k, v in result_settings(config).items()
        if state["settings"].get(k) != v
    }
    if changed:
        raise ValueError(
            f"Run {config.run_dir} exists with other settings {changed} (saved, now): choose another "
            "run_name, or set resume=False to start it over"
        )
    added, lost = (
        sorted(set(case_ids) - set(state["case_ids"])),
        sorted(set(state["case_ids"]) - set(case_ids)),
    )
    if added or lost:
        raise ValueError(
            f"{config.data_dir} no longer holds the cases run {config.run_dir} was trained on "
            f"(new: {added[:10]}, missing: {lost[:10]}): a changed case list would move cases between "
            "training, validation and test; restore the data folder or start a new run"
        )
    if state["world_size"] != context.world_size:
        raise ValueError(
            f"Run {config.run_dir} was trained with {state['world_size']} process(es): resume it with as "
            f"many (now {context.world_size}), or set resume=False to start over"
        )
    return state


LIMIT_HINTS = {"epochs": "epochs", "time_budget_minutes": "time_budget_minutes (or set it to None)"}


def _limits_reached(state: dict, config: TrainConfig) -> list[str]:
    """The settings whose limit a run has reached: `epochs`, `time_budget_minutes`, both or neither."""
    trained = sum(entry["seconds"] for entry in state["history"])
    budget = config.time_budget_minutes
    return (["epochs"] if len(state["history"]) >= config.epochs else []) + (
        ["time_budget_minutes"] if budget is not None and trained >= 60 * budget else []
    )


def choose_postprocessing(history_entry: dict) -> str:
    """The post-processing with the best validation DSC at the best epoch; ties keep the simpler one."""
    scores = history_entry["val_dsc_postprocessed"]
    return max(
        POSTPROCESSING, key=lambda method: (round(scores[method], 9), -list(POSTPROCESSING).index(method))
    )


def _summary(config: TrainConfig, state: dict) -> dict:
    history = state["history"]
    best = history[state["best_epoch"] - 1]
    return {
        "run_dir": str(config.run_dir),
        "best_val_mean_dsc": best["val_mean_dsc"],
        "best_val_score": state["best"],  # the mean DSC, or the CPM for detection: what chose the epoch
        "score": "CPM" if "val_cpm" in best else "mean DSC",
        "best_epoch": state["best_epoch"],
        "postprocessing": choose_postprocessing(history[state["best_epoch"] - 1]),
        "history": history,
        "split": state["split"],
        "finished": state["finished"],
    }


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of a network's parameters and buffers: equal on every rank of a healthy data-parallel run."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def train(config: TrainConfig) -> dict:
    """Train, validate every epoch, keep the best weights; returns the run's summary and history.

    In a torchrun run every process calls this with the same settings; rank 0 writes the files.
    """
    config.check()
    check_network_and_loss(config)
    context = distributed.setup(config.device)
    try:
        if context.is_main:
            with RunLock(config.run_dir):
                return _train(config, context)
        return _train(config, context)
    finally:
        distributed.teardown(context)


def _train(config: TrainConfig, context: distributed.Context) -> dict:
    run_dir = config.run_dir

    def say(message: str) -> None:
        if context.is_main:
            print(message, flush=True)

    sources, info = find_sources(config.dataset, config.data_dir)
    by_id = {source.case_id: source for source in sources}
    case_ids = sorted(by_id)
    state = _resume_state(config, case_ids, context)
    distributed.barrier(context)
    if state is not None and state["finished"] and (limits := _limits_reached(state, config)):
        say(
            f"Run {run_dir} is finished ({len(state['history'])} epochs, best validation score "
            f"{state['best']:.4f} at epoch {state['best_epoch']}); its results are in {run_dir}. Nothing was "
            f"changed: raise {' and '.join(LIMIT_HINTS[limit] for limit in limits)} to continue it, or set "
            "resume=False to start over."
        )
        summary = _summary(config, state)
        if context.is_main and not (run_dir / RESULT).exists():  # killed just before writing it
            write_json_atomic({k: v for k, v in summary.items() if k != "history"}, run_dir / RESULT)
        return summary
    if context.is_main:
        if state is None:
            clear_run(run_dir)
        remove_leftovers(run_dir)
    split_seed = config.seed if config.split_seed is None else config.split_seed
    split = (
        state["split"]
        if state
        else split_cases(case_ids, config.validation_cases, config.test_cases, split_seed, config.data_dir)
    )
    train_sources = [by_id[i] for i in split["train"]]
    if state:
        plan = state["plan"]
    else:
        plan = distributed.from_main(context, lambda: _plan(config, train_sources, info))
    if context.is_main:
        cases = prepare_cases(sources, plan, info, config.cache_dir, config.preprocess_workers)
    distributed.wait_for_main(context)
    if not context.is_main:
        cases = prepare_cases(sources, plan, info, config.cache_dir, 1)  # rank 0 has filled the cache
    by_case = {case.case_id: case for case in cases}
    train_cases = [by_case[i] for i in split["train"]]
    val_cases = [by_case[i] for i in split["validation"]]
    if info.task == "detection" and not any(case.origin.nodules for case in val_cases):
        raise ValueError(
            f"The validation scans of {config.data_dir} hold no annotated nodule, so no epoch can be chosen "
            "by CPM: raise validation_cases or choose another split_seed"
        )
    if not any(case.classes for case in train_cases):
        raise ValueError(
            f"No training case of {config.data_dir} has any foreground voxel of {info.class_names}: every "
            "label map is empty, so there is nothing to learn (and DSC would be 1.0 for an empty prediction)"
        )

    seed_everything(config.seed)
    device = context.device
    model = make_model(config, info)
    shapes = state["shapes"] if state else data_shapes(train_cases, config, model.size_divisor)
    check_input_size(model, shapes["patch_size"] if model.spatial_dims == 3 else shapes["slice_size"])
    if context.distributed and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if config.channels_last:
        model = model.to(
            memory_format=torch.channels_last if model.spatial_dims == 2 else torch.channels_last_3d
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    precision = amp_dtype(config.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16 and device.type == "cuda")
    history: list[dict] = []
    best, best_epoch, best_model, start_epoch = -1.0, 0, None, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when the run was saved without loss scaling (e.g. on the CPU)
            scaler.load_state_dict(state["scaler"])
        _restore_random_state(state["random"])
        best, best_epoch, best_model = state["best"], state["best_epoch"], state["best_model"]
        start_epoch, history = len(state["history"]), state["history"]
        say(f"Resuming {run_dir} after epoch {start_epoch}")
    wrapped = (
        DistributedDataParallel(
            model, find_unused_parameters=not getattr(model, "trains_every_parameter", True)
        )
        if context.distributed
        else model
    )
    step_model = torch.compile(wrapped) if config.compile_model else wrapped
    base_loss = build_loss(config.loss, **config.loss_options)
    criterion = DeepSupervisionLoss(base_loss, getattr(model, "supervision_weights", None))

    derived = {"class_names": info.class_names, "in_channels": info.in_channels}
    derived |= {"display_channel": info.display_channel, "split": split, "case_ids": case_ids}
    derived |= {"plan": plan, "shapes": shapes, "world_size": context.world_size, "task": info.task}
    if context.is_main:
        write_json_atomic({**dataclasses.asdict(config), **derived}, run_dir / ARGS)
        if state is not None:
            save_state(run_dir, state, history)  # the best weights and history of the checkpoint, again
    loader, sampler = training_data(train_cases, config, model.spatial_dims, shapes, plan, context)
    layout = torch.channels_last if model.spatial_dims == 2 else torch.channels_last_3d
    logger = (
        Logger(run_dir / "tensorboard", purge_step=start_epoch * len(loader)) if context.is_main else None
    )
    trained_seconds = sum(entry["seconds"] for entry in history)
    budget_seconds = math.inf if config.time_budget_minutes is None else 60 * config.time_budget_minutes
    finished = False
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        model.train()
        losses, data_seconds, samples = [], 0.0, 0
        waited = time.perf_counter()
        clock = trained_seconds  # training seconds so far, by rank 0's clock on every rank
        progress_bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not context.is_main
        )
        for images, labels in progress_bar:
            data_seconds += time.perf_counter() - waited
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=layout)
            progress = max(epoch / config.epochs, clock / budget_seconds)
            set_learning_rate(optimizer, config, progress)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, precision):
                loss = criterion(step_model(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.detach())
            samples += len(images) * context.world_size
            waited = time.perf_counter()
            clock = trained_seconds + waited - started
            if context.distributed and budget_seconds < math.inf:
                clock = distributed.broadcast(context, clock)  # the same learning rate and last step on all
            if clock >= budget_seconds:
                break
        distributed.sync_buffers(context, model)
        step_losses = torch.stack(losses).float().cpu().tolist()
        if context.distributed:  # the mean over ranks: what one process with the whole batch would see
            step_losses = np.mean(distributed.gather(context, step_losses), axis=0).tolist()
        if not all(math.isfinite(value) for value in step_losses):
            raise FloatingPointError(
                f"Training loss became {next(v for v in step_losses if not math.isfinite(v))} in epoch "
                f"{epoch + 1} of {run_dir}: check the images for NaN or extreme values, or lower lr "
                f"({config.lr}); the checkpoint of the last good epoch is kept"
            )
        train_seconds = distributed.broadcast(context, time.perf_counter() - started)  # one clock: rank 0's
        show = (epoch + 1) % config.vis_freq == 0 or epoch + 1 == config.epochs
        result = validate(
            model, val_cases, base_loss, info, context, shapes, config, overlays=8 if show else 0
        )
        trained_seconds += train_seconds
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(step_losses)),
                "val_loss": result["loss"],
                "val_mean_dsc": result["dsc"],
                **({"val_cpm": result["cpm"]} if "cpm" in result else {}),
                "val_dsc_postprocessed": result["dsc_postprocessed"],
                "seconds": train_seconds,
                "data_seconds": data_seconds,
                "samples_per_second": samples / train_seconds,
                "validation_seconds": time.perf_counter() - started - train_seconds,
            }
        )
        if result["score"] > best:  # validation DSC, or CPM for detection
            best, best_epoch = result["score"], epoch + 1
            best_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        finished = epoch + 1 == config.epochs or trained_seconds >= budget_seconds
        if context.is_main:
            first_step = epoch * len(loader)
            for offset, value in enumerate(step_losses):
                logger.scalar("train/loss", value, first_step + offset)
            last_step = first_step + len(step_losses) - 1  # validation on the step axis: a resume purges it
            logger.scalar("val/loss", result["loss"], last_step)
            logger.scalar("val/mean_dsc", result["dsc"], last_step)
            if "cpm" in result:
                logger.scalar("val/cpm", result["cpm"], last_step)
            logger.images("val/overlays", result["overlays"], last_step)
            logger.flush()  # on disk before the checkpoint: a resume starts after this epoch
            checkpoint = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "random": _random_state(),
                "best": best,
                "best_epoch": best_epoch,
                "best_model": best_model,
                "history": history,
                "finished": finished,
                "settings": result_settings(config),
                "case_ids": case_ids,
                "split": split,
                "plan": plan,
                "shapes": shapes,
                "world_size": context.world_size,
            }
            save_state(run_dir, checkpoint, history)
        distributed.barrier(context)
        say(
            f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}, val loss {result['loss']:.4f}, "
            f"val mean DSC {result['dsc']:.4f} ({train_seconds:.0f} s training)"
        )
        if trained_seconds >= budget_seconds:
            say(f"Training time budget of {config.time_budget_minutes} minutes reached")
            break
    if logger is not None:
        logger.close()
    state = {"best": best, "best_epoch": best_epoch, "history": history, "split": split, "finished": finished}
    summary = _summary(config, state)
    summary["rank_weights"] = distributed.gather(context, weights_fingerprint(model))
    if len(set(summary["rank_weights"])) > 1:
        raise RuntimeError(
            f"The processes of run {run_dir} ended with different weights: {summary['rank_weights']}"
        )
    if context.is_main:
        write_json_atomic({k: v for k, v in summary.items() if k != "history"}, run_dir / RESULT)
    say(
        f"Best validation {summary['score']}: {best:.4f} (epoch {best_epoch}); "
        f"post-processing chosen on validation: {summary['postprocessing']}"
    )
    return summary


def load_run(run_dir: str | Path, device: torch.device) -> tuple[TrainConfig, dict, torch.nn.Module]:
    """A run's settings, saved arguments and best network, rebuilt from `args.json`.

    The best weights come from the checkpoint when there is one (it is the run's record: its history
    contains their epoch), else from weights.pt. Missing, truncated or foreign files are errors naming
    the file.
    """
    run_dir = Path(run_dir)
    args = read_json(run_dir / ARGS, "the settings file written by train()")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in args.items() if k in names})
    info = DatasetInfo(
        class_names={int(k): v for k, v in args["class_names"].items()},
        in_channels=args["in_channels"],
        display_channel=args["display_channel"],
        task=args["task"],
    )
    result = (
        read_json(run_dir / RESULT, "the summary of a finished run") if (run_dir / RESULT).exists() else {}
    )
    checkpoint = run_dir / CHECKPOINT
    source = checkpoint if checkpoint.exists() else run_dir / WEIGHTS
    stored = read_checkpoint(source)
    weights = stored["best_model"] if source == checkpoint else stored
    if weights is None:
        raise FileNotFoundError(f"{source} has no validated epoch yet: train the run for at least one epoch")
    model = make_model(config, info).to(device)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{source} does not hold weights of the network {args['model']!r} with the options in "
            f"{run_dir / ARGS} (another network, or other options?): {str(error).splitlines()[0]}"
        ) from error
    model.eval()
    postprocessing = (  # the choice of the epoch whose weights these are, also for an unfinished run
        choose_postprocessing(stored["history"][stored["best_epoch"] - 1])
        if source == checkpoint
        else result.get("postprocessing", "none")
    )
    return config, {**args, "info": info, "postprocessing": postprocessing}, model


def write_prediction(labels: np.ndarray, geometry: Geometry, folder: Path, name: str) -> Path:
    """A predicted label map on its source scan's grid, with the scan's geometry."""
    return write_volume(labels.astype(np.uint8), geometry, folder / name)


def output_folder(run_dirs: Sequence[Path], data_dir: str | None, mirror_tta: bool | None = None) -> Path:
    """Where evaluate writes: inference[-ensemble<n>-<members>][-mirrored|-unmirrored][-<data>] in the
    first run's folder, so that no two evaluations share a folder.

    An ensemble's name holds a short hash of its members' paths; a mirror_tta that overrides the run's
    own setting is named; a data folder is named with a short hash of its full path (the demo's
    kaggle_3m and a real one differ).
    """
    base = "inference"
    if len(run_dirs) > 1:
        members = "\n".join(str(Path(folder).resolve()) for folder in run_dirs)
        base += f"-ensemble{len(run_dirs)}-{hashlib.sha1(members.encode()).hexdigest()[:8]}"
    if mirror_tta is not None:
        base += "-mirrored" if mirror_tta else "-unmirrored"
    if data_dir is None:
        return run_dirs[0] / base
    resolved = str(Path(data_dir).resolve())
    return run_dirs[0] / f"{base}-{Path(resolved).name}-{hashlib.sha1(resolved.encode()).hexdigest()[:8]}"


def _check_ensemble(run_dirs: Sequence[Path], runs: list, own_split: bool) -> None:
    shared = [*PREPROCESSING, "class_names", "in_channels"] + (["split"] if own_split else [])
    for folder, (_, other, _) in zip(run_dirs[1:], runs[1:], strict=True):
        differ = [key for key in shared if other.get(key) != runs[0][1].get(key)]
        if differ:
            raise ValueError(f"{folder} differs from {run_dirs[0]} in {differ}: an ensemble must share them")


def _figures(case: Case, source, shown: np.ndarray, truth: np.ndarray | None, folder: Path) -> None:
    """Overlays and a GIF on the source grid in radiological orientation, named by source slice."""
    view = radiological_view(source.geometry.direction if source.geometry else None)
    depth = shown.shape[view[0][0]]
    present = source.present if source.geometry is None else np.ones(depth, bool)
    names = np.array(source.slice_names if source.geometry is None else range(depth), str)
    if view[1][0]:
        present, names = present[::-1], names[::-1]
    image, pred = to_view(source.image, view)[present], to_view(shown, view)[present]
    truth = None if truth is None else to_view(truth, view)[present]
    save_case_figures(case.case_id, image, pred, truth, out_dir=folder, slice_names=list(names[present]))


OUTPUTS = ("dsc.csv", "dsc*.png", "scans.csv", "candidates.csv", "sensitivities-*.csv", "froc-*.png")


def clear_outputs(output: Path) -> None:
    """Remove what an earlier evaluate wrote to `output` (its tables, plots, label maps and figures), so
    that a smaller evaluation leaves no stale case behind; nothing else in the folder is touched."""
    for pattern in OUTPUTS:
        for path in output.glob(pattern):
            path.unlink()
    for folder in ("labels", "predictions"):
        shutil.rmtree(output / folder, ignore_errors=True)


def plot_subsets(rows: list[dict], output: Path, name: str) -> None:
    """Per-case DSC bar plots, one per subset, so that no mean mixes validation and test cases: dsc.png
    shows the test cases (or the only subset predicted), dsc-<subset>.png each other subset."""
    subsets = list(dict.fromkeys(row["subset"] for row in rows))
    primary = "test" if "test" in subsets else subsets[0]
    for subset in subsets:
        chosen = [row for row in rows if row["subset"] == subset]
        path = output / ("dsc.png" if subset == primary else f"dsc-{subset}.png")
        plot_dsc(chosen, path, title=f"{name}\nper-case DSC, {subset} ({len(chosen)} cases)")


def evaluate(
    run_dir: str | Path | Sequence[str | Path],
    data_dir: str | None = None,
    subsets: Sequence[str] = ("validation", "test"),
    output_dir: str | Path | None = None,
    device: str = "auto",
    mirror_tta: bool | None = None,
) -> dict:
    """Predict cases with a run's best weights; write dsc.csv, dsc.png, overlays and GIFs on each case's
    source grid (the original slices or scan, every slice of it).

    Without data_dir: the run's own cases of `subsets` ("validation", "test", "train"). With data_dir:
    every case in that folder, labelled or not (LUNA16 CTs without a lung mask too; nodule detection
    needs the masks, which crop the scans), preprocessed as the run's plan says; unlabelled cases get
    prediction overlays and GIFs but no metrics. Probabilities are mapped back onto the source grid before
    they become labels, so metrics compare with the original-resolution reference, with HD95 in mm for
    scans and in pixels of the original slices for kaggle_3m. The post-processing the run chose on its
    validation cases is applied (the `_pp` columns); scans also get their post-processed label map
    written with the scan's geometry (.mhd for LUNA16, .nii.gz for NIfTI), so it overlays in a viewer.
    mirror_tta: test-time mirroring on or off (None: as the run was trained). A list of run folders
    predicts with their ensemble (the mean of their probabilities; the first run's post-processing); the
    runs must share the data set, its plan, its classes and, without data_dir, the split.
    Returns the output folder, the rows and the post-processing used.
    """
    run_dirs = [Path(run_dir)] if isinstance(run_dir, (str, Path)) else [Path(d) for d in run_dir]
    if not run_dirs:
        raise ValueError("evaluate needs at least one run folder")
    torch_device = select_device(device)
    runs = [load_run(folder, torch_device) for folder in run_dirs]
    _check_ensemble(run_dirs, runs, data_dir is None)
    if mirror_tta is not None:
        runs = [(dataclasses.replace(config, mirror_tta=mirror_tta), a, m) for config, a, m in runs]
    for folder, (run_config, _, _) in zip(run_dirs, runs, strict=True):
        if run_config.mirror_tta and not run_config.aug_flip:
            raise ValueError(
                f"mirror_tta: {folder} was trained without flips (aug_flip=0), so mirroring is no TTA"
            )
    config, args, _ = runs[0]
    info: DatasetInfo = args["info"]
    method = args["postprocessing"]
    name = run_dirs[0].name if len(runs) == 1 else f"{run_dirs[0].name} (ensemble of {len(runs)})"
    if data_dir is None:
        unknown = sorted(set(subsets) - set(args["split"]))
        if unknown:
            raise ValueError(f"Unknown subset(s) {unknown}: expected some of {sorted(args['split'])}")
        wanted = {case_id: subset for subset in subsets for case_id in args["split"][subset]}
        sources, _ = find_sources(config.dataset, config.data_dir)
        missing = sorted(set(wanted) - {source.case_id for source in sources})
        if missing:
            raise ValueError(f"{config.data_dir} no longer holds the run's cases {missing[:10]}")
        sources = [source for source in sources if source.case_id in wanted]
    else:
        sources, found = find_sources(config.dataset, data_dir, require_labels=False)
        if found.in_channels != info.in_channels:
            raise ValueError(
                f"{data_dir} has {found.in_channels} image channel(s), the run {run_dirs[0]} was trained on "
                f"{info.in_channels}"
            )
        if found.class_names != info.class_names:
            raise ValueError(
                f"{data_dir} labels its classes {found.class_names}, the run {run_dirs[0]} was trained on "
                f"{info.class_names}: the per-class columns would name the wrong structures"
            )
        wanted = {source.case_id: Path(data_dir).name for source in sources}
    cases = prepare_cases(sources, args["plan"], info, config.cache_dir, config.preprocess_workers)
    output = Path(output_dir) if output_dir else output_folder(run_dirs, data_dir, mirror_tta)
    clear_outputs(output)
    if info.task == "detection":
        return _evaluate_detection(cases, runs, wanted, torch_device, output, name)
    suffix = ".mhd" if config.dataset == "luna" else ".nii.gz"
    rows = []
    for case in tqdm(cases, desc="cases"):
        started = time.perf_counter()
        predicted = to_source_grid(case, _ensemble_probabilities(case, runs, torch_device))
        seconds = time.perf_counter() - started
        source = read_source(case, args["plan"], info)
        final = postprocess(predicted, method, list(info.class_names))
        if source.label is not None:
            row = case_metrics(
                case.case_id, predicted, source.label, info.class_names, source.spacing, method, final
            )
            unit = "px" if source.spacing is None else "mm"
            rows.append({"subset": wanted[case.case_id], **row, "hd95_unit": unit, "seconds": seconds})
        del predicted  # a source-size volume: one case's arrays at a time
        _figures(case, source, final, source.label, output / "predictions")
        if source.geometry is not None:
            write_prediction(final, source.geometry, output / "labels", f"{case.case_id}{suffix}")
    if rows:
        write_metrics_csv(rows, output / "dsc.csv")
        plot_subsets(rows, output, name)
        for subset in dict.fromkeys(row["subset"] for row in rows):
            chosen = [row for row in rows if row["subset"] == subset]
            raw = np.mean([row["dsc_mean"] for row in chosen])
            final_dsc = np.mean([row["dsc_mean_pp"] for row in chosen])
            print(
                f"{subset}: mean DSC {raw:.4f}, with the run's post-processing ({method}: "
                f"{POSTPROCESSING[method]}) {final_dsc:.4f} ({len(chosen)} cases)"
            )
    return {"output_dir": output, "rows": rows, "postprocessing": method}


def _ensemble_probabilities(case: Case, runs: list, device: torch.device) -> np.ndarray:
    image = np.asarray(case.image)
    return mean_probabilities([predict_case(m, image, device, a["shapes"], c) for c, a, m in runs])


DETECTION_DISPLAY_PROBABILITY = 0.5  # candidates circled in the figures
CANDIDATE_CIRCLE_MM = 5.0


def _evaluate_detection(
    cases: list[Case], runs: list, wanted: dict, device: torch.device, output: Path, name: str
):
    """Candidates, FROC and CPM (with bootstrap intervals) per subset, and figures with circles."""
    config, args, _ = runs[0]
    info: DatasetInfo = args["info"]
    rows, candidates = [], []
    for case in tqdm(cases, desc="scans"):
        started = time.perf_counter()
        found = scan_candidates(case, _ensemble_probabilities(case, runs, device))
        seconds = time.perf_counter() - started
        candidates += found
        source = read_source(case, args["plan"], info)
        shown = [c for c in found if c.probability >= DETECTION_DISPLAY_PROBABILITY]
        detected = circles(shown, source.geometry, source.image.shape, CANDIDATE_CIRCLE_MM)
        annotated = circles(case.origin.nodules, source.geometry, source.image.shape)
        _figures(case, source, detected, annotated, output / "predictions")
        rows.append(
            {
                "subset": wanted[case.case_id],
                "case": case.case_id,
                "nodules": len(case.origin.nodules),
                "candidates": len(found),
                f"candidates_p{DETECTION_DISPLAY_PROBABILITY:g}": len(shown),
                "seconds": seconds,
            }
        )
    write_candidates(candidates, output / "candidates.csv")
    write_metrics_csv(rows, output / "scans.csv")
    results = {}
    for subset in dict.fromkeys(row["subset"] for row in rows):
        chosen = [case for case in cases if wanted[case.case_id] == subset]
        if not any(case.origin.nodules for case in chosen):
            continue
        ids = {case.case_id for case in chosen}
        result = detection_score(chosen, [c for c in candidates if c.seriesuid in ids], bootstrap=True)
        results[subset] = result
        write_metrics_csv(sensitivity_table(result), output / f"sensitivities-{subset}.csv")
        plot_froc(result, output / f"froc-{subset}.png", title=f"{name}: {subset} ({len(chosen)} scans)")
        print(
            f"{subset}: CPM {result.cpm:.3f} (95% CI {result.bootstrap.cpm_lower:.3f}-"
            f"{result.bootstrap.cpm_upper:.3f}), {result.n_detected}/{result.n_nodules} nodules found, "
            f"{len(chosen)} scans"
        )
    return {"output_dir": output, "rows": rows, "froc": results, "postprocessing": "none"}
