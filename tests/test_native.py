"""The native kernels (unmerge.methods.native) against the torch code they replace: bitwise-equal outputs for every
TIES convention, weighting, normalisation, rescale and tie quota; the scans and the finite check; the build cache
and the fallback without a compiler; and the engine's recycled output buffers and skipped input checks."""
from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch
from safetensors.torch import save_file

from unmerge import engine
from unmerge.checkpoint import Checkpoint
from unmerge.engine import _OutputBuffers, _same_memory, merge_checkpoints
from unmerge.errors import CheckpointError
from unmerge.methods import get_method, native
from unmerge.methods.arithmetic import task_arithmetic
from unmerge.methods.kernels import band_scan, kth_largest_abs, kth_smallest
from unmerge.methods.sparsify import CONVENTIONS, ties


@pytest.fixture
def lib():
    native.reset()
    loaded = native.library()
    if loaded is None:
        pytest.skip("no working C compiler here: the torch path runs alone (covered by every other test)")
    yield loaded
    native.reset()


def _torch_only(fn, monkeypatch):
    """``fn()`` with the native kernels switched off."""
    with monkeypatch.context() as patch:
        patch.setenv("UNMERGE_NATIVE", "0")
        native.reset()
        assert native.library() is None
        try:
            return fn()
        finally:
            native.reset()


def _inputs(n: int = 300_001, models: int = 3, seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and models; the last two task vectors cancel exactly on the first 1000 entries (Σ = 0 there)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen)
    ms = [base + 0.01 * torch.randn(n, generator=gen) for _ in range(models)]
    if models > 1:
        ms[-1][:1000] = base[:1000] - (ms[-2][:1000] - base[:1000])
    return base, ms


def _quantised(n: int = 300_001, models: int = 3, seed: int = 2) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Task vectors on a grid of 0.25: many magnitudes tie at every threshold (exact trims keep part of them)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.zeros(n), [torch.round(torch.randn(n, generator=gen) * 4) / 4 for _ in range(models)]


@pytest.mark.parametrize("compat", list(CONVENTIONS))
def test_ties_native_is_bitwise_the_torch_result(compat, lib, monkeypatch):
    base, ms = _inputs()
    calls = []
    real = native.ties_combine
    monkeypatch.setattr(native, "ties_combine", lambda *a, **k: calls.append(1) or real(*a, **k))
    cases = itertools.product([[1.0, 1.0, 1.0], [0.5, 0.3, 0.9], [1.0, -0.5, 0.2]], [None, True, False],
                              [[0.5, 0.5, 0.5], [0.1, 1.0, 0.0]], [False, True])
    for weights, normalize, density, rescale in cases:
        run = lambda: ties(base, ms, weights, density, lam=0.7, compat=compat, normalize=normalize,  # noqa: E731
                           rescale=rescale)
        got = run()
        want = _torch_only(run, monkeypatch)
        assert torch.equal(got, want), (weights, normalize, density, rescale)
    assert calls  # the kernels did run


@pytest.mark.parametrize("compat", list(CONVENTIONS))
def test_ties_native_keeps_the_same_tied_entries(compat, lib, monkeypatch):
    """mergekit/peft keep exactly k entries, the tied ones first by position: the kernel counts the quota down."""
    base, ms = _quantised()
    for density in ([0.5, 0.3, 0.77], [0.01, 0.999, 0.5]):
        got = ties(base, ms, [1.0, 1.0, 1.0], density, compat=compat)
        want = _torch_only(lambda: ties(base, ms, [1.0, 1.0, 1.0], density, compat=compat), monkeypatch)
        assert torch.equal(got, want), density
        if CONVENTIONS[compat].trim == "exact":  # k = ⌊d·n⌋ entries survive the trim (a single model shows it)
            kept = ties(base, ms[:1], [1.0], density[:1], compat=compat) != 0
            assert int(kept.sum()) == int(density[0] * base.numel())


def test_global_thresholds_and_the_zero_sum_tie_break(lib, monkeypatch):
    """Global (given) thresholds, a keep-nothing model (inf) and the paper's γ = −1 redo where Σ = 0."""
    base, ms = _inputs(models=2)
    ms[1][1000:] = base[1000:] - 3 * (ms[0][1000:] - base[1000:])  # Σ sgn < 0 overall: the γ = −1 redo runs
    for thresholds in ([0.004, 0.01], [0.0, math.inf]):
        run = lambda: ties(base, ms, [1.0, 1.0], [0.5, 0.5], compat="paper", thresholds=thresholds)  # noqa: E731
        assert torch.equal(run(), _torch_only(run, monkeypatch))


@pytest.mark.parametrize("native_kernels", [True, False])
def test_exact_cancellations_take_the_majority_sign(native_kernels, lib, monkeypatch):
    """The paper's tie-break where Σ_t τ̂_t = 0 exactly: γ is the sign of Σ sgn(Σ_t τ̂_t) over the tensor, here −1
    (most positions sum negative), so each cancelled position keeps its negative entry; the chunks that hold a
    cancellation are redone and no others."""
    n = 3 * 262_144 + 17
    a = torch.rand(n, generator=torch.Generator().manual_seed(5)).add_(0.5)  # entries in [0.5, 1.5): no zeros
    base = torch.zeros(n)
    first, second = a.clone(), -3 * a
    cancelled = torch.arange(n) % 10 == 3
    second[cancelled] = -a[cancelled]
    redone = []
    real = native.ties_combine
    monkeypatch.setattr(native, "ties_combine", lambda *args: redone.append(args[-2]) or real(*args))
    run = lambda: ties(base, [first, second], [1.0, 1.0], [1.0, 1.0], compat="paper")  # noqa: E731
    got = run() if native_kernels else _torch_only(run, monkeypatch)
    assert torch.equal(got[cancelled], -a[cancelled])  # γ = −1 there: the negative entry is the agreeing one
    assert torch.equal(got[~cancelled], -3 * a[~cancelled])
    if native_kernels:  # four chunks with γ = +1, then the four again (each holds a cancellation) with γ = −1
        assert redone == [1.0] * 4 + [-1.0] * 4


@pytest.mark.parametrize("weights,normalize", [([1.0, 1.0, 1.0], False), ([0.5, 0.3, 0.9], True),
                                               ([1.0, -1.0, 0.0], True)])
def test_task_arithmetic_native_is_bitwise_the_torch_result(weights, normalize, lib, monkeypatch):
    base, ms = _inputs()
    run = lambda: task_arithmetic(base, ms, weights, 0.8, normalize)  # noqa: E731
    assert torch.equal(run(), _torch_only(run, monkeypatch))


def test_band_scan_and_finite_proof(lib, monkeypatch):
    base, ms = _inputs(n=70_001, models=3)
    brackets = [(0.004, 0.009), (0.0, 0.001), (0.012, math.inf)]
    got = band_scan(base, ms, brackets)
    want = _torch_only(lambda: band_scan(base, ms, brackets), monkeypatch)
    for m, (low, high), (count, band, finite), (want_count, want_band, want_finite) in zip(ms, brackets, got, want):
        assert count == want_count and torch.equal(band, want_band) and finite and not want_finite
        magnitude = (m - base).abs()
        assert count == int((magnitude > high).sum())
        assert band.numel() == int(((magnitude > low) & (magnitude <= high)).sum()) > 0
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (70_000, 300):  # in the tail after the last full block, and inside a block
            poisoned = ms[1].clone()
            poisoned[where] = bad
            proofs = [finite for _, _, finite in band_scan(base, [ms[0], poisoned, ms[2]], brackets)]
            assert proofs == [True, False, True]


def test_the_portable_build_gives_the_same_results(tmp_path, monkeypatch):
    """Built without -march=native (so without the AVX-512 band scan: the scalar blocks), the kernels give the
    same results as torch too."""
    monkeypatch.setattr(native, "ARCH_FLAGS", ())
    monkeypatch.setenv("UNMERGE_NATIVE_CACHE", str(tmp_path / "portable"))
    native.reset()
    if native.library() is None:
        pytest.skip("no working C compiler here")
    assert native.library().um_band_slack() == 0  # the scalar scan
    base, ms = _inputs(n=70_001, models=2)
    brackets = [(0.004, 0.009), (0.0, 0.001)]
    got = band_scan(base, ms, brackets)
    want = _torch_only(lambda: band_scan(base, ms, brackets), monkeypatch)
    for (count, band, finite), (want_count, want_band, _) in zip(got, want):
        assert count == want_count and torch.equal(band, want_band) and finite
    run = lambda: ties(base, ms, [0.5, 0.3], [0.3, 0.6], compat="mergekit")  # noqa: E731
    assert torch.equal(run(), _torch_only(run, monkeypatch))
    native.reset()


def test_order_statistic_is_the_same_and_proves_finite(lib, monkeypatch):
    base, ms = _quantised(n=400_000)
    ks = [1000, 150_000, 399_999]
    got = kth_largest_abs(base, ms, ks)
    want = _torch_only(lambda: kth_largest_abs(base, ms, ks), monkeypatch)
    for g, w in zip(got, want):
        assert (g.value, g.greater, g.equal) == (w.value, w.greater, w.equal)
        assert g.finite and not w.finite


def test_kth_smallest_matches_torch_kthvalue():
    gen = torch.Generator().manual_seed(3)
    values = torch.round(torch.randn(100_003, generator=gen) * 10) / 10  # many duplicates
    ks = [1, 17, 50_000, 100_003]
    assert kth_smallest(values, ks) == [float(torch.kthvalue(values, k).values) for k in ks]
    assert kth_smallest(values, []) == []
    assert kth_smallest(values.bfloat16(), ks) == [float(torch.kthvalue(values.bfloat16(), k).values) for k in ks]


def test_all_finite(lib):
    x = torch.randn(10_000)
    x[5] = torch.finfo(torch.float32).max
    x[6] = 1e-45  # a subnormal
    assert native.all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[9_999] = bad
        assert not native.all_finite(y)
        assert not engine._all_finite(y.reshape(100, 100))


def test_build_is_cached_and_no_compiler_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("UNMERGE_NATIVE", raising=False)
    monkeypatch.setenv("UNMERGE_NATIVE_CACHE", str(tmp_path / "native"))
    native.reset()
    if native.library() is None:
        pytest.skip("no working C compiler here")
    built = list((tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # (no temporary file left beside it)
    stamp = built[0].stat().st_mtime_ns
    native.reset()
    assert native.library() is not None and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native.reset()
    with caplog.at_level(logging.INFO, logger="unmerge.methods.native"):
        assert native.library() is None
    assert "no C compiler" in caplog.text
    base, ms = _inputs(n=5000)
    assert ties(base, ms, [1.0] * 3, [0.5] * 3).shape == base.shape  # the torch path
    native.reset()


def test_a_failing_compiler_is_reported_and_leaves_nothing(tmp_path, monkeypatch, caplog):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fatal: cannot compile' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.delenv("UNMERGE_NATIVE", raising=False)
    monkeypatch.setenv("UNMERGE_NATIVE_CACHE", str(tmp_path / "native"))
    native.reset()
    with caplog.at_level(logging.INFO, logger="unmerge.methods.native"):
        assert native.library() is None
    assert "cannot compile" in caplog.text
    assert not list((tmp_path / "native").iterdir())
    native.reset()


# ---------------------------------------------------------------------------------------------------- the engine
def test_output_buffers_recycle_by_size_within_the_largest_tensor():
    pool = _OutputBuffers()
    assert pool.KEEP == 4
    pool.take(1000)  # the largest tensor so far: the free buffers may hold 1000 elements
    a, b = pool.take(100), pool.take(100)
    assert a.numel() == 100 and a.dtype == torch.float32 and a.data_ptr() != b.data_ptr()
    pool.give(a.view(10, 10))
    pool.give(b)
    for _ in range(3):
        pool.give(torch.empty(100))  # a fifth of the same size is not kept
    assert [t.numel() for t in pool.free] == [100] * 4
    newest = pool.free[-1].data_ptr()
    assert pool.take(100).data_ptr() == newest  # the most recently returned first
    pool.give(torch.empty(800))  # 1100 free elements > 1000: the least recently returned (a) goes
    assert [t.numel() for t in pool.free] == [100, 100, 800] and pool.free[0].data_ptr() == b.data_ptr()
    assert _same_memory(a.view(10, 10), a) and not _same_memory(a[:50], a) and not _same_memory(a.double(), a)


def _two_tensor_checkpoints(tmp_path, n: int = 300_000, poison: bool = False):
    """Base and two models with a large tensor (scanned: above kernels.SMALL) and a small one, twice each size."""
    gen = torch.Generator().manual_seed(4)
    shapes = {"a.weight": (n // 100, 100), "b.weight": (n // 100, 100), "c.bias": (100,), "d.bias": (100,)}
    dirs = []
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    for i in range(3):
        state = base if i == 0 else {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        if poison and i == 2:
            state["b.weight"][7, 3] = float("nan")
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file(state, d / "model.safetensors")
        dirs.append(d)
    return [Checkpoint(d) for d in dirs]


def test_engine_recycles_outputs_and_skips_proven_input_checks(tmp_path, lib, monkeypatch):
    ckpts = _two_tensor_checkpoints(tmp_path)
    given, checked = [], []
    real_give, real_check = _OutputBuffers.give, engine._check_finite
    monkeypatch.setattr(_OutputBuffers, "give", lambda self, t: given.append(t.numel()) or real_give(self, t))
    monkeypatch.setattr(engine, "_check_finite", lambda name, *a: checked.append(name) or real_check(name, *a))
    params = {"density": 0.4, "compat": "mergekit"}
    merge_checkpoints(get_method("ties"), ckpts[0], ckpts[1:], tmp_path / "out", params=params, device="cpu",
                      progress=False)
    assert sorted(set(given)) == [100, 300_000]  # every output came back to the pool once written
    # the large tensors' scans proved their inputs finite (and TIES's pre-pass reads no tensor to learn the scope),
    # the small ones, selected directly, are checked by the engine
    assert not {"a.weight", "b.weight"} & set(checked) and {"c.bias", "d.bias"} <= set(checked)
    out = Checkpoint(tmp_path / "out")
    for name in ("a.weight", "b.weight", "c.bias", "d.bias"):
        want = ties(ckpts[0].get(name), [c.get(name) for c in ckpts[1:]], [1.0, 1.0], [0.4, 0.4], 1.0, "mergekit")
        assert torch.equal(out.get(name), want), name  # a recycled buffer holds nothing of the previous tensor


def test_a_nan_in_a_scanned_input_is_still_named(tmp_path, lib):
    ckpts = _two_tensor_checkpoints(tmp_path, poison=True)
    with pytest.raises(CheckpointError, match=f"tensor 'b.weight' in '{ckpts[2].directory / 'model.safetensors'}' "
                                              "has NaN or Inf"):
        merge_checkpoints(get_method("ties"), ckpts[0], ckpts[1:], tmp_path / "out", params={"density": 0.4},
                          device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.4}), ("task_arithmetic", {}),
                                           ("dare_ties", {"density": 0.5})])
def test_outputs_the_kernels_saw_finite_are_not_read_again(method, params, tmp_path, lib, monkeypatch):
    """The fused kernels check each output value as they write it: the engine's output check then reads nothing
    (with the torch path, or a random-mask sparsifier, it reads every output). Counted: the finite checks of the
    large tensors (three inputs and the output each, two tensors), inputs included where not proven finite."""
    ckpts = _two_tensor_checkpoints(tmp_path)
    read = []
    real = engine._all_finite
    monkeypatch.setattr(engine, "_all_finite", lambda t: read.append(t.numel()) or real(t))
    merge = lambda out: merge_checkpoints(get_method(method), ckpts[0], ckpts[1:], tmp_path / out,  # noqa: E731
                                          params=params, device="cpu", progress=False)
    merge("native")
    native_reads = read.count(300_000)
    read.clear()
    _torch_only(lambda: merge("torch"), monkeypatch)
    # task arithmetic never checks its inputs (a NaN would reach its output); the others check all three in torch
    assert read.count(300_000) == (2 if method == "task_arithmetic" else 8)
    assert native_reads == {"ties": 0, "task_arithmetic": 0, "dare_ties": 8}[method]
    for name in ("a.weight", "c.bias"):
        assert torch.equal(Checkpoint(tmp_path / "native").get(name), Checkpoint(tmp_path / "torch").get(name))


@pytest.mark.parametrize("how", ["task_arithmetic", "ties"])
def test_an_overflowing_output_is_not_proven_finite(how, lib):
    """Finite inputs whose merge overflows float32: the kernels report it, and the engine refuses the output."""
    from unmerge.methods.registry import Proof

    base = torch.full((70_000,), 3e38)
    ms = [base.clone(), base.clone()]
    ms[0][5] = -3e38  # τ = −6e38 overflows to −inf
    proof = Proof(finite=True)
    if how == "ties":
        got = ties(base, ms, [1.0, 1.0], [1.0, 1.0], compat="mergekit", proof=proof)
    else:
        got = task_arithmetic(base, ms, [1.0, 1.0], 1.0, proof=proof)
    assert not torch.isfinite(got[5]) and not proof.finite
    ms[0][5] = 2e38  # τ = −1e38, finite, and so is θ₀ + τ
    got = task_arithmetic(base, ms, [1.0, 1.0], 1.0, proof=proof)
    assert bool(torch.isfinite(got).all()) and proof.finite
