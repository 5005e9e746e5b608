"""Linear combinations: weighted averaging, task arithmetic and its negation baseline."""
from __future__ import annotations

import torch

from unmerge.methods.kernels import flat, map_chunks
from unmerge.methods.registry import WEIGHT, Method, Param, Proof, TensorTask, register
from unmerge.methods.sparsify import Shrink, model_taus, stream_combine


def linear(models: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """θ = Σ w_i θ_i / Σ w_i (normalize) or Σ w_i θ_i; streamed in chunks like :func:`task_arithmetic`."""
    denom = sum(weights)
    if normalize and denom == 0:
        raise ZeroDivisionError("the weights sum to zero; set normalize: false")
    ms = [flat(m) for m in models]
    out = torch.empty_like(ms[0])

    def run(s: int, e: int) -> None:
        acc = None
        for w, m in zip(weights, ms):
            term = torch.mul(m[s:e], w)
            acc = term if acc is None else acc.add_(term)
        if normalize:
            acc.div_(denom)
        out[s:e] = acc

    map_chunks(run, out.numel(), out)
    return out.view_as(models[0])


def task_arithmetic(base: torch.Tensor, models: list[torch.Tensor], weights: list[float], lam: float = 1.0,
                    normalize: bool = False, out: torch.Tensor | None = None, proof: Proof | None = None
                    ) -> torch.Tensor:
    """θ = θ₀ + λ Σ_t w_t (θ_t − θ₀)  (÷ Σ_t w_t with ``normalize``, as mergekit: a |Σ w| below 1e-8 divides by 1).

    The sparsified sum of :func:`~unmerge.methods.sparsify.stream_combine` with nothing trimmed: streamed in chunks
    (the same arithmetic, element by element, as the whole-tensor expression, fused natively where it can be), so
    memory-mapped inputs cost no copies: the peak is the output plus a few chunks."""
    if not models:
        return base + 0.0  # θ₀ + λ · (an empty sum)
    return stream_combine(base, model_taus(base, models), [Shrink(None)] * len(models), weights, "task_arithmetic",
                          lam, "paper", normalize, models=models, out=out, proof=proof)


def negation(base: torch.Tensor, forget: torch.Tensor, alpha: float, out: torch.Tensor | None = None,
             proof: Proof | None = None) -> torch.Tensor:
    """θ = θ₀ − α (θ_f − θ₀): task arithmetic with weight −α."""
    return task_arithmetic(base, [forget], [-alpha], out=out, proof=proof)


def _linear(task: TensorTask) -> torch.Tensor:
    try:
        return linear(task.models, task.params["weight"], task.params["normalize"])
    except ZeroDivisionError as exc:
        from unmerge.errors import MethodError

        raise MethodError(f"linear merge of '{task.name}': {exc}") from None


register(Method(
    name="linear",
    fn=_linear,
    summary="weighted average of the models (model soup)",
    formula="θ = Σ w_i θ_i / Σ w_i  (or Σ w_i θ_i with normalize: false)",
    params=(WEIGHT, Param("normalize", True, bool, "divide by the sum of weights")),
    needs_base=False,
    propagates_nonfinite=True,
))

register(Method(
    name="task_arithmetic",
    fn=lambda t: task_arithmetic(t.base, t.models, t.params["weight"], t.params["lambda"], t.params["normalize"],
                                 t.out, t.proof),
    summary="add scaled task vectors to the base (Ilharco et al., 2023); negation is w < 0",
    formula="θ = θ₀ + λ Σ w_t (θ_t − θ₀)  (÷ Σ w_t with normalize: true)",
    params=(WEIGHT, Param("lambda", 1.0, float, "global scale λ of the summed task vectors", aliases=("scaling_coef",)),
            Param("normalize", False, bool, "divide the summed task vectors by Σ w (mergekit's normalize; its default "
                  "for task_arithmetic is false too)")),
    propagates_nonfinite=True,
))

ALPHA = Param("alpha", 1.0, float, "removal strength α", minimum=0.0, min_exclusive=True)

register(Method(
    name="negation",
    fn=lambda t: negation(t.base, t.models[0], t.params["alpha"], t.out, t.proof),
    summary="subtract the forget task vector (task-arithmetic negation baseline)",
    formula="θ = θ₀ − α (θ_f − θ₀)",
    params=(ALPHA,),
    min_models=1,
    max_models=1,
    aliases=("task_arithmetic_negation",),
    propagates_nonfinite=True,
))
