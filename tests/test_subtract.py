"""`unmerge subtract` output equals the removal formulas computed directly on the tensors (guards included)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from unmerge.checkpoint import Checkpoint
from unmerge.cli import main
from unmerge.errors import MethodError
from unmerge import api
from unmerge.stats import save_statistic

N0, NF = 400.0, 100.0


@pytest.fixture
def removal_inputs(tiny_gpt2_dirs, tmp_path):
    base_dir, forget_dir, _ = tiny_gpt2_dirs
    gen = torch.Generator().manual_seed(7)
    stats = {}
    for label, model_dir, n in (("base_fisher", base_dir, N0), ("forget_fisher", forget_dir, NF)):
        ckpt = Checkpoint(model_dir)
        tensors = {name: torch.rand(ckpt.meta(name)[0], generator=gen) ** 4 for name in ckpt.names()}
        stats[label] = save_statistic(tensors, {"kind": "fisher", "N": n}, tmp_path / label)
    return base_dir, forget_dir, stats


def direct(method, b, f, f0, ff, alpha, m_max=5.0, rho=0.1):  # the registered defaults
    """The formulas of methods.md, written out independently of the library."""
    h0 = N0 * f0.double() + 1e-12
    hf = NF * ff.double()
    tau = f.double() - b.double()
    if method == "negation":
        return b.double() - alpha * tau, 0
    if method == "fisher_negation":
        return b.double() - alpha * hf / (h0 + hf) * tau, 0
    if rho:
        h0 = torch.maximum(h0, rho * h0.mean())
    denom = h0 - alpha * hf
    m = (h0 + hf) / denom
    over = (denom <= 0) | (m > m_max)
    m = torch.where(denom <= 0, torch.full_like(m, m_max), m).clamp(1, m_max)
    return b.double() - alpha * m * tau, int(over.sum())


@pytest.mark.parametrize("method,alpha,extra", [
    ("negation", 0.7, {}),
    ("fisher_negation", 1.5, {}),
    ("uncertainty_removal", 0.5, {}),
    ("uncertainty_removal", 0.5, {"m_max": 5.0, "rho": 0.0}),
    ("uncertainty_removal", 2.0, {"m_max": 3.0, "rho": 0.0}),
    ("uncertainty_removal", 1.0, {"m_max": 5.0, "rho": 0.5}),
])
def test_subtract_matches_formula(removal_inputs, tmp_path, method, alpha, extra):
    base_dir, forget_dir, stats = removal_inputs
    out = tmp_path / "out"
    result = api.subtract(str(base_dir), str(forget_dir), out, method=method, params={"alpha": alpha, **extra},
                          base_fisher=stats["base_fisher"], forget_fisher=stats["forget_fisher"], progress=False)
    b, f, o = Checkpoint(base_dir), Checkpoint(forget_dir), Checkpoint(out)
    s0, sf = Checkpoint(stats["base_fisher"]), Checkpoint(stats["forget_fisher"])
    clamped = 0
    for name in b.names():
        expect, n = direct(method, b.get(name), f.get(name), s0.get(name), sf.get(name), alpha, **extra)
        clamped += n
        torch.testing.assert_close(o.get(name).double(), expect, rtol=1e-5, atol=1e-6)
    if method == "uncertainty_removal":
        assert result.totals["clamped"] == clamped
        numel = sum(b.get(n).numel() for n in b.names())
        assert result.totals["clamped_fraction"] == pytest.approx(clamped / numel)
        assert clamped > 0  # the fixture's Fishers are heavy-tailed, so the guard must act
        info = json.loads((out / "merge_info.json").read_text())
        assert info["totals"]["clamped"] == clamped and info["params"]["global"]["n_base"] == N0


def test_guards_off_with_nonpositive_denominator_is_an_error_naming_the_tensor(removal_inputs, tmp_path):
    base_dir, forget_dir, stats = removal_inputs
    with pytest.raises(MethodError, match=r"H₀ − αH_f ≤ 0 at \d+ entries of '"):
        api.subtract(str(base_dir), str(forget_dir), tmp_path / "out", method="uncertainty_removal",
                     params={"alpha": 100.0, "m_max": 0, "rho": 0}, base_fisher=stats["base_fisher"],
                     forget_fisher=stats["forget_fisher"], progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_subtract_and_errors(removal_inputs, tmp_path):
    base_dir, forget_dir, stats = removal_inputs
    runner = CliRunner()
    out = tmp_path / "cli-out"
    res = runner.invoke(main, ["subtract", str(base_dir), str(forget_dir), str(out), "--method",
                               "uncertainty_removal", "--alpha", "0.5", "--base-fisher", str(stats["base_fisher"]),
                               "--forget-fisher", str(stats["forget_fisher"]), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "clamped fraction" in res.output and (out / "model.safetensors").exists()
    res = runner.invoke(main, ["subtract", str(base_dir), str(forget_dir), str(tmp_path / "x"), "--method",
                               "uncertainty_remova", "--alpha", "0.5", "--quiet"])
    assert res.exit_code == 2 and "did you mean 'uncertainty_removal'" in res.output
    res = runner.invoke(main, ["subtract", str(base_dir), str(forget_dir), str(tmp_path / "y"), "--method",
                               "negation", "--alpha", "-1", "--quiet"])
    assert res.exit_code == 2 and "outside (0, inf)" in res.output
