"""Distributed helpers for ``torchrun``: process-group set-up, samplers, reductions.

NCCL on GPUs, gloo on CPU. Training batches are cut from one global permutation per epoch, so a run on
W processes with global batch B sees exactly the batches of a one-process run with batch B; evaluation
shards the dataset without padding, so no sample is counted twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def init_distributed(device: str) -> tuple[int, int, int]:
    """Initialise the default process group when launched by torchrun. Returns (rank, world, local_rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return rank, world, local


def shutdown_distributed(wait: bool = True) -> None:
    """Destroy the process group (a process that exits with a live gloo group can abort in its destructor);
    ``wait`` first waits for every rank (only on success: after a one-rank failure the others never come)."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def world_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class GlobalBatchSampler:
    """Yields this rank's share of each global batch of one seeded permutation per epoch.

    Args:
        n: dataset size. batch_size: global batch. rank, world: this process and the process count.
        seed: base seed; epoch ``e`` uses ``seed + e``. drop_last: drop a final partial batch (only
        when at least one full batch exists).
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0, drop_last: bool = True):
        if batch_size % world:
            raise ValueError(f"global batch {batch_size} is not divisible by the {world} processes")
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.drop_last = drop_last and n >= batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for i in range(len(self)):
            batch = perm[i * self.batch_size : (i + 1) * self.batch_size]
            yield batch[self.rank :: self.world]


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation shard ``indices[rank::world]``: every sample on exactly one rank, no padding."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, n, world))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
