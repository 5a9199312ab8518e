"""One training run over several processes: PyTorch's own distributed engine, as launched by `torchrun`.

`torchrun --nproc_per_node=N train.py --config run.yaml` starts N processes and sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address in their environment; `setup` joins them into one process group (gloo
on CPU, NCCL on CUDA, one GPU per process). Started any other way (a notebook, `python train.py`), a run is
a group of one and none of this costs anything. Rank 0 is the only one that writes files.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from utils import select_device

TIMEOUT = datetime.timedelta(minutes=30)  # a rank that waits longer for the others gives up
# ...except while rank 0 prepares the data alone (a first run on LUNA16 or LiTS reads every scan): a crash
# there still ends the job at once, since torchrun stops every rank when one fails.
PREPARATION_TIMEOUT = datetime.timedelta(days=2)


@dataclass(frozen=True)
class Context:
    """Where this process stands in its run: its rank among world_size processes and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    preparation_group: Any = None  # a gloo group with PREPARATION_TIMEOUT, for waiting on rank 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> Context:
    """Join the process group when launched by torchrun; a group of one otherwise."""
    if not launched():
        return Context(device=select_device(device))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = select_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=chosen if chosen.type == "cuda" else None)
    preparation_group = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
    return Context(rank, world_size, chosen, preparation_group)


def barrier(context: Context, group: Any = None) -> None:
    """Wait until every rank gets here (on `group`'s timeout; None: the default group's, TIMEOUT)."""
    if context.distributed:
        dist.barrier(group=group)


def from_main(context: Context, prepare: Callable[[], Any]) -> Any:
    """prepare() run on rank 0 alone, its result on every rank: the others wait for it as long as it
    takes (PREPARATION_TIMEOUT, not TIMEOUT), however long rank 0 reads the data."""
    return broadcast(context, prepare() if context.is_main else None, context.preparation_group)


def wait_for_main(context: Context) -> None:
    """Wait until rank 0 gets here too, as long as it takes (PREPARATION_TIMEOUT): the barrier after
    rank 0 has prepared the data alone."""
    barrier(context, context.preparation_group)


def gather(context: Context, value: Any) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not context.distributed:
        return [value]
    values: list[Any] = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values


def broadcast(context: Context, value: Any, group: Any = None) -> Any:
    """Rank 0's `value` on every rank (on `group`'s timeout; None: the default group's, TIMEOUT)."""
    if not context.distributed:
        return value
    holder = [value if context.is_main else None]
    dist.broadcast_object_list(holder, src=0, group=group)
    return holder[0]


def sync_buffers(context: Context, module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics).

    DistributedDataParallel copies them from rank 0 before each forward pass, but the last step of an
    epoch updates each rank's copy from its own share of the batch; without SyncBatchNorm (the CPU) the
    ranks would validate, and end, with different statistics.
    """
    if context.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def teardown(context: Context) -> None:
    """Leave the process group (at the end of a launched run)."""
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()
