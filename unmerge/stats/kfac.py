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

Sequence-classification models (``*ForSequenceClassification``, detected by ``is_sequence_classifier``): the
log-likelihood of an example is log p(y | x) of its one label, y sampled from the model's class distribution
p(· | x) with the same per-example generators (``estimator: sampled``, one draw per example) or the observed label
(``empirical``, labels passed in). Padding uses ``config.pad_token_id`` (the classifier pools the rightmost
non-padding token). A is as above; G = (1/n_examples) Σ_tokens g gᵀ, so that A ⊗ G ≈ (1/n_examples) Σ_i Σ_t
x̄_t x̄_tᵀ ⊗ g_t g_tᵀ is on the per-example scale of the diagonal Fisher (recorded as ``g_normalization``); the
classifier's loss is per sequence, not per token, so a per-token mean would weight long-input tasks less.

Stored as ``<module>.A`` and ``<module>.G`` (fp32; accumulated in fp64). An untied output head is a linear layer
too: its G is [vocab, vocab] (4 GB in fp32 for a 32k vocabulary); a tied one is skipped. With W in its own layout, the matrix-vector
product of the K-FAC curvature is X ↦ A X G for a Conv1D weight ([in, out]) and X ↦ G X A for an nn.Linear weight
([out, in]); see ``unmerge.methods.mats``.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from unmerge.errors import StatisticError
from unmerge.stats.fisher import ESTIMATORS, _token_logprobs, draw_labels, target_labels
from unmerge.stats.gram import (LAYER_STAT_FACTORS, InputGrams, check_examples, classifier_pad_id,
                                 is_sequence_classifier, linear_layers, pad_batch, token_rows)


def _lm_loglik(model, ids, mask, estimator, seeds, labels, capture) -> tuple[torch.Tensor, int]:
    """Σ_pos log p(y_pos | x_<pos) of a causal-LM batch (targets sampled before the captured forward)."""
    targets = target_labels(model, ids, mask, estimator, seeds) if ids.shape[1] > 1 else ids[:, 1:]
    capture.mask, capture.active = mask, True
    with torch.enable_grad():
        logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1]
    capture.active = False
    predicted = mask[:, 1:]
    return (_token_logprobs(logits, targets) * predicted).sum(), int(predicted.sum())


def _classifier_loglik(model, ids, mask, estimator, seeds, labels, capture) -> tuple[torch.Tensor, int]:
    """Σ_i log p(y_i | x_i) of a sequence-classification batch, y sampled from p(· | x_i) or observed."""
    capture.mask, capture.active = mask, True
    with torch.enable_grad():
        logits = model(input_ids=ids, attention_mask=mask.long()).logits
    capture.active = False
    if estimator == "sampled":
        targets = draw_labels(logits.unsqueeze(1), seeds).squeeze(1)  # the diagonal Fisher's draws
    elif labels is None:
        raise StatisticError("the empirical K-FAC of a sequence classifier needs the observed labels",
                             "pass labels=..., or use estimator='sampled'")
    else:
        targets = torch.as_tensor(labels, dtype=torch.long, device=ids.device)
    return _token_logprobs(logits, targets).sum(), ids.shape[0]


def kfac_factors(model: torch.nn.Module, examples: list[list[int]], *, estimator: str = "sampled",
                 batch_size: int = 8, seed: int = 0, progress: bool = True,
                 labels: list[int] | None = None, offset: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """K-FAC factors of every linear layer: ({'<module>.A': ..., '<module>.G': ...}, info).

    ``labels`` (one class per example) are needed only by the empirical estimator of a sequence classifier.
    ``offset``: the global index of ``examples[0]`` when this is one shard of a data-parallel run
    (``unmerge.stats.distributed``); it enters the per-example label seeds only."""
    if estimator not in ESTIMATORS:
        raise StatisticError(f"unknown K-FAC estimator '{estimator}'", f"use one of {', '.join(ESTIMATORS)}")
    classifier = is_sequence_classifier(model)
    if labels is not None and len(labels) != len(examples):
        raise StatisticError(f"K-FAC: {len(labels)} labels for {len(examples)} examples", "give one label per example")
    if not classifier:
        examples = check_examples(examples)
    elif not examples or any(len(e) == 0 for e in examples):
        raise StatisticError("the dataset is empty or has an empty example", "give non-empty token lists")
    loglik = _classifier_loglik if classifier else _lm_loglik
    pad_id = classifier_pad_id(model) if classifier else 0
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
            ids, mask = pad_batch(examples[start : start + batch_size], device, pad_id)
            seeds = [seed * 1_000_003 + offset + start + i for i in range(ids.shape[0])]
            batch_labels = labels[start : start + batch_size] if labels is not None else None
            total, predicted = loglik(model, ids, mask, estimator, seeds, batch_labels, capture)
            outputs, capture.outputs = capture.outputs, []
            if not all(out.requires_grad for _, out, _ in outputs):
                raise StatisticError("a linear layer's output does not require grad", "unfreeze the model")
            grads = torch.autograd.grad(total, [out for _, out, _ in outputs], allow_unused=True)
            for (name, out, out_mask), grad in zip(outputs, grads):
                rows = token_rows(grad if grad is not None else torch.zeros_like(out), out_mask, name)
                product = (rows.T @ rows).double()
                gg[name] = gg[name] + product if name in gg else product
            n_tokens += int(mask.sum())
            n_predicted += predicted
    model.train(was_training)
    tensors: dict[str, torch.Tensor] = {}
    described = {}
    for name, layer in layers.items():
        a = capture.augmented(name) if layer.bias else capture.gram(name)
        tensors[f"{name}.A"] = a.float().cpu()
        g_count = len(examples) if classifier else capture.count[name]
        tensors[f"{name}.G"] = (gg[name] / g_count).float().cpu()
        described[name] = {**layer.describe(), "homogeneous": layer.bias}
    info = {"n_examples": len(examples), "n_tokens": n_tokens, "n_predicted_tokens": n_predicted,
            "estimator": estimator, "seed": seed, "batch_size": batch_size, "layers": described,
            "skipped_layers": skipped, "keyed_by": "module", "factors": list(LAYER_STAT_FACTORS["kfac"]),
            "bias": "homogeneous coordinate: A = E[[x,1][x,1]ᵀ] for layers with a bias", "accumulation": "float64",
            "model_kind": "sequence_classification" if classifier else "causal_lm",
            "g_normalization": "per_example" if classifier else "per_token"}
    return tensors, info
