"""What a merge writes besides the merged floats: tied heads stored once, integer buffers copied from the base,
config and tokenizer copied, and a model card with the exact config and the sha256 of every input."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import threading

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.conftest import make_gpt2, perturbed
from unmerge.checkpoint import Checkpoint
from unmerge.engine import merge_checkpoints
from unmerge.errors import CheckpointError, MethodError
from unmerge.merge_config import merge
from unmerge.methods import get_method
from unmerge.methods.sparsify import ties


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tied_heads_int_buffers_and_model_card(tmp_path):
    from transformers import GPT2LMHeadModel

    base = make_gpt2()
    dirs = [tmp_path / n for n in ("base", "ft1", "ft2")]
    for i, (model, d) in enumerate(zip([base, perturbed(base, 1), perturbed(base, 2)], dirs)):
        model.save_pretrained(d)
        state = load_file(d / "model.safetensors")
        state["step"] = torch.tensor([10 + i], dtype=torch.int64)  # an integer buffer, different in each input
        state["lm_head.weight"] = state["transformer.wte.weight"].clone()  # as checkpoints that store both do
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    (dirs[0] / "tokenizer_config.json").write_text("{}")
    config = {"merge_method": "task_arithmetic", "base_model": str(dirs[0]), "dtype": "float32",
              "models": [{"model": str(d), "parameters": {"weight": w}} for d, w in zip(dirs[1:], (0.5, 0.25))]}
    merge(config, tmp_path / "out", device="cpu", progress=False)
    out = tmp_path / "out"
    stored = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in stored and "transformer.wte.weight" in stored  # tied: stored once
    assert torch.equal(stored["step"], torch.tensor([10]))  # integer buffers: the base's, not averaged
    reloaded = GPT2LMHeadModel.from_pretrained(out)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    info = json.loads((out / "merge_info.json").read_text())
    card = (out / "README.md").read_text()
    for d in dirs:  # each input: sha256 over "<file> <sha256>" lines of its weight files, computed independently
        files = Checkpoint(d).files()
        want = hashlib.sha256("".join(f"{f.name} {_sha(f)}\n" for f in files).encode()).hexdigest()
        assert info["inputs"][str(d)] == want and f"| `{d}` | `{want}` |" in card
    given = card.split("## Configuration (as given)\n```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(given) == config
    assert "`lm_head.weight` is tied to `transformer.wte.weight`" in card


def test_prepare_step_runs_one_tensor_ahead_on_the_loader_thread(tmp_path, tiny_gpt2_dirs):
    """A method's ``prepare`` runs on the engine's loader thread (overlapping the previous tensor's ``fn``) and its
    result reaches ``fn`` as ``task.prepared``; TIES through the engine equals TIES called directly."""
    dirs = tiny_gpt2_dirs
    ties_method = get_method("ties")
    seen: dict[str, tuple[str, str]] = {}

    def prepare(task):
        return threading.current_thread().name, ties_method.prepare(task)

    def fn(task):
        where, rules = task.prepared
        seen[task.name] = (where, threading.current_thread().name)
        return ties_method.fn(dataclasses.replace(task, prepared=rules))

    traced = dataclasses.replace(ties_method, prepare=prepare, fn=fn)
    ckpts = [Checkpoint(d) for d in dirs]
    merge_checkpoints(traced, ckpts[0], ckpts[1:], tmp_path / "out", params={"density": 0.4, "compat": "mergekit"},
                      model_params=[{"weight": 1.0}, {"weight": 0.5}], device="cpu", progress=False)
    assert seen and all(prep != run for prep, run in seen.values())  # prepared on another thread than fn ran on
    stored = load_file(tmp_path / "out" / "model.safetensors")
    name = "transformer.h.0.mlp.c_fc.weight"
    want = ties(ckpts[0].get(name), [c.get(name) for c in ckpts[1:]], [1.0, 0.5], [0.4, 0.4], 1.0, "mergekit")
    assert torch.equal(stored[name], want)


def test_an_output_that_overflows_its_dtype_is_refused_and_nothing_is_written(tmp_path, tiny_gpt2_dirs):
    """Checked as stored: a float16 output above 65504 would be Inf."""
    dirs = tiny_gpt2_dirs
    config = {"merge_method": "task_arithmetic", "base_model": str(dirs[0]), "dtype": "float16",
              "models": [{"model": str(dirs[1]), "parameters": {"weight": 1.0}}], "parameters": {"lambda": 1e9}}
    with pytest.raises(MethodError, match=r"produced NaN/Inf in '.*' \(stored as torch.float16\)"):
        merge(config, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()
    config["dtype"] = "float32"
    merge(config, tmp_path / "out", device="cpu", progress=False)  # representable in float32
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_nan_input_of_a_method_with_a_prepare_step_is_named(tmp_path, tiny_gpt2_dirs):
    """TIES's inputs are checked on the merging thread after its prepare step ran on them: the error still names
    the file and the tensor, and nothing is written."""
    dirs = tiny_gpt2_dirs
    state = load_file(dirs[2] / "model.safetensors")
    name = "transformer.h.1.mlp.c_fc.weight"
    state[name][3, 5] = float("nan")
    save_file(state, dirs[2] / "model.safetensors", metadata={"format": "pt"})
    for scope in ("per_tensor", "global"):
        config = {"merge_method": "ties", "base_model": str(dirs[0]), "parameters": {"density": 0.5, "scope": scope},
                  "models": [{"model": str(d)} for d in dirs[1:]]}
        with pytest.raises(CheckpointError, match=f"tensor '{name}' in '{dirs[2] / 'model.safetensors'}' has NaN"):
            merge(config, tmp_path / "out", device="cpu", progress=False)
        assert not (tmp_path / "out").exists()


def test_write_behind_queues_small_outputs_in_order_and_writes_large_ones_in_place(monkeypatch):
    from unmerge.engine import _WriteBehind

    monkeypatch.setattr(_WriteBehind, "LIMIT", 400)
    monkeypatch.setattr(_WriteBehind, "QUEUE", 800)
    log, release = [], threading.Event()

    class Writer:
        def add(self, name, tensor):
            if name == "s0":
                assert release.wait(10)
            log.append((name, threading.current_thread().name))

    with _WriteBehind(Writer()) as behind:
        behind.add("s0", torch.empty(100))  # 400 bytes: behind, held up in the writer until released
        behind.add("s1", torch.empty(100))  # 800 bytes queued: still fits
        assert len(behind.pending) == 2 and not log
        threading.Timer(0.2, release.set).start()
        behind.add("s2", torch.empty(100))  # 1200 > 800: waits for s0 first
        assert log and log[0][0] == "s0"
        behind.add("big", torch.empty(200))  # 800 bytes > LIMIT: after the queue, on the calling thread
    assert [name for name, _ in log] == ["s0", "s1", "s2", "big"]
    assert log[0][1].startswith("unmerge-write") and log[-1][1] == threading.current_thread().name
