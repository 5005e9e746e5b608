"""LoRA fine-tuning with peft: low-rank adapters on the targeted weights are trained, then merged into the base, so
the forget model is a full checkpoint whose task vector is the merged LoRA delta and everything downstream
(statistics, removal, evaluation) is unchanged. With scale s = alpha / r:

    nn.Linear (W [out, in]):        W_f = W_0 + s · B A
    GPT-2 Conv1D (W [in, out]):     W_f = W_0 + s · (B A)ᵀ        (peft's ``fan_in_fan_out``)

A [r, in] starts Kaiming-uniform (seeded), B [out, r] at zero, so training starts at the base. The adapter itself
is kept next to the merged model (``lora/``: peft's ``adapter_model.safetensors`` + ``adapter_config.json``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unmerge.errors import InputError, RecipeError, did_you_mean
from unmerge.recipe import SCHEMA

if TYPE_CHECKING:
    import torch

ADAPTER_DIR = "lora"
LORA_DEFAULTS: dict[str, Any] = SCHEMA["finetune"]["lora"]  # the recipe's defaults, for the CLI and API too


def lora_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """The LoRA settings with defaults filled in and checked (r a positive integer, alpha > 0, 0 ≤ dropout < 1,
    target_modules a list of module names or None for peft's default for the architecture)."""
    for key in spec:
        if key not in LORA_DEFAULTS:
            raise RecipeError(f"unknown finetune.lora key '{key}'", did_you_mean(key, LORA_DEFAULTS))
    out = {**LORA_DEFAULTS, **spec}
    if isinstance(out["r"], bool) or not isinstance(out["r"], int) or out["r"] < 1:
        raise RecipeError(f"finetune.lora.r is {out['r']!r}", "give the adapter rank as a positive integer, e.g. 8")
    if not isinstance(out["alpha"], (int, float)) or not out["alpha"] > 0:
        raise RecipeError(f"finetune.lora.alpha is {out['alpha']!r}", "give a positive number, e.g. 2·r")
    if not isinstance(out["dropout"], (int, float)) or not 0 <= out["dropout"] < 1:
        raise RecipeError(f"finetune.lora.dropout is {out['dropout']!r}", "give a number in [0, 1)")
    targets = out["target_modules"]
    if isinstance(targets, str):
        targets = [targets]
    if targets is not None and (not targets or not all(isinstance(t, str) for t in targets)):
        raise RecipeError(f"finetune.lora.target_modules is {targets!r}",
                          "give module names such as [c_attn, c_proj], or leave it out for peft's default")
    out["target_modules"] = list(targets) if targets is not None else None
    return out


def with_lora(model: "torch.nn.Module", spec: dict[str, Any]):
    """``model`` wrapped by peft with fresh adapters (only the adapters are trainable)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise InputError("finetune.lora needs the peft package", "pip install 'unmerge[lora]'") from exc
    settings = lora_settings(spec)
    from transformers.pytorch_utils import Conv1D

    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                        target_modules=settings["target_modules"], fan_in_fan_out=conv1d, bias="none",
                        task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft: a target module that the model does not have, or no default for the model
        raise RecipeError(f"finetune.lora cannot target {settings['target_modules']}: {exc}",
                          "name modules of the model, e.g. c_attn for GPT-2, q_proj/v_proj for Llama") from exc


@dataclass
class Adapter:
    """The trained adapter as peft saves it: tensors keyed as in ``adapter_model.safetensors`` and the config."""

    tensors: dict[str, "torch.Tensor"]
    config: Any

    def save(self, directory: Path) -> None:
        """``adapter_model.safetensors`` + ``adapter_config.json`` (loadable with ``peft.PeftModel.from_pretrained``)."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
        self.config.save_pretrained(directory)


def merge_lora(peft_model) -> tuple["torch.nn.Module", dict[str, Any], Adapter]:
    """(the base model with the adapters merged in, the LoRA record for ``training_info.json``, the adapter)."""
    from peft import get_peft_model_state_dict

    config = next(iter(peft_model.peft_config.values()))
    adapter = Adapter({k: v.detach().cpu().contiguous().clone()
                       for k, v in get_peft_model_state_dict(peft_model).items()}, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    targeted = sorted(name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")
                      and hasattr(module, "base_layer"))
    record = {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
              "target_modules": sorted(config.target_modules), "scale": config.lora_alpha / config.r,
              "fan_in_fan_out": config.fan_in_fan_out, "trainable_parameters": trainable,
              "targeted_layers": len(targeted), "adapter": ADAPTER_DIR,
              "delta": "W_f = W_0 + (alpha/r)·B A (Conv1D: (B A)ᵀ), merged into the saved model"}
    return peft_model.merge_and_unload(), record, adapter
