"""Sparsified task-vector merges: TIES, DARE, Model Breadcrumbs and DELLA, with mergekit's variant names.

Every method here sparsifies each task vector τ_t = θ_t − θ₀ into τ̂_t, then combines:

- ``task_arithmetic`` combine: θ = θ₀ + λ Σ_t w_t τ̂_t  (optionally / Σ_t w_t with ``normalize``);
- ``ties`` combine (Yadav et al., 2023): elect γ = sgn(Σ_t w_t τ̂_t), keep the entries that agree with γ
  (a_t = [sgn(w_t τ̂_t) = γ]) and take their disjoint mean τ_m = Σ_t a_t w_t τ̂_t / max(Σ_t a_t, 1); θ = θ₀ + λ τ_m.

Sparsifiers: TIES keeps the top ``density`` fraction of |τ_t|; DARE (Yu et al., 2024) keeps each entry with
probability 1 − p and rescales survivors by 1/(1 − p); Breadcrumbs (Davari & Belilovsky, 2024) drops the largest
``gamma`` fraction and the smallest entries so that ``density`` remains; DELLA (Deep et al., 2024) keeps entry i with
probability p_i = density − ε + 2ε·r_i (r_i ∈ [0, 1] its magnitude rank within its row) and rescales by 1/p_i.

``compat`` selects whose TIES arithmetic to reproduce (the paper is the default). What each library does, read from
its source (mergekit ``generalized_task_arithmetic.py`` / ``sparsify.py``, FusionBench ``ties_merging_utils.py`` and
its default config, peft ``utils/merge_utils.py``):

- ``paper`` — trim: keep |τ| ≥ the k-th largest |τ|, k = ⌈density·n⌉ (magnitude ties kept). Elect γ = sgn Σ w τ̂;
  where Σ = 0, γ = sgn Σγ (then +1). Agree: sgn(w τ̂) = γ. Aggregate: Σ a w τ̂ / max(Σ a, 1).
- ``mergekit`` — trim: exactly k = ⌊density·n⌋ entries by a sort. γ = +1 where Σ w τ̂ ≥ 0. Agree: sgn(w τ̂) = γ.
  Aggregate: Σ a w τ̂ / Σ a w (0 → 1) when ``normalize`` (its default: on for ties and della, off for dare_ties and
  breadcrumbs_ties), else Σ a w τ̂; then × ``lambda``.
- ``fusionbench`` — trim: keep |τ| ≥ the (n − ⌊density·n⌋)-th smallest |τ|, i.e. one entry more than ⌊density·n⌋.
  Election and agreement as the paper. Aggregate: Σ a w τ̂ (its config's ``merge_func: sum``).
- ``peft`` — trim: exactly k = ⌊density·n⌋ by top-k. γ = +1 where the *unweighted* Σ τ̂ ≥ 0. Agree: sgn(τ̂) = γ.
  Aggregate: Σ a w τ̂ / max(Σ a, 1).

Further differences: peft returns the merged delta only (we add θ₀ + λ·); FusionBench flattens the whole model into
one vector per task (``scope: global`` here, with ``lambda`` = its ``scaling_factor``, 0.3 in its config) and its
threshold is a percentage; mergekit's DARE/DELLA ``rescale`` matches the L1 norm of the original task vector
(``RescaleNorm.l1``) instead of dividing by the keep probability, and its Breadcrumbs mask is empty when
⌊gamma·n⌋ = 0 (``indices[n_bot:-0]``), which we do not reproduce. ``normalize`` (true: disjoint mean, false: disjoint
sum) overrides each convention's default. Magnitude ties at the threshold are kept in paper/fusionbench mode.

``scope: global`` takes the top-k of each model's whole task vector (k = Σ density·numel), as the TIES paper's code
does: an exact streaming pre-pass (a two-pass radix select over float32 bit patterns) finds each model's threshold
without holding more than one tensor; every compat then keeps |τ| ≥ its model's threshold, and the zero-sum
tie-break (paper/fusionbench) stays per tensor. The paper has no per-model weights: in paper mode w_t scales τ_t.

Random masks (DARE, DELLA) come from a CPU ``torch.Generator`` seeded by sha256(seed, tensor name, model index), so
the same seed gives the same bytes on any device and in any tensor order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from unmerge.errors import MethodError
from unmerge.methods.arithmetic import WEIGHT
from unmerge.methods.registry import Method, Param, TensorTask, register

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------- trimming
def _ceil(x: float) -> int:
    """⌈x⌉ after rounding away float noise (0.3·10 = 3.0000000000000004 gives 3, not 4)."""
    return math.ceil(round(x, 3))


def keep_count(density: float, n: int) -> int:
    """k = ⌈density·n⌉, clamped to [0, n]."""
    return min(n, max(0, _ceil(density * n)))


def _trim_threshold(magnitude: Tensor, density: float) -> Tensor:
    """Paper: keep |τ| ≥ the k-th largest |τ|, k = ⌈density·n⌉."""
    k = keep_count(density, magnitude.numel())
    if k >= magnitude.numel():
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    return magnitude >= torch.topk(magnitude.flatten(), k).values[-1]


def _trim_kthvalue(magnitude: Tensor, density: float) -> Tensor:
    """FusionBench: keep |τ| ≥ the (n − ⌊density·n⌋)-th smallest |τ| (one more entry than ⌊density·n⌋)."""
    n = magnitude.numel()
    kept = int(n * density)
    if kept >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    return magnitude >= torch.kthvalue(magnitude.flatten(), n - kept).values


def _trim_exact(magnitude: Tensor, density: float) -> Tensor:
    """mergekit / peft: exactly k = ⌊density·n⌋ entries by a sort (magnitude ties broken by position)."""
    if density >= 1:
        return torch.ones_like(magnitude, dtype=torch.bool)
    k = int(density * magnitude.numel())
    mask = torch.zeros(magnitude.numel(), dtype=torch.bool, device=magnitude.device)
    mask[torch.topk(magnitude.flatten(), k).indices] = True
    return mask.view_as(magnitude)


# ---------------------------------------------------------------------------------------------------- conventions
@dataclass(frozen=True)
class Convention:
    """How one library computes TIES: trimming, sign election, agreement, aggregation and DARE rescaling."""

    trim: Callable[[Tensor, float], Tensor]  # (|τ|, density) -> keep mask
    weighted_sign: bool  # elect and match signs on w·τ̂ (peft: on τ̂)
    zero_to_majority: bool  # Σ = 0 takes sgn Σγ (paper) instead of +1
    weighted_divisor: bool  # divide by Σ a w (mergekit) instead of the count Σ a
    normalize: bool | None  # default aggregate: mean (True) or sum (False); None: the method family decides
    l1_rescale: bool  # random masks rescale to the original L1 norm (mergekit) instead of 1/keep probability


CONVENTIONS: dict[str, Convention] = {
    "paper": Convention(_trim_threshold, True, True, False, True, False),
    "mergekit": Convention(_trim_exact, True, False, True, None, True),
    "fusionbench": Convention(_trim_kthvalue, True, True, False, False, False),
    "peft": Convention(_trim_exact, False, False, False, True, False),
}


def elect_sign(deltas: Tensor, weights: Tensor, conv: Convention) -> Tensor:
    """γ = sgn Σ_t (w_t) τ̂_t over the stacked deltas (model axis 0), with the convention's tie-break."""
    total = (deltas * weights if conv.weighted_sign else deltas).sum(0)
    if not conv.zero_to_majority:
        return torch.where(total >= 0, 1.0, -1.0).to(deltas.dtype)
    sign = torch.sign(total)
    majority = 1.0 if float(sign.sum()) >= 0 else -1.0
    return torch.where(sign == 0, torch.full_like(sign, majority), sign)


def disjoint_merge(deltas: Tensor, weights: Tensor, sign: Tensor, conv: Convention, normalize: bool) -> Tensor:
    """τ_m = Σ_t a_t w_t τ̂_t / divisor, a_t = [sgn(w_t τ̂_t) = γ]; divisor Σ a_t (≥ 1), Σ a_t w_t, or 1 (sum)."""
    agree = (torch.sign(deltas * weights if conv.weighted_sign else deltas) == sign).to(deltas.dtype)
    total = (deltas * weights * agree).sum(0)
    if not normalize:
        return total
    divisor = (agree * weights).sum(0) if conv.weighted_divisor else agree.sum(0)
    return total / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def combine(base: Tensor, deltas: list[Tensor], weights: list[float], how: str, lam: float, compat: str,
            normalize: bool | None, family_normalize: bool = True) -> Tensor:
    """θ = θ₀ + λ · (Σ w τ̂ [/ Σ w]  or  the TIES disjoint merge of the τ̂)."""
    conv = CONVENTIONS[compat]
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * base.dim()))
    if how == "ties":
        if normalize is None:
            normalize = family_normalize if conv.normalize is None else conv.normalize
        merged = disjoint_merge(stacked, w, elect_sign(stacked, w, conv), conv, normalize)
    else:
        merged = (stacked * w).sum(0)
        if normalize:
            total = sum(weights)
            merged = merged / (total if abs(total) >= 1e-8 else 1.0)
    return base + lam * merged


def ties(base: Tensor, models: list[Tensor], weights: list[float], density: list[float], lam: float = 1.0,
         compat: str = "paper", normalize: bool | None = None, thresholds: list[float] | None = None) -> Tensor:
    """TIES: trim each τ_t to its top ``density`` by magnitude (or to |τ_t| ≥ a global per-model threshold), elect
    signs, disjoint mean; θ = θ₀ + λ τ_m."""
    conv = CONVENTIONS[compat]
    trimmed = []
    for i, model in enumerate(models):
        tau = model - base
        keep = conv.trim(tau.abs(), density[i]) if thresholds is None else tau.abs() >= thresholds[i]
        trimmed.append(tau * keep)
    return combine(base, trimmed, weights, "ties", lam, compat, normalize)


# ---------------------------------------------------------------------------------------------------- random masks
def tensor_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed from (seed, tensor name, model index): independent of the order tensors are merged in."""
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _uniform(shape: torch.Size, seed: int, device: torch.device) -> Tensor:
    """U[0, 1) drawn on the CPU (same bytes on every device), then moved."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _rescale(tau: Tensor, kept: Tensor, keep_prob: Tensor | float, l1: bool) -> Tensor:
    """Unbiased rescale kept / p, or (mergekit) kept · ‖τ‖₁ / ‖kept‖₁."""
    if not l1:
        return kept / keep_prob
    before, after = tau.abs().sum(), kept.abs().sum()
    return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept


def dare(tau: Tensor, drop_rate: float, seed: int, rescale: bool = True, l1: bool = False) -> Tensor:
    """τ̃ = m ⊙ τ / (1 − p), m_i ~ Bernoulli(1 − p) (no rescale: m ⊙ τ)."""
    keep_prob = 1.0 - drop_rate
    kept = tau * (_uniform(tau.shape, seed, tau.device) < keep_prob)
    return _rescale(tau, kept, keep_prob, l1) if rescale and keep_prob > 0 else kept


def della(tau: Tensor, density: float, epsilon: float, seed: int, rescale: bool = True, l1: bool = False) -> Tensor:
    """MagPrune: p_i = density − ε + 2ε·r_i with r_i = rank(|τ_i|)/(m − 1) within its row (dim 0 slices, a 1-D
    tensor is one row; r = ½ for a single entry); τ̃_i = m_i τ_i / p_i, m_i ~ Bernoulli(p_i)."""
    if density - epsilon <= 0 or density + epsilon > 1:
        raise MethodError(f"della: density ± epsilon = {density} ± {epsilon} leaves (0, 1]",
                          "choose epsilon < density ≤ 1 − epsilon")
    rows = tau.reshape(tau.shape[0], -1) if tau.dim() > 1 else tau.reshape(1, -1)
    width = rows.shape[1]
    if width > 1:
        ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).to(tau.dtype) / (width - 1)
    else:
        ranks = torch.full_like(rows, 0.5)
    probs = density - epsilon + 2 * epsilon * ranks
    kept = rows * (_uniform(rows.shape, seed, tau.device) < probs)
    out = _rescale(rows, kept, probs, l1) if rescale else kept
    return out.reshape(tau.shape)


# ---------------------------------------------------------------------------------------------------- breadcrumbs
def breadcrumbs(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Drop the ⌊gamma·n⌋ largest |τ| and the smallest so that ⌈density·n⌉ entries remain (fewer top drops when
    density + gamma > 1)."""
    n = tau.numel()
    n_keep = keep_count(density, n)
    n_top = math.floor(round(gamma * n, 3))
    n_bottom = n - n_keep - n_top
    if n_bottom < 0:
        n_top, n_bottom = n_top + n_bottom, 0
    order = torch.sort(tau.abs().flatten(), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=tau.device)
    mask[order[n_bottom:n - n_top]] = True
    return tau * mask.view_as(tau)


# ---------------------------------------------------------------------------------------------------- global top-k
_HIGH_BINS, _LOW_BINS = 1 << 15, 1 << 16


def _bits(tau: Tensor) -> Tensor:
    """IEEE-754 bit patterns of |τ| (float32): for non-negative floats they sort like the values."""
    return tau.abs().float().contiguous().view(torch.int32).flatten().long()


def _locate(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest count position, and the rank k' of that element inside the bin."""
    from_top = hist.flip(0).cumsum(0)
    pos = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype)))
    bin_ = hist.numel() - 1 - pos
    return bin_, k - int(from_top[pos] - hist[bin_])


def global_thresholds(stream: Callable[[], Iterator[TensorTask]]) -> list[float]:
    """Exact k_t-th largest |τ_t| over every tensor of each model t, k_t = ⌈Σ_tensors density_t·numel⌉.

    Two streaming passes over the tensors: a histogram of the high 16 bits of |τ|'s float32 pattern locates the
    bin, a histogram of the low 16 bits inside that bin pins the value. Memory: two histograms per model.
    """
    high: list[Tensor] = []
    wanted: list[float] = []
    for task in stream():
        for i, model in enumerate(task.models):
            if i == len(high):
                high.append(torch.zeros(_HIGH_BINS, dtype=torch.long))
                wanted.append(0.0)
            high[i] += torch.bincount(_bits(model - task.base) >> 16, minlength=_HIGH_BINS).cpu()
            wanted[i] += task.params["density"][i] * model.numel()
    targets = []
    for hist, want in zip(high, wanted):
        k = min(int(hist.sum()), _ceil(want))
        targets.append((*_locate(hist, k), k) if k > 0 else None)
    low = [torch.zeros(_LOW_BINS, dtype=torch.long) for _ in high]
    for task in stream():
        for i, model in enumerate(task.models):
            if targets[i] is not None:
                bits = _bits(model - task.base)
                low[i] += torch.bincount(bits[(bits >> 16) == targets[i][0]] & 0xFFFF, minlength=_LOW_BINS).cpu()
    out = []
    for target, hist in zip(targets, low):
        if target is None:
            out.append(math.inf)
            continue
        high_bin, rank, _ = target
        low_bin, _ = _locate(hist, rank)
        pattern = torch.tensor([(high_bin << 16) | low_bin], dtype=torch.int32)
        out.append(float(pattern.view(torch.float32)))
    return out


def _ties_prepass(stream: Callable[[], Iterator[TensorTask]]) -> dict[str, Any]:
    first = next(iter(stream()), None)
    if first is None or first.params["scope"] != "global":
        return {}
    return {"ties_thresholds": global_thresholds(stream)}


# ---------------------------------------------------------------------------------------------------- registration
LAMBDA = Param("lambda", 1.0, float, "global scale λ of the merged task vector",
               aliases=("scaling_coef", "scaling_factor"))
COMPAT = Param("compat", "paper", str, "whose TIES arithmetic to reproduce (see the module docs)",
               choices=tuple(CONVENTIONS))
NORMALIZE = Param("normalize", None, bool, "true: divide the merged delta (disjoint mean / Σw); false: sum; "
                  "unset: the compat convention's default")
COMBINE = Param("combine", "task_arithmetic", str, "how the sparsified task vectors are combined",
                choices=("task_arithmetic", "ties"))
SEED = Param("seed", 0, int, "random seed (per tensor and model: sha256(seed, name, index))", minimum=0)
RESCALE = Param("rescale", True, bool, "rescale the kept entries by 1/keep probability (mergekit: to the L1 norm)")


def _density(default: float, doc: str = "fraction of each task vector kept") -> Param:
    return Param("density", default, float, doc, per_model=True, minimum=0.0, maximum=1.0)


def _ties_fn(task: TensorTask) -> Tensor:
    p = task.params
    thresholds = None
    if p["scope"] == "global":
        thresholds = task.context.get("ties_thresholds")
        if thresholds is None:
            raise MethodError(f"ties scope 'global' on '{task.name}' needs the whole-model pre-pass",
                              "merge through unmerge.engine.merge_checkpoints, or use scope: per_tensor")
    return ties(task.base, task.models, p["weight"], p["density"], p["lambda"], p["compat"], p["normalize"],
                thresholds)


register(Method(
    name="ties",
    fn=_ties_fn,
    summary="trim, elect sign, disjoint merge (Yadav et al., 2023)",
    formula="τ̂_t = top-k(τ_t);  γ = sgn Σ w_t τ̂_t;  τ_m = Σ_{t: sgn = γ} w_t τ̂_t / count;  θ = θ₀ + λ τ_m",
    params=(WEIGHT, _density(0.2), LAMBDA,
            Param("scope", "per_tensor", str, "top-k per tensor, or over each model's whole task vector",
                  choices=("per_tensor", "global")),
            COMPAT, NORMALIZE),
    prepass=_ties_prepass,
))


def _sparsified(sparsify: Callable[[TensorTask, Tensor, int], Tensor],
                family_normalize: bool) -> Callable[[TensorTask], Tensor]:
    """A method function: sparsify each τ_t, then combine as ``params['combine']`` says."""
    def fn(task: TensorTask) -> Tensor:
        p = task.params
        deltas = [sparsify(task, model - task.base, i) for i, model in enumerate(task.models)]
        return combine(task.base, deltas, p["weight"], p["combine"], p["lambda"], p["compat"], p["normalize"],
                       family_normalize)
    return fn


def _dare_sparsify(task: TensorTask, tau: Tensor, i: int) -> Tensor:
    p = task.params
    drop = p["drop_rate"][i] if p["density"][i] is None else 1.0 - p["density"][i]
    return dare(tau, drop, tensor_seed(p["seed"], task.name, i), p["rescale"], CONVENTIONS[p["compat"]].l1_rescale)


def _breadcrumbs_sparsify(task: TensorTask, tau: Tensor, i: int) -> Tensor:
    return breadcrumbs(tau, task.params["density"][i], task.params["gamma"][i])


def _della_sparsify(task: TensorTask, tau: Tensor, i: int) -> Tensor:
    p = task.params
    return della(tau, p["density"][i], p["epsilon"][i], tensor_seed(p["seed"], task.name, i), p["rescale"],
                 CONVENTIONS[p["compat"]].l1_rescale)


def _family(name: str, variant: str, summary: str, formula: str, params: tuple[Param, ...],
            sparsify: Callable[[TensorTask, Tensor, int], Tensor], mergekit_normalize: bool,
            symmetric: bool, aliases: tuple[str, ...] = ()) -> None:
    """Register ``name`` (combine: task_arithmetic) and ``variant`` (combine: ties) — mergekit's two spellings.

    ``mergekit_normalize``: mergekit's default ``normalize`` for the family's TIES form (compat: mergekit).
    """
    for method_name, how, extra in ((name, "task_arithmetic", aliases), (variant, "ties", ())):
        combine_param = dataclasses.replace(COMBINE, default=how)
        register(Method(
            name=method_name,
            fn=_sparsified(sparsify, mergekit_normalize),
            summary=summary + ("" if how == "task_arithmetic" else ", then TIES sign election"),
            formula=formula,
            params=(WEIGHT, *params, combine_param, LAMBDA, COMPAT, NORMALIZE),
            symmetric=symmetric,
            aliases=extra,
        ))


_family(
    "dare", "dare_ties",
    "drop and rescale: random Bernoulli masks on the task vectors (Yu et al., 2024)",
    "τ̃_t = m_t ⊙ τ_t / (1 − p),  m_t ~ Bernoulli(1 − p);  θ = θ₀ + λ Σ w_t τ̃_t  (or TIES-combined)",
    (Param("drop_rate", 0.9, float, "p: probability of dropping each entry", per_model=True, minimum=0.0,
           maximum=1.0),
     Param("density", None, float, "keep rate 1 − p (mergekit's name); overrides drop_rate", per_model=True,
           minimum=0.0, maximum=1.0),
     SEED, RESCALE),
    _dare_sparsify, False, symmetric=False, aliases=("dare_linear",),
)

_family(
    "breadcrumbs", "breadcrumbs_ties",
    "Model Breadcrumbs: drop the largest outliers and the smallest entries (Davari & Belilovsky, 2024)",
    "τ̂_t = τ_t with the top ⌊γn⌋ and the bottom |τ| dropped so that ⌈density·n⌉ remain;  θ = θ₀ + λ Σ w_t τ̂_t",
    (_density(0.9), Param("gamma", 0.01, float, "fraction of the largest |τ| dropped", per_model=True,
                          minimum=0.0, maximum=1.0)),
    _breadcrumbs_sparsify, False, symmetric=True,
)

_family(
    "della_linear", "della",
    "DELLA MagPrune: magnitude-ranked keep probabilities, rescaled (Deep et al., 2024)",
    "p_i = density − ε + 2ε·rank_i;  τ̃_i = m_i τ_i / p_i;  then TIES election (della) or a sum (della_linear)",
    (_density(0.5), Param("epsilon", 0.15, float, "half-width ε of the keep-probability range", per_model=True,
                          minimum=0.0, maximum=0.5),
     SEED, RESCALE),
    _della_sparsify, True, symmetric=False,
)
