"""Shared fixtures: offline environment and tiny random HF models saved as safetensors."""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="unmerge-hf-home-"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# the native kernels (unmerge.methods.native) are compiled once per session here, not into the user's cache
os.environ.setdefault("UNMERGE_NATIVE_CACHE", tempfile.mkdtemp(prefix="unmerge-native-"))

import pytest  # noqa: E402
import torch  # noqa: E402


def make_gpt2(seed: int = 0, vocab: int = 64, n_embd: int = 16, n_layer: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=2,
                     bos_token_id=0, eos_token_id=0, pad_token_id=None)
    return GPT2LMHeadModel(cfg).eval()


def perturbed(model, seed: int, scale: float = 0.02):
    """A copy of ``model`` with every parameter moved by seeded Gaussian noise (a stand-in fine-tune)."""
    import copy

    gen = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


@pytest.fixture
def tiny_gpt2_dirs(tmp_path):
    """(base_dir, finetuned_dir_1, finetuned_dir_2) of a tiny GPT-2 saved with save_pretrained."""
    base = make_gpt2()
    dirs = [tmp_path / "base", tmp_path / "ft1", tmp_path / "ft2"]
    base.save_pretrained(dirs[0])
    perturbed(base, 1).save_pretrained(dirs[1])
    perturbed(base, 2).save_pretrained(dirs[2])
    return dirs


def linear_layer_io(model, examples, objective=None):
    """Independent reference for Gram / K-FAC tests, one unpadded example at a time with plain hooks and autograd:
    per linear layer (nn.Linear or GPT-2 Conv1D, skipping a head tied to the input embedding) the stacked inputs
    X [n_tokens, in] and, when ``objective(logits, ids, index)`` gives the example's scalar log-likelihood, the
    stacked gradients Γ [n_tokens, out] of it w.r.t. the layer output. Returns (X, Γ or None, modules)."""
    from transformers.pytorch_utils import Conv1D

    embedding = model.get_input_embeddings().weight
    modules = {n: m for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, Conv1D)) and m.weight is not embedding}
    inputs = {n: [] for n in modules}
    grads = {n: [] for n in modules}
    outputs = {}

    def hook(name):
        def fn(module, args, out):
            inputs[name].append(args[0][0].detach().double())
            out.retain_grad()
            outputs[name] = out
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    for index, ex in enumerate(examples):
        ids = torch.tensor([ex])
        logits = model(input_ids=ids).logits[0]
        if objective is not None:
            objective(logits, ids, index).backward()
            for n in modules:
                grads[n].append(outputs[n].grad[0].double())
    for h in handles:
        h.remove()
    model.zero_grad()
    return ({n: torch.cat(v) for n, v in inputs.items()},
            {n: torch.cat(v) for n, v in grads.items()} if objective is not None else None, modules)


def assert_rel(a, b, rtol=1e-5, what=""):
    """max |a − b| / max |b| < rtol (in float64)."""
    scale = b.abs().max().clamp_min(1e-30)
    assert float((a.double() - b.double()).abs().max() / scale) < rtol, what
