"""Batches of device-resident tensors: which rows each rank visits in an epoch, and how they are served.

Lightning accepts any sized iterable as a dataloader, and calls `set_epoch` on an iterable's
`sampler` at the start of each epoch, as it does for `DistributedSampler`. An epoch here is a
`torch.randperm` over row indices and a walk over slices of it: no per-sample transform, no
worker processes.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch import Tensor


class EpochShard:
    """The indices one rank visits in one epoch: a `DistributedSampler` for tensors.

    Training (`shuffle=True`): every rank draws the same `randperm(n)` (seeded by seed + epoch)
    and takes its own contiguous block of `n // world_size` indices, so over an epoch the ranks
    see disjoint samples and each sample at most once; the `n % world_size` left over (a
    different few each epoch) are dropped so that all ranks take the same number of steps.
    Evaluation (`shuffle=False`): rank r takes the r-th of `world_size` contiguous, nearly equal
    blocks, in order, with nothing dropped or repeated, so metrics reduced over ranks equal the
    single-process ones.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> Tensor:
        """(n_local,) int64 indices, on the CPU."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            per_rank = self.n // self.world_size
            return torch.randperm(self.n, generator=g)[self.rank * per_rank:(self.rank + 1) * per_rank]
        return torch.tensor_split(torch.arange(self.n), self.world_size)[self.rank]

    def __len__(self) -> int:
        return self.n // self.world_size if self.shuffle else len(self.indices())


def gather(x: Tensor, y: Tensor, rows: Tensor | slice) -> tuple[Tensor, Tensor]:
    """(x[rows] (B, D), y[rows] (B,)): views for a slice, else one index_select each.

    index_select, not x[rows]: advanced indexing is slower for the same gather (README, Performance);
    scripts/bench.py's floor gathers the same way, so its ratio measures overhead, not the gather.
    """
    if isinstance(rows, slice):
        return x[rows], y[rows]
    return x.index_select(0, rows), y.index_select(0, rows)


class StepBatches:
    """The (x (B, D), y (B,)) batches of one training_step call, each gathered as iteration reaches it.

    Gathered one at a time, a batch is still in cache when its step reads it, and only one is held
    (gathering a whole group up front holds steps_per_call batches and was slower: README, Performance).
    Lightning hands the object to training_step as it is: it has no `.to()` and is not a sequence,
    mapping or dataclass, so batch_to_device neither moves nor walks it (the tensors are already on
    the training device). Its length is a count of steps, not samples: a `self.log(tensor,
    on_epoch=True)` added to training_step should pass `batch_size=`, or Lightning infers one by
    iterating the group (gathering it again).

    Args:
        x: (N, D) inputs of the whole split, on the training device.
        y: (N,) labels, on the same device.
        rows: one index tensor (on that device) or slice per batch.
    """

    def __init__(self, x: Tensor, y: Tensor, rows: Sequence[Tensor | slice]) -> None:
        self.x, self.y, self.rows = x, y, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for rows in self.rows:
            yield gather(self.x, self.y, rows)


class TensorBatches:
    """Serves (x, y) batches of device-resident tensors in the order an `EpochShard` gives.

    With `steps_per_call=k` it serves `StepBatches` of up to k consecutive batches instead, one per
    Lightning batch: the fast path (mlplab.fast_path) takes one optimiser step per batch, so that
    Lightning's per-batch work (fetching, hooks, progress, logging) is paid once per k steps, as
    Keras's `steps_per_execution` does. Only the last group of an
    epoch is shorter, and only its last batch may be smaller.

    Args:
        x: (N, D) float inputs, already normalised and on the training device.
        y: (N,) int64 labels, on the same device.
        batch_size: samples per batch (per optimiser step) on this rank.
        sampler: which indices this rank visits; its `set_epoch` is called by Lightning.
        steps_per_call: None serves each batch as (x, y); k >= 1 serves groups of up to k of them.
    """

    batch_sampler = None  # Lightning reads DataLoader's two sampler attributes; batching is done here

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, sampler: EpochShard,
                 steps_per_call: int | None = None) -> None:
        self.x, self.y, self.batch_size, self.sampler = x, y, batch_size, sampler
        self.steps_per_call = steps_per_call

    def __len__(self) -> int:
        batches = math.ceil(len(self.sampler) / self.batch_size)
        return batches if self.steps_per_call is None else math.ceil(batches / self.steps_per_call)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor] | StepBatches]:
        idx = self.sampler.indices()
        if self.sampler.shuffle:
            # views of one (n,) tensor; split() would give an empty one for an empty shard
            rows = idx.to(self.x.device).split(self.batch_size) if len(idx) else ()
        else:  # a contiguous block: slices, served as views
            lo, hi = (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0)
            rows = [slice(i, min(i + self.batch_size, hi)) for i in range(lo, hi, self.batch_size)]
        if self.steps_per_call is None:
            for batch_rows in rows:
                yield gather(self.x, self.y, batch_rows)
        else:
            for i in range(0, len(rows), self.steps_per_call):
                yield StepBatches(self.x, self.y, rows[i:i + self.steps_per_call])


