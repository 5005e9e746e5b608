"""mergekit's parameter forms: a scalar, a gradient over layer depth (a list, linearly interpolated), and
``{filter: substring, value: x}`` conditions by tensor name (first match wins; a condition without filter is the
default), from a YAML config through the engine."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from unmerge.merge_config import merge
from unmerge.methods.params import value_for_tensor


def test_value_forms_by_hand():
    conds = [{"filter": "attn", "value": 0.5}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 2.0}]
    assert value_for_tensor(conds, "transformer.h.1.attn.c_attn.weight", 2) == 0.5
    assert value_for_tensor(conds, "transformer.h.1.mlp.c_fc.weight", 2) == 1.0  # gradient: last layer
    assert value_for_tensor(conds, "transformer.h.0.mlp.c_fc.weight", 2) == 0.0
    assert value_for_tensor(conds, "transformer.wte.weight", 2) == 2.0
    # three anchors over five layers: layer 1 sits a quarter of the way, between anchors 0 and 1
    assert value_for_tensor([0.0, 1.0, 0.0], "model.layers.1.mlp.up_proj.weight", 5) == pytest.approx(0.5)
    assert value_for_tensor([{"filter": "attn", "value": 1.0}], "lm_head.weight", 2) is None  # no default


def test_filter_conditions_in_a_config(tiny_gpt2_dirs, tmp_path):
    base, ft1, ft2 = tiny_gpt2_dirs
    config = tmp_path / "merge.yaml"
    config.write_text(f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: [{{filter: attn, value: 0.5}}, {{value: 1.0}}]
  - model: {ft2}
    parameters:
      weight: [0.0, 1.0]
dtype: float32
""")
    merge(config, tmp_path / "out", device="cpu", progress=False)
    got = load_file(tmp_path / "out" / "model.safetensors")
    b, f1, f2 = (load_file(d / "model.safetensors") for d in (base, ft1, ft2))
    for name, tensor in got.items():
        w1 = 0.5 if "attn" in name else 1.0
        w2 = 0.0 if (".0." in name or "wte" in name or "wpe" in name) else 1.0  # depth 0 -> 0, depth 1 -> 1
        want = b[name] + w1 * (f1[name] - b[name]) + w2 * (f2[name] - b[name])
        torch.testing.assert_close(tensor, want, rtol=1e-6, atol=1e-6, msg=name)
