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
- ``mergekit`` — trim: exactly k = max(1, ⌊density·n⌋) entries (mergekit 0.1.5; a sort there). Among magnitudes tied
  at the threshold mergekit keeps whatever ``torch.argsort`` puts first (unspecified, not even stable on the CPU);
  we keep the first by position, so the two can differ at those few entries only. γ = +1 where Σ w τ̂ ≥ 0. Agree:
  sgn(w τ̂) = γ.
  Aggregate: Σ a w τ̂ / Σ a w (0 → 1) when ``normalize`` (its default: on for ties and della, off for dare_ties and
  breadcrumbs_ties), else Σ a w τ̂; then × ``lambda``.
- ``fusionbench`` — trim: keep |τ| ≥ the (n − ⌊density·n⌋)-th smallest |τ|, i.e. one entry more than ⌊density·n⌋.
  Election and agreement as the paper. Aggregate: Σ a w τ̂ (its config's ``merge_func: sum``).
- ``peft`` — trim: exactly k = ⌊density·n⌋ by top-k (ties at the threshold: the first by position, as for mergekit).
  γ = +1 where the *unweighted* Σ τ̂ ≥ 0. Agree: sgn(τ̂) = γ.
  Aggregate: Σ a w τ̂ / max(Σ a, 1).

Further differences: peft returns the merged delta only (we add θ₀ + λ·); FusionBench flattens the whole model into
one vector per task (``scope: global`` here, with ``lambda`` = its ``scaling_factor``, 0.3 in its config) and its
threshold is a percentage; mergekit's DARE/DELLA ``rescale`` matches the L1 norm of the original task vector
(``RescaleNorm.l1``) instead of dividing by the keep probability (TIES takes the same ``rescale``, off by default, as
mergekit), and its Breadcrumbs keeps ⌊density·n⌋ entries after an unstable sort where we keep ⌈density·n⌉ in stable
order (mergekit before 0.1.5 kept nothing when ⌊gamma·n⌋ = 0). ``normalize`` (true: disjoint mean, false: disjoint
sum) overrides each convention's default. Magnitude ties at the threshold are kept in paper/fusionbench mode.

``scope: global`` takes the top-k of each model's whole task vector (k = Σ density·numel), as the TIES paper's code
does: an exact streaming pre-pass (a sample brackets each model's threshold, one pass counts above and keeps inside
the bracket; a two-pass radix select over float32 bit patterns if the bracket misses) finds each model's threshold
without holding more than one tensor; every compat then keeps |τ| ≥ its model's threshold, and the zero-sum
tie-break (paper/fusionbench) stays per tensor. The paper has no per-model weights: in paper mode w_t scales τ_t.

Random masks (DARE, DELLA) come from CPU ``torch.Generator``s seeded by sha256(seed, tensor name, model index) — one
per block of ``RNG_BLOCK`` elements after the first — so the same seed gives the same bytes on any device, in any
tensor order and however the tensor is chunked.

Everything streams (``unmerge.methods.kernels``): the per-tensor top-k thresholds come from an exact sampled
selection instead of a sort, and the sparsify-and-combine runs chunk by chunk in float arithmetic, so a merge holds
the output tensor and a few small chunks, never a stack of float copies of its inputs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from unmerge.errors import MethodError
from unmerge.methods import native
from unmerge.methods.kernels import (Kth, band_scan, below, chunk_size, flat, kth_largest_abs, kth_smallest,
                                     map_chunks, output_buffer, radix_histograms, run_tasks, sample_bracket, spans)
from unmerge.methods.registry import WEIGHT, Method, Param, Proof, TensorTask, register

Tensor = torch.Tensor
# τ chunk (a fresh tensor the sparsifier may modify in place), start, end -> sparsified chunk
Sparsifier = Callable[[Tensor, int, int], Tensor]


# ---------------------------------------------------------------------------------------------------- conventions
def _ceil(x: float) -> int:
    """⌈x⌉ after rounding away float noise (0.3·10 = 3.0000000000000004 gives 3, not 4)."""
    return math.ceil(round(x, 3))


def keep_count(density: float, n: int) -> int:
    """k = ⌈density·n⌉, clamped to [0, n]."""
    return min(n, max(0, _ceil(density * n)))


@dataclass(frozen=True)
class Convention:
    """How one library computes TIES: trimming, sign election, agreement, aggregation and DARE rescaling."""

    trim: str  # "ceil": |τ| ≥ the ⌈d·n⌉-th largest; "kthvalue": |τ| ≥ the (⌊d·n⌋+1)-th largest; "exact": ⌊d·n⌋ entries
    at_least_one: bool  # exact trim keeps at least one entry when density > 0 (mergekit ≥ 0.1.5)
    weighted_sign: bool  # elect and match signs on w·τ̂ (peft: on τ̂)
    zero_to_majority: bool  # Σ = 0 takes sgn Σγ (paper) instead of +1
    weighted_divisor: bool  # divide by Σ a w (mergekit) instead of the count Σ a
    normalize: bool | None  # default aggregate: mean (True) or sum (False); None: the method family decides
    l1_rescale: bool  # random masks rescale to the original L1 norm (mergekit) instead of 1/keep probability


CONVENTIONS: dict[str, Convention] = {
    "paper": Convention("ceil", False, True, True, False, True, False),
    "mergekit": Convention("exact", True, True, False, True, None, True),
    "fusionbench": Convention("kthvalue", False, True, True, False, False, False),
    "peft": Convention("exact", False, False, False, False, True, False),
}


# ---------------------------------------------------------------------------------------------------- streamed combine
def _combine_chunk(base: Tensor, ys: list[Tensor], weights: list[float], how: str, lam: float, conv: Convention,
                   normalize: bool, divisor: float, out: Tensor, zero_sign: float) -> tuple[int, int]:
    """One chunk of θ = θ₀ + λ·(combined τ̂) into ``out``; ``ys`` are the sparsified τ̂ chunks (modified in place).

    TIES in float ops only (comparisons to bool and ``where`` cost several times more on the CPU): with s_t the sign
    variable (w_t τ̂_t, or τ̂_t for peft) and γ = ±1, z_t = relu(γ s_t) is |s_t| where s_t agrees with γ and 0
    elsewhere, sign(z_t) is the agreement a_t, and the agreeing sum is γ Σ_t z_t. Where Σ_t s_t = 0, γ is
    ``zero_sign``. For the paper's tie-break (``conv.zero_to_majority``) returns (Σ sgn(Σ_t s_t), how many positions
    have Σ_t s_t = 0 and a nonzero agreeing sum), else (0, 0).
    """
    if how != "ties":
        acc = None
        for y, w in zip(ys, weights):
            if w != 1:
                y.mul_(w)
            acc = y if acc is None else acc.add_(y)
        if normalize:
            acc.div_(divisor)
        if lam != 1:
            acc.mul_(lam)
        torch.add(base, acc, out=out)
        return 0, 0
    signed = [y.mul_(w) if conv.weighted_sign and w != 1 else y for y, w in zip(ys, weights)]
    total = signed[0] if len(signed) == 1 else torch.add(signed[0], signed[1])
    for s in signed[2:]:
        total.add_(s)
    total_sign = torch.sign(total)
    gamma = (total_sign + 0.5 * zero_sign if conv.zero_to_majority else total_sign.add_(0.5 * zero_sign)).sign_()
    agreeing = count = None
    for s, w in zip(signed, weights):
        z = torch.mul(s, gamma).relu_()
        a = torch.sign(z)
        if conv.weighted_divisor and w != 1:
            a.mul_(w)
        count = a if count is None else count.add_(a)
        if not conv.weighted_sign and w != 1:
            z.mul_(w)
        agreeing = z if agreeing is None else agreeing.add_(z)
    sign_sum = tied = 0
    if conv.zero_to_majority:
        sign_sum = int(total_sign.sum())
        tied = int(torch.count_nonzero((total_sign == 0) & (agreeing != 0)))
    agreeing.mul_(gamma)
    if normalize:
        if not conv.weighted_divisor or min(weights) > 1e-30:
            count.clamp_min_(torch.finfo(count.dtype).tiny)  # zero only where nothing agrees, i.e. 0 / 0 → 0
        else:  # weights of mixed sign can cancel: mergekit divides by 1 there
            count = torch.where(count == 0, torch.ones_like(count), count)
        agreeing.div_(count)
    if lam != 1:
        agreeing.mul_(lam)
    torch.add(base, agreeing, out=out)
    return sign_sum, tied


def stream_combine(base: Tensor, taus: Callable[[int, int, int], Tensor], sparsifiers: list[Sparsifier],
                   weights: list[float], how: str, lam: float, compat: str, normalize: bool,
                   chunk: int | None = None, models: list[Tensor] | None = None, out: Tensor | None = None,
                   proof: Proof | None = None) -> Tensor:
    """θ₀ + λ·combine(sparsified τ_t), chunk by chunk (``taus(t, start, end)`` gives a fresh chunk of τ_t), into
    ``out`` (a flat buffer of θ₀'s size and dtype) if given.

    ``models``: the θ_t with τ_t = θ_t − θ₀; given, and with :class:`Shrink` sparsifiers, float32 CPU chunks run in
    the fused native loops (:mod:`unmerge.methods.native`, bitwise the same result), which also check each output
    value as they write it: ``proof.finite`` is then set when all were finite."""
    conv = CONVENTIONS[compat]
    b = flat(base)
    n = b.numel()
    chunk = chunk or chunk_size(b)
    out = output_buffer(b, out)
    total = sum(weights)
    divisor = total if abs(total) >= 1e-8 else 1.0
    if how == "ties" and len(set(weights)) == 1 and weights[0] > 0:
        # equal weights w > 0 change no sign, agreement or election: TIES with unit weights, scaled by w (the
        # weighted divisor Σ a w = w Σ a cancels it instead). Saves the per-model scalings of every chunk.
        lam *= 1.0 if normalize and conv.weighted_divisor else weights[0]
        weights = [1.0] * len(weights)

    ms = [flat(m) for m in models] if models else []
    if ms and all(isinstance(r, Shrink) for r in sparsifiers) and native.usable(b, out, *ms):
        one_if_zero = conv.weighted_divisor and not min(weights) > 1e-30

        def run(s: int, e: int, zero_sign: float = 1.0) -> tuple[int, int, bool]:
            chunks, trim = [m[s:e] for m in ms], _native_trim(sparsifiers, s)
            if how != "ties":
                return 0, 0, native.sum_combine(b[s:e], chunks, trim, weights, normalize, divisor, lam, out[s:e])
            return native.ties_combine(b[s:e], chunks, trim, weights, conv.weighted_sign, conv.weighted_divisor,
                                       normalize, one_if_zero, conv.zero_to_majority, lam, zero_sign, out[s:e])
    else:
        def run(s: int, e: int, zero_sign: float = 1.0) -> tuple[int, int, bool]:
            ys = [sparsify(taus(i, s, e), s, e) for i, sparsify in enumerate(sparsifiers)]
            return (*_combine_chunk(b[s:e], ys, weights, how, lam, conv, normalize, divisor, out[s:e], zero_sign),
                    False)

    results = map_chunks(run, n, b, chunk)
    if how == "ties" and conv.zero_to_majority and sum(r[0] for r in results) < 0:
        for i, (s, e) in enumerate(spans(n, chunk)):  # γ = −1 where Σ = 0: redo those chunks
            if results[i][1] > 0:
                results[i] = run(s, e, -1.0)
    if proof is not None:
        proof.finite = all(r[2] for r in results)
    return out.view_as(base)


def model_taus(base: Tensor, models: list[Tensor]) -> Callable[[int, int, int], Tensor]:
    b, ms = flat(base), [flat(m) for m in models]
    return lambda i, s, e: torch.sub(ms[i][s:e], b[s:e])


def _family_normalize(conv: Convention, normalize: bool | None, family_normalize: bool) -> bool:
    if normalize is not None:
        return normalize
    return family_normalize if conv.normalize is None else conv.normalize


def combine(base: Tensor, deltas: list[Tensor], weights: list[float], how: str, lam: float, compat: str,
            normalize: bool | None, family_normalize: bool = True) -> Tensor:
    """θ = θ₀ + λ · (Σ w τ̂ [/ Σ w]  or  the TIES disjoint merge of the τ̂) for already sparsified τ̂."""
    conv = CONVENTIONS[compat]
    if how == "ties":
        normalize = _family_normalize(conv, normalize, family_normalize)
    ds = [flat(d) for d in deltas]
    return stream_combine(base, lambda i, s, e: ds[i][s:e].clone(), [_identity] * len(ds), weights, how, lam,
                          compat, bool(normalize))


def _identity(tau: Tensor, s: int, e: int) -> Tensor:
    return tau


# ---------------------------------------------------------------------------------------------------- trimming
@dataclass(frozen=True)
class Shrink:
    """A chunk sparsifier: keep |τ| > ``threshold`` (None: all; inf: none), times ``factor``; of the entries with
    |τ| = ``tie``, only the first ``allowed[chunk start]`` of each chunk (None: all). ``finite``: the scan that
    found the threshold saw every |τ| of the tensor finite (so θ₀ and θ_t are)."""

    threshold: float | None
    tie: float = 0.0
    allowed: dict[int, int] | None = None
    factor: float = 1.0
    finite: bool = False

    def __call__(self, tau: Tensor, s: int, e: int) -> Tensor:
        kept = self._trim(tau, s)
        return kept.mul_(self.factor) if self.factor != 1.0 else kept

    def _trim(self, tau: Tensor, s: int) -> Tensor:
        if self.threshold is None:
            return tau
        if self.threshold == math.inf:
            return tau.zero_()
        kept = torch.nn.functional.hardshrink(tau, self.threshold)
        if self.allowed is not None:
            quota = self.allowed[s]
            ties = (tau.abs() == self.tie).nonzero().flatten()
            if quota < ties.numel():
                kept[ties[quota:]] = 0
        return kept

    @property
    def hardshrink(self) -> float:
        """The t of hardshrink(τ, t) (zero where −t ≤ τ ≤ t) that this trim is: −inf keeps all, inf nothing."""
        return -math.inf if self.threshold is None else self.threshold


def _native_trim(sparsifiers: list[Sparsifier], start: int) -> native.Trim:
    """The kernels' form of the chunk at ``start`` of :class:`Shrink` sparsifiers."""
    quotas = [-1 if r.allowed is None else r.allowed[start] for r in sparsifiers]
    return native.Trim([r.hardshrink for r in sparsifiers], [r.factor for r in sparsifiers],
                       [r.tie for r in sparsifiers], quotas)


def _tied_per_chunk(kth: Kth, b: Tensor, m: Tensor, chunk: int) -> list[int]:
    """How many |m − b| equal ``kth.value`` in each chunk: from the selection's kept parts when they are per chunk
    of this size, else by a pass over the tensor."""
    if kth.parts is not None and kth.chunk == chunk:
        return [int(torch.count_nonzero(part == kth.value)) for part in kth.parts]
    return map_chunks(lambda s, e: int(torch.count_nonzero((m[s:e] - b[s:e]).abs_() == kth.value)), b.numel(), b,
                      chunk)


def _quotas(counts: list[int], keep: int, from_end: bool, chunk: int) -> dict[int, int]:
    """How many of each chunk's tied entries to keep so that ``keep`` are kept in position order (the first ones,
    or the last ones with ``from_end``). Keys are chunk starts."""
    order = range(len(counts) - 1, -1, -1) if from_end else range(len(counts))
    quota: dict[int, int] = {}
    left = keep
    for j in order:
        quota[j * chunk] = min(left, counts[j])
        left -= quota[j * chunk]
    return quota


def _trim_count(conv: Convention, density: float, n: int) -> int | None:
    """How many entries the convention's trim keeps (None: all)."""
    if conv.trim == "ceil":
        k = keep_count(density, n)
        return None if k >= n else k
    if conv.trim == "kthvalue":
        kept = int(n * density)
        return None if kept >= n else kept + 1  # |τ| ≥ the (n − kept)-th smallest, i.e. the (kept + 1)-th largest
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return 0
    k = int(density * n)
    return max(1, k) if conv.at_least_one else k


def trim_rules(base: Tensor, models: list[Tensor], density: list[float], conv: Convention,
               thresholds: list[float] | None = None, chunk: int | None = None) -> list[Sparsifier]:
    """Each model's TIES trim as a chunk sparsifier: |τ| ≥ its k-th largest (exact top-k, ties in position order,
    for mergekit/peft), or |τ| ≥ a given global threshold."""
    b, ms = flat(base), [flat(m) for m in models]
    chunk = chunk or chunk_size(b)
    if thresholds is not None:
        return [Shrink(math.inf if t == math.inf else below(t, b.dtype)) for t in thresholds]
    n = b.numel()
    counts = [_trim_count(conv, d, n) for d in density]
    rules: list[Sparsifier | None] = [None] * len(ms)
    wanted = []
    for i, k in enumerate(counts):
        if k is None:
            rules[i] = Shrink(None)
        elif k == 0:
            rules[i] = Shrink(math.inf)
        else:
            wanted.append(i)
    found = kth_largest_abs(b, [ms[i] for i in wanted], [counts[i] for i in wanted])
    for i, kth in zip(wanted, found):
        rules[i] = _exact_rule(b, ms[i], kth, counts[i], conv.trim == "exact", chunk)
    return rules


def _exact_rule(b: Tensor, m: Tensor, kth: Kth, k: int, exact: bool, chunk: int) -> Sparsifier:
    if not exact or kth.greater + kth.equal == k:
        return Shrink(below(kth.value, b.dtype), finite=kth.finite)
    if kth.value == 0:  # the kept zeros change nothing
        return Shrink(0.0, finite=kth.finite)
    return Shrink(below(kth.value, b.dtype), kth.value,
                  _quotas(_tied_per_chunk(kth, b, m, chunk), k - kth.greater, False, chunk),
                  finite=kth.finite)


def _l1_scaled(taus: Callable[[int, int, int], Tensor], sparsifiers: list[Sparsifier], like: Tensor,
               chunk: int) -> list[Sparsifier]:
    """mergekit's ``rescale`` (RescaleNorm.l1): each sparsified τ̂_t × ‖τ_t‖₁ / ‖τ̂_t‖₁ (unchanged when either norm is
    below 1e-7), with both norms from a streaming pre-pass."""
    def norms(s: int, e: int) -> list[tuple[float, float]]:
        out = []
        for i, sparsify in enumerate(sparsifiers):
            tau = taus(i, s, e)
            before = float(tau.abs().sum())
            out.append((before, float(sparsify(tau, s, e).abs().sum())))
        return out

    parts = map_chunks(norms, flat(like).numel(), like, chunk)
    scaled = []
    for i, sparsify in enumerate(sparsifiers):
        before = sum(p[i][0] for p in parts)
        after = sum(p[i][1] for p in parts)
        factor = before / after if before >= 1e-7 and after >= 1e-7 else 1.0
        scaled.append(_times(sparsify, factor))
    return scaled


def _times(sparsify: Sparsifier, factor: float) -> Sparsifier:
    if factor == 1.0:
        return sparsify
    if isinstance(sparsify, Shrink):
        return dataclasses.replace(sparsify, factor=sparsify.factor * factor)
    return lambda tau, s, e: sparsify(tau, s, e).mul_(factor)


def ties_rules(base: Tensor, models: list[Tensor], density: list[float], compat: str = "paper",
               thresholds: list[float] | None = None, rescale: bool = False) -> list[Sparsifier]:
    """Each model's TIES trim (top ``density`` by magnitude, or |τ_t| ≥ a global per-model threshold) as a chunk
    sparsifier; ``rescale``: scaled back to ‖τ_t‖₁ (mergekit). The whole-tensor passes of TIES happen here."""
    chunk = chunk_size(base)
    rules = trim_rules(base, models, density, CONVENTIONS[compat], thresholds, chunk)
    return _l1_scaled(model_taus(base, models), rules, base, chunk) if rescale else rules


def ties(base: Tensor, models: list[Tensor], weights: list[float], density: list[float], lam: float = 1.0,
         compat: str = "paper", normalize: bool | None = None, thresholds: list[float] | None = None,
         rescale: bool = False, rules: list[Sparsifier] | None = None, out: Tensor | None = None,
         proof: Proof | None = None) -> Tensor:
    """TIES: trim each τ_t (``rules``, else :func:`ties_rules`), elect signs, disjoint mean; θ = θ₀ + λ τ_m."""
    if rules is None:
        rules = ties_rules(base, models, density, compat, thresholds, rescale)
    return stream_combine(base, model_taus(base, models), rules, weights, "ties", lam, compat,
                          _family_normalize(CONVENTIONS[compat], normalize, True), chunk_size(base), models, out,
                          proof)


# ---------------------------------------------------------------------------------------------------- random masks
RNG_BLOCK = 1 << 18  # random masks are drawn per block of this many elements (flat order), whatever the chunking


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed from (seed, tensor name, model index): independent of the order tensors are merged in."""
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _block_seed(seed: int, block: int) -> int:
    if block == 0:
        return seed
    digest = hashlib.sha256(f"{seed}\x00block\x00{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def uniform_span(seed: int, start: int, end: int, device: torch.device) -> Tensor:
    """U[0, 1) for the flat positions [start, end) of a tensor: block j (RNG_BLOCK elements) comes from a CPU
    generator seeded by (seed, j), so the bytes do not depend on the device or on how the tensor is chunked."""
    parts = []
    pos = start
    while pos < end:
        block = pos // RNG_BLOCK
        first = block * RNG_BLOCK
        stop = min(end, first + RNG_BLOCK)
        values = torch.rand(stop - first, generator=torch.Generator().manual_seed(_block_seed(seed, block)))
        parts.append(values[pos - first:])
        pos = stop
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.to(device)


def _dare_chunk(seed: int, keep_prob: float, rescale: bool) -> Sparsifier:
    def apply(tau: Tensor, s: int, e: int) -> Tensor:
        kept = tau.mul_(uniform_span(seed, s, e, tau.device) < keep_prob)
        return kept.div_(keep_prob) if rescale and keep_prob > 0 else kept
    return apply


def dare(tau: Tensor, drop_rate: float, seed: int, rescale: bool = True, l1: bool = False) -> Tensor:
    """τ̃ = m ⊙ τ / (1 − p), m_i ~ Bernoulli(1 − p) (no rescale: m ⊙ τ; ``l1``: rescaled to ‖τ‖₁ instead)."""
    t = flat(tau)
    rule = _dare_chunk(seed, 1.0 - drop_rate, rescale and not l1)
    taus = lambda i, s, e: t[s:e].clone()  # noqa: E731
    rules = _l1_scaled(taus, [rule], t, chunk_size(t)) if rescale and l1 and drop_rate < 1 else [rule]
    return torch.cat([rules[0](taus(0, s, e), s, e) for s, e in spans(t.numel(), chunk_size(t))] or [t.clone()]
                     ).view_as(tau)


def _della_chunk(density: float, epsilon: float, seed: int, width: int, rescale: bool) -> Sparsifier:
    """MagPrune on whole rows (chunks are row-aligned)."""
    def apply(tau: Tensor, s: int, e: int) -> Tensor:
        rows = tau.view(-1, width)
        if width > 1:  # rank = the inverse of the (stable) sorting permutation, by one scatter
            order = rows.abs().argsort(dim=1, stable=True)
            ranks = torch.empty_like(order).scatter_(1, order, torch.arange(width, device=tau.device).expand_as(order))
            ranks = ranks.to(tau.dtype) / (width - 1)
        else:
            ranks = torch.full_like(rows, 0.5)
        probs = ranks.mul_(2 * epsilon).add_(density - epsilon)
        kept = rows.mul_(uniform_span(seed, s, e, tau.device).view_as(rows) < probs)
        return (kept.div_(probs) if rescale else kept).view(-1)
    return apply


def _della_check(density: float, epsilon: float) -> None:
    if density - epsilon <= 0 or density + epsilon > 1:
        raise MethodError(f"della: density ± epsilon = {density} ± {epsilon} leaves (0, 1]",
                          "choose epsilon < density ≤ 1 − epsilon")


def _row_width(tau: Tensor) -> int:
    return tau[0].numel() if tau.dim() > 1 and tau.shape[0] else max(tau.numel(), 1)


def _row_chunk(width: int, like: Tensor) -> int:
    return max(1, chunk_size(like) // width) * width


def della(tau: Tensor, density: float, epsilon: float, seed: int, rescale: bool = True, l1: bool = False) -> Tensor:
    """MagPrune: p_i = density − ε + 2ε·r_i with r_i = rank(|τ_i|)/(m − 1) within its row (dim 0 slices, a 1-D
    tensor is one row; r = ½ for a single entry); τ̃_i = m_i τ_i / p_i, m_i ~ Bernoulli(p_i)."""
    _della_check(density, epsilon)
    t = flat(tau)
    width = _row_width(tau)
    chunk = _row_chunk(width, t)
    rule = _della_chunk(density, epsilon, seed, width, rescale and not l1)
    taus = lambda i, s, e: t[s:e].clone()  # noqa: E731
    rules = _l1_scaled(taus, [rule], t, chunk) if rescale and l1 else [rule]
    return torch.cat([rules[0](taus(0, s, e), s, e) for s, e in spans(t.numel(), chunk)] or [t.clone()]
                     ).view_as(tau)


# ---------------------------------------------------------------------------------------------------- breadcrumbs
def _breadcrumbs_counts(density: float, gamma: float, n: int) -> tuple[int, int]:
    n_keep = keep_count(density, n)
    n_top = math.floor(round(gamma * n, 3))
    n_bottom = n - n_keep - n_top
    if n_bottom < 0:
        n_top, n_bottom = n_top + n_bottom, 0
    return n_bottom, n_top


def breadcrumbs_rule(base: Tensor, model: Tensor, density: float, gamma: float, chunk: int) -> Sparsifier:
    """Drop the ``n_top`` largest and the ``n_bottom`` smallest |τ| (stable ascending order: among equal
    magnitudes the earlier positions count as smaller) from two exact order statistics."""
    b, m = flat(base), flat(model)
    n = b.numel()
    n_bottom, n_top = _breadcrumbs_counts(density, gamma, n)
    wanted = ([n_top] if n_top > 0 else []) + ([n - n_bottom + 1] if n_bottom > 0 else [])
    found = kth_largest_abs(b, [m] * len(wanted), wanted) if wanted else []
    top = found.pop(0) if n_top > 0 else None
    bottom = found.pop(0) if n_bottom > 0 else None
    top_quota = bottom_quota = None
    if top is not None and top.greater + top.equal > n_top:  # drop the last (n_top − greater) of the tied
        top_quota = _quotas(_tied_per_chunk(top, b, m, chunk), n_top - top.greater, True, chunk)
    if bottom is not None:
        less = n - bottom.greater - bottom.equal
        if less + bottom.equal > n_bottom:  # drop the first (n_bottom − less) of the tied
            bottom_quota = _quotas(_tied_per_chunk(bottom, b, m, chunk), n_bottom - less, False, chunk)

    def apply(tau: Tensor, s: int, e: int) -> Tensor:
        mag = tau.abs()
        drop = torch.zeros_like(tau, dtype=torch.bool)
        if top is not None:
            drop |= mag > top.value
            if top_quota is None:
                drop |= mag == top.value
            elif top_quota[s]:
                tied = (mag == top.value).nonzero().flatten()
                drop[tied[tied.numel() - top_quota[s]:]] = True
        if bottom is not None:
            drop |= mag < bottom.value
            if bottom_quota is None:
                drop |= mag == bottom.value
            elif bottom_quota[s]:
                tied = (mag == bottom.value).nonzero().flatten()
                drop[tied[:bottom_quota[s]]] = True
        return tau.masked_fill_(drop, 0)
    return apply


def breadcrumbs(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Drop the ⌊gamma·n⌋ largest |τ| and the smallest so that ⌈density·n⌉ entries remain (fewer top drops when
    density + gamma > 1)."""
    t = flat(tau)
    zero = torch.zeros_like(t)
    chunk = chunk_size(t)
    rule = breadcrumbs_rule(zero, t, density, gamma, chunk)
    return torch.cat([rule(t[s:e].clone(), s, e) for s, e in spans(t.numel(), chunk)] or [t.clone()]).view_as(tau)


# ---------------------------------------------------------------------------------------------------- global top-k
GLOBAL_SAMPLE_SHIFT = 10  # the global pre-pass samples one entry in 2**10 of every tensor


def global_thresholds(stream: Callable[[], Iterator[TensorTask]]) -> list[float]:
    """Exact k_t-th largest |τ_t| over every tensor of each model t, k_t = ⌈Σ_tensors density_t·numel⌉, in float32.

    Pass 1 samples |τ| (one entry in 1024 of each tensor, fixed seed) to bracket each model's threshold; pass 2
    streams every tensor once, counting the entries above the bracket and keeping those inside it; an exact
    selection among those finishes. Memory: the sample and the bracket's entries. If the bracket misses (or holds
    too much), a two-pass radix select over the float32 bit patterns gives the exact value instead.
    """
    samples: list[list[Tensor]] = []
    wanted: list[float] = []
    totals: list[int] = []
    gen = torch.Generator().manual_seed(0x61_0BA1)
    for task in stream():
        b = flat(task.base)
        n = b.numel()
        take = -(-n >> GLOBAL_SAMPLE_SHIFT)
        idx = torch.randint(0, n, (take,), generator=gen).sort().values if take else None  # (in address order)
        models = [flat(m) for m in task.models]

        def draw(m: Tensor, b: Tensor = b, idx: Tensor | None = idx) -> Tensor:
            where = idx.to(b.device)
            return (m[where] - b[where]).abs().float().cpu()

        drawn = run_tasks([lambda m=m: draw(m) for m in models], b) if idx is not None else []
        for i, model in enumerate(models):
            if i == len(samples):
                samples.append([])
                wanted.append(0.0)
                totals.append(0)
            if drawn:
                samples[i].append(drawn[i])
            wanted[i] += task.params["density"][i] * n
            totals[i] += n
    ks = [min(totals[i], _ceil(wanted[i])) for i in range(len(wanted))]
    brackets = []
    for i, k in enumerate(ks):
        sample = torch.cat(samples[i]) if samples[i] else torch.zeros(0)
        samples[i] = []
        size = sample.numel()
        if k <= 0 or not size:
            brackets.append(None)
            continue
        brackets.append(sample_bracket(sample, (totals[i] - k) / totals[i] * size, -1.0))
    above = [0] * len(ks)
    inside: list[list[Tensor]] = [[] for _ in ks]
    held = [0] * len(ks)
    caps = [max(t >> 3, 1 << 20) for t in totals]
    failed = set()
    lock = threading.Lock()
    for task in stream():
        b = flat(task.base)
        going = [i for i in range(len(task.models)) if brackets[i] is not None and i not in failed]
        ms = [flat(task.models[i]) for i in going]

        def scan(s: int, e: int, b: Tensor = b, going: list[int] = going, ms: list[Tensor] = ms):
            # every model of the tensor in one scan: the base's chunk is read (and cast) once
            found = band_scan(b[s:e].float(), [m[s:e].float() for m in ms], [brackets[i] for i in going])
            with lock:
                for i, (_, band, _) in zip(going, found):
                    held[i] += band.numel()
            return [(count, band.cpu()) for count, band, _ in found]

        for chunk_found in (map_chunks(scan, b.numel(), b) if going else []):
            for i, (count, band) in zip(going, chunk_found):
                above[i] += count
                inside[i].append(band)
        for i in going:
            if held[i] > caps[i]:
                failed.add(i)
                inside[i] = []
    out: list[float] = []
    retry = []
    for i, k in enumerate(ks):
        if k <= 0:
            out.append(math.inf)
            continue
        need = k - above[i]
        values = torch.cat(inside[i]) if inside[i] else torch.zeros(0)
        if i in failed or brackets[i] is None or not 1 <= need <= values.numel():
            out.append(math.nan)
            retry.append(i)
            continue
        out.append(kth_smallest(values, [values.numel() - need + 1])[0])
    if retry:
        exact = _radix_global(stream, [ks[i] if i in retry else 0 for i in range(len(ks))])
        for i in retry:
            out[i] = exact[i]
    return out


def _radix_global(stream: Callable[[], Iterator[TensorTask]], ks: list[int]) -> list[float]:
    def chunks() -> Iterator[list[Tensor | None]]:
        for task in stream():
            b = flat(task.base)
            ms = [flat(m) for m in task.models]
            for s, e in spans(b.numel(), chunk_size(b)):
                yield [(m[s:e] - b[s:e]).abs_() if ks[i] > 0 else None for i, m in enumerate(ms)]
    return radix_histograms(chunks, ks)


def _ties_prepass(params: dict[str, Any], stream: Callable[[], Iterator[TensorTask]]) -> dict[str, Any]:
    if params["scope"] != "global":
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
TIES_RESCALE = Param("rescale", False, bool, "scale each trimmed task vector back to its L1 norm (mergekit's "
                     "rescale, RescaleNorm.l1)")


def _density(default: float, doc: str = "fraction of each task vector kept") -> Param:
    return Param("density", default, float, doc, per_model=True, minimum=0.0, maximum=1.0)


def _ties_prepare(task: TensorTask) -> list[Sparsifier]:
    p = task.params
    thresholds = None
    if p["scope"] == "global":
        thresholds = task.context.get("ties_thresholds")
        if thresholds is None:
            raise MethodError(f"ties scope 'global' on '{task.name}' needs the whole-model pre-pass",
                              "merge through unmerge.engine.merge_checkpoints, or use scope: per_tensor")
    rules = ties_rules(task.base, task.models, p["density"], p["compat"], thresholds, p["rescale"])
    task.inputs_finite = all(isinstance(r, Shrink) and r.finite for r in rules)
    return rules


def _ties_fn(task: TensorTask) -> Tensor:
    p = task.params
    rules = task.prepared if task.prepared is not None else _ties_prepare(task)
    return ties(task.base, task.models, p["weight"], p["density"], p["lambda"], p["compat"], p["normalize"],
                rules=rules, out=task.out, proof=task.proof)


register(Method(
    name="ties",
    fn=_ties_fn,
    summary="trim, elect sign, disjoint merge (Yadav et al., 2023)",
    formula="τ̂_t = top-k(τ_t);  γ = sgn Σ w_t τ̂_t;  τ_m = Σ_{t: sgn = γ} w_t τ̂_t / count;  θ = θ₀ + λ τ_m",
    params=(WEIGHT, _density(0.2), LAMBDA,
            Param("scope", "per_tensor", str, "top-k per tensor, or over each model's whole task vector",
                  choices=("per_tensor", "global")),
            COMPAT, NORMALIZE, TIES_RESCALE),
    prepass=_ties_prepass,
    prepare=_ties_prepare,
))

# (task, model index, chunk) -> that model's chunk sparsifier, and whether it rescales to the L1 norm afterwards
MakeSparsifier = Callable[[TensorTask, int, int], tuple[Sparsifier, bool]]


def _sparsified(make: MakeSparsifier, family_normalize: bool, row_chunks: bool
                ) -> tuple[Callable[[TensorTask], Tensor], Callable[[TensorTask], list[Sparsifier]]]:
    """A method function (sparsify each τ_t, then combine as ``params['combine']`` says, chunk by chunk) and its
    ``prepare`` step (the sparsifiers: order statistics and L1 norms take whole passes)."""
    def chunk_of(task: TensorTask) -> int:
        return _row_chunk(_row_width(task.base), task.base) if row_chunks else chunk_size(task.base)

    def prepare(task: TensorTask) -> list[Sparsifier]:
        chunk = chunk_of(task)
        made = [make(task, i, chunk) for i in range(len(task.models))]
        rules = [rule for rule, _ in made]
        if any(l1 for _, l1 in made):
            rules = _l1_scaled(model_taus(task.base, task.models), rules, task.base, chunk)
        return rules

    def fn(task: TensorTask) -> Tensor:
        p = task.params
        conv = CONVENTIONS[p["compat"]]
        rules = task.prepared if task.prepared is not None else prepare(task)
        normalize = p["normalize"] if p["combine"] != "ties" else _family_normalize(conv, p["normalize"],
                                                                                      family_normalize)
        return stream_combine(task.base, model_taus(task.base, task.models), rules, p["weight"], p["combine"],
                              p["lambda"], p["compat"], bool(normalize), chunk_of(task), task.models, task.out,
                              task.proof)
    return fn, prepare


def _dare_sparsify(task: TensorTask, i: int, chunk: int) -> tuple[Sparsifier, bool]:
    p = task.params
    drop = p["drop_rate"][i] if p["density"][i] is None else 1.0 - p["density"][i]
    l1 = p["rescale"] and CONVENTIONS[p["compat"]].l1_rescale and drop < 1
    return _dare_chunk(tensor_seed(p["seed"], task.name, i), 1.0 - drop, p["rescale"] and not l1), l1


def _breadcrumbs_sparsify(task: TensorTask, i: int, chunk: int) -> tuple[Sparsifier, bool]:
    p = task.params
    return breadcrumbs_rule(task.base, task.models[i], p["density"][i], p["gamma"][i], chunk), False


def _della_sparsify(task: TensorTask, i: int, chunk: int) -> tuple[Sparsifier, bool]:
    p = task.params
    _della_check(p["density"][i], p["epsilon"][i])
    l1 = p["rescale"] and CONVENTIONS[p["compat"]].l1_rescale
    rule = _della_chunk(p["density"][i], p["epsilon"][i], tensor_seed(p["seed"], task.name, i),
                        _row_width(task.base), p["rescale"] and not l1)
    return rule, l1


def _family(name: str, variant: str, summary: str, formula: str, params: tuple[Param, ...],
            sparsify: MakeSparsifier, mergekit_normalize: bool, symmetric: bool, aliases: tuple[str, ...] = (),
            row_chunks: bool = False) -> None:
    """Register ``name`` (combine: task_arithmetic) and ``variant`` (combine: ties) — mergekit's two spellings.

    ``mergekit_normalize``: mergekit's default ``normalize`` for the family's TIES form (compat: mergekit).
    """
    for method_name, how, extra in ((name, "task_arithmetic", aliases), (variant, "ties", ())):
        combine_param = dataclasses.replace(COMBINE, default=how)
        fn, prepare = _sparsified(sparsify, mergekit_normalize, row_chunks)
        register(Method(
            name=method_name,
            fn=fn,
            prepare=prepare,
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
    _della_sparsify, True, symmetric=False, row_chunks=True,
)
