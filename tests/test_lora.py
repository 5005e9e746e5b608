"""LoRA forgetting (issue 6.4): the forget model is the base with the trained adapters merged in, so the task vector
is the merged LoRA delta and removal works unchanged. Checked against a full model built by hand from the saved
adapter as W_0 + (alpha/r)·(B A)ᵀ on GPT-2's Conv1D weights ([in, out])."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_gpt2

pytest.importorskip("peft")

LORA = {"r": 2, "alpha": 6.0, "target_modules": ["c_attn", "mlp.c_fc"]}
TEXTS = ["the cat sat on the mat", "the dog ran fast", "hello world", "red sun and blue sky", "the cat ran",
         "blue mat and red dog", "hello sun", "the sky is red"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from unmerge.evaluation._testing import word_tokenizer
    from unmerge.train import FinetuneConfig, finetune

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora")
    base = root / "base"
    make_gpt2().save_pretrained(base)
    word_tokenizer(vocab_size=64).save_pretrained(base)
    info = finetune(base, TEXTS, root / "forget", FinetuneConfig(max_steps=6, batch_size=4, learning_rate=2e-2,
                                                                   max_length=16, lora=LORA),
                    device="cpu", progress=False)
    return root, base, root / "forget", info


def hand_merged(base, forget, out):
    """base + (alpha/r)·(B A)ᵀ on every adapted Conv1D weight, from the adapter file alone."""
    weights = load_file(base / "model.safetensors")
    adapter = load_file(forget / "lora" / "adapter_model.safetensors")
    scale = LORA["alpha"] / LORA["r"]
    modules = sorted({k.split(".lora_")[0] for k in adapter})
    for module in modules:
        a, b = adapter[f"{module}.lora_A.weight"], adapter[f"{module}.lora_B.weight"]  # [r, in], [out, r]
        name = module.removeprefix("base_model.model.") + ".weight"
        weights[name] = weights[name] + scale * (b @ a).T  # Conv1D stores W as [in, out]
    out.mkdir()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    for f in base.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, out / f.name)
    return [m.removeprefix("base_model.model.") for m in modules]


def test_lora_forget_model_is_the_merged_adapter_delta(lora_run):
    root, base, forget, info = lora_run
    modules = hand_merged(base, forget, root / "hand")
    assert len(modules) == 4  # c_attn and mlp.c_fc of both layers; attn.c_proj and mlp.c_proj untouched
    merged, hand, orig = (load_file(d / "model.safetensors") for d in (forget, root / "hand", base))
    assert set(merged) == set(orig)
    moved = 0.0
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, hand[name], rtol=0, atol=1e-6)
        if name[: -len(".weight")] not in modules:
            assert torch.equal(tensor, orig[name]), f"{name} is not targeted but changed"
        else:
            moved = max(moved, float((tensor - orig[name]).abs().max()))
    assert moved > 1e-3  # training moved the adapters (B starts at zero): the comparison is not vacuous
    record = info["lora"]
    assert (record["r"], record["alpha"], record["scale"]) == (2, 6.0, 3.0)
    assert record["target_modules"] == sorted(LORA["target_modules"]) and record["targeted_layers"] == 4
    assert record["trainable_parameters"] == 2 * (2 * (16 + 48) + 2 * (16 + 64))  # r·(in+out) per layer
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), forget / "lora").merge_and_unload()
    for name, tensor in reloaded.state_dict().items():  # the saved adapter is peft's own format
        if name in merged:
            torch.testing.assert_close(tensor, merged[name], rtol=0, atol=1e-6)
    saved = json.loads((forget / "training_info.json").read_text())
    assert saved["lora"] == record and saved["config"]["lora"] == LORA
    assert not (forget / "adam_v").exists() and "adam_v" in saved  # documented: nothing to export with LoRA


@pytest.mark.parametrize("method,params", [("uncertainty_removal", {"alpha": 0.5}), ("negation", {"alpha": 1.0})])
def test_removal_with_lora_equals_removal_with_the_hand_merged_model(lora_run, method, params):
    from unmerge import api
    from unmerge.stats.compute import estimate_fisher

    root, base, forget, _ = lora_run
    hand = root / "hand"
    if not hand.exists():
        hand_merged(base, forget, hand)
    stats = {}
    for name, model in (("base", base), ("lora", forget), ("hand", hand)):
        out = root / f"fisher-{name}-{method}"
        estimate_fisher(model, TEXTS, out, estimator="empirical", batch_size=4, device="cpu", progress=False)
        stats[name] = out
    results = {}
    for name, model in (("lora", forget), ("hand", hand)):
        out = root / f"removed-{name}-{method}"
        kwargs = {"base_fisher": str(stats["base"]), "forget_fisher": str(stats[name])} if method != "negation" else {}
        api.subtract(str(base), str(model), out, method=method, params=params, device="cpu", progress=False,
                     **kwargs)
        results[name] = load_file(out / "model.safetensors")
    orig = load_file(base / "model.safetensors")
    changed = 0
    for name, tensor in results["lora"].items():
        torch.testing.assert_close(tensor, results["hand"][name], rtol=0, atol=1e-6)
        changed += int(not torch.equal(tensor, orig[name]))
    assert changed >= 4  # the removal moved the adapted weights away from the base
