"""Data-parallel statistics and fine-tuning (issues 4 and 6.5): the same commands launched on 2 CPU processes give
the single-process results on the same examples; only the main process writes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import make_gpt2
from distributed_driver import TEXTS, commands

from unmerge.stats.distributed import per_process_batch, shard_bounds


def test_shards_cover_the_examples_in_order():
    assert shard_bounds(7, 2) == [0, 3, 7] and shard_bounds(8, 3) == [0, 2, 5, 8] and shard_bounds(1, 1) == [0, 1]


def test_global_batch_must_split_over_the_processes(monkeypatch):
    from unmerge.errors import UnmergeError

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert per_process_batch(4) == 2
    with pytest.raises(UnmergeError, match="batch size 5 does not split over 2 processes"):
        per_process_batch(5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(workdir, names): every command once in this process (suffix 1) and once under a 2-process launch (2)."""
    from unmerge.cli import main
    from unmerge.evaluation._testing import word_tokenizer

    work = tmp_path_factory.mktemp("dist")
    model = make_gpt2()
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):  # dropout draws differ per process; the rest must not
        setattr(model.config, key, 0.0)
    model.save_pretrained(work / "model")
    word_tokenizer(vocab_size=64).save_pretrained(work / "model")
    (work / "data.txt").write_text("\n".join(TEXTS) + "\n")
    # CPU processes with gloo even where CUDA exists (two processes must not share one GPU through NCCL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), str(Path(__file__).parent / "distributed_driver.py"),
              str(work), "2"]
    proc = subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runner = CliRunner()
    torch.set_num_threads(1)
    for name, argv in commands(work, "1").items():  # the reference, while the launch runs
        result = runner.invoke(main, argv)
        assert result.exit_code == 0, (name, result.output)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return work


@pytest.mark.parametrize("kind", ["fisher", "gram", "kfac"])
def test_two_process_statistic_equals_single_process(runs, kind):
    from unmerge.stats import Statistic

    one, two = Statistic(runs / f"{kind}1"), Statistic(runs / f"{kind}2")
    assert sorted(one.names()) == sorted(two.names()) and one.names()
    for name in one.names():
        a, b = one.get(name), two.get(name)
        assert float(a.abs().max()) > 0
        assert float((a - b).abs().max() / a.abs().max()) < 1e-5, name
    assert two.meta["processes"] == 2 and "processes" not in one.meta
    for key in ("n_examples", "n_tokens", "n_predicted_tokens", "N", "data_fingerprint", "model_hash"):
        assert one.meta.get(key) == two.meta.get(key), key


def test_two_process_finetune_equals_single_process_and_writes_once(runs):
    one, two = load_file(runs / "finetune1" / "model.safetensors"), load_file(runs / "finetune2" / "model.safetensors")
    base = load_file(runs / "model" / "model.safetensors")
    moved = max(float((one[k] - base[k]).abs().max()) for k in one)
    assert moved > 1e-2  # four AdamW steps at lr 1e-2
    # global batch 4 = 2 per process, same sampler order: equal up to float noise (Adam divides by √v); a wrong
    # batch split or data order moves weights by ~moved
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-4
    info = json.loads((runs / "finetune2" / "training_info.json").read_text())
    assert info["processes"] == 2 and info["steps"] == 4
    leftovers = [p.name for p in runs.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # one writer: no second partial directory, no .old- sibling
    assert (runs / "finetune2" / "adam_v").is_dir()


def test_unmerge_run_refuses_a_multi_process_launch(monkeypatch, tmp_path):
    """The workflow's stage locks would make the processes wait for each other: a clear error instead."""
    from unmerge.errors import RecipeError
    from unmerge.workflow import UnlearningRun

    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
    run = UnlearningRun(recipe, out=tmp_path / "r", cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(RecipeError, match="runs in one process"):
        run.execute()
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()
