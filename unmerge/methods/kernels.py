"""Streaming building blocks for the per-tensor methods: chunked element-wise loops and an exact, memory-lean
order statistic of |τ| = |θ_t − θ₀|.

Why chunks: a method receives whole tensors (on the CPU, memory-mapped from the safetensors files, so reading them
costs no anonymous memory). Whole-tensor expressions such as ``((models - base) * w * mask).sum(0)`` materialise
several float copies of the largest tensor (an embedding is often 10% of a model); looping over slices of
``CPU_CHUNK`` elements keeps the temporaries in cache and the peak memory at one output tensor plus a few chunks.
The chunks run on a small pool of threads that each run torch single-threaded (:func:`map_chunks`): the chunks are
the parallelism, and no op pays OpenMP's fork/join, which on a small or busy machine costs more than the arithmetic
(measured on 2 shared cores: a chunked TIES with 2 OpenMP threads per op ran 4-25x slower than single-threaded
ops). Inside those threads the kernels use float ops (``hardshrink``, ``sign``, ``relu``, ``mul``) rather than
comparisons to bool and ``where``, which are several times slower per element on the CPU. Where a C compiler is
available the float32 loops run fused instead (:mod:`unmerge.methods.native`, bitwise the same results). On CUDA,
chunks are large (launch overhead dominates there, and device memory holds the whole tensor anyway) and run in
order.

Why not ``torch.topk``/``sort``/``kthvalue`` on the whole tensor: each copies it (and ``topk`` with k ≈ n/2 is
slower than a full sort). :func:`kth_largest_abs` draws a fixed-seed sample of |τ| to bracket the wanted rank,
makes one streaming pass that counts the entries above the bracket and keeps the few inside it, and finishes with
an exact selection on those. The answer is exact whatever the sample: if the rank falls outside the bracket
(unlucky sample, or a mass of equal magnitudes), it falls back to an exact two-pass radix select over the float32
bit patterns (float32) or to a whole-tensor ``kthvalue`` (other dtypes).
"""
from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch

from unmerge.methods import native

Tensor = torch.Tensor

CPU_CHUNK = 1 << 18  # elements per chunk on the CPU (1 MB of float32: temporaries stay in cache)
CUDA_CHUNK = 1 << 26
SAMPLE = 1 << 16  # sample size used to bracket an order statistic (a quarter of it below SAMPLE_LARGE elements)
SAMPLE_LARGE = 1 << 23
SMALL = 1 << 16  # tensors this small are selected directly
_SAMPLE_SEED = 0x5EED


def chunk_size(t: Tensor) -> int:
    return CPU_CHUNK if t.device.type == "cpu" else CUDA_CHUNK


def spans(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


T = TypeVar("T")
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def cpu_workers() -> int:
    """Chunk workers on the CPU: torch's thread count (``torch.set_num_threads`` / OMP_NUM_THREADS), capped by the
    cores this process may use. Inside a pool thread (one torch thread) this is 1, so nested loops run inline."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cores))


def _forget_pool() -> None:  # a forked child has the pool object but not its threads
    global _POOL, _POOL_SIZE
    _POOL, _POOL_SIZE = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _pool(size: int) -> ThreadPoolExecutor:
    """A process-wide pool whose threads each run torch single-threaded: the chunks are the parallelism, so no op
    pays OpenMP's fork/join (which, with every core busy, can cost more than the arithmetic). The pool's threads
    set their own thread count; the process-wide default that new threads inherit is restored."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE != size:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            saved = torch.get_num_threads()
            barrier = threading.Barrier(size)

            def init() -> None:
                torch.get_num_threads()  # initialise this thread's torch threading state first
                torch.set_num_threads(1)

            pool = ThreadPoolExecutor(size, thread_name_prefix="unmerge-chunk", initializer=init)
            list(pool.map(lambda _: barrier.wait(), range(size)))  # start (and initialise) every thread now
            torch.set_num_threads(saved)
            _POOL, _POOL_SIZE = pool, size
        return _POOL


def map_chunks(fn: Callable[[int, int], T], n: int, like: Tensor, chunk: int | None = None) -> list[T]:
    """``[fn(start, end) for each chunk of range(n)]``, in order; on the CPU the chunks run on :func:`_pool`."""
    ranges = list(spans(n, chunk or chunk_size(like)))
    workers = cpu_workers()
    if like.device.type != "cpu" or workers == 1 or (len(ranges) == 1 and n <= 32768):
        return [fn(s, e) for s, e in ranges]
    return list(_pool(workers).map(lambda r: fn(*r), ranges))


def run_tasks(tasks: list[Callable[[], T]], like: Tensor) -> list[T]:
    """``[task() for task in tasks]``; on the CPU on :func:`_pool`'s single-threaded workers (small ops such as a sort
    of a sample would otherwise fork OpenMP threads from the calling thread)."""
    if like.device.type != "cpu" or cpu_workers() == 1:
        return [task() for task in tasks]
    return list(_pool(cpu_workers()).map(lambda task: task(), tasks))


def flat(t: Tensor) -> Tensor:
    """A 1-D view (a copy only for a non-contiguous input)."""
    return t.reshape(-1)


def output_buffer(like: Tensor, out: Tensor | None) -> Tensor:
    """``out`` (a caller's flat buffer of ``like``'s size and dtype, e.g. the engine's recycled ``TensorTask.out``),
    else a fresh tensor like the 1-D ``like``."""
    if out is None or out.numel() != like.numel() or out.dtype != like.dtype or out.device != like.device:
        return torch.empty_like(like)
    return out.reshape(-1)


def below(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value strictly below ``value``: ``|x| > below(v)`` is ``|x| ≥ v`` for ``dtype`` x."""
    v = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(v, torch.tensor(-math.inf, dtype=dtype)))


# ---------------------------------------------------------------------------------------------------- order statistic
@dataclass(frozen=True)
class Kth:
    """The k-th largest |τ| (``value``), how many entries are strictly above it and how many equal it."""

    value: float
    greater: int
    equal: int
    parts: tuple[Tensor, ...] | None = None  # the |τ| that may equal it, one part per chunk of ``chunk`` elements
    chunk: int = 0
    finite: bool = False  # every |τ| was seen finite on the way (which proves θ₀ and θ_t finite)


def kth_smallest(values: Tensor, ks: list[int]) -> list[float]:
    """The ks[j]-th smallest of a 1-D tensor (1-based, as ``torch.kthvalue``). On the CPU one numpy introselect
    for all of them (measured 1.2-10x faster than ``torch.kthvalue`` for 65K-550K float32 values)."""
    if not ks:
        return []
    if values.device.type != "cpu" or values.dtype == torch.bfloat16:  # (numpy has no bfloat16)
        return [float(torch.kthvalue(values, k).values) for k in ks]
    positions = [k - 1 for k in ks]
    selected = np.partition(values.detach().numpy(), positions)
    return [float(selected[p]) for p in positions]


def sample_bracket(sample: Tensor, rank: float, floor_value: float) -> tuple[float, float]:
    """(low, high) values of a sample around its ascending position ``rank`` (fractional): ±6 binomial standard
    deviations + 8 positions; ``floor_value`` / inf where the bracket passes an end of the sample."""
    size = sample.numel()
    p = min(max(rank / size, 1e-9), 1 - 1e-9)
    spread = 6.0 * math.sqrt(size * p * (1 - p)) + 8
    low_pos, high_pos = math.floor(rank - spread), math.ceil(rank + spread)
    inside = [pos + 1 for pos in (low_pos, high_pos) if 0 <= pos < size]
    found = iter(kth_smallest(sample, inside))
    low = floor_value if low_pos < 0 else next(found)
    high = math.inf if high_pos >= size else next(found)
    return low, high


def _direct(a: Tensor, k: int, chunk: int = 0) -> Kth:
    """The k-th largest of a 1-D tensor with its counts; on the CPU (not bfloat16) counted on numpy's partitioned
    copy: the entries after the selected one are ≥ it, those before ≤ it, so each side needs one comparison (a NaN,
    which numpy orders last, counts as greater)."""
    parts = (a,) if a.numel() <= chunk else None
    if a.device.type != "cpu" or a.dtype == torch.bfloat16:
        v = kth_smallest(a, [a.numel() - k + 1])[0]
        return Kth(v, int(torch.count_nonzero(a > v)), int(torch.count_nonzero(a == v)), parts, chunk)
    position = a.numel() - k
    ordered = np.partition(a.detach().numpy(), position)
    v = ordered[position]
    equal_above = int(np.count_nonzero(ordered[position + 1:] == v))
    equal = equal_above + 1 + int(np.count_nonzero(ordered[:position] == v))
    return Kth(float(v), k - 1 - equal_above, equal, parts, chunk)


@functools.lru_cache(maxsize=16)
def sample_positions(n: int) -> Tensor:
    """The fixed-seed sample of flat positions (in address order) that brackets an order statistic of a tensor of
    ``n`` elements: ``SAMPLE`` of them from ``SAMPLE_LARGE`` elements on, a quarter of that below (a bigger sample
    narrows the bracket but costs more). Cached: a model repeats a few tensor sizes."""
    size = SAMPLE if n >= SAMPLE_LARGE else SAMPLE // 4
    return torch.randint(0, n, (size,), generator=torch.Generator().manual_seed(_SAMPLE_SEED)).sort().values


def kth_largest_abs(base: Tensor, models: list[Tensor], ks: list[int]) -> list[Kth | None]:
    """For each model t, the ks[t]-th largest |θ_t − θ₀| over the whole tensor (None where ks[t] ∉ [1, n]).

    One streaming pass over all models together; memory: a sample and the entries inside each bracket.
    """
    b = flat(base)
    ms = [flat(m) for m in models]
    n = b.numel()
    out: list[Kth | None] = [None] * len(ms)
    todo = [i for i, k in enumerate(ks) if 1 <= k <= n]
    if not todo:
        return out
    chunk = chunk_size(b)
    if n <= SMALL:
        for i in todo:
            out[i] = _direct((ms[i] - b).abs(), ks[i], chunk)
        return out

    positions = sample_positions(n).to(b.device)
    size = positions.numel()
    base_sample = b.index_select(0, positions)

    def bracket(i: int) -> tuple[float, float]:
        sample = ms[i].index_select(0, positions).sub_(base_sample).abs_()
        # around the ascending position of the wanted value in the sorted sample (zeros below it: see finish)
        return sample_bracket(sample, (n - ks[i]) / n * size, 0.0)

    brackets = dict(zip(todo, run_tasks([lambda i=i: bracket(i) for i in todo], b)))

    cap = max(n // 8, 4 * size)
    lock = threading.Lock()
    held = {i: 0 for i in todo}
    failed: set[int] = set()

    def scan(s: int, e: int) -> dict[int, tuple[int, Tensor, bool]]:
        found = {}
        going = [i for i in todo if i not in failed]
        for i, (count, band, finite) in zip(going, band_scan(b[s:e], [ms[i][s:e] for i in going],
                                                             [brackets[i] for i in going])):
            with lock:
                held[i] += band.numel()
                if held[i] > cap:
                    failed.add(i)
                    continue
            found[i] = (count, band, finite)
        return found

    parts = map_chunks(scan, n, b)
    above = {i: sum(p[i][0] for p in parts if i in p) for i in todo}
    inside = {i: [p[i][1] for p in parts if i in p] for i in todo}
    finite = {i: all(i in p and p[i][2] for p in parts) for i in todo}

    def finish(i: int) -> Kth:
        need = ks[i] - above[i]
        values = torch.cat(inside[i]) if inside[i] else b.new_empty(0)
        if i in failed or need < 1:
            return _exact(b, ms[i], ks[i])
        if need <= values.numel():
            found = _direct(values, need)
            return Kth(found.value, above[i] + found.greater, found.equal, tuple(inside[i]), chunk, finite[i])
        # at or below the bracket's low end: usually a mass of equal magnitudes there (zeros)
        low = brackets[i][0]
        at_low = _count_equal(b, ms[i], low)
        if need - values.numel() <= at_low:
            return Kth(low, above[i] + values.numel(), at_low, finite=finite[i])
        return _exact(b, ms[i], ks[i])

    ready = [i for i in todo if i not in failed and 1 <= ks[i] - above[i] <= sum(v.numel() for v in inside[i])]
    for i, kth in zip(ready, run_tasks([lambda i=i: finish(i) for i in ready], b)):
        out[i] = kth
    for i in todo:
        if i not in ready:
            out[i] = finish(i)  # (these start their own passes over the chunks)
    return out


def band_scan(b: Tensor, models: list[Tensor], brackets: list[tuple[float, float]]
              ) -> list[tuple[int, Tensor, bool]]:
    """For each model m and its bracket (low, high), over one chunk: (#{|m − b| > high}, the |m − b| with
    low < |m − b| ≤ high in position order, whether every |m − b| is known finite: the native scan checks it as it
    goes, the torch one does not). The native scan reads ``b`` once for all the models."""
    if native.usable(b, *models):
        return native.band_scan(b, models, [low for low, _ in brackets], [high for _, high in brackets])
    found = []
    for m, (low, high) in zip(models, brackets):
        magnitude = torch.sub(m, b).abs_()
        over = magnitude > high
        found.append((int(torch.count_nonzero(over)), magnitude[(magnitude > low) ^ over], False))
    return found


def _count_equal(b: Tensor, m: Tensor, value: float) -> int:
    return sum(map_chunks(lambda s, e: int(torch.count_nonzero((m[s:e] - b[s:e]).abs_() == value)), b.numel(), b))


def _exact(b: Tensor, m: Tensor, k: int) -> Kth:
    """Exact fallback: radix select on float32 bit patterns (two streaming passes), else whole-tensor kthvalue."""
    if b.dtype != torch.float32:
        return _direct((m - b).abs(), k)
    return radix_kth_largest(lambda: ((m[s:e] - b[s:e]).abs_() for s, e in spans(b.numel(), chunk_size(b))), k)


_HIGH_BINS, _LOW_BINS = 1 << 15, 1 << 16


def _locate(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and that element's rank k' (from the top) inside the bin."""
    from_top = hist.flip(0).cumsum(0)
    pos = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype)))
    bin_ = hist.numel() - 1 - pos
    return bin_, k - int(from_top[pos] - hist[bin_])


def float_bits(magnitudes: Tensor) -> Tensor:
    """IEEE-754 bit patterns of non-negative float32 values (they order like the values), as int32."""
    return magnitudes.float().contiguous().view(torch.int32).reshape(-1)


def radix_histograms(streams: Callable[[], Iterator[list[Tensor | None]]], ks: list[int]) -> list[float]:
    """Exact ks[t]-th largest value of stream t, several streams at once (each item: one chunk per stream,
    non-negative float32, None to skip). Two passes: a histogram of the high 16 bits locates the bin, one of the
    low 16 bits inside it pins the value. Memory: two histograms per stream. ``inf`` where k < 1."""
    count = len(ks)
    high = [torch.zeros(_HIGH_BINS, dtype=torch.long) for _ in range(count)]
    for chunks in streams():
        for i, a in enumerate(chunks):
            if a is not None and a.numel():
                high[i] += torch.bincount(float_bits(a) >> 16, minlength=_HIGH_BINS).cpu()
    targets = []
    for hist, k in zip(high, ks):
        k = min(int(hist.sum()), k)
        targets.append(_locate(hist, k) if k > 0 else None)
    low = [torch.zeros(_LOW_BINS, dtype=torch.long) for _ in range(count)]
    if any(t is not None for t in targets):
        for chunks in streams():
            for i, a in enumerate(chunks):
                if targets[i] is None or a is None or not a.numel():
                    continue
                bits = float_bits(a)
                inside = bits[(bits >> 16) == targets[i][0]]
                if inside.numel():
                    low[i] += torch.bincount(inside & 0xFFFF, minlength=_LOW_BINS).cpu()
    out = []
    for target, hist in zip(targets, low):
        if target is None:
            out.append(math.inf)
            continue
        high_bin, rank = target
        low_bin, _ = _locate(hist, rank)
        out.append(float(torch.tensor([(high_bin << 16) | low_bin], dtype=torch.int32).view(torch.float32)))
    return out


def radix_kth_largest(stream: Callable[[], Iterator[Tensor]], k: int) -> Kth:
    """Exact k-th largest of a stream of non-negative float32 chunks, with the counts above and equal to it."""
    value = radix_histograms(lambda: ([a] for a in stream()), [k])[0]
    greater = equal = 0
    for a in stream():
        greater += int(torch.count_nonzero(a > value))
        equal += int(torch.count_nonzero(a == value))
    return Kth(value, greater, equal)
