"""Training and inference loops behind train.ipynb and inference.ipynb.

`train(config)` fits a 2D network on slices or a 3D network on patches, keeps the best weights by validation
mean per-volume DSC and resumes an interrupted run; `evaluate(run_dir)` rebuilds the network from the run's
`args.json` and writes the per-case metric table, its bar plot, overlays, GIFs and, for scans, the predicted
label maps on the source grid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from tqdm.auto import tqdm

from dataset import (
    Case,
    DatasetInfo,
    PatchDataset,
    SliceDataset,
    center_pad_or_crop,
    load_dataset,
    slice_sampling_weights,
    split_cases,
)
from logger import Logger
from loss import DeepSupervisionLoss, build_loss
from models import build_model
from sliding_window import predict_padded, sliding_window_inference
from transform import build_transform
from utils import (
    case_metrics,
    dice_per_class,
    overlay,
    plot_dsc,
    save_case_figures,
    save_checkpoint_atomic,
    seed_everything,
    select_device,
    write_json_atomic,
    write_metrics_csv,
)
from volumes import resample_to_shape, write_volume


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run; the defaults are the reference brain-MRI experiment."""

    run_name: str = "unet"  # the run's folder under runs_dir
    runs_dir: str = "runs"
    dataset: str = "kaggle_3m"  # kaggle_3m, luna, msd
    data_dir: str = "data/kaggle_3m"
    cache_dir: str = ".cache"  # preprocessed volumes, never inside data_dir
    image_size: int = 256  # kaggle_3m: slices resized to image_size²
    edge_slices: int = 1  # kaggle_3m: slices dropped at each end of a volume
    spacing: float | None = None  # luna, msd: isotropic resampling in mm (luna: 2.5 when None)
    hu_window: list = dataclasses.field(default_factory=lambda: [-1000.0, 400.0])  # CT clip in HU
    lung_labels: list = dataclasses.field(default_factory=lambda: [3, 4])  # luna: mask labels = lung
    validation_cases: int = 10
    test_cases: int = 10
    model: str = "unet"  # unet, attention_unet, unet_pp (2D); unet3d, vnet (3D)
    init_features: int = 32
    model_options: dict = dataclasses.field(default_factory=dict)
    loss: str = "dice"  # dice, bce, ce, dice_bce, dice_ce, focal, dice_focal, tversky
    loss_options: dict = dataclasses.field(default_factory=dict)
    slice_axis: int = 0  # 2D networks on volumes: the spatial axis slices are taken along
    patch_size: list | None = None  # 3D networks: training patch and inference window (D, H, W)
    patches_per_epoch: int = 250  # 3D networks: patches drawn per epoch
    foreground_ratio: float = 0.33  # 3D networks: share of patches centred on foreground
    overlap: float = 0.5  # 3D inference: overlap of the sliding windows
    mirror_tta: bool = False  # inference: average over the flips of aug_flip_axes (not in validation)
    epochs: int = 100
    time_budget_minutes: float | None = None  # stop training (then validate once more) after this long
    batch_size: int = 16
    lr: float = 1e-4
    lr_schedule: str = "constant"  # constant, or poly: lr × (1 - progress)^0.9 as nnU-Net
    aug_scale: float = 0.05
    aug_angle: float = 15.0
    aug_flip: float = 0.5
    aug_flip_axes: list = dataclasses.field(default_factory=lambda: [-1])  # input axes mirrored (-1: width)
    aug_intensity: float = 0.0  # random per-channel gain and shift (0: off)
    aug_affine_prob: float = 1.0  # share of samples scaled and rotated (nnU-Net: 0.2 each); the rest exact
    num_workers: int = 0
    amp: bool = False  # automatic mixed precision: bfloat16 on CPU, float16 on CUDA
    channels_last: bool = True  # measured faster on CPU for the 2D U-Net (report.md)
    compile_model: bool = False  # torch.compile the network
    vis_freq: int = 10  # epochs between overlay images in TensorBoard
    seed: int = 42
    split_seed: int | None = None  # seed of the train/validation/test split; None: the same as seed
    device: str = "auto"  # auto, cpu, cuda
    resume: bool = True  # continue an interrupted run with the same settings

    @classmethod
    def from_namespace(cls, namespace: Mapping) -> TrainConfig:
        """The settings found in a namespace (a notebook's globals()); the rest keep their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in namespace.items() if k in names})

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name


# Settings that may change between an interrupted run and its resumption without changing its result.
RESUMABLE = {"resume", "num_workers", "device", "epochs", "vis_freq", "time_budget_minutes"}


# The settings that decide how load_cases prepares a data set: networks that differ in them see other inputs.
PREPROCESSING = ("dataset", "image_size", "edge_slices", "spacing", "hu_window", "lung_labels")


def load_cases(config: TrainConfig, data_dir: str | None = None, require_labels: bool = True):
    """The dataset's preprocessed cases and its description (classes, channels)."""
    return load_dataset(
        config.dataset,
        data_dir or config.data_dir,
        image_size=config.image_size,
        edge_slices=config.edge_slices,
        cache_dir=config.cache_dir,
        require_labels=require_labels,
        spacing=config.spacing,
        hu_window=config.hu_window,
        lung_labels=config.lung_labels,
    )


def make_model(config: TrainConfig, info: DatasetInfo) -> torch.nn.Module:
    """The configured network; one output channel for binary tasks, one per class otherwise."""
    out_channels = 1 if len(info.class_names) == 1 else max(info.class_names) + 1
    return build_model(
        config.model,
        in_channels=info.in_channels,
        out_channels=out_channels,
        init_features=config.init_features,
        **config.model_options,
    )


def _round_up(size: int, multiple: int) -> int:
    return int(math.ceil(size / multiple) * multiple)


def data_shapes(cases: Sequence[Case], config: TrainConfig, divisor: int) -> dict:
    """Sizes decided from the data (nnU-Net's habit), saved in args.json for inference.

    slice_size: the largest in-plane size, rounded up to the network's divisor, so slices of every
    volume batch together. patch_size: unless set, the largest volume rounded up, at most 96 per axis.
    """
    largest = np.max(
        [case.label.shape if case.label is not None else case.image.shape[1:] for case in cases], 0
    )
    in_plane = [int(size) for axis, size in enumerate(largest) if axis != config.slice_axis]
    patch = config.patch_size or [min(_round_up(int(size), divisor), 96) for size in largest]
    return {
        "slice_size": [_round_up(size, divisor) for size in in_plane],
        "patch_size": [int(p) for p in patch],
    }


def to_labels(logits: torch.Tensor) -> np.ndarray:
    """Class indices from logits (K, *spatial): sigmoid > 0.5 for one channel, argmax otherwise."""
    if logits.shape[0] == 1:
        return (logits[0] > 0).numpy().astype(np.uint8)
    return logits.argmax(0).numpy().astype(np.uint8)


def ensemble_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Logits (K, *spatial) whose softmax, or sigmoid for one channel, is the networks' mean probability.

    Probabilities rather than logits are averaged, as nnU-Net does: one network's overconfident logits
    cannot outvote the others. The log of the mean stands in for logits so `to_labels` applies unchanged.
    """
    if len(logits) == 1:
        return logits[0]
    if logits[0].shape[0] == 1:
        return torch.logit(sum(torch.sigmoid(x.float()) for x in logits) / len(logits), eps=1e-7)
    mean = sum(torch.softmax(x.float(), 0) for x in logits) / len(logits)
    return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()


def _autocast(device: torch.device, enabled: bool):
    """Mixed precision where asked: bfloat16 on CPU, float16 on CUDA."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def predict_case(
    model: torch.nn.Module,
    image: np.ndarray,
    device: torch.device,
    shapes: dict,
    config: TrainConfig,
) -> torch.Tensor:
    """Logits (K, D, H, W) on the CPU for a (C, D, H, W) volume.

    2D networks: slice by slice along config.slice_axis, each slice padded to the network's divisor.
    3D networks: Gaussian-weighted sliding windows of shapes["patch_size"]. With config.mirror_tta
    the logits are averaged over every flip of the axes training mirrors (config.aug_flip_axes).
    """
    model.eval()
    volume = torch.from_numpy(np.ascontiguousarray(image))
    mirror = config.aug_flip_axes if config.mirror_tta else False
    with _autocast(device, config.amp):
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
            predict_padded(model, slices[start : start + config.batch_size].to(device), mirror)
            for start in range(0, slices.shape[0], config.batch_size)
        ]
    return torch.cat(outputs).movedim(0, config.slice_axis + 1)


def validate(
    model: torch.nn.Module,
    cases: Sequence[Case],
    criterion: torch.nn.Module,
    info: DatasetInfo,
    device: torch.device,
    shapes: dict,
    config: TrainConfig,
) -> tuple[float, float, dict[str, np.ndarray]]:
    """Mean validation loss, mean per-volume DSC (over cases and classes) and the predicted label maps.

    Without test-time mirroring: validation only picks the best epoch, and mirroring costs 4-8 times.
    """
    config = dataclasses.replace(config, mirror_tta=False)
    losses, scores, predictions = [], [], {}
    for case in cases:
        logits = predict_case(model, case.image, device, shapes, config)
        target = torch.from_numpy(case.label.astype(np.int64))[None, None]
        losses.append(float(criterion(logits[None], target)))
        predictions[case.case_id] = to_labels(logits)
        per_class = dice_per_class(predictions[case.case_id], case.label, list(info.class_names))
        scores.append(float(np.mean(list(per_class.values()))))
    return float(np.mean(losses)), float(np.mean(scores)), predictions


def overlay_strip(
    cases: Sequence[Case], predictions: dict[str, np.ndarray], info: DatasetInfo, count: int = 8
) -> list[np.ndarray]:
    """Overlays of the validation slices (axis 0) with the most foreground, for TensorBoard."""
    ranked = sorted(
        ((int((case.label[d] > 0).sum()), case, d) for case in cases for d in range(len(case.label))),
        key=lambda item: -item[0],
    )
    strips = [
        overlay(case.image[info.display_channel, d], predictions[case.case_id][d], case.label[d])
        for _, case, d in ranked[:count]
    ]
    size = np.max([strip.shape[:2] for strip in strips], axis=0)
    return [center_pad_or_crop(np.moveaxis(strip, -1, 0), size).transpose(1, 2, 0) for strip in strips]


def training_data(cases: Sequence[Case], config: TrainConfig, spatial_dims: int, shapes: dict) -> DataLoader:
    """Slices for 2D networks (weighted by foreground area), foreground-biased patches for 3D ones."""
    transform = build_transform(
        config.aug_scale,
        config.aug_angle,
        config.aug_flip,
        config.aug_flip_axes,
        config.aug_intensity,
        config.aug_affine_prob,
    )
    sampler = None
    dataset: Dataset
    if spatial_dims == 2:
        dataset = SliceDataset(cases, transform, config.slice_axis, shapes["slice_size"])
        weights = torch.from_numpy(slice_sampling_weights(cases, config.slice_axis))
        sampler = WeightedRandomSampler(weights, num_samples=len(dataset))
    else:
        dataset = PatchDataset(
            cases, shapes["patch_size"], config.patches_per_epoch, config.foreground_ratio, transform
        )
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        drop_last=len(dataset) > config.batch_size,
        persistent_workers=config.num_workers > 0,
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, config: TrainConfig, progress: float) -> None:
    """The scheduled learning rate for a share `progress` of the training (epochs or time budget) done."""
    if config.lr_schedule not in ("constant", "poly"):
        raise ValueError(f"lr_schedule must be 'constant' or 'poly', got {config.lr_schedule!r}")
    factor = (1 - min(progress, 1.0)) ** 0.9 if config.lr_schedule == "poly" else 1.0
    for group in optimizer.param_groups:
        group["lr"] = config.lr * factor


def _settings(config: TrainConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE}


def _resume_state(config: TrainConfig) -> dict | None:
    """The last checkpoint of this run if it may be resumed; an error when the settings changed."""
    checkpoint = config.run_dir / "checkpoint.pt"
    if not (config.resume and checkpoint.exists()):
        return None
    saved = json.loads((config.run_dir / "args.json").read_text())
    changed = {k: (saved.get(k), v) for k, v in _settings(config).items() if saved.get(k) != v}
    if changed:
        raise ValueError(
            f"Run {config.run_dir} exists with other settings {changed} (saved, now): choose another "
            "run_name, or set resume=False to start it over"
        )
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


def _prepare(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The network on its device, in channels-last layout when asked."""
    model = model.to(device)
    if config.channels_last:
        layout = torch.channels_last if model.spatial_dims == 2 else torch.channels_last_3d
        model = model.to(memory_format=layout)
    return model


def train(config: TrainConfig) -> dict:
    """Train, validate every epoch, keep the best weights; returns the run's summary and history."""
    seed_everything(config.seed)
    device = select_device(config.device)
    cases, info = load_cases(config)
    split_seed = config.seed if config.split_seed is None else config.split_seed
    split = split_cases([c.case_id for c in cases], config.validation_cases, config.test_cases, split_seed)
    by_id = {case.case_id: case for case in cases}
    train_cases = [by_id[i] for i in split["train"]]
    val_cases = [by_id[i] for i in split["validation"]]

    model = _prepare(make_model(config, info), config, device)
    shapes = data_shapes(cases, config, model.size_divisor)
    step_model = torch.compile(model) if config.compile_model else model
    base_loss = build_loss(config.loss, **config.loss_options)
    criterion = DeepSupervisionLoss(base_loss, getattr(model, "supervision_weights", None))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")
    state = _resume_state(config)
    history: list[dict] = []
    best, start_epoch = -1.0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        best, start_epoch, history = state["best"], state["epoch"] + 1, state["history"]
        print(f"Resuming {config.run_dir} after epoch {start_epoch}")

    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    derived = {"class_names": info.class_names, "in_channels": info.in_channels}
    derived |= {"display_channel": info.display_channel, "split": split, "shapes": shapes}
    write_json_atomic({**dataclasses.asdict(config), **derived}, run_dir / "args.json")

    loader = training_data(train_cases, config, model.spatial_dims, shapes)
    layout = torch.channels_last if model.spatial_dims == 2 else torch.channels_last_3d
    logger = Logger(run_dir / "tensorboard")
    step = start_epoch * len(loader)
    trained_seconds = sum(entry["seconds"] for entry in history)
    budget_seconds = math.inf if config.time_budget_minutes is None else 60 * config.time_budget_minutes
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        model.train()
        train_losses, data_seconds, samples = [], 0.0, 0
        waited = time.perf_counter()
        for images, labels in tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False):
            data_seconds += time.perf_counter() - waited
            images, labels = images.to(device), labels.to(device)
            if config.channels_last:
                images = images.contiguous(memory_format=layout)
            progress = max(epoch / config.epochs, (trained_seconds + waited - started) / budget_seconds)
            set_learning_rate(optimizer, config, progress)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, config.amp):
                loss = criterion(step_model(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            train_losses.append(loss.item())
            samples += len(images)
            logger.scalar("train/loss", train_losses[-1], step)
            step += 1
            waited = time.perf_counter()
            if trained_seconds + waited - started >= budget_seconds:
                break
        train_seconds = time.perf_counter() - started
        val_loss, val_dsc, predictions = validate(model, val_cases, base_loss, info, device, shapes, config)
        logger.scalar("val/loss", val_loss, epoch)
        logger.scalar("val/mean_dsc", val_dsc, epoch)
        if (epoch + 1) % config.vis_freq == 0 or epoch + 1 == config.epochs:
            logger.images("val/overlays", overlay_strip(val_cases, predictions, info), epoch)
        if val_dsc > best:
            best = val_dsc
            save_checkpoint_atomic(model.state_dict(), run_dir / "weights.pt")
        trained_seconds += train_seconds
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(train_losses)),
                "val_loss": val_loss,
                "val_mean_dsc": val_dsc,
                "seconds": train_seconds,
                "data_seconds": data_seconds,
                "samples_per_second": samples / train_seconds,
                "validation_seconds": time.perf_counter() - started - train_seconds,
            }
        )
        save_checkpoint_atomic(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "best": best,
                "history": history,
            },
            run_dir / "checkpoint.pt",
        )
        write_json_atomic(history, run_dir / "history.json")
        print(
            f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}, val loss {val_loss:.4f}, "
            f"val mean DSC {val_dsc:.4f} ({train_seconds:.0f} s training)"
        )
        if trained_seconds >= budget_seconds:
            print(f"Training time budget of {config.time_budget_minutes} minutes reached")
            break
    logger.close()
    print(f"Best validation mean DSC: {best:.4f}")
    return {"run_dir": str(run_dir), "best_val_mean_dsc": best, "history": history, "split": split}


def load_run(run_dir: str | Path, device: torch.device) -> tuple[TrainConfig, dict, torch.nn.Module]:
    """A finished run's settings, saved arguments and best network, rebuilt from `args.json`."""
    run_dir = Path(run_dir)
    args_file, weights = run_dir / "args.json", run_dir / "weights.pt"
    for path in (args_file, weights):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: expected a run folder written by train()")
    args = json.loads(args_file.read_text())
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in args.items() if k in names})
    info = DatasetInfo(
        class_names={int(k): v for k, v in args["class_names"].items()},
        in_channels=args["in_channels"],
        display_channel=args["display_channel"],
    )
    model = make_model(config, info).to(device)
    model.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
    model.eval()
    return config, {**args, "info": info}, model


def write_prediction(case: Case, predicted: np.ndarray, folder: Path, suffix: str) -> Path:
    """A predicted label map back on its source scan's grid, with the scan's geometry."""
    if case.source_shape is not None and tuple(predicted.shape) != tuple(case.source_shape):
        predicted = resample_to_shape(predicted, case.source_shape, order=0)
    return write_volume(predicted.astype(np.uint8), case.source_geometry, folder / f"{case.case_id}{suffix}")


def evaluate(
    run_dir: str | Path | Sequence[str | Path],
    data_dir: str | None = None,
    subsets: Sequence[str] = ("validation", "test"),
    output_dir: str | Path | None = None,
    device: str = "auto",
    mirror_tta: bool | None = None,
) -> dict:
    """Predict cases with a run's best weights; write dsc.csv, dsc.png, overlays and GIFs.

    Without data_dir: the run's own validation and test cases (`subsets`). With data_dir: every case in
    that folder, labelled or not; unlabelled cases get prediction overlays and GIFs but no DSC. Scans
    (luna, msd) also get their predicted label map written on the source grid (.mhd for LUNA16, .nii.gz
    for NIfTI) so that it overlays on the scan in a viewer. mirror_tta: test-time mirroring on or off
    (None: as the run was trained). A list of run folders predicts with their ensemble (the mean of
    their probabilities); the runs must share the data set, its preprocessing, its classes and, without
    data_dir, the split.
    Returns the output folder and the rows.
    """
    run_dirs = [Path(run_dir)] if isinstance(run_dir, (str, Path)) else [Path(d) for d in run_dir]
    if not run_dirs:
        raise ValueError("evaluate needs at least one run folder")
    torch_device = select_device(device)
    runs = [load_run(folder, torch_device) for folder in run_dirs]
    shared = [*PREPROCESSING, "class_names", "in_channels"] + (["split"] if data_dir is None else [])
    for folder, (_, other, _) in zip(run_dirs[1:], runs[1:], strict=True):
        differ = [key for key in shared if other.get(key) != runs[0][1].get(key)]
        if differ:
            raise ValueError(f"{folder} differs from {run_dirs[0]} in {differ}: an ensemble must share them")
    if mirror_tta is not None:
        runs = [(dataclasses.replace(config, mirror_tta=mirror_tta), a, m) for config, a, m in runs]
    config, args, _ = runs[0]
    info: DatasetInfo = args["info"]
    name = run_dirs[0].name if len(runs) == 1 else f"{run_dirs[0].name} (ensemble of {len(runs)})"
    default_output = "inference" if len(runs) == 1 else f"inference-ensemble{len(runs)}"
    if data_dir is None:
        wanted = {case_id: subset for subset in subsets for case_id in args["split"][subset]}
        cases, _ = load_cases(config)
        cases = [case for case in cases if case.case_id in wanted]
        output_dir = Path(output_dir or run_dirs[0] / default_output)
    else:
        cases, _ = load_cases(config, data_dir, require_labels=False)
        wanted = {case.case_id: Path(data_dir).name for case in cases}
        output_dir = Path(output_dir or run_dirs[0] / f"{default_output}-{Path(data_dir).name}")
    suffix = ".mhd" if config.dataset == "luna" else ".nii.gz"
    rows = []
    for case in tqdm(cases, desc="cases"):
        started = time.perf_counter()
        logits = [predict_case(m, case.image, torch_device, a["shapes"], c) for c, a, m in runs]
        predicted = to_labels(ensemble_logits(logits))
        seconds = time.perf_counter() - started
        save_case_figures(
            case.case_id,
            case.image[info.display_channel],
            predicted,
            case.label,
            out_dir=output_dir / "predictions",
            slice_names=case.slice_names or None,
        )
        if case.source_geometry is not None:
            write_prediction(case, predicted, output_dir / "labels", suffix)
        if case.label is not None:
            row = case_metrics(case.case_id, predicted, case.label, info.class_names, case.spacing)
            rows.append({"subset": wanted[case.case_id], **row, "seconds": seconds})
    if rows:
        write_metrics_csv(rows, output_dir / "dsc.csv")
        plot_dsc(rows, output_dir / "dsc.png", title=f"{name}\nper-case DSC")
        for subset in dict.fromkeys(row["subset"] for row in rows):
            chosen = [row for row in rows if row["subset"] == subset]
            raw = np.mean([row["dsc_mean"] for row in chosen])
            lcc = np.mean([row["dsc_mean_lcc"] for row in chosen])
            print(
                f"{subset}: mean DSC {raw:.4f}, with largest-component post-processing {lcc:.4f} "
                f"({len(chosen)} cases)"
            )
    return {"output_dir": output_dir, "rows": rows}
