"""``unmerge bench merge``: synthetic Llama-shaped fp32 checkpoints of a given size, merged by unmerge's streaming
engine, compared in the same run with the I/O floor (read every byte of every input once, write one output) and,
when available, with ``mergekit-yaml`` on the same job.

Every job runs in its own child process (imports included), monitored for wall time, peak RSS and peak anonymous
memory (``RssAnon``: memory-mapped input pages are reclaimable page cache and count in RSS only; see
``unmerge.bench.monitor``). The 1-minute load average when each job starts is printed too: on a shared machine it
explains most of the run-to-run spread, and each job's CPU time (user + system, all threads) is printed beside its
wall time as the load-independent cost.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from unmerge.bench.monitor import JobFigures, median_run, python_job, run_monitored
from unmerge.checkpoint import Checkpoint, ShardedWriter, write_json_atomic


def llama_shape(total_bytes: int, hidden: int = 1024) -> dict:
    """A LlamaConfig whose fp32 weights take about ``total_bytes`` (layers added until the size is reached)."""
    inter, vocab = hidden * 4, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((total_bytes / 4 - fixed) / per_layer))
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 64, "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32"}


def llama_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    names = [("model.embed_tokens.weight", (v, h))]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        names += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        names += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                  (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                  (p + "post_attention_layernorm.weight", (h,))]
    return names + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_synthetic(directory: Path, config: dict, seed: int, base: Path | None = None) -> None:
    """A checkpoint: random base, or base + small seeded noise (a stand-in fine-tune), sharded at 500 MB."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = llama_tensors(config)
    writer = ShardedWriter(directory, max_shard_bytes=500 * 1024**2,
                           layout=[(name, shape, torch.float32) for name, shape in specs])
    gen = torch.Generator().manual_seed(seed)
    base_ckpt = Checkpoint(base) if base else None
    for name, shape in specs:
        tensor = torch.randn(shape, generator=gen) * 0.02
        writer.add(name, base_ckpt.get(name) + 0.1 * tensor if base_ckpt else tensor)
    writer.finish()
    write_json_atomic(directory / "config.json", config)


# Read every byte of every input once, each into a reused buffer (as a read() would), and write the first input's
# copy as the output, with the same streaming writer the merge uses: like a merge's output, the bytes written are
# ones this process wrote. With "mapped" (a reference row, not the floor) the first input's memory-mapped pages are
# written instead, which skips making the output; on some virtual machines the kernel copies such clean file pages
# several times faster than freshly written memory.
FLOOR_CODE = """
import sys
from pathlib import Path
import torch
from unmerge.checkpoint import Checkpoint, ShardedWriter
inputs = [Checkpoint(p) for p in sys.argv[1].split(",")]
out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
mapped = sys.argv[3] == "mapped"
names = inputs[0].names()
writer = ShardedWriter(out, layout=[(n, *inputs[0].meta(n)) for n in names])
buffers = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]  # the output's bytes; the others'
for name in names:
    tensors = [c.get(name) for c in inputs]
    size = tensors[0].numel() * tensors[0].element_size()
    for i, t in enumerate(tensors[1:] if mapped else tensors, start=int(mapped)):
        slot = min(i, 1)
        if buffers[slot].numel() < size:
            buffers[slot] = torch.empty(size, dtype=torch.uint8)
        buffers[slot][:size].copy_(t.reshape(-1).view(torch.uint8))
    writer.add(name, tensors[0] if mapped else buffers[0][:size].view(tensors[0].dtype).view(tensors[0].shape))
writer.finish()
"""

OURS_CODE = """
import sys, json
from unmerge.merge_config import merge
merge(json.loads(sys.argv[1]), sys.argv[2], device=sys.argv[3], progress=False)
"""

MAPPED_FLOOR = "io-floor, output from the input's mapped pages (reference)"


def mergekit_command(explicit: str | None = None) -> str | None:
    """``explicit`` (a path, or a name on PATH) if given, else ``mergekit-yaml`` on PATH; None when not found."""
    if explicit:
        path = Path(explicit).expanduser()
        return str(path) if path.is_file() and os.access(path, os.X_OK) else shutil.which(explicit)
    return shutil.which("mergekit-yaml")


def job_config(method: str, base: Path, models: list[Path], ours: bool) -> dict:
    """The same job for both tools: weights 0.5, density 0.5 (TIES), no normalisation of task arithmetic. Our TIES
    runs with ``compat: mergekit`` so that both compute the same thing (mergekit takes no ``compat``)."""
    params = {"weight": 0.5} if method == "task_arithmetic" else {"weight": 0.5, "density": 0.5}
    cfg = {"merge_method": method, "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(m), "parameters": dict(params)} for m in models],
           "parameters": {"normalize": False} if method == "task_arithmetic" else {}}
    if ours and method == "ties":
        cfg["parameters"]["compat"] = "mergekit"
    return cfg


def max_abs_difference(first: Path, second: Path) -> float | None:
    """max |a − b| over every tensor of two checkpoints with the same tensors (None if they differ in names)."""
    a, b = Checkpoint(first), Checkpoint(second)
    if sorted(a.names()) != sorted(b.names()):
        return None
    worst = 0.0
    for name in a.names():
        x, y = a.get(name), b.get(name)
        if x.shape != y.shape:
            return None
        if x.numel():
            worst = max(worst, float((x.double() - y.double()).abs().max()))
    return worst


def balanced_order(count: int, round_: int) -> list[int]:
    """Row ``round_`` (cyclically) of a Williams design for ``count`` jobs: over ``count`` rounds (even ``count``;
    twice that for odd) every job comes right after every other job equally often, so no job always pays for the
    same predecessor. Row 0: 0, 1, n−1, 2, n−2, ...; row r adds r (mod n)."""
    first, low, high = [0], 1, count - 1
    while len(first) < count:
        first.append(low)
        low += 1
        if len(first) < count:
            first.append(high)
            high -= 1
    rows = count if count % 2 == 0 else 2 * count
    r = round_ % rows
    row = [(x + r) % count for x in first]
    return row if r < count else row[::-1]


def _settle() -> float:
    """Before each job: flush dirty pages (so that no job pays for the previous one's writeback) and return the
    1-minute load average."""
    if hasattr(os, "sync"):
        os.sync()
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def bench_merge(workdir: Path, size_bytes: int, n_models: int = 3, methods: tuple[str, ...] = ("task_arithmetic",
                "ties"), with_mergekit: bool = True, mergekit_bin: str | None = None,
                device: str = "cpu", threads: int | None = None, repeat: int = 1) -> list[dict]:
    """Figures for each job: seconds, ratio to the I/O floor, peak RSS and peak anonymous memory (MB), and for
    mergekit jobs the ratio of mergekit's time to ours and the largest difference between the two outputs.

    Our merges write the sha256 of every input into the model card; a file's digest is computed once per file
    version (``unmerge.checkpoint.hashing``). The first job (``cold hashes``, run once) starts from an empty digest
    cache and so pays for hashing every input; the other unmerge jobs find the digests known, as a repeated merge
    of the same models does. ``threads`` sets ``OMP_NUM_THREADS`` (torch's thread count) for every job, mergekit's
    included. With ``repeat`` > 1 every other job runs that many times in rounds (the floor and each method's jobs,
    in the order of :func:`balanced_order`: on a virtual machine a job can slow the one after it) and each row
    holds the job's median run, its ratios taken against the median floor: a passing load then hits every job
    alike. The reference floor that writes the input's mapped pages runs once, after the rounds: measured on the
    development VM, the job after it took about 1 s longer (task arithmetic 3.6-3.9 s after it, 2.5-2.7 s after
    the floor)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "UNMERGE_CACHE": str(workdir / "cache")}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    config = llama_shape(size_bytes)

    def synthetic(name: str, seed: int, base: Path | None = None) -> Path:
        """The checkpoint ``workdir/name``, written unless one of this configuration is there already."""
        path = workdir / name
        if not (path / "config.json").exists() or json.loads((path / "config.json").read_text()) != config:
            write_synthetic(path, config, seed=seed, base=base)
        return path

    base = synthetic("base", 0)
    models = [synthetic(f"model{i}", i, base) for i in range(1, n_models)]
    inputs = [base] + models
    mergekit = mergekit_command(mergekit_bin) if with_mergekit else None
    if with_mergekit and mergekit_bin and mergekit is None:
        raise FileNotFoundError(f"--mergekit-bin '{mergekit_bin}' is not an executable file or a command on PATH")

    runs: dict[str, list[tuple[JobFigures, float]]] = {}  # label -> (figures, load when it started), in run order
    differences: dict[str, float | None] = {}

    def run(label: str, argv: list[str], out: Path) -> JobFigures:
        shutil.rmtree(out, ignore_errors=True)
        load = _settle()
        job = run_monitored(label, argv, env=env)
        runs.setdefault(label, []).append((job, load))
        return job

    def ours(method: str, out: Path, label: str) -> JobFigures:
        return run(label, python_job(OURS_CODE) + [json.dumps(job_config(method, base, models, ours=True)), str(out),
                                                   device], out)

    if methods:
        shutil.rmtree(workdir / "cache" / "hashes", ignore_errors=True)
        ours(methods[0], workdir / "out-unmerge-cold", f"unmerge:{methods[0]} (cold hashes)")
        shutil.rmtree(workdir / "out-unmerge-cold", ignore_errors=True)
    def floor(label: str, variant: str) -> None:
        floor_out = workdir / "out-floor"
        run(label, python_job(FLOOR_CODE) + [",".join(map(str, inputs)), str(floor_out), variant], floor_out)
        shutil.rmtree(floor_out, ignore_errors=True)

    def method_jobs(method: str) -> None:
        """Ours, then mergekit's on the same job (when found), then the largest difference of their outputs."""
        out = workdir / f"out-unmerge-{method}"
        mine = ours(method, out, f"unmerge:{method}")
        if mergekit:
            yaml_file = workdir / f"mergekit-{method}.yaml"
            yaml_file.write_text(json.dumps(job_config(method, base, models, ours=False)))  # JSON is YAML
            theirs_out = workdir / f"out-mergekit-{method}"
            theirs = run(f"mergekit:{method}", [mergekit, str(yaml_file), str(theirs_out)], theirs_out)
            if mine.returncode == 0 and theirs.returncode == 0:
                differences[f"mergekit:{method}"] = max_abs_difference(out, theirs_out)
            shutil.rmtree(theirs_out, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)

    units = [lambda: floor("io-floor", "copy")] + [lambda method=method: method_jobs(method) for method in methods]
    for round_ in range(max(1, repeat)):
        for index in balanced_order(len(units), round_):
            units[index]()
    floor(MAPPED_FLOOR, "mapped")  # once, last: it slows the job after it (see bench_merge)

    def median(label: str) -> tuple[JobFigures, float]:
        return median_run(runs[label], lambda item: item[0].seconds)

    floor_job = median("io-floor")[0]
    floor = floor_job.seconds if floor_job.returncode == 0 else None
    rows: list[dict] = []
    floors = ["io-floor", MAPPED_FLOOR]
    for label in floors + [k for k in runs if k not in floors]:
        job, load = median(label)
        row = {"job": label, "seconds": round(job.seconds, 2),
               "x_floor": round(job.seconds / floor, 2) if floor else 1.0, "cpu_s": round(job.cpu_seconds, 2),
               "peak_rss_mb": round(job.peak_rss_mb), "peak_anon_mb": round(max(j.peak_anon_mb for j, _ in runs[label])),
               "load_1m": round(load, 2), "runs": len(runs[label]),
               "each_s": "/".join(f"{j.seconds:.2f}" for j, _ in runs[label]),  # in run order: the spread
               "ok": all(j.returncode == 0 for j, _ in runs[label])}
        if label.startswith("mergekit:"):
            mine = median("unmerge:" + label.split(":", 1)[1])[0]
            row["x_ours"] = round(job.seconds / mine.seconds, 2) if row["ok"] else None
            row["max_abs_diff"] = differences.get(label)
        failed = [j for j, _ in runs[label] if j.returncode != 0]
        rows.append({**row, "error": failed[0].output[-500:] if failed else ""})
    rows.append({"job": "model", "error": f"{config['num_hidden_layers']} layers, {size_bytes / 1024**3:.2f} GB per "
                 f"checkpoint, {n_models} checkpoints, largest tensor "
                 f"{config['vocab_size'] * config['hidden_size'] * 4 / 1024**2:.0f} MB, {os.cpu_count()} CPUs, "
                 f"threads {threads or 'default'}"})
    return rows
