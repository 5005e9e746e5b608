"""Issue 7, the bad-input catalog: one test per case. Each checks all three of

(a) a clear error naming the offending file, tensor, key or value, with a hint saying what to do;
(b) exit status 2 from the CLI (``CliRunner`` on ``unmerge.cli.main``) and/or the typed ``UnmergeError`` subclass
    from Python;
(c) every input byte-identical afterwards and nothing left behind: ``untouched(root)`` hashes the whole tree holding
    the inputs and the output location before and after, so an output directory, a ``.partial-*`` / ``.tmp``
    sibling or a changed input all fail it.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_gpt2, perturbed
from safetensors.torch import load_file, save_file
from test_workflow_e2e import TINY_RECIPE

from unmerge import api
from unmerge.checkpoint import Checkpoint
from unmerge.checkpoint.writer import MARKER
from unmerge.cli import main
from unmerge.engine import checkpoint_hash
from unmerge.errors import (CheckpointError, DataError, InputError, MethodError, OutputError, RecipeError,
                            StatisticError)
from unmerge.stats import save_statistic

WEIGHT = "transformer.h.0.attn.c_attn.weight"
BIAS = "transformer.h.0.mlp.c_fc.bias"


# ------------------------------------------------------------------------------------------------------------------
# helpers


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root``: 'dir' for directories, the sha256 of files."""
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@contextlib.contextmanager
def untouched(root: Path):
    """(c): nothing under ``root`` changes, appears or disappears."""
    before = tree(root)
    yield
    after = tree(root)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (added or removed or changed), f"added {added}, removed {removed}, changed {changed}"


def cli(args: list, *needles: str, code: int = 2, env: dict | None = None, hint: bool = True):
    """(a)+(b): run the CLI; exit status ``code``, no traceback, each needle in the output, a hint line."""
    res = CliRunner(env=env).invoke(main, [str(a) for a in args])
    print(f"$ unmerge {' '.join(str(a) for a in args)}\n{res.output}")  # shown by pytest -s or on failure
    assert res.exit_code == code, res.output + repr(res.exception)
    assert "Traceback" not in res.output
    for needle in needles:
        assert str(needle) in res.output, (needle, res.output)
    if hint and code == 2:
        assert "hint: " in res.output, res.output
    return res


def fisher_like(model_dir: Path, out: Path, n: float = 100.0, seed: int = 0, edit=None, model_hash: str | None = "own",
                kind: str = "fisher") -> Path:
    """A Fisher-shaped statistic of ``model_dir`` (random positive values); ``edit(tensors)`` corrupts it."""
    ckpt = Checkpoint(model_dir)
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.rand(ckpt.meta(name)[0], generator=gen) ** 2 + 1e-3 for name in ckpt.names()}
    if edit is not None:
        edit(tensors)
    meta = {"kind": kind, "N": n}
    if model_hash is not None:
        meta["model_hash"] = checkpoint_hash(ckpt) if model_hash == "own" else model_hash
    return save_statistic(tensors, meta, out)


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of model directory ``src`` whose tensors went through ``edit(tensors)``."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture
def w(tmp_path):
    """The workspace: tiny GPT-2 base and fine-tune with matching Fishers under ``in/``; ``out`` does not exist."""
    root = tmp_path / "in"
    base = make_gpt2()
    base.save_pretrained(root / "base")
    perturbed(base, 1).save_pretrained(root / "ft")
    ns = SimpleNamespace(tmp=tmp_path, root=root, base=root / "base", ft=root / "ft", out=tmp_path / "out")
    ns.fb = fisher_like(ns.base, root / "fb", n=400.0, seed=1)
    ns.ff = fisher_like(ns.ft, root / "ff", n=100.0, seed=2)
    return ns


def subtract(w, *, base=None, ft=None, out=None, method="negation", alpha="0.5", fb=None, ff=None, extra=()):
    args = ["subtract", base or w.base, ft or w.ft, out or w.out, "--method", method, "--alpha", alpha, "--quiet"]
    if fb:
        args += ["--base-fisher", fb]
    if ff:
        args += ["--forget-fisher", ff]
    return args + list(extra)


@pytest.fixture(scope="module")
def builtin_cache(tmp_path_factory):
    """UNMERGE_CACHE shared by the recipe cases (the builtin tiny model is unpacked once)."""
    return tmp_path_factory.mktemp("unmerge-cache")


def run_recipe(w, builtin_cache, recipe: dict | str, *needles: str, code: int = 2, extra=()):
    """``unmerge run`` on a recipe written under ``in/``, with its own stage cache; checks that no stage ran."""
    path = w.root / "recipe.yaml"
    if isinstance(recipe, dict):
        path.write_text(yaml.safe_dump(recipe))
    else:
        path.write_text(recipe)
    stages = w.tmp / "stages"
    stages.mkdir(exist_ok=True)
    with untouched(w.tmp):
        res = cli(["run", path, "--out", w.out, "--cache-dir", stages, "--quiet", *extra], *needles, code=code,
                  env={"UNMERGE_CACHE": str(builtin_cache)})
    return res


def recipe(**changes) -> dict:
    r = copy.deepcopy(TINY_RECIPE)
    for key, value in changes.items():
        node = r
        *parents, last = key.split("__")
        for parent in parents:
            node = node[parent]
        node[last] = value
    return r


# ------------------------------------------------------------------------------------------------------------------
# the catalog


def test_01_model_path_does_not_exist(w):
    missing = w.root / "no-such-model"
    with untouched(w.tmp):
        cli(subtract(w, base=missing), f"model path '{missing}' does not exist")
        with pytest.raises(InputError, match="does not exist"):
            api.subtract(str(missing), str(w.ft), w.out, method="negation", params={"alpha": 0.5}, progress=False)


def test_02_hub_name_while_offline_fails_fast(w, builtin_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with untouched(w.tmp):
        start = time.perf_counter()
        cli(subtract(w, base="some-org/some-model"), "'some-org/some-model'", "offline",
            env={"HF_HUB_OFFLINE": "1"})
        assert time.perf_counter() - start < 2.0
        with pytest.raises(InputError, match="offline"):
            api.subtract("some-org/some-model", str(w.ft), w.out, method="negation", params={"alpha": 0.5})
    start = time.perf_counter()
    run_recipe(w, builtin_cache, recipe(base_model="some-org/some-model"), "'some-org/some-model'", "offline")
    assert time.perf_counter() - start < 2.0


def test_03_unknown_method_suggests_the_closest(w, builtin_cache):
    with untouched(w.tmp):
        cli(subtract(w, method="negaton"), "unknown merge method 'negaton'", "did you mean 'negation'")
        with pytest.raises(MethodError, match="did you mean 'fisher_negation'"):
            api.subtract(str(w.base), str(w.ft), w.out, method="fisher_negaton", params={"alpha": 0.5})
    run_recipe(w, builtin_cache, recipe(removal__methods=["uncertainty_removl"]), "'uncertainty_removl'",
               "did you mean 'uncertainty_removal'")


def test_04_unknown_parameter_suggests_the_closest(w, builtin_cache):
    config = w.root / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(w.base),
                                      "models": [{"model": str(w.ft), "parameters": {"weight": 1.0}}],
                                      "parameters": {"densty": 0.5}}))
    with untouched(w.tmp):
        cli(["merge", config, w.out, "--quiet"], "no parameter 'densty'", "did you mean 'density'")
    run_recipe(w, builtin_cache, recipe(removal__params={"uncertainty_removal": {"m_mx": 5.0}}),
               "no parameter 'm_mx'", "did you mean 'm_max'")
    typo = recipe()
    typo["finetun"] = typo.pop("finetune")
    run_recipe(w, builtin_cache, typo, "unknown recipe key 'finetun'", "did you mean 'finetune'")
    with pytest.raises(RecipeError, match="did you mean 'finetune'"):
        api.plan(typo)


def test_05_tensor_shape_mismatch(w):
    bad = edited_copy(w.ft, w.root / "ft-wide", lambda t: t.__setitem__(BIAS, torch.zeros(t[BIAS].numel() + 1)))
    n = Checkpoint(w.base).meta(BIAS)[0][0]
    with untouched(w.tmp):
        cli(subtract(w, ft=bad), f"tensor '{BIAS}' has shape [{n + 1}] in '{bad}' but [{n}] in '{w.base}'")
        with pytest.raises(CheckpointError, match="has shape"):
            api.subtract(str(w.base), str(bad), w.out, method="negation", params={"alpha": 0.5}, progress=False)


def test_06_tensor_missing_from_one_model(w):
    bad = edited_copy(w.ft, w.root / "ft-short", lambda t: t.pop(WEIGHT))
    with untouched(w.tmp):
        cli(subtract(w, ft=bad), f"tensor '{WEIGHT}' is in '{w.base}' but missing from '{bad}'")
        with pytest.raises(CheckpointError, match="missing from"):
            api.subtract(str(w.base), str(bad), w.out, method="negation", params={"alpha": 0.5}, progress=False)


def test_07_different_architectures(w):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    llama.save_pretrained(w.root / "llama")
    with untouched(w.tmp):
        cli(subtract(w, ft=w.root / "llama"), "architectures", "LlamaForCausalLM", "GPT2LMHeadModel",
            f"'{w.root / 'llama'}'", "same base")
        with pytest.raises(CheckpointError, match="LlamaForCausalLM"):
            api.subtract(str(w.base), str(w.root / "llama"), w.out, method="negation", params={"alpha": 0.5})


def test_08_different_vocabulary_sizes(w):
    make_gpt2(vocab=80).save_pretrained(w.root / "ft-vocab")
    with untouched(w.tmp):
        cli(subtract(w, ft=w.root / "ft-vocab"), f"'{w.root / 'ft-vocab'}' has vocab_size = 80", "has 64",
            "tokenizer")
        with pytest.raises(CheckpointError, match="vocab_size"):
            api.subtract(str(w.base), str(w.root / "ft-vocab"), w.out, method="negation", params={"alpha": 0.5})


def test_09_statistic_of_a_different_model(w):
    other = fisher_like(w.ft, w.root / "ff-other", model_hash=checkpoint_hash(Checkpoint(w.base)))
    args = subtract(w, method="uncertainty_removal", fb=w.fb, ff=other)
    with untouched(w.tmp):
        cli(args, f"statistic '{other}' was computed for another model", "--force")
        with pytest.raises(StatisticError, match="another model"):
            api.subtract(str(w.base), str(w.ft), w.out, method="uncertainty_removal", params={"alpha": 0.5},
                         base_fisher=w.fb, forget_fisher=other, progress=False)
    # names and shapes that differ cannot be forced
    short = fisher_like(w.ft, w.root / "ff-short", edit=lambda t: t.pop(WEIGHT))
    wrong = fisher_like(w.ft, w.root / "ff-shape", edit=lambda t: t.__setitem__(BIAS, torch.ones(3)))
    with untouched(w.tmp):
        cli(subtract(w, method="uncertainty_removal", fb=w.fb, ff=short, extra=["--force"]),
            f"statistic '{short}' has no tensor '{WEIGHT}'")
        cli(subtract(w, method="uncertainty_removal", fb=w.fb, ff=wrong, extra=["--force"]),
            f"statistic '{wrong}' has shape [3] for '{BIAS}'")
    # the same through `unmerge merge` (a Fisher-weighted merge config)
    config = w.root / "fisher.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "fisher", "models": [
        {"model": str(w.base), "fisher": str(w.fb)}, {"model": str(w.ft), "fisher": str(other)}]}))
    with untouched(w.tmp):
        cli(["merge", config, w.out, "--quiet"], f"statistic '{other}' was computed for another model", "--force")
    # --force accepts a statistic recorded for another model (inputs still untouched)
    before = tree(w.root)
    cli(args + ["--force"], "wrote", code=0)
    cli(["merge", config, w.tmp / "merged", "--force", "--quiet"], "wrote", code=0)
    assert tree(w.root) == before and (w.out / "model.safetensors").is_file()


def test_10_nan_or_inf_in_weights_or_statistics(w):
    def poison(t):
        t[WEIGHT][3, 5] = float("nan")

    bad = edited_copy(w.ft, w.root / "ft-nan", poison)
    with untouched(w.tmp):
        cli(subtract(w, ft=bad), f"tensor '{WEIGHT}' in '{bad / 'model.safetensors'}' has NaN or Inf")
        with pytest.raises(CheckpointError, match="NaN or Inf"):  # also as the base, and for any method
            api.subtract(str(bad), str(w.ft), w.out, method="fisher_negation", params={"alpha": 0.5},
                         base_fisher=w.fb, forget_fisher=w.ff, force=True, progress=False)
    inf = fisher_like(w.ft, w.root / "ff-inf", edit=lambda t: t[BIAS].__setitem__(0, float("inf")))
    with untouched(w.tmp):
        cli(subtract(w, method="fisher_negation", fb=w.fb, ff=inf), f"statistic '{inf}' has NaN or Inf in '{BIAS}'")


def test_11_negative_fisher_values(w):
    neg = fisher_like(w.base, w.root / "fb-neg", edit=lambda t: t[WEIGHT].__setitem__((0, 0), -1e-3))
    with untouched(w.tmp):
        cli(subtract(w, method="uncertainty_removal", fb=neg, ff=w.ff), f"statistic '{neg}' has negative values "
            f"in '{WEIGHT}'", "re-estimate")
        with pytest.raises(StatisticError, match="negative"):
            api.subtract(str(w.base), str(w.ft), w.out, method="fisher_negation", params={"alpha": 0.5},
                         base_fisher=neg, forget_fisher=w.ff, progress=False)


def test_12_all_zero_fisher(w):
    zero = fisher_like(w.ft, w.root / "ff-zero", edit=lambda t: [v.zero_() for v in t.values()])
    with untouched(w.tmp):
        cli(subtract(w, method="fisher_negation", fb=w.fb, ff=zero), f"statistic '{zero}' ('fisher') is zero "
            "everywhere", "re-estimate")
        with pytest.raises(StatisticError, match="zero everywhere"):
            api.subtract(str(w.base), str(w.ft), w.out, method="fisher_negation", params={"alpha": 0.5},
                         base_fisher=w.fb, forget_fisher=zero, progress=False)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_13_truncated_or_corrupt_safetensors(w, damage):
    bad = w.root / f"ft-{damage}"
    shutil.copytree(w.ft, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 64)
    with untouched(w.tmp):
        cli(subtract(w, ft=bad), f"'{bad / 'model.safetensors'}' is not a readable safetensors file",
            "truncated or corrupt")
        with pytest.raises(CheckpointError, match="not a readable safetensors"):
            api.subtract(str(w.base), str(bad), w.out, method="negation", params={"alpha": 0.5})


def test_14_empty_forget_set(w, builtin_cache):
    empty = w.root / "forget.txt"
    empty.write_text("\n   \n\n")
    run_recipe(w, builtin_cache, recipe(data__forget=str(empty)), f"the dataset '{empty}' is empty")
    with untouched(w.tmp):
        cli(["finetune", w.base, empty, w.out, "--quiet"], f"'{empty}' is empty")
        with pytest.raises(DataError, match="is empty"):
            api.finetune(str(w.base), str(empty), w.out, max_steps=1)


def test_15_dataset_without_the_text_column(w, builtin_cache):
    data = w.root / "forget.jsonl"
    data.write_text("".join(json.dumps({"body": f"example {i}", "label": 1}) + "\n" for i in range(4)))
    run_recipe(w, builtin_cache, recipe(data__forget={"path": str(data), "column": "text"}),
               f"'{data}' has no text column 'text' (columns: body, label)", "column:")
    with untouched(w.tmp):
        cli(["fisher", w.base, data, w.out, "--quiet"], f"'{data}' has no text column", "columns: body, label")


def test_16_bad_numbers(w, builtin_cache):
    with untouched(w.tmp):
        cli(subtract(w, alpha="strong"), "Invalid value for '--alpha'", "'strong'", hint=False)
        cli(subtract(w, alpha="-1"), "parameter 'alpha' of method 'negation' is -1.0, outside (0, inf)")
        cli(subtract(w, alpha="nan"), "parameter 'alpha' of method 'negation' must be finite")
        for method, params, needle in (
                ("ties", {"density": 1.5}, "parameter 'density' of method 'ties' is 1.5, outside [0, 1]"),
                ("ties", {"density": "half"}, "parameter 'density' of method 'ties' must be a number, got 'half'"),
                ("dare", {"drop_rate": -0.1}, "parameter 'drop_rate' of method 'dare' is -0.1, outside [0, 1]")):
            config = w.root / "merge.yaml"
            config.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(w.base),
                                              "models": [{"model": str(w.ft), "parameters": params}]}))
            cli(["merge", config, w.out, "--quiet"], needle)
            config.unlink()
    run_recipe(w, builtin_cache, recipe(removal__alpha=[0.5, "high"]), "removal alpha 'high' must be a positive")
    run_recipe(w, builtin_cache, recipe(removal__alpha=[float("inf")]), "'alpha'", "must be finite")


def test_17_output_equal_to_or_inside_an_input(w):
    with untouched(w.tmp):
        cli(subtract(w, out=w.base / "merged"), f"output '{w.base / 'merged'}' is inside the input")
        cli(subtract(w, out=w.ft, extra=["--overwrite"]), f"output '{w.ft}' is inside the input")
        cli(subtract(w, out=w.root, extra=["--overwrite"]), f"is inside the output '{w.root}'")
        with pytest.raises(OutputError, match="inside the input"):
            api.subtract(str(w.base), str(w.ft), w.base, method="negation", params={"alpha": 0.5}, overwrite=True)


def test_18_output_directory_holding_other_files(w, builtin_cache):
    w.out.mkdir()
    (w.out / "notes.txt").write_text("my notes")
    with untouched(w.tmp):
        cli(subtract(w), f"output directory '{w.out}' is not empty", "'notes.txt'", "never deletes")
        cli(subtract(w, extra=["--overwrite"]), "unmerge did not write it", "never deletes")
        with pytest.raises(OutputError):
            api.subtract(str(w.base), str(w.ft), w.out, method="negation", params={"alpha": 0.5}, overwrite=True)
    run_recipe(w, builtin_cache, recipe(), f"output directory '{w.out}' is not empty")  # before any stage runs
    # an earlier unmerge output: refused without --overwrite, replaced with it, unless someone added a file to it
    shutil.rmtree(w.out)
    cli(subtract(w), "wrote", code=0)
    assert (w.out / MARKER).is_file()
    with untouched(w.tmp):
        cli(subtract(w), "is not empty", "--overwrite")
    (w.out / "sub").mkdir()
    (w.out / "sub" / "results.csv").write_text("precious")
    with untouched(w.tmp):
        cli(subtract(w, extra=["--overwrite"]), "holds files that unmerge did not write: 'sub/results.csv'")
    shutil.rmtree(w.out / "sub")
    cli(subtract(w, alpha="0.25", extra=["--overwrite"]), "wrote", code=0)
    assert json.loads((w.out / "merge_info.json").read_text())["params"]["global"]["alpha"] == 0.25
    assert [p.name for p in w.tmp.iterdir() if p.name.startswith(".")] == []


def test_19_disk_full_during_a_write(w, monkeypatch):
    import unmerge.checkpoint.writer as writer

    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, data, offset):  # the first block is written, then the disk is full
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", pwrite)
    with untouched(w.tmp):
        with pytest.raises(OutputError, match=f"disk full while writing '{w.out}'") as info:
            api.subtract(str(w.base), str(w.ft), w.out, method="negation", params={"alpha": 0.5}, progress=False)
        assert "model.safetensors" in str(info.value) and "free some space" in str(info.value.hint)
        calls.clear()
        cli(subtract(w), f"disk full while writing '{w.out}'", "free some space")
        calls.clear()
        with pytest.raises(OutputError, match=f"disk full while writing '{w.out}'"):  # a statistic
            save_statistic({WEIGHT: torch.ones(4), BIAS: torch.ones(2)}, {"kind": "fisher", "N": 1}, w.out)
    monkeypatch.undo()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "save_file", full)  # the writer without a declared layout (safetensors' save_file)
    with untouched(w.tmp):
        with pytest.raises(OutputError, match=f"disk full while writing '{w.out}'"):
            with writer.atomic_output_dir(w.out) as tmp:
                shard = writer.ShardedWriter(tmp)
                shard.add(WEIGHT, torch.ones(4))
                shard.finish()


def test_20_pickle_checkpoint_needs_allow_pickle(w, monkeypatch):
    for name in ("base", "ft"):
        d = w.root / f"{name}-bin"
        d.mkdir()
        shutil.copy(w.root / name / "config.json", d / "config.json")
        torch.save(load_file(w.root / name / "model.safetensors"), d / "pytorch_model.bin")
    base_bin, ft_bin = w.root / "base-bin", w.root / "ft-bin"
    with untouched(w.tmp):
        cli(subtract(w, base=base_bin, ft=ft_bin), f"'{base_bin / 'pytorch_model.bin'}' is a pickle checkpoint",
            "--allow-pickle")
        with pytest.raises(CheckpointError, match="pickle"):
            api.subtract(str(w.base), str(ft_bin), w.out, method="negation", params={"alpha": 0.5})

    # a pickle that would run code when unpickled without weights_only: refused even with --allow-pickle
    sentinel = w.tmp / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {sentinel}",)

    evil = w.root / "ft-evil"
    shutil.copytree(ft_bin, evil)
    torch.save({WEIGHT: Payload()}, evil / "pytorch_model.bin")
    with untouched(w.tmp):
        cli(subtract(w, base=base_bin, ft=evil, extra=["--allow-pickle"]),
            f"'{evil / 'pytorch_model.bin'}' cannot be loaded safely", "weights_only")
    assert not sentinel.exists()

    # a plain state dict is accepted with --allow-pickle, read with weights_only=True, same result as safetensors
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real_load(*a, **k))
    before = tree(w.root)
    cli(subtract(w, base=base_bin, ft=ft_bin, extra=["--allow-pickle"]), "wrote", code=0)
    assert seen and all(flag is True for flag in seen)
    assert tree(w.root) == before
    api.subtract(str(w.base), str(w.ft), w.tmp / "ref", method="negation", params={"alpha": 0.5}, progress=False)
    got, ref = Checkpoint(w.out), Checkpoint(w.tmp / "ref")
    assert got.names() == ref.names()
    for name in ref.names():
        torch.testing.assert_close(got.get(name), ref.get(name), rtol=0, atol=0)


def test_21_yaml_tags_that_construct_objects(w, builtin_cache):
    sentinel = w.tmp / "pwned"
    text = yaml.safe_dump(TINY_RECIPE).replace("name: tiny", f"name: !!python/object/apply:os.system ['touch "
                                                             f"{sentinel}']")
    assert "!!python/object/apply" in text
    run_recipe(w, builtin_cache, text, f"recipe '{w.root / 'recipe.yaml'}' is not valid YAML",
               "tags that construct objects are refused")
    config = w.root / "merge.yaml"
    config.write_text(f"merge_method: !!python/object/apply:os.system ['touch {sentinel}']\nmodels: []\n")
    with untouched(w.tmp):
        cli(["merge", config, w.out], f"merge config '{config}' is not valid YAML", "tags that construct objects")
        with pytest.raises(RecipeError):
            api.plan(str(w.root / "recipe.yaml"))
    assert not sentinel.exists()


def test_22_selection_rule_that_tries_to_run_code(w, builtin_cache):
    sentinel = w.tmp / "pwned"
    rule = f"__import__('os').system('touch {sentinel}') <= 1"
    run_recipe(w, builtin_cache, recipe(select={"minimize": "toxicity.mean", "subject_to": rule}),
               "'__import__' is not allowed")
    run_recipe(w, builtin_cache, recipe(select={"minimize": "().__class__", "subject_to": "perplexity <= 2"}),
               "unexpected character '.'")
    assert not sentinel.exists()


EVIL = "<script>alert('x')</script><img src=x onerror=alert(1)>"


def test_23_generated_html_is_escaped_in_the_report(w, builtin_cache, monkeypatch):
    """A run whose model generates HTML/script: the report shows it as text. The stages are stand-ins (their
    outputs are what the report reads), so this checks the workflow -> bundle path in a second."""
    from unmerge.checkpoint import write_json_atomic
    from unmerge.workflow import UnlearningRun

    def weights(out: Path) -> None:
        out.mkdir()
        save_file({"w": torch.zeros(2)}, out / "model.safetensors")

    def evaluate(self, cand, out, parts):
        rows = [{"metric": "toxicity.mean", "value": 0.5, "ci_low": 0.4, "ci_high": 0.6},
                {"metric": "perplexity", "value": 10.0}]
        records = [{"kind": "generation", "prompt": "Tell me <b>", "text": EVIL, "score": 0.9}]
        write_json_atomic(out, {"candidate": cand.name, "rows": rows, "records": records})

    monkeypatch.setattr(UnlearningRun, "_finetune", lambda self, out: weights(out))
    monkeypatch.setattr(UnlearningRun, "_fisher", lambda self, model, side, out: weights(out))
    monkeypatch.setattr(UnlearningRun, "_merge", lambda self, cand, *a: (cand.path.mkdir(), write_json_atomic(
        cand.path / "merge_info.json", {"totals": {"clamped_fraction": 0.0}})))
    monkeypatch.setattr(UnlearningRun, "_evaluate", evaluate)
    given = recipe(removal__methods=["negation"], removal__alpha=[1.0], oracle_model=None,
                   select={"minimize": "toxicity.mean", "subject_to": "perplexity <= 2 * base"})
    given["report"] = {"title": "<script>alert('title')</script>"}
    path = w.root / "recipe.yaml"
    path.write_text(yaml.safe_dump(given))
    before = tree(w.root)
    cli(["run", path, "--out", w.out, "--cache-dir", w.tmp / "stages", "--quiet"], "report:", code=0,
        env={"UNMERGE_CACHE": str(builtin_cache)})
    assert tree(w.root) == before
    page = (w.out / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert "&lt;script&gt;alert(" in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    md = (w.out / "report.md").read_text(encoding="utf-8")
    assert EVIL not in md and "<script>" not in md
    samples = [json.loads(line) for line in (w.out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["text"] == EVIL for s in samples)  # the data itself is kept as generated
    assert api.verify(w.out) == []
