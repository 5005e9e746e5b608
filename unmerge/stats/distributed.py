"""Data parallelism for statistics and training outputs (``accelerate launch`` / ``torchrun``), at the level of
"examples in, means and counts out".

With W processes the examples (after the estimator's own length filter) are cut into W contiguous shards,
rank r taking ``examples[b_r : b_{r+1}]`` with b_r = ⌊r·n/W⌋. Each process runs the single-process estimator on its
shard with ``offset = b_r``, the global index of its first example, so the per-example seeds of sampled labels
(``seed·1_000_003 + global index``) are exactly those of a single-process run. Every estimator returns a mean over
its count (examples or tokens); the means are combined as

    mean = Σ_r c_r · mean_r / Σ_r c_r        (one fp64 all-reduce per tensor, and one for the counts)

which is the single-process mean up to summation order. Only the main process writes outputs; the others wait
for it and receive what it returned (or its error). With one process every function here is a pass-through, so a
single-process run is byte-identical to one without this module.

The process group is accelerate's ``PartialState`` (gloo on CPU, NCCL on GPUs), created only when ``WORLD_SIZE``
> 1; the transformers Trainer uses the same state.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch

from unmerge.errors import StatisticError, UnmergeError

T = TypeVar("T")
Examples = list[list[int]]


@dataclass(frozen=True)
class Processes:
    """This process's place among the data-parallel processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def world_size() -> int:
    """The number of data-parallel processes launched (``WORLD_SIZE``; 1 when not launched), without joining them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_process_batch(batch_size: int) -> int:
    """A global batch of ``batch_size`` examples split evenly over the processes (an error if it does not divide)."""
    world = world_size()
    if batch_size % world:
        raise UnmergeError(f"batch size {batch_size} does not split over {world} processes",
                           f"use a multiple of {world} (the batch size is the global batch, over all processes)")
    return batch_size // world


def processes() -> Processes:
    """Rank and world size; initialises the process group (accelerate ``PartialState``) when launched with > 1:
    gloo on CPUs (no CUDA, or ``ACCELERATE_USE_CPU``), else NCCL with this process's GPU as the current device."""
    if world_size() <= 1:
        return Processes()
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    state = PartialState(cpu=cpu)
    return Processes(state.process_index, state.num_processes)


def shard_bounds(n: int, world: int) -> list[int]:
    """b_0 = 0 ≤ b_1 ≤ … ≤ b_W = n with b_r = ⌊r·n/W⌋ (shard sizes differ by at most one)."""
    return [r * n // world for r in range(world + 1)]


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Σ over processes of ``tensor`` (returned on its own device)."""
    import torch.distributed as dist

    work = tensor.to(_collective_device()).clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def data_parallel(compute: Callable[[Examples, int], tuple[dict[str, torch.Tensor], dict]], examples: Examples, *,
                  min_length: int, count: str | Callable[[str, dict], str],
                  summed: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], dict]:
    """``compute(shard, offset) -> (means, info)`` on this process's shard, combined over all processes.

    ``min_length``: the estimator's own filter (shorter examples are dropped), applied before sharding so that
    offsets index the list the single-process estimator would see. ``count``: the info key holding the count a mean
    is over, or ``(tensor name, info) -> key`` when it differs per tensor; these counts and the ``summed`` ones are
    summed over processes in the returned info."""
    procs = processes()
    if not procs.distributed:
        return compute(examples, 0)
    kept = [e for e in examples if len(e) >= min_length]
    if len(kept) < procs.world:
        raise StatisticError(f"{len(kept)} usable examples for {procs.world} processes",
                             "give at least one example per process, or launch fewer processes")
    bounds = shard_bounds(len(kept), procs.world)
    means, info = compute(kept[bounds[procs.rank] : bounds[procs.rank + 1]], bounds[procs.rank])
    count_of = count if callable(count) else (lambda name, _info: count)
    keys = {name: count_of(name, info) for name in means}
    # collectives are matched by call order: iterate in the same (sorted) order on every process
    totals = {key: float(all_reduce_sum(torch.tensor([float(info[key])], dtype=torch.float64)).item())
              for key in sorted(set(keys.values()) | set(summed))}
    for key in set(keys.values()):
        if totals[key] == 0:
            raise StatisticError(f"no example reached the estimator on any process ({key} = 0)",
                                 "give a non-empty dataset")
    combined = {}
    for name in sorted(means):
        tensor, key = means[name], keys[name]
        combined[name] = (all_reduce_sum(tensor.double() * float(info[key])) / totals[key]).to(tensor.dtype)
    info = {**info, **{key: int(total) for key, total in totals.items()}, "processes": procs.world}
    return {name: combined[name] for name in means}, info


def main_process_writes(write: Callable[[], T]) -> T:
    """Run ``write`` on the main process only; the others wait and get its result. An error on the main process
    is raised on every process (the others get an ``UnmergeError`` naming it), so none hangs."""
    procs = processes()
    if not procs.distributed:
        return write()
    import torch.distributed as dist

    box: list[Any] = [None]
    error: BaseException | None = None
    if procs.main:
        try:
            box[0] = ("ok", write())
        except BaseException as exc:  # re-raised below, after the others have been told
            error = exc
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise UnmergeError(f"the main process failed while writing: {value}", "see the main process's output")
    return value
