"""The streaming kernels behind the sparsified methods (unmerge.methods.kernels, unmerge.methods.sparsify): exact
order statistics on tensors large enough to take the sampled path, and streamed TIES / DARE / Breadcrumbs against
whole-tensor references written here from the formulas."""
from __future__ import annotations

import math

import pytest
import torch

from unmerge.methods import kernels
from unmerge.methods.kernels import kth_largest_abs, map_chunks, spans
from unmerge.methods.sparsify import CONVENTIONS, breadcrumbs, dare, ties, uniform_span

N = 300_000  # > SMALL and > CPU_CHUNK: the sampled bracket and several chunks


def _taus(n: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cont = torch.randn(n, generator=gen, dtype=dtype)
    quant = (torch.randn(n, generator=gen, dtype=dtype) * 4).round() / 4  # masses of equal magnitudes
    sparse = torch.where(torch.rand(n, generator=gen) < 0.1, torch.randn(n, generator=gen), 0.0).to(dtype)
    return {"cont": cont, "quant": quant, "sparse": sparse, "zeros": torch.zeros(n, dtype=dtype)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [10, 1000, N])
def test_kth_largest_is_exact(n, dtype):
    base = torch.randn(n, generator=torch.Generator().manual_seed(9), dtype=dtype)
    for kind, tau in _taus(n, dtype).items():
        model = base + tau
        magnitude = (model - base).abs()
        ordered = magnitude.sort(descending=True).values
        for k in sorted({1, 2, n // 100 + 1, n // 2, n - 1, n}):
            got = kth_largest_abs(base, [model], [k])[0]
            value = ordered[k - 1]
            assert (got.value, got.greater, got.equal) == (float(value), int((magnitude > value).sum()),
                                                           int((magnitude == value).sum())), (kind, k)
            if got.parts is not None:  # the kept parts hold every tied entry of their chunk
                assert [int((part == value).sum()) for part in got.parts] == \
                    [int((magnitude[s:e] == value).sum()) for s, e in spans(n, got.chunk)]


def _ties_reference(base, models, weights, density, compat, normalize, lam=1.0):
    """The whole-tensor formulas (methods.md; exact-k ties kept first by position)."""
    conv = CONVENTIONS[compat]
    n = base.numel()
    trimmed = []
    for model, d in zip(models, density):
        tau = model - base
        mag = tau.abs()
        if conv.trim == "ceil":
            k = min(n, math.ceil(round(d * n, 3)))
            keep = mag >= mag.sort(descending=True).values[k - 1] if 0 < k < n else torch.full_like(mag, k > 0, dtype=torch.bool)
        elif conv.trim == "kthvalue":
            kept = int(n * d)
            keep = mag >= torch.kthvalue(mag, n - kept).values if kept < n else torch.ones_like(mag, dtype=torch.bool)
        else:
            k = int(d * n)
            if conv.at_least_one and d > 0:
                k = max(1, k)
            keep = torch.zeros_like(mag, dtype=torch.bool)
            if d >= 1:
                keep[:] = True
            else:
                keep[torch.sort(-mag, stable=True).indices[:k]] = True
        trimmed.append(tau * keep)
    stacked = torch.stack(trimmed)
    w = torch.tensor(weights, dtype=base.dtype).view(-1, 1)
    signed = stacked * w if conv.weighted_sign else stacked
    total = signed.sum(0)
    if conv.zero_to_majority:
        sign = torch.sign(total)
        majority = 1.0 if float(sign.sum()) >= 0 else -1.0
        gamma = torch.where(sign == 0, torch.full_like(sign, majority), sign)
    else:
        gamma = torch.where(total >= 0, 1.0, -1.0).to(base.dtype)
    agree = (torch.sign(signed) == gamma).to(base.dtype)
    merged = (stacked * w * agree).sum(0)
    if normalize:
        divisor = (agree * w).sum(0) if conv.weighted_divisor else agree.sum(0)
        merged = merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return base + lam * merged


@pytest.mark.parametrize("compat", sorted(CONVENTIONS))
@pytest.mark.parametrize("kind", ["cont", "quant", "sparse"])
def test_streamed_ties_equals_whole_tensor_formulas(compat, kind):
    base = torch.randn(N, generator=torch.Generator().manual_seed(1))
    taus = [_taus(N, seed=s)[kind] for s in (2, 3, 4)]
    if kind == "quant":  # make exact cancellations (Σ = 0) common too, for the paper's tie-break
        taus[1] = -taus[0].clone()
    models = [base + t for t in taus]
    for weights, density, normalize in [([1.0, 1.0, 1.0], [0.5, 0.5, 0.5], True),
                                        ([0.5, 2.0, 0.3], [0.2, 0.7, 1.0], False),
                                        ([1.0, -0.5, 0.7], [0.3, 0.3, 0.9], True)]:
        got = ties(base, models, weights, density, 0.8, compat, normalize)
        want = _ties_reference(base, models, weights, density, compat, normalize, 0.8)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_random_masks_do_not_depend_on_chunking():
    n = 3 * kernels.CPU_CHUNK + 12345
    seed = 123
    whole = uniform_span(seed, 0, n, torch.device("cpu"))
    for s, e in [(0, 10), (kernels.CPU_CHUNK - 5, kernels.CPU_CHUNK + 7), (n - 100, n), (1000, 2 * kernels.CPU_CHUNK)]:
        assert torch.equal(uniform_span(seed, s, e, torch.device("cpu")), whole[s:e])
    tau = torch.randn(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dare(tau, 0.7, seed), tau * (whole < 0.3) / 0.3)


def test_streamed_breadcrumbs_equals_stable_sort_reference():
    for kind, tau in _taus(N).items():
        for density, gamma in [(0.6, 0.1), (0.9, 0.01), (0.3, 0.0), (0.95, 0.1)]:
            n = tau.numel()
            n_keep = min(n, math.ceil(round(density * n, 3)))
            n_top = math.floor(round(gamma * n, 3))
            n_bottom = n - n_keep - n_top
            if n_bottom < 0:
                n_top, n_bottom = n_top + n_bottom, 0
            order = torch.sort(tau.abs(), stable=True).indices
            mask = torch.zeros(n, dtype=torch.bool)
            mask[order[n_bottom:n - n_top]] = True
            assert torch.equal(breadcrumbs(tau, density, gamma), tau * mask), (kind, density, gamma)


def test_map_chunks_keeps_order_and_nests_inline():
    n = 5 * kernels.CPU_CHUNK + 3
    like = torch.empty(0)
    assert map_chunks(lambda s, e: (s, e), n, like) == list(spans(n, kernels.CPU_CHUNK))
    inner = map_chunks(lambda s, e: map_chunks(lambda a, b: b - a, 40000, like), n, like)
    assert all(sum(x) == 40000 for x in inner)
