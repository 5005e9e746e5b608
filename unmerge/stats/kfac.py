"""K-FAC factors per linear layer (``nn.Linear`` and GPT-2 ``Conv1D``; layers as in ``unmerge.stats.gram``).

For a layer with input x (per token) and output s, K-FAC approximates the Fisher block of its weight by A ⊗ G:

- A = E[x̄ x̄ᵀ] over the non-padding tokens, where x̄ = [x, 1] (the homogeneous coordinate) when the layer has a bias
  (recorded per layer as ``homogeneous: true``; A is then [in+1, in+1], its last row/column being E[x] and 1, and its
  [in, in] block is exactly the Gram of ``unmerge.stats.gram``), else x̄ = x;
- G = E[g gᵀ] over the same tokens, g = ∂/∂s_t Σ_pos log p(y_pos | x_<pos) the gradient of the example's
  log-likelihood w.r.t. the layer output at token t. Labels y are sampled from the model (``estimator: sampled``,
  the true Fisher; per-example generators seeded as the diagonal Fisher's, so the draws do not depend on the batch)
  or are the observed next tokens (``empirical``). Padding is masked; the last token of an example predicts nothing
  and has g = 0, but counts in both expectations (so that A ⊗ G ≈ (1/n) Σ_t x̄_t x̄_tᵀ ⊗ g_t g_tᵀ, n = tokens).

Examples do not interact in a causal LM, so one backward pass of the summed log-likelihood of a batch yields every
per-token g exactly (unlike the diagonal Fisher, which needs per-example gradients squared).

Stored as ``<module>.A`` and ``<module>.G`` (fp32; accumulated in fp64). An untied output head is a linear layer
too: its G is [vocab, vocab] (4 GB in fp32 for a 32k vocabulary); a tied one is skipped. With W in its own layout, the matrix-vector
product of the K-FAC curvature is X ↦ A X G for a Conv1D weight ([in, out]) and X ↦ G X A for an nn.Linear weight
([out, in]); see ``unmerge.methods.mats``.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from unmerge.errors import StatisticError
from unmerge.stats.fisher import ESTIMATORS, _token_logprobs, target_labels
from unmerge.stats.gram import LAYER_STAT_FACTORS, InputGrams, check_examples, linear_layers, pad_batch, token_rows


def kfac_factors(model: torch.nn.Module, examples: list[list[int]], *, estimator: str = "sampled",
                 batch_size: int = 8, seed: int = 0, progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """K-FAC factors of every linear layer: ({'<module>.A': ..., '<module>.G': ...}, info)."""
    if estimator not in ESTIMATORS:
        raise StatisticError(f"unknown K-FAC estimator '{estimator}'", f"use one of {', '.join(ESTIMATORS)}")
    examples = check_examples(examples)
    layers, skipped = linear_layers(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    capture = InputGrams(layers, keep_outputs=True)
    gg: dict[str, torch.Tensor] = {}
    n_tokens = n_predicted = 0
    with capture.attached():
        for start in tqdm(range(0, len(examples), batch_size), desc=f"kfac:{estimator}", disable=not progress,
                          unit="batch"):
            ids, mask = pad_batch(examples[start : start + batch_size], device)
            if ids.shape[1] > 1:
                seeds = [seed * 1_000_003 + start + i for i in range(ids.shape[0])]
                labels = target_labels(model, ids, mask, estimator, seeds)
            else:
                labels = ids[:, 1:]
            capture.mask, capture.active = mask, True
            with torch.enable_grad():
                logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1]
            capture.active = False
            predicted = mask[:, 1:]
            total = (_token_logprobs(logits, labels) * predicted).sum()
            outputs, capture.outputs = capture.outputs, []
            if not all(out.requires_grad for _, out, _ in outputs):
                raise StatisticError("a linear layer's output does not require grad", "unfreeze the model")
            grads = torch.autograd.grad(total, [out for _, out, _ in outputs], allow_unused=True)
            for (name, out, out_mask), grad in zip(outputs, grads):
                rows = token_rows(grad if grad is not None else torch.zeros_like(out), out_mask, name)
                product = (rows.T @ rows).double()
                gg[name] = gg[name] + product if name in gg else product
            n_tokens += int(mask.sum())
            n_predicted += int(predicted.sum())
    model.train(was_training)
    tensors: dict[str, torch.Tensor] = {}
    described = {}
    for name, layer in layers.items():
        a = capture.augmented(name) if layer.bias else capture.gram(name)
        tensors[f"{name}.A"] = a.float().cpu()
        tensors[f"{name}.G"] = (gg[name] / capture.count[name]).float().cpu()
        described[name] = {**layer.describe(), "homogeneous": layer.bias}
    info = {"n_examples": len(examples), "n_tokens": n_tokens, "n_predicted_tokens": n_predicted,
            "estimator": estimator, "seed": seed, "batch_size": batch_size, "layers": described,
            "skipped_layers": skipped, "keyed_by": "module", "factors": list(LAYER_STAT_FACTORS["kfac"]),
            "bias": "homogeneous coordinate: A = E[[x,1][x,1]ᵀ] for layers with a bias", "accumulation": "float64"}
    return tensors, info
