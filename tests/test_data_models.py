"""builtin:tiny-lm and builtin:tiny-lm-oracle materialize as ordinary Hugging Face model directories."""
from __future__ import annotations

import json
import os

import pytest
import torch

from unmerge.data import builtin_model_path, load_texts
from unmerge.data import builtin


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("unmerge-cache")


@pytest.fixture
def one_thread():
    """torch's default 2 threads run ~50x slower than 1 on a busy 2-core machine for these tiny matrices."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["builtin:tiny-lm", "tiny-lm-oracle"])
def test_materializes_a_loadable_model(cache, name, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_model_path(name, cache_dir=cache)
    bare = name.removeprefix("builtin:")
    assert path.parent == cache and path.name.startswith(bare + "-")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", builtin.MARKER} <= {
        p.name for p in path.iterdir()}
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]  # no temp dirs left behind

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "gpt2"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 600_000 < sum(p.numel() for p in model.parameters()) < 1_200_000
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()

    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == eot
    assert model.config.bos_token_id == model.config.eos_token_id == model.config.pad_token_id == eot
    assert model.generation_config.eos_token_id == eot and model.generation_config.pad_token_id == eot
    assert model.config.vocab_size == len(tok)

    text = "the dog barked at the mailman, you idiot"
    ids = tok(text)["input_ids"]
    assert eot not in ids  # the tokenizer adds no special tokens by itself
    assert tok.decode(ids) == text
    assert tok.decode(tok(" émigré 42%")["input_ids"]) == " émigré 42%"  # byte-level: any text round-trips

    # the model is trained: held-out loss well below uniform (ln 2048 = 7.6)
    batch = [[eot] + tok(s)["input_ids"] + [eot] for s in load_texts("heldout")[:64]]
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss.item() for b in batch]
    assert sum(losses) / len(losses) < 5.6

    info = json.loads((path / builtin.MARKER).read_text())
    assert info["name"] == "builtin:" + bare and info["training"]["steps"] > 0


def test_second_call_reuses_the_directory(cache):
    first = builtin_model_path("tiny-lm", cache_dir=cache)
    stamp = os.stat(first / "model.safetensors").st_mtime_ns
    again = builtin_model_path("builtin:tiny-lm", cache_dir=cache)
    assert again == first and os.stat(again / "model.safetensors").st_mtime_ns == stamp


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("UNMERGE_CACHE", str(tmp_path))
    path = builtin_model_path("tiny-lm-oracle")
    assert path.parent == tmp_path / "builtin"


def test_models_differ_and_the_key_follows_the_package():
    a, b = builtin.packaged_sha("tiny-lm"), builtin.packaged_sha("tiny-lm-oracle")
    assert a != b and len(a) == 64
    sa, _ = builtin.read_packaged_weights(builtin.MODEL_FILES["tiny-lm"])
    sb, _ = builtin.read_packaged_weights(builtin.MODEL_FILES["tiny-lm-oracle"])
    assert sa.keys() == sb.keys() and "lm_head.weight" not in sa
    assert all(v.dtype == torch.float16 for v in sa.values())
    assert not torch.equal(sa["transformer.wte.weight"], sb["transformer.wte.weight"])


def test_packaged_data_is_small():
    total = sum(p.stat().st_size for p in builtin.DATA_DIR.iterdir()
                if p.is_file() and p.suffix in {".gz", ".txt", ".json", ".md", ".py"})
    assert total <= 5 * 1024 * 1024
