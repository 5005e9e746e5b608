"""``unmerge bench merge``: synthetic Llama-shaped fp32 checkpoints of a given size, merged by unmerge's streaming
engine, compared in the same run with the I/O floor (read every input tensor once, write one output) and, when
installed, with ``mergekit-yaml`` on the same job."""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import torch

from unmerge.bench.monitor import JobFigures, python_job, run_monitored
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
    writer = ShardedWriter(directory, max_shard_bytes=500 * 1024**2)
    gen = torch.Generator().manual_seed(seed)
    base_ckpt = Checkpoint(base) if base else None
    for name, shape in llama_tensors(config):
        tensor = torch.randn(shape, generator=gen) * 0.02
        writer.add(name, base_ckpt.get(name) + 0.1 * tensor if base_ckpt else tensor)
    writer.finish()
    write_json_atomic(directory / "config.json", config)


FLOOR_CODE = """
import sys
from pathlib import Path
from unmerge.checkpoint import Checkpoint, ShardedWriter
inputs = [Checkpoint(p) for p in sys.argv[1].split(",")]
out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
writer = ShardedWriter(out)
for name in inputs[0].names():
    tensors = [c.get(name) for c in inputs]
    writer.add(name, tensors[0])
writer.finish()
"""

OURS_CODE = """
import sys, json
from unmerge.merge_config import merge
merge(json.loads(sys.argv[1]), sys.argv[2], device="cpu", progress=False)
"""


def mergekit_command() -> str | None:
    return shutil.which("mergekit-yaml")


def bench_merge(workdir: Path, size_bytes: int, n_models: int = 3, methods: tuple[str, ...] = ("task_arithmetic",
                "ties"), with_mergekit: bool = True) -> list[dict]:
    """Figures for each job (seconds, peak RSS, peak anonymous memory, ratio to the I/O floor)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = llama_shape(size_bytes)
    base = workdir / "base"
    if not (base / "config.json").exists():
        write_synthetic(base, config, seed=0)
    models = []
    for i in range(1, n_models):
        path = workdir / f"model{i}"
        if not (path / "config.json").exists():
            write_synthetic(path, config, seed=i, base=base)
        models.append(path)
    inputs = [base] + models
    jobs: list[JobFigures] = []
    floor_out = workdir / "out-floor"
    shutil.rmtree(floor_out, ignore_errors=True)
    jobs.append(run_monitored("io-floor", python_job(FLOOR_CODE) + [",".join(map(str, inputs)), str(floor_out)]))
    for method in methods:
        cfg = {"merge_method": method, "base_model": str(base), "dtype": "float32",
               "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in models],
               "parameters": {"normalize": False}}
        out = workdir / f"out-unmerge-{method}"
        shutil.rmtree(out, ignore_errors=True)
        jobs.append(run_monitored(f"unmerge:{method}", python_job(OURS_CODE) + [json.dumps(cfg), str(out)]))
        if with_mergekit and mergekit_command():
            yaml_file = workdir / f"mergekit-{method}.yaml"
            yaml_file.write_text(json.dumps(cfg))
            out = workdir / f"out-mergekit-{method}"
            shutil.rmtree(out, ignore_errors=True)
            jobs.append(run_monitored(f"mergekit:{method}", [mergekit_command(), str(yaml_file), str(out)]))
    floor = jobs[0].seconds
    rows = []
    for job in jobs:
        rows.append({"job": job.label, "seconds": round(job.seconds, 2), "x_floor": round(job.seconds / floor, 2),
                     "peak_rss_mb": round(job.peak_rss_mb), "peak_anon_mb": round(job.peak_anon_mb),
                     "ok": job.returncode == 0, "error": "" if job.returncode == 0 else job.output[-500:]})
    rows.append({"job": "model", "seconds": None, "x_floor": None, "peak_rss_mb": None, "peak_anon_mb": None,
                 "ok": True, "error": textwrap.shorten(f"{config['num_hidden_layers']} layers, "
                                                      f"{size_bytes / 1024**3:.2f} GB per checkpoint", 80)})
    return rows
