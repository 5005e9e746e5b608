"""MaTS from a checkpoint initialization (``init: checkpoint``, ``init_model: PATH``): θ⁽⁰⁾ is read per tensor."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_gpt2, perturbed
from unmerge.checkpoint import Checkpoint
from unmerge.engine import merge_checkpoints
from unmerge.errors import MethodError, OutputError
from unmerge.stats import Statistic
from unmerge.stats.store import save_statistic


@pytest.fixture
def setup(tiny_gpt2_dirs, tmp_path):
    base, ft1, ft2 = tiny_gpt2_dirs
    init_dir = tmp_path / "init"
    perturbed(make_gpt2(), 9, scale=0.05).save_pretrained(init_dir)
    stats = []
    for i, d in enumerate((ft1, ft2)):
        names = Checkpoint(d).names()
        gen = torch.Generator().manual_seed(10 + i)
        tensors = {n: torch.rand(Checkpoint(d).meta(n)[0], generator=gen) + 0.1 for n in names}
        save_statistic(tensors, {"kind": "fisher", "N": 10}, tmp_path / f"fisher{i}")
        stats.append(Statistic(tmp_path / f"fisher{i}"))
    return base, [ft1, ft2], init_dir, stats


def merge(setup, out, params):
    base, fts, _, stats = setup
    return merge_checkpoints("mats", Checkpoint(base), [Checkpoint(d) for d in fts], out, params=params,
                             stats={"fisher": stats}, device="cpu", progress=False)


def test_mats_starts_from_the_init_checkpoint_and_records_it(setup, tmp_path):
    init_dir = setup[2]
    merge(setup, tmp_path / "zero", {"init": "checkpoint", "init_model": str(init_dir), "iterations": 0})
    got, init = load_file(tmp_path / "zero" / "model.safetensors"), load_file(init_dir / "model.safetensors")
    for name, tensor in got.items():  # zero CG steps: every tensor (embeddings included) is the init's
        torch.testing.assert_close(tensor, init[name], rtol=0, atol=0)
    info = json.loads((tmp_path / "zero" / "merge_info.json").read_text())
    assert info["params"]["global"] == {"init": "checkpoint", "init_model": str(init_dir), "iterations": 0}
    assert info["per_tensor"]["transformer.h.0.attn.c_attn.weight"]["init"] == "checkpoint"
    # the init checkpoint is an input like the models: its sha256 is in the model card
    from unmerge.engine import checkpoint_hash

    assert info["inputs"][str(init_dir)] == checkpoint_hash(Checkpoint(init_dir))
    assert f"| `{init_dir}` | `{checkpoint_hash(Checkpoint(init_dir))}` |" in (tmp_path / "zero" / "README.md").read_text()
    # converged, the Fisher objective's solution Σ F_i θ_i / Σ F_i does not depend on the initialization
    merge(setup, tmp_path / "ckpt", {"init": "checkpoint", "init_model": str(init_dir), "rtol": 1e-10})
    merge(setup, tmp_path / "ta", {"rtol": 1e-10})
    a, b = load_file(tmp_path / "ckpt" / "model.safetensors"), load_file(tmp_path / "ta" / "model.safetensors")
    name = "transformer.h.1.mlp.c_fc.weight"
    torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a["transformer.wte.weight"], b["transformer.wte.weight"])  # embeddings keep the init


def test_mats_init_checkpoint_errors(setup, tmp_path):
    with pytest.raises(MethodError, match="needs init_model"):
        merge(setup, tmp_path / "a", {"init": "checkpoint"})
    with pytest.raises(MethodError, match="set init: checkpoint"):
        merge(setup, tmp_path / "b", {"init_model": str(setup[2])})
    with pytest.raises(MethodError, match="parameter 'init_model' of method 'mats'"):
        merge(setup, tmp_path / "d", {"init": "checkpoint", "init_model": str(tmp_path / "nowhere")})
    with pytest.raises(OutputError, match="is inside the input"):  # the output may not overwrite the init
        merge(setup, setup[2], {"init": "checkpoint", "init_model": str(setup[2])})
    wider = tmp_path / "wider"
    make_gpt2(n_embd=32).save_pretrained(wider)
    with pytest.raises(MethodError, match="has shape"):
        merge(setup, tmp_path / "c", {"init": "checkpoint", "init_model": str(wider)})


def test_init_model_in_a_config_file_resolves_against_the_file(setup, tmp_path):
    import yaml

    from unmerge.merge_config import merge as merge_file

    base, fts, init_dir, _ = setup
    config = {"merge_method": "mats", "base_model": str(base),
              "models": [{"model": str(d), "fisher": f"fisher{i}"} for i, d in enumerate(fts)],
              "parameters": {"init": "checkpoint", "init_model": init_dir.name, "iterations": 0}}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    merge_file(tmp_path / "merge.yaml", tmp_path / "out", device="cpu", progress=False)
    info = json.loads((tmp_path / "out" / "merge_info.json").read_text())
    assert info["params"]["global"]["init_model"] == str(init_dir) and str(init_dir) in info["inputs"]
