"""The settings of a training run: one dataclass shared by train.ipynb and the command line (train.py).

`TrainConfig.check()` rejects impossible settings with a message that names the setting, before any data is
read; `from_namespace` (the notebook's parameters cell) and `from_file` (a YAML or JSON file for torchrun)
reject unknown names and suggest the closest setting, so that a misspelt parameter is never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import numbers
import typing
from collections.abc import Mapping
from pathlib import Path

import yaml

AMP_MODES = (False, True, "auto", "bfloat16", "float16")
VOLUMETRIC_MODELS = ("unet3d", "res_unet3d", "vnet")  # the 3D networks of models.MODELS (test-checked)
# Names other tools give to settings, for the hint in the unknown-setting error.
ALIASES = {
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "n_epochs": "epochs",
    "batch": "batch_size",
    "features": "init_features",
    "workers": "num_workers",
    "network": "model",
    "architecture": "model",
}


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run; the defaults are the reference brain-MRI experiment."""

    run_name: str = "unet"  # the run's folder under runs_dir
    runs_dir: str = "runs"
    dataset: str = "kaggle_3m"  # kaggle_3m, luna, msd, luna_nodules (nodule detection)
    data_dir: str = "data/kaggle_3m"
    cache_dir: str = ".cache"  # preprocessed volumes, never inside data_dir
    preprocess_workers: int | None = None  # processes that preprocess cases (None: the CPU count)
    image_size: int = 256  # kaggle_3m: slices resized to image_size²
    edge_slices: int = 1  # kaggle_3m: slices at each end of a volume that training never draws
    spacing: float | list | None = None  # mm (None: luna 2.5, luna_nodules 1, msd the median)
    hu_window: list | None = None  # CT clip in HU (None: luna -1000..400, luna_nodules -1200..600, msd data)
    lung_labels: list = dataclasses.field(default_factory=lambda: [3, 4])  # luna: mask labels = lung
    validation_cases: int | list = 10  # how many cases to draw with split_seed, or the case ids to hold out
    test_cases: int | list = 10
    model: str = "unet"  # unet, attention_unet, unet_pp, res_unet (2D); unet3d, res_unet3d, vnet (3D)
    init_features: int = 32
    model_options: dict = dataclasses.field(default_factory=dict)
    loss: str = "dice"  # dice, bce, ce, dice_bce, dice_ce, focal, dice_focal, tversky
    loss_options: dict = dataclasses.field(default_factory=dict)
    slice_axis: int = 0  # 2D networks on volumes: the spatial axis slices are taken along
    context_slices: int = 0  # 2D networks: neighbouring slices on each side as extra input channels (2.5D)
    patch_size: list | str | None = None  # 3D networks: patch and window (D, H, W); "foreground": the
    # training cases' largest foreground box; None: the largest case, at most 96 per axis
    patches_per_epoch: int = 250  # 3D networks: patches drawn per epoch
    foreground_ratio: float = 0.33  # 3D networks: share of patches drawn on foreground
    foreground_jitter: float = 0.0  # 3D networks: share of the patch over which a foreground patch's
    # voxel lies around its centre (0: centred, nnU-Net; 1: anywhere)
    overlap: float = 0.5  # 3D inference: overlap of the sliding windows
    mirror_tta: bool = False  # inference: average over the flips of aug_flip_axes (not in validation)
    epochs: int = 100
    time_budget_minutes: float | None = None  # stop training (then validate once more) after this long
    batch_size: int = 16  # the global batch: split across the processes of a torchrun run
    lr: float = 1e-4
    lr_schedule: str = "constant"  # constant, or poly: lr × (1 - progress)^0.9 as nnU-Net
    aug_scale: float = 0.05
    aug_angle: float = 15.0
    aug_flip: float = 0.5
    aug_flip_axes: list = dataclasses.field(default_factory=lambda: [-1])  # input axes mirrored (-1: width)
    aug_intensity: float = 0.0  # random per-channel gain and shift (0: off)
    aug_affine_prob: float = 1.0  # share of samples scaled and rotated (nnU-Net: 0.2 each); the rest exact
    aug_patch_context: bool = True  # 3D: rotate a patch with the volume around it (nnU-Net); False fills
    # its corners with zeros, as runs before commit 862b585 did
    num_workers: int = 0
    amp: bool | str = "auto"  # mixed precision: auto (bfloat16 on GPUs that have it, float16 on others,
    # off on CPU), True (also bfloat16 on CPU), False, "bfloat16" or "float16"
    channels_last: bool = True  # measured faster on CPU for the 2D U-Net (report.md)
    compile_model: bool = False  # torch.compile the network
    vis_freq: int = 10  # epochs between overlay images in TensorBoard
    seed: int = 42
    split_seed: int | None = None  # seed of the train/validation/test split; None: the same as seed
    device: str = "auto"  # auto, cpu, cuda
    resume: bool = True  # continue an interrupted run; False starts it over

    @classmethod
    def from_namespace(cls, namespace: Mapping) -> TrainConfig:
        """The settings in a namespace (a notebook's globals()): plain values only, every name known.

        Modules, functions, classes, other objects, private names (`_x`) and the notebook's own results
        (NOT_SETTINGS) are not settings; any other plain value whose name is not a setting (e.g.
        `learning_rate`) is an error that suggests the closest one.
        """
        values = {
            name: value
            for name, value in namespace.items()
            if not name.startswith("_") and name not in NOT_SETTINGS and isinstance(value, PLAIN_TYPES)
        }
        return cls.from_mapping(values, "the notebook's parameters")

    @classmethod
    def from_mapping(cls, values: Mapping, where: str) -> TrainConfig:
        """Settings from a mapping; unknown names are an error naming `where` and the closest setting."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [name for name in values if name not in names]
        if unknown:
            hints = []
            for name in unknown:
                close = [ALIASES[name]] if name in ALIASES else difflib.get_close_matches(name, names, 1, 0.5)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"Unknown setting(s) in {where}: {', '.join(hints)}")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _number_from_text(value, hints[name]) for name, value in values.items()})

    @classmethod
    def from_file(cls, path: str | Path, overrides: Mapping | None = None) -> TrainConfig:
        """Settings from a YAML or JSON file of TrainConfig fields, then `overrides` (command-line ones)."""
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"Cannot read the settings file {path}: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(
                f"{path}: expected a mapping of settings (name: value), got {type(values).__name__}"
            )
        return cls.from_mapping({**values, **(overrides or {})}, str(path))

    def save(self, path: str | Path) -> Path:
        """Write the settings as a YAML file that `from_file` and `torchrun train.py --config` read."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(self))), sort_keys=False))
        return path

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name

    def check(self) -> None:
        """ValueError naming the setting for any value no run can use (cheap: no data is read)."""
        hints = typing.get_type_hints(type(self))
        problems = [
            f"{field.name} must be {' or '.join(_type_name(t) for t in _allowed_types(hints[field.name]))}, "
            f"got {getattr(self, field.name)!r} ({type(getattr(self, field.name)).__name__})"
            for field in dataclasses.fields(self)
            if not _has_type(getattr(self, field.name), _allowed_types(hints[field.name]))
        ]
        if problems:  # the range checks below assume the types
            raise ValueError("Invalid settings: " + "; ".join(problems))

        def require(condition: bool, message: str) -> None:
            if not condition:
                problems.append(message)

        require(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        require(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        for name in ("validation_cases", "test_cases"):
            held_out = getattr(self, name)
            if isinstance(held_out, list | tuple):
                require(
                    len(held_out) >= 1
                    and all(isinstance(case, str) for case in held_out)
                    and len(set(held_out)) == len(held_out),
                    f"{name} as a list must name one or more distinct case ids, got {held_out!r}",
                )
            else:
                require(
                    type(held_out) is int and held_out >= 1,
                    f"{name} must be at least 1 (a number of cases) or a list of case ids, got {held_out!r}",
                )
        require(self.image_size >= 8, f"image_size must be at least 8 pixels, got {self.image_size}")
        require(
            self.slice_axis in (0, 1, 2),
            f"slice_axis must be 0, 1 or 2 (a spatial axis), got {self.slice_axis}",
        )
        require(self.edge_slices >= 0, f"edge_slices must be 0 or more, got {self.edge_slices}")
        require(
            type(self.context_slices) is int and self.context_slices >= 0,
            f"context_slices must be an integer, 0 or more, got {self.context_slices!r}",
        )
        require(
            not (self.context_slices and self.model in VOLUMETRIC_MODELS),
            f"context_slices is for 2D networks; {self.model!r} is 3D and sees the neighbouring slices",
        )
        require(
            self.patches_per_epoch >= 1, f"patches_per_epoch must be at least 1, got {self.patches_per_epoch}"
        )
        require(
            0 <= self.foreground_ratio <= 1,
            f"foreground_ratio must be in [0, 1], got {self.foreground_ratio}",
        )
        require(
            0 <= self.foreground_jitter <= 1,
            f"foreground_jitter must be in [0, 1], got {self.foreground_jitter}",
        )
        require(0 <= self.overlap < 1, f"overlap must be in [0, 1), got {self.overlap}")
        require(0 <= self.aug_scale < 1, f"aug_scale must be in [0, 1), got {self.aug_scale}")
        require(
            self.lr_schedule in ("constant", "poly"),
            f"lr_schedule must be 'constant' or 'poly', got {self.lr_schedule!r}",
        )
        require(self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        require(self.num_workers >= 0, f"num_workers must be 0 or more, got {self.num_workers}")
        require(
            self.time_budget_minutes is None or self.time_budget_minutes > 0,
            f"time_budget_minutes must be positive or None, got {self.time_budget_minutes}",
        )
        if self.patch_size not in (None, "foreground"):
            require(
                len(self.patch_size) == 3 and all(int(p) >= 1 for p in self.patch_size),
                f"patch_size must be 3 positive sizes (D, H, W), got {self.patch_size}",
            )
        if self.hu_window is not None:
            require(
                len(self.hu_window) == 2 and self.hu_window[0] < self.hu_window[1],
                f"hu_window must be [low, high] with low < high, got {self.hu_window}",
            )
        dims = 3 if self.model in VOLUMETRIC_MODELS else 2
        require(
            all(type(axis) is int and -dims <= axis < dims for axis in self.aug_flip_axes),
            f"aug_flip_axes must be spatial axes of a {dims}D network ({-dims}..{dims - 1}), "
            f"got {self.aug_flip_axes}",
        )
        require(
            not (self.mirror_tta and not self.aug_flip),
            "mirror_tta averages over the flips training makes, and aug_flip=0 makes none",
        )
        for name in ("init_features", "in_channels", "out_channels"):
            require(
                name not in self.model_options,
                f"model_options must not hold {name!r}: "
                + ("set init_features itself" if name == "init_features" else "the data set decides it"),
            )
        data, cache = Path(self.data_dir).resolve(), Path(self.cache_dir).resolve()
        require(
            not cache.is_relative_to(data),
            f"cache_dir {self.cache_dir} is inside data_dir {self.data_dir}: the data folder stays read-only",
        )
        if problems:
            raise ValueError("Invalid settings: " + "; ".join(problems))


def _allowed_types(hint: object) -> tuple[type, ...]:
    return typing.get_args(hint) or (hint,)


def _type_name(kind: type) -> str:
    return {float: "a number", int: "an integer", type(None): "None"}.get(kind, f"a {kind.__name__}")


def _has_type(value: object, allowed: tuple[type, ...]) -> bool:
    """isinstance, where a bool is no number, a float setting takes integers and a list setting tuples."""
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, numbers.Integral) and (int in allowed or float in allowed):
        return True
    if isinstance(value, numbers.Real) and float in allowed:
        return True
    if isinstance(value, tuple) and list in allowed:
        return True
    return isinstance(value, tuple(kind for kind in allowed if kind not in (int, float)))


def _number_from_text(value: object, hint: object) -> object:
    """YAML 1.1 (PyYAML) reads 3e-4 as the text '3e-4': a number setting given so becomes the number."""
    if isinstance(value, str) and float in _allowed_types(hint):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# Notebook variables that are not settings: IPython's own, and what train.ipynb computes after the parameters.
NOT_SETTINGS = {"In", "Out", "exit", "quit", "config", "result"}
PLAIN_TYPES = (bool, int, float, str, list, dict, tuple, type(None))
