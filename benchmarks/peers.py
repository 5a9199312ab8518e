"""Peers trained side by side with the project, on its split, scored case by case.

`monai`: a plain MONAI recipe for the real hippocampus data (MSD Task04), as a MONAI user would write it:
MONAI's residual UNet (16 to 256 channels, 2 residual units), DiceCELoss, Adam 1e-3, batches of 4 whole
volumes padded or cropped to 48 x 64 x 48, random left-right flips, trained for a budget of training
minutes, best epoch by validation mean Dice. The test cases are predicted on their own grid (MONAI's
sliding window pads and crops back) and scored with the project's `utils.dice_per_class`.

`reference`: the reference course program (../shared/peers/brain-segmentation-pytorch) on a kaggle_3m
folder, its own training loop and settings (U-Net with 32 features, Dice loss, Adam 1e-4, batch 16), trained
on the project's training patients, its best epoch chosen on the project's validation patients, and scored
on the project's test patients with its own per-volume `utils.dsc`. Its modules share names with the
project's, so it runs in a separate Python process, its incompatibilities with current libraries patched
there at run time (its files are never edited, nothing of it is copied here).

    .venv/bin/python benchmarks/peers.py monai --budget 20
    .venv/bin/python benchmarks/peers.py monai --quick --test-ids hippocampus_008 hippocampus_011
    .venv/bin/python benchmarks/peers.py reference --epochs 10 --image-size 256
    .venv/bin/python benchmarks/peers.py reference --preprocessing-only --data data/demo-24/kaggle_3m

Records (JSON lists, a re-run with the same settings on the same device replaces its record) go to
benchmarks/results/peer_<name>.json unless --output says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib
import json
import platform
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared"
HIPPOCAMPUS = SHARED / "data" / "msd-hippocampus"
REFERENCE = SHARED / "peers" / "brain-segmentation-pytorch"
SPLIT = REPO / "benchmarks" / "split.json"
RESULTS = REPO / "benchmarks" / "results"
WORKER = "_reference-worker"  # the hidden command the reference's own process runs

CLASSES = {1: "Anterior", 2: "Posterior"}
VOLUME_SIZE = (48, 64, 48)  # MONAI's array order (x, y, z); the project's (z, y, x) padding is the same
FLIP_AXIS = 0  # x, left-right: the project's default flip; the other axes would swap anterior and posterior
MONAI_RECIPE = {
    "network": "monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=3, "
    "channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)",
    "loss": "DiceCELoss(to_onehot_y=True, softmax=True)",
    "optimizer": "Adam, lr 1e-3",
    "batch_size": 4,
    "volume_size": list(VOLUME_SIZE),
    "transforms": "LoadImaged, EnsureChannelFirstd, NormalizeIntensityd, ResizeWithPadOrCropd, "
    "RandFlipd(prob=0.5, spatial_axis=0)",
    "inference": "sliding_window_inference over the unpadded volume, argmax",
    "metric": "utils.dice_per_class on the label's own grid",
}


# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch threads, then restore the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def select_device(name: str) -> torch.device:
    """cuda when asked for, or for "auto" when there is one; else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def device_description(device: torch.device, threads: int) -> str:
    """The device as benchmarks/run.py names it: the GPU, or the CPU model and thread count."""
    from model_speed import cpu_name

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()}, {threads} threads"


def environment(device: torch.device, threads: int) -> dict:
    """Where and with what a record was measured, and the project's commit."""
    from model_speed import cpu_name
    from run import commit

    return {
        "commit": commit(),
        "device": device_description(device, threads),
        "cpu": cpu_name(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def record_key(record: Mapping) -> str:
    """What a re-run replaces: the same peer, settings and device."""
    return json.dumps([record["peer"], record["settings"], record["device"]], sort_keys=True)


def save_record(record: dict, path: Path) -> None:
    """Add the record to the JSON list at `path`, replacing one with the same key."""
    records = json.loads(path.read_text()) if path.exists() else []
    records = [old for old in records if record_key(old) != record_key(record)] + [record]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")


def mean_of(rows: Sequence[Mapping], column: str) -> float:
    return float(np.mean([row[column] for row in rows]))


# ------------------------------------------------------------------------------------------------
# MONAI on the hippocampus
# ------------------------------------------------------------------------------------------------


def labelled_cases(data_dir: Path) -> dict:
    """The labelled Decathlon cases by id, as the project lists them."""
    from volumes import find_decathlon_cases

    return {case.case_id: case for case in find_decathlon_cases(data_dir) if case.label_path is not None}


def hippocampus_split(
    data_dir: Path, split_file: Path = SPLIT, validation: int = 20, seed: int = 0
) -> dict[str, list[str]]:
    """The project's split (`dataset.split_cases` of the labelled ids); its test list must equal the file's.

    A split file holding "train", "validation" and "test" lists is used as it is.
    """
    from dataset import split_cases

    fixed = json.loads(Path(split_file).read_text())
    if {"train", "validation", "test"} <= set(fixed):
        return {subset: list(fixed[subset]) for subset in ("train", "validation", "test")}
    split = split_cases(list(labelled_cases(data_dir)), validation, len(fixed["test"]), seed=seed)
    if split["test"] != fixed["test"]:
        raise ValueError(f"split_cases(seed={seed}) gives other test cases than {split_file}")
    return split


def quick_split(split: Mapping[str, Sequence[str]], tests: int = 2) -> dict[str, list[str]]:
    """A smoke run's split: the first 4 training, 2 validation and `tests` test cases of the split."""
    return {
        "train": list(split["train"][:4]),
        "validation": list(split["validation"][:2]),
        "test": list(split["test"][:tests]),
    }


def chosen_test_cases(split: dict[str, list[str]], test_ids: Sequence[str] | None) -> dict[str, list[str]]:
    """The split with its test list narrowed to `test_ids`, which must be test cases of the split."""
    if not test_ids:
        return split
    outside = sorted(set(test_ids) - set(split["test"]))
    if outside:
        raise ValueError(f"{outside} are not test cases of the project's split: testing them would leak")
    return {**split, "test": list(test_ids)}


def monai_items(data_dir: Path, case_ids: Sequence[str]) -> list[dict]:
    """MONAI's data dictionaries (image and label paths, case id) of the cases."""
    cases = labelled_cases(data_dir)
    return [
        {"image": str(cases[i].image_paths[0]), "label": str(cases[i].label_path), "case": i}
        for i in case_ids
    ]


def monai_transforms(training: bool):
    """Loading and z-scoring; for training also padding or cropping to VOLUME_SIZE and random flips."""
    from monai import transforms

    keys = ["image", "label"]
    steps = [
        transforms.LoadImaged(keys=keys),
        transforms.EnsureChannelFirstd(keys=keys),
        transforms.NormalizeIntensityd(keys="image"),
    ]
    if training:
        steps += [
            transforms.ResizeWithPadOrCropd(keys=keys, spatial_size=VOLUME_SIZE),
            transforms.RandFlipd(keys=keys, prob=0.5, spatial_axis=FLIP_AXIS),
        ]
    return transforms.Compose(steps)


def monai_network() -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=3,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
    )


def train_epoch(model, loader, loss_function, optimizer, device, seconds_left: float) -> tuple[float, int]:
    """One pass over the loader, stopped early when `seconds_left` run out; (seconds, volumes seen)."""
    model.train()
    started, samples = time.perf_counter(), 0
    for batch in loader:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_function(model(images), labels)
        loss.backward()
        optimizer.step()
        samples += len(images)
        if time.perf_counter() - started >= seconds_left:
            break
    return time.perf_counter() - started, samples


def predict_labels(model: torch.nn.Module, image: torch.Tensor, device: torch.device) -> np.ndarray:
    """The label map of one (1, x, y, z) image on its own grid."""
    from monai.inferers import sliding_window_inference

    model.eval()
    with torch.no_grad():
        batch = torch.as_tensor(image)[None].to(device)
        logits = sliding_window_inference(batch, roi_size=VOLUME_SIZE, sw_batch_size=1, predictor=model)
    return logits.argmax(dim=1)[0].cpu().numpy()


def case_row(case_id: str, predicted: np.ndarray, truth: np.ndarray) -> dict:
    """Per-class and mean DSC of one case, with the project's metric and column names."""
    from utils import dice_per_class

    dsc = dice_per_class(predicted, truth, list(CLASSES))
    row = {"case": case_id, **{f"dsc_{name}": dsc[c] for c, name in CLASSES.items()}}
    row["dsc_mean"] = float(np.mean(list(dsc.values())))
    return row


def score_cases(model: torch.nn.Module, dataset, device: torch.device) -> list[dict]:
    """One row per case of a dataset of loaded (unpadded) cases."""
    rows = []
    for item in dataset:
        truth = np.rint(np.asarray(item["label"][0])).astype(np.int64)
        rows.append(case_row(item["case"], predict_labels(model, item["image"], device), truth))
    return rows


def train_monai(
    train_items: list[dict],
    validation_items: list[dict],
    budget_minutes: float,
    max_epochs: int,
    seed: int,
    device: torch.device,
) -> tuple[torch.nn.Module, list[dict]]:
    """Train for a budget of training minutes (loading, validation not counted); the best epoch's network."""
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    train_transforms = monai_transforms(training=True)
    train_transforms.set_random_state(seed=seed)
    loader = DataLoader(
        CacheDataset(train_items, train_transforms, progress=False), batch_size=4, shuffle=True, num_workers=0
    )
    validation = CacheDataset(validation_items, monai_transforms(training=False), progress=False)
    model = monai_network().to(device)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    budget, trained, history, best = 60 * budget_minutes, 0.0, [], None
    for epoch in range(1, max_epochs + 1):
        seconds, samples = train_epoch(model, loader, loss_function, optimizer, device, budget - trained)
        trained += seconds
        val_dsc = mean_of(score_cases(model, validation, device), "dsc_mean")
        history.append({"epoch": epoch, "seconds": seconds, "samples": samples, "val_mean_dsc": val_dsc})
        print(f"epoch {epoch}: val mean DSC {val_dsc:.4f} ({trained:.0f} s training)", flush=True)
        if best is None or val_dsc > best[0]:
            best = (val_dsc, copy.deepcopy(model.state_dict()))
        if trained >= budget:
            break
    model.load_state_dict(best[1])
    return model, history


def monai_summary(rows: list[dict], history: list[dict]) -> dict:
    """Test means, the chosen epoch and the training speed."""
    train_seconds = sum(entry["seconds"] for entry in history)
    best = max(history, key=lambda entry: entry["val_mean_dsc"])
    summary = {f"dsc_{name.lower()}": mean_of(rows, f"dsc_{name}") for name in CLASSES.values()}
    summary |= {"dsc_mean": mean_of(rows, "dsc_mean"), "test_cases": len(rows)}
    summary |= {"best_val_dsc": best["val_mean_dsc"], "best_epoch": best["epoch"], "epochs": len(history)}
    summary |= {"train_seconds": train_seconds}
    summary["samples_per_second"] = sum(entry["samples"] for entry in history) / train_seconds
    return summary


def run_monai(
    data_dir: Path,
    split: Mapping[str, Sequence[str]],
    budget_minutes: float,
    max_epochs: int = 1000,
    seed: int = 0,
    threads: int = 2,
    device: str = "auto",
) -> dict:
    """Train the MONAI recipe on split["train"], choose on split["validation"], score split["test"]."""
    import monai
    from monai.data import Dataset

    started = time.perf_counter()
    torch_device = select_device(device)
    with torch_threads(threads):
        model, history = train_monai(
            monai_items(data_dir, split["train"]),
            monai_items(data_dir, split["validation"]),
            budget_minutes,
            max_epochs,
            seed,
            torch_device,
        )
        test = Dataset(monai_items(data_dir, split["test"]), monai_transforms(training=False))
        rows = score_cases(model, test, torch_device)
    settings = {"budget_minutes": budget_minutes, "max_epochs": max_epochs, "seed": seed}
    settings |= {"train_cases": len(split["train"]), "test_cases": list(split["test"])}
    record = {"peer": "monai", "settings": settings, "budget_minutes": budget_minutes, "seed": seed}
    record |= monai_summary(rows, history)
    record |= {"seconds": time.perf_counter() - started, "rows": rows, "history": history}
    record |= {"split": {subset: list(ids) for subset, ids in split.items()}, "recipe": MONAI_RECIPE}
    return record | {"monai": monai.__version__, **environment(torch_device, threads)}


# ------------------------------------------------------------------------------------------------
# The reference course program on kaggle_3m (parent process)
# ------------------------------------------------------------------------------------------------


def reference_split(
    data_dir: Path, validation: int = 4, test: int = 4, seed: int = 42
) -> dict[str, list[str]]:
    """The project's split of the patient folders (the demo's: 4 validation, 4 test patients, seed 42)."""
    from dataset import list_patient_folders, split_cases

    return split_cases([folder.name for folder in list_patient_folders(data_dir)], validation, test, seed)


def linked_patients(data_dir: Path, patients: Sequence[str], folder: Path) -> Path:
    """A kaggle_3m-like folder of the chosen patients, each a real folder of links to its tif files.

    The reference walks its folder with os.walk, which does not enter linked folders; nothing is copied.
    """
    for patient in patients:
        source = (Path(data_dir) / patient).resolve()
        if not source.is_dir():
            raise FileNotFoundError(f"patient folder {source} does not exist")
        (folder / patient).mkdir(parents=True)
        for tif in source.glob("*.tif"):
            (folder / patient / tif.name).symlink_to(tif)
    return folder


def run_worker(request: dict) -> dict:
    """Run the reference in its own Python process; its result, or an error with the end of its output."""
    with tempfile.TemporaryDirectory(prefix="reference-request-") as folder:
        request_path, result_path = Path(folder) / "request.json", Path(folder) / "result.json"
        request_path.write_text(json.dumps(request))
        command = [sys.executable, str(Path(__file__).resolve()), WORKER, str(request_path), str(result_path)]
        finished = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if finished.returncode or not result_path.exists():
            output = (finished.stdout + finished.stderr)[-5000:]
            raise RuntimeError(f"the reference process failed (exit {finished.returncode}):\n{output}")
        return json.loads(result_path.read_text())


def time_reference_preprocessing(folder: Path, image_size: int = 256, repeats: int = 1) -> dict:
    """Seconds the reference takes to build its BrainSegmentationDataset (read, crop, pad, resize, normalise).

    Every patient folder under `folder` is read, `repeats` times in one fresh process; "seconds" is the
    median, "runs" every time. Its files are read as they are (0/255 masks are binarised after its resize).
    """
    request = {"mode": "preprocess", "folder": str(Path(folder).resolve()), "image_size": image_size}
    result = run_worker(request | {"repeats": repeats, "threads": 2})
    result["seconds"] = float(np.median(result["runs"]))
    result["seconds_per_patient"] = result["seconds"] / result["patients"]
    return result


REFERENCE_METRIC = (
    "the reference's utils.dsc per patient (sigmoid outputs rounded at 0.5, largest 3D connected component "
    "kept, Dice over the whole volume) on its own grid and slices: every slice but the first and last, "
    "cropped to the slices, rows and columns where the head exceeds 10% of the maximum, padded to square "
    "and resized to image_size x image_size (mask: nearest neighbour); not the project's grid"
)


def reference_record(result: dict, split: Mapping[str, Sequence[str]], settings: dict) -> dict:
    """One reference run's record: preprocessing, throughput, per-patient DSC and where they come from."""
    preprocessing = result["preprocessing_seconds"]
    patients = sum(len(split[subset]) for subset in ("train", "validation", "test"))
    rows = result["rows"]
    record = {"peer": "reference", "settings": settings, "epochs": settings["epochs"]}
    record |= {"preprocessing_seconds": sum(preprocessing.values()), "preprocessing_by_subset": preprocessing}
    record["preprocessing_seconds_per_patient"] = record["preprocessing_seconds"] / patients
    record |= {key: result[key] for key in ("slices_per_second", "train_seconds", "history", "weights")}
    record |= {"best_val_dsc": result["best_val_dsc"], "best_epoch": result["best_epoch"]}
    record |= {
        "dsc_mean": float(np.mean([row["dsc"] for row in rows])),
        "test_cases": len(rows),
        "rows": rows,
    }
    record |= {"dsc_metric": REFERENCE_METRIC, "split": {key: list(ids) for key, ids in split.items()}}
    return record


def run_reference(
    data_dir: Path,
    split: Mapping[str, Sequence[str]],
    epochs: int = 1,
    image_size: int = 256,
    batch_size: int = 16,
    lr: float = 1e-4,
    workers: int = 0,
    seed: int = 42,
    threads: int = 2,
    device: str = "auto",
) -> dict:
    """Train the reference with its own loop on split["train"] for `epochs`; score split["test"] per patient.

    Its best epoch is chosen on split["validation"] as its train.py does; each subset is a folder of links.
    """
    settings = {"epochs": epochs, "image_size": image_size, "batch_size": batch_size, "lr": lr}
    settings |= {"init_features": 32, "workers": workers, "seed": seed, "loss": "its DiceLoss"}
    torch_device = select_device(device)
    with tempfile.TemporaryDirectory(prefix="reference-") as work:
        folders = {
            subset: str(linked_patients(data_dir, split[subset], Path(work) / subset))
            for subset in ("train", "validation", "test")
        }
        request = {"mode": "train", "folders": folders, "work": work, "threads": threads}
        request |= settings | {"device": "cuda:0" if torch_device.type == "cuda" else "cpu"}
        result = run_worker(request)
    return reference_record(result, split, settings) | environment(torch_device, threads)


# ------------------------------------------------------------------------------------------------
# The reference's own process: its modules first on sys.path, its incompatibilities patched
# ------------------------------------------------------------------------------------------------


class ScalarLog:
    """Stands in for the reference's TensorFlow 1 logger: keeps the scalars, drops the images."""

    def __init__(self, log_dir: str):
        self.scalars: list[tuple[str, float, int]] = []

    def scalar_summary(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, float(value), int(step)))

    def image_list_summary(self, tag: str, images: list, step: int) -> None:
        """Images are not logged."""


class TimedLoader:
    """A data loader that adds up the time from its first batch to its end, and the samples it gave."""

    def __init__(self, loader):
        self.loader, self.dataset = loader, loader.dataset
        self.epochs: list[dict] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        started, samples = time.perf_counter(), 0
        for batch in self.loader:
            samples += len(batch[0])
            yield batch
        self.epochs.append({"seconds": time.perf_counter() - started, "slices": samples})


def import_reference() -> dict[str, types.ModuleType]:
    """The reference's modules, imported from its folder with the workarounds the shared README lists."""
    sys.path[:] = [str(REFERENCE)] + [path for path in sys.path if Path(path).resolve() != REPO]
    logger = types.ModuleType("logger")  # stands in for its TensorFlow 1 logger module
    logger.Logger = ScalarLog
    sys.modules["logger"] = logger
    modules = {
        name: importlib.import_module(name) for name in ("dataset", "train", "transform", "unet", "utils")
    }
    foreign = [name for name, module in modules.items() if Path(module.__file__).parent != REFERENCE]
    if foreign:
        raise ImportError(
            f"{foreign} were not imported from {REFERENCE}: another module of that name came first"
        )
    dataset, transform, utils = modules["dataset"], modules["transform"], modules["utils"]
    transform.rescale = rescale_with_channel_axis(transform.rescale)
    utils.largest_connected_component = empty_safe(utils.largest_connected_component)
    dataset.resize_sample = binarised_masks(dataset.resize_sample)
    return modules


def rescale_with_channel_axis(rescale):
    """scikit-image's rescale, accepting the removed `multichannel=True` as `channel_axis=-1`."""

    def patched(*args, multichannel=False, **kwargs):
        return rescale(*args, **({"channel_axis": -1} if multichannel else {}), **kwargs)

    return patched


def empty_safe(largest_connected_component):
    """medpy's largest-component step, returning an empty mask for an all-background input."""

    def patched(image, *args, **kwargs):
        if not np.any(image):
            return np.zeros(np.shape(image), dtype=bool)
        return largest_connected_component(image, *args, **kwargs)

    return patched


def binarised_masks(resize_sample):
    """The reference's resize, with its mask binarised (0/255 masks stay 0/255 under current scikit-image)."""

    def patched(sample, size=256):
        volume, mask = resize_sample(sample, size=size)
        return volume, (mask > 0).astype(np.float32)

    return patched


def timed_build(build, timings: dict, name: str):
    started = time.perf_counter()
    built = build()
    timings[name] = time.perf_counter() - started
    return built


def preprocessing_worker(request: dict) -> dict:
    """Build the reference's dataset of a folder `repeats` times; the seconds of each build."""
    dataset = import_reference()["dataset"]
    runs, built = [], None
    for _ in range(request["repeats"]):
        started = time.perf_counter()
        built = dataset.BrainSegmentationDataset(
            request["folder"], subset="all", image_size=request["image_size"], random_sampling=False
        )
        runs.append(time.perf_counter() - started)
    slices = sum(volume.shape[0] for volume, _ in built.volumes)
    return {
        "runs": runs,
        "patients": len(built.patients),
        "slices": slices,
        "image_size": request["image_size"],
    }


def reference_namespace(request: dict) -> argparse.Namespace:
    """The arguments its train.main reads: the reference settings, no images logged, folders in `work`."""
    work = Path(request["work"])
    return argparse.Namespace(
        batch_size=request["batch_size"],
        epochs=request["epochs"],
        lr=request["lr"],
        device=request["device"],
        workers=request["workers"],
        vis_images=0,
        vis_freq=10,
        weights=str(work / "weights"),
        logs=str(work / "logs"),
        images=request["folders"]["train"],
        image_size=request["image_size"],
        aug_scale=0.05,
        aug_angle=15,
    )


def install_probes(modules: dict, request: dict, timings: dict) -> dict:
    """Point its train.py at the project's subsets, time its preprocessing and training, keep its network."""
    train, dataset = modules["train"], modules["dataset"]
    folders, probes = request["folders"], {"models": [], "loaders": [], "logs": []}

    def datasets(args):
        augment = modules["transform"].transforms(scale=args.aug_scale, angle=args.aug_angle, flip_prob=0.5)
        build = dataset.BrainSegmentationDataset
        training = timed_build(
            lambda: build(folders["train"], transform=augment, image_size=args.image_size, subset="all"),
            timings,
            "train",
        )
        validation = timed_build(
            lambda: build(
                folders["validation"], image_size=args.image_size, subset="all", random_sampling=False
            ),
            timings,
            "validation",
        )
        return training, validation

    def data_loader(data, **kwargs):
        loader = torch.utils.data.DataLoader(data, **kwargs)
        if kwargs.get("shuffle"):
            probes["loaders"].append(TimedLoader(loader))
            return probes["loaders"][-1]
        return loader

    def network(**kwargs):
        probes["models"].append(modules["unet"].UNet(init_features=32, **kwargs))
        return probes["models"][-1]

    def logger(log_dir):
        probes["logs"].append(ScalarLog(log_dir))
        return probes["logs"][-1]

    train.datasets, train.DataLoader, train.UNet, train.Logger = datasets, data_loader, network, logger
    return probes


def per_patient_dsc(modules: dict, model, folder: str, request: dict, device, timings: dict) -> list[dict]:
    """Its per-volume DSC of each patient in `folder`, computed as its inference.py does."""
    data = timed_build(
        lambda: modules["dataset"].BrainSegmentationDataset(
            folder, image_size=request["image_size"], subset="all", random_sampling=False
        ),
        timings,
        "test",
    )
    loader = torch.utils.data.DataLoader(data, batch_size=request["batch_size"], shuffle=False)
    predictions, truths = [], []
    model.eval()
    with torch.no_grad():
        for images, masks in loader:
            predictions.append(model(images.to(device)).cpu().numpy())
            truths.append(masks.numpy())
    predictions, truths = np.concatenate(predictions), np.concatenate(truths)
    rows, start = [], 0
    for patient, slices in zip(
        data.patients, np.bincount([p for p, _ in data.patient_slice_index]), strict=True
    ):
        chosen = slice(start, start + slices)
        dsc = float(modules["utils"].dsc(predictions[chosen], truths[chosen]))
        rows.append({"case": patient, "dsc": dsc, "slices": int(slices)})
        start += slices
    return rows


def validation_scores(log: ScalarLog) -> list[float]:
    """The mean validation DSC its loop logged after each epoch."""
    return [value for tag, value, _ in log.scalars if tag == "val_dsc"]


def training_worker(request: dict) -> dict:
    """Run its train.main on the project's subsets, then score the test patients with its best weights."""
    modules = import_reference()
    timings: dict[str, float] = {}
    probes = install_probes(modules, request, timings)
    modules["train"].main(reference_namespace(request))
    device = torch.device(request["device"])
    (model,), (loader,), (log,) = probes["models"], probes["loaders"], probes["logs"]
    weights = Path(request["work"]) / "weights" / "unet.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, map_location=device))
    rows = per_patient_dsc(modules, model, request["folders"]["test"], request, device, timings)
    slices, seconds = (sum(epoch[key] for epoch in loader.epochs) for key in ("slices", "seconds"))
    if slices == 0:
        raise RuntimeError(
            "no training batch: fewer training slices than the batch size (its loader drops the rest)"
        )
    scores = validation_scores(log)
    history = [
        {"epoch": index + 1, **epoch, "val_mean_dsc": score}
        for index, (epoch, score) in enumerate(zip(loader.epochs, scores, strict=True))
    ]
    return {
        "preprocessing_seconds": timings,
        "slices_per_second": slices / seconds,
        "train_seconds": seconds,
        "history": history,
        "best_val_dsc": max(scores),
        "best_epoch": int(np.argmax(scores)) + 1,
        "weights": "best validation epoch"
        if weights.exists()
        else "last epoch (no epoch had validation DSC > 0)",
        "rows": rows,
    }


def reference_worker(request_path: Path, result_path: Path) -> int:
    """The entry point of the reference's own process."""
    request = json.loads(Path(request_path).read_text())
    torch.set_num_threads(request["threads"])
    torch.manual_seed(request.get("seed", 42))
    np.random.seed(request.get("seed", 42))
    work = preprocessing_worker if request["mode"] == "preprocess" else training_worker
    Path(result_path).write_text(json.dumps(work(request)))
    return 0


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def missing(path: Path, what: str) -> bool:
    """True (after saying so) when `path` is absent: a user's clone has no ../shared."""
    if path.exists():
        return False
    print(
        f"skipping the {what}: {path} is absent (it lives in ../shared, not in the project)", file=sys.stderr
    )
    return True


def monai_command(args: argparse.Namespace) -> int:
    if missing(args.data / "dataset.json", "MONAI peer (no MSD hippocampus data)"):
        return 0
    split = hippocampus_split(args.data, args.split_file, args.validation, args.split_seed)
    split = chosen_test_cases(split, args.test_ids)
    if args.quick:
        split = quick_split(split, len(args.test_ids) if args.test_ids else 2)
    epochs = 1 if args.quick else args.epochs
    record = run_monai(args.data, split, args.budget, epochs, args.seed, args.threads, args.device)
    record["settings"]["quick"] = record["quick"] = args.quick
    save_record(record, args.output or RESULTS / "peer_monai.json")
    print(f"MONAI peer: test mean DSC {record['dsc_mean']:.4f} over {record['test_cases']} cases")
    return 0


def kaggle_data(data: Path | None) -> Path:
    """The given kaggle_3m folder, or the brain benchmarks' generated set (benchmarks/run.py: brain_data)."""
    if data is not None:
        return data
    from run import brain_data

    return brain_data()


def reference_command(args: argparse.Namespace) -> int:
    if missing(REFERENCE, "reference course program"):
        return 0
    data = kaggle_data(args.data)
    if args.preprocessing_only:
        timing = time_reference_preprocessing(data, args.image_size, args.repeats)
        print(json.dumps(timing, indent=1))
        return 0
    split = reference_split(data, args.validation, args.test, args.split_seed)
    record = run_reference(
        data,
        split,
        args.epochs,
        args.image_size,
        args.batch_size,
        args.lr,
        args.workers,
        args.seed,
        args.threads,
        args.device,
    )
    record["data"] = str(data)
    save_record(record, args.output or RESULTS / "peer_reference.json")
    print(
        f"reference: preprocessing {record['preprocessing_seconds']:.1f} s, "
        f"{record['slices_per_second']:.2f} slices/s, test mean DSC {record['dsc_mean']:.4f}"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    main_parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    commands = main_parser.add_subparsers(dest="peer", required=True)
    monai = commands.add_parser("monai", help="the MONAI recipe on the real hippocampus data")
    monai.add_argument("--data", type=Path, default=HIPPOCAMPUS)
    monai.add_argument("--budget", type=float, default=20.0, help="training minutes")
    monai.add_argument("--epochs", type=int, default=1000, help="at most this many epochs")
    monai.add_argument("--split-file", type=Path, default=SPLIT, help="the test ids (or a full split)")
    monai.add_argument("--validation", type=int, default=20, help="validation cases of the split")
    monai.add_argument("--split-seed", type=int, default=0)
    monai.add_argument("--test-ids", nargs="+", help="only these test cases of the split")
    monai.add_argument("--quick", action="store_true", help="4 training, 2 validation cases, 1 epoch")
    reference = commands.add_parser("reference", help="the reference course program on kaggle_3m")
    reference.add_argument("--data", type=Path, help="a kaggle_3m folder (default: data/demo-24/kaggle_3m)")
    reference.add_argument("--epochs", type=int, default=1)
    reference.add_argument("--image-size", type=int, default=256)
    reference.add_argument("--batch-size", type=int, default=16)
    reference.add_argument("--lr", type=float, default=1e-4)
    reference.add_argument("--workers", type=int, default=0, help="its DataLoader workers")
    reference.add_argument("--validation", type=int, default=4, help="validation patients of the split")
    reference.add_argument("--test", type=int, default=4, help="test patients of the split")
    reference.add_argument("--split-seed", type=int, default=42, help="the demo's (engine: seed 42)")
    reference.add_argument("--preprocessing-only", action="store_true", help="time its dataset build only")
    reference.add_argument(
        "--repeats", type=int, default=1, help="preprocessing timings (with --preprocessing-only)"
    )
    for command, seed in ((monai, 0), (reference, 42)):
        command.add_argument("--seed", type=int, default=seed)
        command.add_argument("--threads", type=int, default=2, help="torch threads, as the project's runs")
        command.add_argument("--device", default="auto", help="auto, cpu or cuda")
        command.add_argument("--output", type=Path, help="the JSON list of records to add to")
    return main_parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER]:
        return reference_worker(*map(Path, argv[1:3]))
    args = parser().parse_args(argv)
    return monai_command(args) if args.peer == "monai" else reference_command(args)


if __name__ == "__main__":
    sys.exit(main())
