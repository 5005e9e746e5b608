"""The streaming engine: plans the tensors, checks the inputs, streams each tensor through a method on a device,
and writes size-capped shards atomically together with config, tokenizer and a model card."""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from unmerge.checkpoint import Checkpoint, ShardedWriter, atomic_output_dir, sha256_file, write_json_atomic
from unmerge.errors import CheckpointError, MethodError, StatisticError, UnmergeError
from unmerge.methods import Method, TensorTask, get_method
from unmerge.methods.params import ParamPlan
from unmerge.stats import Statistic
from unmerge.stats.gram import LAYER_STAT_FACTORS, layer_stat_names, module_of

log = logging.getLogger(__name__)

COPIED_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")
TIED_HEADS = {"lm_head.weight": ("transformer.wte.weight", "model.embed_tokens.weight", "embed_tokens.weight")}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MethodError("--device cuda was asked for but no CUDA device is available", "use --device auto or cpu")
    return torch.device(device)


def checkpoint_hash(ckpt: Checkpoint) -> str:
    """sha256 over the weight files of a checkpoint ('file sha' lines in order); each file's sha256 is computed once
    per file version (``sha256_file(cached=True)``)."""
    import hashlib

    digest = hashlib.sha256()
    for file in ckpt.files():
        digest.update(f"{file.name} {sha256_file(file, cached=True)}\n".encode())
    return digest.hexdigest()


@dataclass
class MergeResult:
    out_dir: Path
    method: str
    params: dict[str, Any]
    totals: dict[str, float] = field(default_factory=dict)
    per_tensor: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def _tied_skips(ckpt: Checkpoint) -> dict[str, str]:
    """Names that duplicate another tensor (tied heads): merged once, recorded, not re-stored."""
    config = ckpt.config or {}
    if not config.get("tie_word_embeddings", True):
        return {}
    skips = {}
    for head, embeddings in TIED_HEADS.items():
        for emb in embeddings:
            if head in ckpt and emb in ckpt and ckpt.meta(head)[0] == ckpt.meta(emb)[0]:
                skips[head] = emb
    return skips


def check_compatible(reference: Checkpoint, others: list[Checkpoint], names: list[str]) -> None:
    """Same architecture, vocabulary size, tensor names and shapes; errors name the tensor and both models."""
    ref_cfg = reference.config or {}
    for other in others:
        cfg = other.config or {}
        for key in ("architectures", "vocab_size", "model_type"):
            if key in ref_cfg and key in cfg and ref_cfg[key] != cfg[key]:
                raise CheckpointError(
                    f"'{other.path}' has {key} = {cfg[key]!r} but '{reference.path}' has {ref_cfg[key]!r}",
                    "merge only models fine-tuned from the same base (same architecture and tokenizer)",
                )
        for name in names:
            if name not in other:
                raise CheckpointError(f"tensor '{name}' is in '{reference.path}' but missing from '{other.path}'",
                                      "the models must have the same parameters")
            if other.meta(name)[0] != reference.meta(name)[0]:
                raise CheckpointError(
                    f"tensor '{name}' has shape {list(other.meta(name)[0])} in '{other.path}' but "
                    f"{list(reference.meta(name)[0])} in '{reference.path}'",
                    "the models must share the architecture and vocabulary",
                )


def required_stats(method: Method, params: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The statistic kinds a merge needs: ``method.stats``, or, for a method whose needs depend on its parameters
    (a ``stats_for(params)`` attribute, e.g. ``mats`` and its ``objective``), what it says for ``params``."""
    stats_for = getattr(method, "stats_for", None)
    if stats_for is None:
        return method.stats
    return tuple(stats_for({**method.defaults(), **method.canonical_params(params or {})}))


def check_statistic(stat: Statistic, model: Checkpoint, names: list[str], model_hash: str | None, force: bool,
                    kind: str = "fisher") -> None:
    """A statistic must belong to its model: the recorded model hash, and the same float tensor names and shapes
    (per-parameter statistics) or, for per-layer ones (Gram, K-FAC), square factors for some of its weights."""
    if kind in LAYER_STAT_FACTORS:
        _check_layer_statistic(stat, model, names, kind)
        names = []
    for name in names:
        if name not in stat:
            raise StatisticError(f"statistic '{stat.path}' has no tensor '{name}' of model '{model.path}'",
                                 "compute the statistic for this model")
        if stat.checkpoint.meta(name)[0] != model.meta(name)[0]:
            raise StatisticError(
                f"statistic '{stat.path}' has shape {list(stat.checkpoint.meta(name)[0])} for '{name}', the model "
                f"'{model.path}' has {list(model.meta(name)[0])}", "compute the statistic for this model")
    recorded = stat.meta.get("model_hash")
    if recorded and model_hash and recorded != model_hash and not force:
        raise StatisticError(
            f"statistic '{stat.path}' was computed for another model (hash {recorded[:12]}…, "
            f"'{model.path}' is {model_hash[:12]}…)", "compute it for this model, or pass --force to use it anyway")


def _check_layer_statistic(stat: Statistic, model: Checkpoint, names: list[str], kind: str) -> None:
    if stat.meta.get("kind", kind) != kind:
        raise StatisticError(f"statistic '{stat.path}' is a '{stat.meta['kind']}' statistic, given as '{kind}'",
                             f"compute it with `unmerge stats MODEL DATA OUT --kind {kind}`")
    found = 0
    for name in names:
        for tensor in layer_stat_names(kind, name).values():
            if tensor not in stat:
                continue
            found += 1
            shape = list(stat.checkpoint.meta(tensor)[0])
            if len(shape) != 2 or shape[0] != shape[1]:
                raise StatisticError(f"statistic '{stat.path}' has shape {shape} for '{tensor}', not a square matrix",
                                     f"re-estimate it with `unmerge stats --kind {kind}`")
    if not found:
        raise StatisticError(f"statistic '{stat.path}' has no '{kind}' factor for any weight of model '{model.path}'",
                             f"compute it for this model with `unmerge stats --kind {kind}`")


def _float_names(ckpt: Checkpoint, names: list[str]) -> list[str]:
    return [n for n in names if ckpt.meta(n)[1].is_floating_point]


def merge_checkpoints(
    method: str | Method,
    base: Checkpoint | None,
    models: list[Checkpoint],
    out_dir: str | Path,
    *,
    params: dict[str, Any] | None = None,
    model_params: list[dict[str, Any]] | None = None,
    stats: dict[str, list[Statistic]] | None = None,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    tokenizer_source: Checkpoint | None = None,
    force: bool = False,
    progress: bool = True,
    description: dict[str, Any] | None = None,
) -> MergeResult:
    """Merge ``models`` (onto ``base``) with a registered method, streaming one tensor at a time."""
    start = time.perf_counter()
    method = get_method(method) if isinstance(method, str) else method
    stats = stats or {}
    if method.needs_base and base is None:
        raise MethodError(f"method '{method.name}' needs a base model", "set base_model")
    if len(models) < method.min_models or (method.max_models and len(models) > method.max_models):
        most = method.max_models or "any number of"
        raise MethodError(f"method '{method.name}' takes {method.min_models} to {most} models, got {len(models)}")
    for kind in required_stats(method, params):
        want = 1 if kind.startswith("base_") else len(models)
        if len(stats.get(kind, [])) != want:
            raise StatisticError(f"method '{method.name}' needs {want} '{kind}' statistic(s), got "
                                 f"{len(stats.get(kind, []))}", f"pass --{kind.replace('_', '-')} paths")
    reference = base or models[0]
    n_layers = (reference.config or {}).get("num_hidden_layers") or (reference.config or {}).get("n_layer")
    plan = ParamPlan.build(method, params, model_params or [{} for _ in models], n_layers)
    _fill_counts_from_stats(plan, stats)
    extra_inputs = _checkpoint_params(plan)
    skips = _tied_skips(reference)
    names = [n for n in reference.names() if n not in skips]
    check_compatible(reference, [m for m in models if m is not reference], names)
    float_names = _float_names(reference, names)

    # The sha256 of every input goes into the model card. Statistics are checked against their model's hash before
    # any compute; otherwise the hashing (I/O and SHA, which releases the GIL) overlaps the merge on a thread.
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unmerge-hash")
    pending_hashes = hasher.submit(lambda: {str(c.path): checkpoint_hash(c)
                                            for c in ([base] if base else []) + models + extra_inputs})
    hasher.shutdown(wait=False)
    hashes = pending_hashes.result() if stats else {}
    for kind, items in stats.items():
        owners = [base] if kind.startswith("base_") else models
        for stat, owner in zip(items, owners):
            check_statistic(stat, owner, float_names, hashes.get(str(owner.path)), force, kind)
            hashes[str(stat.path)] = checkpoint_hash(stat.checkpoint)

    dev = resolve_device(device)
    result = MergeResult(Path(out_dir), method.name, plan.as_dict())
    inputs = [c.directory for c in ([base] if base else []) + models + extra_inputs] + [
        s.checkpoint.directory for v in stats.values() for s in v]
    any_nonzero = {(kind, i): False for kind, items in stats.items() for i in range(len(items))}
    key_kind: dict[str, str] = {}  # task.stats key -> statistic kind ('kfac.A' -> 'kfac')

    def check_inputs(name: str, base_t: torch.Tensor | None, model_ts: list[torch.Tensor]) -> None:
        _check_finite(name, ([base] if base else []) + models, ([base_t] if base else []) + model_ts)

    def load(name: str, check: bool = True
             ) -> tuple[torch.Tensor | None, list[torch.Tensor], dict[str, list[torch.Tensor]], dict]:
        """Tensors of ``name``; statistics under their ``task.stats`` keys (``layer_stat_names``: the parameter's
        own name, or ``<module>.<factor>`` for per-layer statistics, which exist for linear-layer weights only);
        and the description of the layer (from the per-layer statistics' metadata, e.g. its weight layout).
        ``check``: refuse NaN/Inf inputs here (unless the method propagates them to its output)."""
        base_t = base.get(name) if base else None
        model_ts = [m.get(name) for m in models]
        stat_ts, layer = {}, {}
        if name in float_names:
            if check and not method.propagates_nonfinite:
                check_inputs(name, base_t, model_ts)
            for kind, items in stats.items():
                for key, tensor in layer_stat_names(kind, name).items():
                    present = [tensor in s for s in items]
                    if not any(present) and kind in LAYER_STAT_FACTORS:
                        continue
                    if not all(present):
                        where = items[present.index(False)].path
                        raise StatisticError(f"statistic '{where}' has no '{tensor}' but the other '{kind}' "
                                             "statistics have it", "estimate every statistic on the same model")
                    stat_ts[key] = [s.get(tensor) for s in items]
                    key_kind[key] = kind
                    for s, t in zip(items, stat_ts[key]):
                        s.check_tensor(tensor, t)
                    if kind in LAYER_STAT_FACTORS and not layer:
                        layer = items[0].meta.get("layers", {}).get(module_of(name), {})
        return base_t, model_ts, stat_ts, layer

    uploader = _Uploader(dev) if dev.type == "cuda" else None
    # On the CPU a method's prepare step runs on the loader thread, which then also takes the inputs' page faults;
    # their NaN/Inf check moves to the merging thread (before ``fn``), which balances the two threads.
    check_after_prepare = uploader is None and method.prepare is not None and not method.propagates_nonfinite

    def to_device(loaded: tuple) -> tuple:
        """On CUDA, called on the prefetch thread: the input tensors go to the device through a small pinned staging
        buffer on a side stream (in their stored dtype; the float32 cast runs on the device), overlapping the
        previous tensor's math. The consumer waits for the copy (``wait_copied``). On the CPU the memory-mapped
        tensors pass through."""
        if uploader is None:
            return loaded
        base_t, model_ts, stat_ts, layer = loaded
        moved = (None if base_t is None else uploader(base_t), [uploader(t) for t in model_ts],
                 {k: [uploader(t) for t in v] for k, v in stat_ts.items()}, layer)
        return (*moved, uploader.done())

    def wait_copied(loaded: tuple) -> tuple:
        if uploader is None:
            return loaded
        *moved, event = loaded
        torch.cuda.current_stream(dev).wait_event(event)
        for t in ([moved[0]] if moved[0] is not None else []) + moved[1] + [x for v in moved[2].values() for x in v]:
            t.record_stream(torch.cuda.current_stream(dev))  # the copy stream's memory is used on this stream
        return tuple(moved)

    def make_task(name: str, base_t: torch.Tensor | None, model_ts: list[torch.Tensor],
                  stat_ts: dict[str, list[torch.Tensor]], layer: dict, context: dict[str, Any]) -> TensorTask:
        return TensorTask(
            name=name,
            base=None if base_t is None else base_t.to(dev, torch.float32),
            models=[t.to(dev, torch.float32) for t in model_ts],
            params=plan.for_tensor(name),
            stats={k: [t.to(dev, torch.float32) for t in v] for k, v in stat_ts.items()},
            # a weight with per-layer statistics comes with its layer's description (weight layout) for the method
            context={**context, "layer": layer} if layer else context,
        )

    context: dict[str, Any] = {}
    if method.prepass is not None and float_names:
        context = method.prepass(plan.for_tensor(float_names[0]),
                                 lambda: (make_task(n, *load(n), {}) for n in float_names))

    def prepared(task: TensorTask) -> TensorTask:
        if method.prepare is not None:
            task.prepared = method.prepare(task)
        return task

    def fetch(name: str) -> tuple[tuple, TensorTask | None]:
        """On the loader thread: the tensors of ``name``; on the CPU, for a float tensor of a method with a
        ``prepare`` step (e.g. TIES's top-k passes), also its prepared task, so that the step overlaps the previous
        tensor's ``fn`` (the float32 copies of non-float32 inputs are then made one tensor ahead). On CUDA the
        upload is queued instead and the task is made on the consuming stream."""
        loaded = to_device(load(name, check=not check_after_prepare))
        if uploader is not None or method.prepare is None or name not in float_names:
            return loaded, None
        try:
            return loaded, prepared(make_task(name, *loaded, context))
        except Exception:
            if check_after_prepare:  # a NaN/Inf input is named as such, not as whatever prepare made of it
                check_inputs(name, loaded[0], loaded[1])
            raise

    # every output tensor's shape and dtype are known up front: the writer streams each to its shard as it comes
    layout = [(n, reference.meta(n)[0], dtype if dtype is not None and n in float_names else reference.meta(n)[1])
              for n in names]
    with atomic_output_dir(out_dir, inputs=inputs, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes=max_shard_bytes, layout=layout)
        buffers = _OutputBuffers()
        with ThreadPoolExecutor(max_workers=1) as pool, _WriteBehind(writer) as behind:
            pending = pool.submit(fetch, names[0]) if names else None
            for i, name in enumerate(tqdm(names, desc=f"merge:{method.name}", disable=not progress, unit="tensor")):
                loaded, task = pending.result()
                base_t, model_ts, stat_ts, layer = wait_copied(loaded)
                loaded = None
                pending = pool.submit(fetch, names[i + 1]) if i + 1 < len(names) else None
                if name not in float_names:
                    behind.add(name, base_t if base_t is not None else model_ts[0])
                    continue
                out_dtype = dtype or (base_t if base_t is not None else model_ts[0]).dtype
                for key, ts in stat_ts.items():
                    kind = key_kind[key]
                    for j, t in enumerate(ts):
                        if not any_nonzero[(kind, j)] and bool((t != 0).any()):
                            any_nonzero[(kind, j)] = True
                if check_after_prepare and not (task is not None and task.inputs_finite):
                    check_inputs(name, base_t, model_ts)
                task = task or prepared(make_task(name, base_t, model_ts, stat_ts, layer, context))
                if uploader is None:
                    task.out = buffers.take((base_t if base_t is not None else model_ts[0]).numel())
                merged = method.fn(task)
                record, buffer, proof, task = task.record, task.out, task.proof, None  # the inputs go now
                stored = merged.to(out_dtype)
                # finite as the kernels wrote it, and stored as written (a cast could overflow)
                proven = proof.finite and stored is merged
                recycle = buffers.give if buffer is not None and _same_memory(stored, buffer) else None
                buffer = None
                merged = None
                if not proven and not _all_finite(stored):  # checked as stored: a float16 overflow too
                    if method.propagates_nonfinite:  # the inputs were not checked on the way in: name the culprit
                        check_inputs(name, base_t, model_ts)
                    raise MethodError(f"method '{method.name}' produced NaN/Inf in '{name}' (stored as "
                                      f"{stored.dtype})", "check the inputs for NaN/Inf and the method parameters; "
                                      "a float16 output overflows above 65504: choose dtype bfloat16 or float32")
                behind.add(name, stored, recycle)
                stored = None  # (written, or queued for writing: at most _WriteBehind.QUEUE bytes of them)
                if record:
                    result.per_tensor[name] = record
        for (kind, j), seen in any_nonzero.items():
            if not seen:
                raise StatisticError(f"statistic '{stats[kind][j].path}' ('{kind}') is zero everywhere",
                                     "it was estimated on no data or is corrupt: re-estimate it on non-empty data")
        writer.finish()
        hashes.update(pending_hashes.result())
        _copy_side_files(reference, tokenizer_source or base or models[0], tmp)
        result.totals = _totals(result.per_tensor)
        for head, emb in skips.items():
            result.per_tensor.setdefault(head, {})["tied_to"] = emb
        result.seconds = time.perf_counter() - start
        info = {"method": method.name, "formula": method.formula, "params": plan.as_dict(), "inputs": hashes,
                "device": str(dev), "totals": result.totals, "tied": skips, "seconds": round(result.seconds, 3),
                "description": description or {}, "prepass": context, "per_tensor": result.per_tensor}
        write_json_atomic(tmp / "merge_info.json", info)
        (tmp / "README.md").write_text(_model_card(info))
    return result


class _WriteBehind:
    """Output tensors up to ``LIMIT`` bytes are written on a thread, in order, while the next tensors are merged, up
    to ``QUEUE`` bytes of them at a time; larger ones are written in place once the queue is empty (the writer is
    not used from two threads at once). So writing overlaps the math at the cost of at most ``QUEUE`` bytes held;
    a queue rather than one tensor absorbs the tensors whose merge is quicker than their write (measured, TIES on
    the 1 GB bench job in-process: the merging thread's wait for the writer 0.54-0.63 → 0.27-0.34 s)."""

    LIMIT = 64 * 1024**2
    QUEUE = 64 * 1024**2

    def __init__(self, writer: ShardedWriter):
        self.writer = writer
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unmerge-write")
        self.pending: list[tuple[Any, int]] = []  # (future, bytes), oldest first

    def add(self, name: str, tensor: torch.Tensor, written: Callable[[torch.Tensor], None] | None = None) -> None:
        """Write ``tensor`` (behind, or now if large); then ``written(tensor)``, if given."""
        size = tensor.numel() * tensor.element_size()
        behind = size <= self.LIMIT
        while self.pending and (not behind or sum(b for _, b in self.pending) + size > self.QUEUE):
            self.pending.pop(0)[0].result()

        def write() -> None:
            self.writer.add(name, tensor)
            if written is not None:
                written(tensor)

        if behind:
            self.pending.append((self.pool.submit(write), size))
        else:
            write()

    def wait(self) -> None:
        while self.pending:
            self.pending.pop(0)[0].result()

    def __enter__(self) -> "_WriteBehind":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()


class _OutputBuffers:
    """Float32 output buffers (``TensorTask.out``) recycled once written: fresh memory costs a page fault and the
    zeroing of every 4 KB page on first write (measured: about twice the time of filling a reused buffer), and a
    merge repeats a few tensor sizes. Holds at most ``KEEP`` free buffers of a size and, dropping the least recently
    returned first, no more free elements than the largest tensor seen: the peak grows with the largest tensor, not
    with the model."""

    KEEP = 4  # those being written behind (a queue of them) while the next of the same size is merged

    def __init__(self) -> None:
        self.free: list[torch.Tensor] = []  # least recently returned first
        self.lock = threading.Lock()
        self.largest = 0

    def take(self, numel: int) -> torch.Tensor:
        """A flat float32 buffer of ``numel`` elements (recycled if one is free; its contents are arbitrary)."""
        with self.lock:
            self.largest = max(self.largest, numel)
            for i in range(len(self.free) - 1, -1, -1):
                if self.free[i].numel() == numel:
                    return self.free.pop(i)
        return torch.empty(numel, dtype=torch.float32)

    def give(self, tensor: torch.Tensor) -> None:
        """Take back a written output (the buffer handed out, or a view of all of it)."""
        flat = tensor.reshape(-1)
        with self.lock:
            if sum(t.numel() == flat.numel() for t in self.free) < self.KEEP:
                self.free.append(flat)
            while sum(t.numel() for t in self.free) > self.largest:
                self.free.pop(0)


def _same_memory(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether ``tensor`` is the whole of ``buffer`` (the method wrote its output into the buffer it was given)."""
    return (tensor.dtype == buffer.dtype and tensor.device == buffer.device and tensor.numel() == buffer.numel()
            and tensor.is_contiguous() and tensor.data_ptr() == buffer.data_ptr())


class _Uploader:
    """Host → device copies through two pinned staging buffers (``STAGE`` bytes each) on a side stream: pinned
    memory stays bounded whatever the tensor sizes, and filling one buffer (reading the memory-mapped input)
    overlaps the device copy from the other."""

    STAGE = 32 * 1024**2

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.buffers = [torch.empty(self.STAGE, dtype=torch.uint8).pin_memory() for _ in range(2)]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
        if not tensor.numel():
            return out
        src = tensor.contiguous().reshape(-1).view(torch.uint8)
        dst = out.reshape(-1).view(torch.uint8)
        with torch.cuda.stream(self.stream):
            for start in range(0, src.numel(), self.STAGE):
                end = min(src.numel(), start + self.STAGE)
                slot = self.turn
                self.turn ^= 1
                if self.events[slot] is not None:
                    self.events[slot].synchronize()  # that buffer's previous copy is done
                staging = self.buffers[slot][: end - start]
                staging.copy_(src[start:end])
                dst[start:end].copy_(staging, non_blocking=True)
                self.events[slot] = torch.cuda.Event()
                self.events[slot].record(self.stream)
        return out

    def done(self) -> "torch.cuda.Event":
        """An event after every copy queued so far (for the consuming stream to wait on)."""
        event = torch.cuda.Event()
        event.record(self.stream)
        return event


def _check_finite(name: str, ckpts: list[Checkpoint], tensors: list[torch.Tensor]) -> None:
    """Refuse an input tensor with NaN/Inf, naming the file and the tensor (a method could hide or spread it)."""
    for ckpt, tensor in zip(ckpts, tensors):
        if not _all_finite(tensor):
            raise CheckpointError(f"tensor '{name}' in '{ckpt.file_of(name)}' has NaN or Inf values",
                                  "the checkpoint is corrupt or its training diverged: use another checkpoint")


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/Inf. float32 on the CPU: a native |x| <= FLT_MAX test per value; else a finite sum proves it in one
    read without a mask, and only an overflowing sum is checked in full."""
    if not tensor.is_floating_point() or not tensor.numel():
        return True
    from unmerge.methods import native
    from unmerge.methods.kernels import map_chunks

    flat = tensor.reshape(-1)  # chunked sums (a sum in another dtype would first copy the whole tensor)
    if native.usable(flat):  # float32: one native test per value
        return all(map_chunks(lambda s, e: native.all_finite(flat[s:e]), flat.numel(), flat))
    if all(map_chunks(lambda s, e: bool(torch.isfinite(flat[s:e].sum())), flat.numel(), flat)):
        return True
    return all(map_chunks(lambda s, e: bool(torch.isfinite(flat[s:e]).all()), flat.numel(), flat))


def _checkpoint_params(plan: ParamPlan) -> list[Checkpoint]:
    """The checkpoints named by ``input_checkpoint`` parameters (global values; a missing one is an error here,
    before any compute)."""
    found = []
    for param in plan.method.params:
        value = plan.global_values.get(param.name) if param.input_checkpoint else None
        if not value:
            continue
        try:
            found.append(Checkpoint(value))
        except UnmergeError as exc:
            raise MethodError(f"parameter '{param.name}' of method '{plan.method.name}': {exc.message}",
                              exc.hint) from exc
    return found


def _fill_counts_from_stats(plan: ParamPlan, stats: dict[str, list[Statistic]]) -> None:
    """Defaults for N₀ / N_f / per-model N (``n_base`` / ``n_forget`` / ``n``) come from the statistics' recorded N."""
    params = {p.name: p for p in plan.method.params}
    for name, kind in (("n_base", "base_fisher"), ("n_forget", "fisher"), ("n", "fisher")):
        if name not in params or plan.global_values.get(name) is not None or not stats.get(kind):
            continue
        if params[name].per_model:
            for values, stat in zip(plan.model_values, stats[kind]):
                if values.get(name) is None:
                    values[name] = _recorded_n(stat, name)
        else:
            plan.overrides[name] = _recorded_n(stats[kind][0], name)


def _recorded_n(stat: Statistic, param: str) -> float:
    if stat.n is None:
        raise StatisticError(f"statistic '{stat.path}' records no N", f"pass {param} explicitly")
    return stat.n


def _totals(per_tensor: dict[str, dict[str, Any]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for record in per_tensor.values():
        for key, value in record.items():
            if isinstance(value, (int, float)) and key in ("numel", "clamped", "nonpositive", "floored"):
                totals[key] = totals.get(key, 0) + value
    if totals.get("numel"):
        totals["clamped_fraction"] = totals.get("clamped", 0) / totals["numel"]
    return totals


def _copy_side_files(reference: Checkpoint, tokenizer_source: Checkpoint, out: Path) -> None:
    for name in COPIED_FILES:
        if (reference.directory / name).exists():
            shutil.copy2(reference.directory / name, out / name)
    for name in TOKENIZER_FILES:
        if (tokenizer_source.directory / name).exists():
            shutil.copy2(tokenizer_source.directory / name, out / name)


def _model_card(info: dict[str, Any]) -> str:
    """README.md of a merge: method, formula, the config exactly as given (when merged from one), the resolved
    parameters, the sha256 of every input (per checkpoint: sha256 of its ``<file> <sha256 of file>`` lines, in file
    order; ``sha256sum`` gives the per-file digests), tied tensors and diagnostics."""
    import yaml

    inputs = "\n".join(f"| `{path}` | `{digest}` |" for path, digest in info["inputs"].items())
    totals = json.dumps(info["totals"], indent=2) if info["totals"] else "{}"
    given = (info.get("description") or {}).get("merge_config")
    config = f"## Configuration (as given)\n```yaml\n{yaml.safe_dump(given, sort_keys=False)}```\n\n" if given else ""
    tied = "".join(f"- `{head}` is tied to `{emb}` (stored once)\n" for head, emb in info.get("tied", {}).items())
    tied = f"## Tied tensors\n{tied}\n" if tied else ""
    return (
        f"# Merged with unmerge: `{info['method']}`\n\n"
        f"Formula: `{info['formula']}`\n\n"
        f"{config}"
        f"## Parameters\n```json\n{json.dumps(info['params'], indent=2, default=str)}\n```\n\n"
        f"## Inputs (sha256 of weight files)\n| input | sha256 |\n|---|---|\n{inputs}\n\n"
        f"{tied}"
        f"## Diagnostics\n```json\n{totals}\n```\n\nDevice: {info['device']}; {info['seconds']} s.\n"
    )
