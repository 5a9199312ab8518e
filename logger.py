"""TensorBoard logging for training runs (`make tensorboard` serves the runs folder)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter


class Logger:
    """Scalars and image strips written under `log_dir`, one TensorBoard run per training run."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        """purge_step: a resumed run's first step; events logged at or after it before the interruption
        are dropped, so a replayed epoch is not shown twice."""
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def images(self, tag: str, images: Sequence[np.ndarray], step: int) -> None:
        """A list of (H, W, 3) uint8 images (overlays) shown as one batch."""
        if images:
            self.writer.add_images(tag, np.stack(images), step, dataformats="NHWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
