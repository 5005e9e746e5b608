"""Shared fixtures: offline environment and tiny random HF models saved as safetensors."""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="unmerge-hf-home-"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

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
