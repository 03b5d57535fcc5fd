"""Training past one process, under `torchrun` (PyTorch's launcher): the few lines DDP needs, kept
here so that train/loop.py reads as one process. A reader can skip this file.

    torchrun --nproc_per_node 2 -m minildm train sd --out runs/tiny-sd

torchrun starts one process per rank and tells each, in its environment, its RANK, the
WORLD_SIZE and where rank 0 listens (MASTER_ADDR, MASTER_PORT). Every rank draws the whole batch
from the same seeded generator, as one process would, and computes only its own share of it
(`share`); DistributedDataParallel averages the shares' gradients, so that each step equals the
single process's step on the whole batch (its loss is the batch mean: the mean of equal shares'
means). Everything that decides the run (the learning rate, when the time is up) follows rank 0's
clock (`agreed`); only rank 0 writes checkpoints, prints and evaluates.

Without torchrun (no WORLD_SIZE, or 1) every function here leaves things as they are.
"""

import datetime
import os
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

# how long a rank waits for the others at a collective before it gives up with an error; rank 0's
# checkpoints and timeline points are the longest waits (seconds to a minute)
TIMEOUT = datetime.timedelta(minutes=10)


def start() -> None:
    """Join the process group torchrun describes (gloo: the CPU backend), if there is one."""
    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait until every rank is here."""
    if world_size() > 1:
        dist.barrier()


def check_batch(batch: int, what: str) -> None:
    """Each rank takes an equal share of every batch: the world size must divide it."""
    if batch % world_size():
        raise ValueError(
            f"{what}: a batch of {batch} does not split into {world_size()} equal shares; run "
            f"with a number of processes that divides {batch} (torchrun --nproc_per_node)"
        )


def share(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a batch drawn whole: (B, ...) -> (B / world, ...)."""
    size = len(x) // world_size()
    return x[rank() * size : (rank() + 1) * size]


def gather(x: torch.Tensor) -> torch.Tensor:
    """The whole batch back from every rank's share, in rank order: (B / world, ...) -> (B, ...)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def total(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, in place."""
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def agreed(value: float) -> float:
    """Rank 0's value of a number every rank measures for itself (its clock)."""
    if world_size() == 1:
        return value
    x = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(x, src=0)
    return float(x)


class StageLoss(torch.nn.Module):
    """The stage's models and its loss as one module, so that DDP sees every trained parameter
    and hooks its gradient averaging onto one forward call."""

    def __init__(self, models: dict, batch_loss):
        super().__init__()
        self.models = torch.nn.ModuleDict(models)
        self.batch_loss = batch_loss

    def forward(self, generator: torch.Generator) -> torch.Tensor:
        return self.batch_loss(generator)


def averaged_gradients(models: dict, batch_loss):
    """batch_loss, or under torchrun the same loss whose backward averages the gradients of all
    ranks (DistributedDataParallel; it also checks that all ranks start from the same weights)."""
    if world_size() == 1:
        return batch_loss
    # DDP copies gradients into flat buckets; a 1x1 convolution's weight in channels_last has
    # strides the bucket's view cannot match, which costs a copy of a few kilobytes per step and
    # made DDP warn once per process about performance
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(StageLoss(models, batch_loss))
