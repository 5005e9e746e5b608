"""RegMean (Jin et al., ICLR 2023): merge each linear layer's weight so that it best reproduces every model's outputs
on that model's own inputs, min_W Σ_i ‖X_i W − X_i W_i‖², given the input Grams G_i = X_iᵀX_i / n_i.

In the [in, out] orientation (GPT-2 Conv1D, y = x W) the solution is W = (Σ G̃_i)⁻¹ Σ G̃_i W_i; an ``nn.Linear``
weight ([out, in], y = x Wᵀ) is transposed into that orientation and back, i.e. W = (Σ W_i G̃_i)(Σ G̃_i)⁻¹. The Grams
are shrunk toward their diagonals, G̃ = diag(G) + a·offdiag(G) (a = ``alpha``; 1 is the plain Gram, 0 a per-input
weighted average), and regularised by a relative ridge: r = ``ridge`` · mean(diag(Σ_i G̃_i)) / n_models is added to
every G̃_i's diagonal, so that Σ_i G̃_i gets ``ridge``·mean-diag and directions no model's inputs span go to the
models' average (one model returns itself exactly). The solve is in float64.

Tensors without a Gram (biases, norms, embeddings, an untied head without statistics) are averaged; a tied
``lm_head`` is merged once as the embedding by the engine. Every tensor's rule is recorded (``rule``).

Helpers shared with ``mats``: which tensors are embeddings, and a linear-layer weight's orientation (from the layer
description that per-layer statistics carry, ``task.context['layer']``).
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from unmerge.errors import MethodError
from unmerge.methods.registry import Method, Param, TensorTask, register

Tensor = torch.Tensor

# token and position embeddings of the common architectures (never sent through a linear-layer solver)
_EMBEDDING = re.compile(r"(^|\.)(wte|wpe|embed_tokens|embed_positions|word_embeddings|position_embeddings|"
                        r"token_type_embeddings|embed_in|shared)\.weight$")


def is_embedding(name: str) -> bool:
    return bool(_EMBEDDING.search(name))


def input_axis(task: TensorTask, fits: Callable[[int], bool], what: str) -> int:
    """The axis of ``task``'s weight that multiplies the layer input: 0 for ``Conv1D`` ([in, out]), 1 for
    ``nn.Linear`` ([out, in]). From the layout recorded with the per-layer statistic (``task.context['layer']``), else
    from the shapes when only one axis ``fits`` the statistic's factors."""
    shape = list(task.models[0].shape)
    if len(shape) != 2:
        raise MethodError(f"'{task.name}' has a {what} statistic but shape {shape}, not a matrix")
    layout = (task.context.get("layer") or {}).get("weight_layout")
    if layout in ("in_out", "out_in"):
        axes = [0 if layout == "in_out" else 1]
        if not fits(axes[0]):
            raise MethodError(f"the {what} statistic of '{task.name}' does not fit its {layout} weight {shape}",
                              "compute the statistic for this model")
        return axes[0]
    axes = [axis for axis in (0, 1) if fits(axis)]
    if len(axes) != 1:
        why = "both orientations fit" if axes else "no orientation fits"
        raise MethodError(f"cannot tell the input axis of the weight '{task.name}' {shape} from its {what} statistic "
                          f"({why})", "use statistics written by `unmerge stats`, which record each layer's layout")
    return axes[0]


def to_in_out(weight: Tensor, axis: int) -> Tensor:
    """The weight in the [in, out] orientation (a view)."""
    return weight if axis == 0 else weight.T


def shrink(gram: Tensor, alpha: float) -> Tensor:
    """diag(G) + a·offdiag(G)."""
    return alpha * gram + (1.0 - alpha) * torch.diag_embed(torch.diagonal(gram))


def regmean_merge(models: list[Tensor], grams: list[Tensor], *, axis: int, alpha: float = 0.1, ridge: float = 1e-6,
                  name: str = "tensor") -> Tensor:
    """W = (Σ G̃_i)⁻¹ Σ G̃_i W_i in the [in, out] orientation (``axis`` = input axis of the weights), float64."""
    grams64 = [shrink(g.double(), alpha) for g in grams]
    total = sum(grams64)
    scale = float(torch.diagonal(total).mean())
    if not scale > 0:
        raise MethodError(f"regmean of '{name}': the Grams are zero", "re-estimate them on non-empty data")
    eye = torch.eye(total.shape[0], dtype=torch.float64, device=total.device)
    r = ridge * scale / len(grams)
    rhs = sum((g + r * eye) @ to_in_out(w.double(), axis) for g, w in zip(grams64, models))
    try:
        solution = torch.linalg.solve(total + ridge * scale * eye, rhs)
    except RuntimeError as exc:  # torch.linalg.LinAlgError is a RuntimeError
        raise MethodError(f"regmean of '{name}': the summed Gram is singular ({exc})", "use a positive ridge") from None
    return to_in_out(solution, axis).to(models[0].dtype).contiguous()


def _regmean(task: TensorTask) -> Tensor:
    grams = task.stats.get("gram")
    if grams is None or is_embedding(task.name):
        task.record.update(rule="average", reason="embedding" if is_embedding(task.name) else "no Gram")
        return sum(task.models) / len(task.models)
    p = task.params
    axis = input_axis(task, lambda ax: task.models[0].shape[ax] == grams[0].shape[0], "Gram")
    task.record.update(rule="regmean", weight_layout="in_out" if axis == 0 else "out_in")
    return regmean_merge(task.models, grams, axis=axis, alpha=p["alpha"], ridge=p["ridge"], name=task.name)


register(Method(
    name="regmean",
    fn=_regmean,
    summary="regression mean of linear layers from their input Grams (Jin et al., 2023); other tensors averaged",
    formula="W = (Σ G̃_i)⁻¹ Σ G̃_i W_i,  G̃ = diag(G) + a·offdiag(G) + ridge;  other tensors: mean θ_i",
    params=(
        Param("alpha", 0.1, float, "off-diagonal scale a of the Grams (1 = plain Gram, 0 = diagonal)", minimum=0.0,
              maximum=1.0, aliases=("reduce_non_diagonal_ratio",)),
        Param("ridge", 1e-6, float, "ridge relative to the mean diagonal of the summed Gram", minimum=0.0),
    ),
    needs_base=False,
    stats=("gram",),
))
