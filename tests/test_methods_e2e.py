"""Every registered method merges tiny random GPT-2 (float32) and Llama (bfloat16) checkpoints through the streaming
engine, and the result loads with ``from_pretrained`` and generates; golden test 7 cross-checks engine merges against
independent hand computations on the state dicts (including the global TIES pre-pass)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_gpt2, perturbed
from unmerge.checkpoint import Checkpoint
from unmerge.engine import merge_checkpoints
from unmerge.methods import all_methods
from unmerge.stats import Statistic, save_statistic

N_STAT = 100.0  # the N recorded in every synthetic Fisher


@dataclass
class Zoo:
    base: Path
    models: list[Path]
    fishers: list[Path]  # one per fine-tuned model
    base_fisher: Path


def make_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _fisher(model_dir: Path, out: Path, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    state = load_file(model_dir / "model.safetensors")
    tensors = {n: 0.01 + torch.rand(t.shape, generator=gen) for n, t in state.items() if t.is_floating_point()}
    return save_statistic(tensors, {"kind": "fisher", "N": N_STAT}, out)


def _zoo(root: Path, base_model, dtype: torch.dtype) -> Zoo:
    dirs = [root / "base", root / "ft1", root / "ft2"]
    for i, (model, path) in enumerate(zip([base_model, perturbed(base_model, 1), perturbed(base_model, 2)], dirs)):
        model.to(dtype).save_pretrained(path)
    fishers = [_fisher(d, root / f"fisher{i}", 10 + i) for i, d in enumerate(dirs)]
    return Zoo(dirs[0], dirs[1:], fishers[1:], fishers[0])


@pytest.fixture(scope="module")
def zoos(tmp_path_factory) -> dict[str, Zoo]:
    root = tmp_path_factory.mktemp("zoo")
    return {"gpt2": _zoo(root / "gpt2", make_gpt2(), torch.float32),
            "llama": _zoo(root / "llama", make_llama(), torch.bfloat16)}


def _merge(zoo: Zoo, method, out: Path, n_models: int, params=None, model_params=None):
    stats = {}
    for kind in method.stats:
        if kind == "fisher":
            stats[kind] = [Statistic(p) for p in zoo.fishers[:n_models]]
        elif kind == "base_fisher":
            stats[kind] = [Statistic(zoo.base_fisher)]
        else:
            pytest.skip(f"no synthetic '{kind}' statistic for '{method.name}' (its own tests cover it)")
    return merge_checkpoints(method, Checkpoint(zoo.base), [Checkpoint(p) for p in zoo.models[:n_models]], out,
                             params=params, model_params=model_params, stats=stats, device="cpu", progress=False)


METHODS = all_methods()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_every_method_merges_reloads_and_generates(zoos, arch, method, tmp_path):
    from transformers import AutoModelForCausalLM

    zoo = zoos[arch]
    n = 1 if method.max_models == 1 else 2
    out = tmp_path / "merged"
    _merge(zoo, method, out, n)
    base, merged = load_file(zoo.base / "model.safetensors"), load_file(out / "model.safetensors")
    assert merged.keys() == base.keys()
    for name, tensor in merged.items():
        assert tensor.dtype == base[name].dtype and tensor.shape == base[name].shape, name
        assert torch.isfinite(tensor.float()).all(), name
    assert any(not torch.equal(merged[k], base[k]) for k in base if base[k].is_floating_point())

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert next(model.parameters()).dtype == base[next(iter(base))].dtype
    model.float()  # bfloat16 matmuls are slow on CPU; the stored dtype was checked above
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        ids = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert ids.shape == (1, 6) and torch.equal(ids[:, :3], prompt)


# ---------------------------------------------------------------------------------------------------- test 7
def _float_state(path: Path) -> dict[str, torch.Tensor]:
    return {n: t.double() for n, t in load_file(path / "model.safetensors").items() if t.is_floating_point()}


def _hand_ties(base, taus, thresholds, weights):
    """TIES by hand: keep |τ_t| ≥ threshold_t, γ = sgn Σ w τ̂ (0 → +), mean over the agreeing entries."""
    trimmed = [w * tau * (tau.abs() >= thr) for tau, thr, w in zip(taus, thresholds, weights)]
    total = sum(trimmed)
    sign = torch.where(total < 0, -1.0, 1.0).double()
    agree = [(torch.sign(t) == sign).double() for t in trimmed]
    return base + sum(t * a for t, a in zip(trimmed, agree)) / sum(agree).clamp(min=1)


def test_ties_global_scope_matches_a_whole_model_hand_computation(zoos, tmp_path):
    zoo = zoos["gpt2"]
    method = next(m for m in METHODS if m.name == "ties")
    result = _merge(zoo, method, tmp_path / "out", 2, {"scope": "global", "density": 0.3},
                    [{"weight": 1.0}, {"weight": 0.5}])
    base = _float_state(zoo.base)
    models = [_float_state(p) for p in zoo.models]
    thresholds = []
    for m in models:  # the k-th largest |τ| over the whole model, k = ⌈0.3·N⌉
        everything = torch.cat([(m[n] - base[n]).float().abs().flatten() for n in base])
        k = math.ceil(0.3 * everything.numel())
        thresholds.append(float(everything.sort(descending=True).values[k - 1]))
    merged = _float_state(tmp_path / "out")
    for name in base:
        taus = [(m[name] - base[name]).float().double() for m in models]
        torch.testing.assert_close(merged[name], _hand_ties(base[name], taus, thresholds, [1.0, 0.5]),
                                   rtol=1e-6, atol=1e-6)
    info = (tmp_path / "out" / "merge_info.json").read_text()
    assert "ties_thresholds" in info
    assert result.method == "ties"
    # per tensor, each tensor keeps its own top 30% instead
    per_tensor = {n: [float((m[n] - base[n]).float().abs().flatten().sort(descending=True).values[
        math.ceil(0.3 * base[n].numel()) - 1]) for m in models] for n in base}
    assert any(per_tensor[n] != thresholds for n in base)


def test_mergekit_ties_and_task_arithmetic_match_hand_computation(zoos, tmp_path):
    zoo = zoos["gpt2"]
    ties = next(m for m in METHODS if m.name == "ties")
    _merge(zoo, ties, tmp_path / "ties", 2, {"density": 0.5, "compat": "mergekit", "lambda": 0.7},
           [{"weight": 2.0}, {"weight": 1.0}])
    ta = next(m for m in METHODS if m.name == "task_arithmetic")
    _merge(zoo, ta, tmp_path / "ta", 2, {"lambda": 0.5}, [{"weight": 1.0}, {"weight": -1.0}])
    base = _float_state(zoo.base)
    models = [_float_state(p) for p in zoo.models]
    merged_ties, merged_ta = _float_state(tmp_path / "ties"), _float_state(tmp_path / "ta")
    weights = torch.tensor([2.0, 1.0], dtype=torch.float64)
    for name in base:
        taus = torch.stack([(m[name] - base[name]).float().double().flatten() for m in models])
        keep = torch.zeros_like(taus)
        for i in range(2):  # exactly ⌊0.5·n⌋ largest by an argsort, as mergekit
            keep[i, taus[i].abs().argsort(descending=True)[: int(0.5 * taus.shape[1])]] = 1
        weighted = taus * keep * weights[:, None]
        sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
        agree = (torch.sign(weighted) == sign).double()
        divisor = (agree * weights[:, None]).sum(0)
        divisor[divisor == 0] = 1
        want = base[name].flatten() + 0.7 * (weighted * agree).sum(0) / divisor
        torch.testing.assert_close(merged_ties[name].flatten(), want, rtol=1e-6, atol=1e-6)
        want_ta = base[name] + 0.5 * ((models[0][name] - base[name]) - (models[1][name] - base[name]))
        torch.testing.assert_close(merged_ta[name], want_ta, rtol=1e-6, atol=1e-6)


def test_fisher_and_uncertainty_match_hand_computation(zoos, tmp_path):
    zoo = zoos["gpt2"]
    by_name = {m.name: m for m in METHODS}
    _merge(zoo, by_name["fisher"], tmp_path / "fisher", 2, {"normalize_fisher": True},
           [{"weight": 1.0}, {"weight": 3.0}])
    _merge(zoo, by_name["uncertainty"], tmp_path / "unc", 2, {"damping": 1e-3},
           [{"alpha": 0.5}, {"alpha": 1.0, "n": 400.0}])
    base = _float_state(zoo.base)
    models = [_float_state(p) for p in zoo.models]
    fishers = [{n: t.double() for n, t in load_file(p / "statistic.safetensors").items()} for p in zoo.fishers]
    f0 = {n: t.double() for n, t in load_file(zoo.base_fisher / "statistic.safetensors").items()}
    norms = [math.sqrt(sum(float((f[n] ** 2).sum()) for n in base)) for f in fishers]
    merged_f, merged_u = _float_state(tmp_path / "fisher"), _float_state(tmp_path / "unc")
    for name in base:
        f = [(fishers[i][name] / norms[i]).clamp(min=1e-6) for i in range(2)]
        want = (f[0] * models[0][name] + 3 * f[1] * models[1][name]) / (f[0] + 3 * f[1])
        torch.testing.assert_close(merged_f[name], want, rtol=1e-5, atol=1e-6)
        h0 = N_STAT * f0[name] + 1e-3
        h = [N_STAT * fishers[0][name], 400.0 * fishers[1][name]]  # model 1's N overridden, model 0's from the stat
        denominator = h0 + 0.5 * h[0] + 1.0 * h[1]
        want_u = base[name] + sum(a * (h0 + h[i]) / denominator * (models[i][name] - base[name])
                                  for i, a in enumerate([0.5, 1.0]))
        torch.testing.assert_close(merged_u[name], want_u, rtol=1e-5, atol=1e-6)


def test_dare_engine_output_is_deterministic(zoos, tmp_path):
    zoo = zoos["gpt2"]
    dare = next(m for m in METHODS if m.name == "dare")
    for out in ("a", "b"):
        _merge(zoo, dare, tmp_path / out, 2, {"drop_rate": 0.5, "seed": 1})
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    _merge(zoo, dare, tmp_path / "c", 2, {"drop_rate": 0.5, "seed": 2})
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()
