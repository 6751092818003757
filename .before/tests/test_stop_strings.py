"""Stop strings (issue #7): the text is cut at the first stop string, the tokens end with the one
that completed it, and nothing depends on how tokens split the string."""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine import Engine, Request
from jaxserve.sampling_params import InvalidRequest, SamplingParams
from jaxserve.weights.assemble import build_model
from jaxserve.weights.safetensors_loader import SafetensorsCheckpoint
from tests.helpers_weights import smollm2_gguf


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from jaxserve.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_gguf())
    torch.manual_seed(0)
    # A tiny random model over SmolLM2's vocabulary, so its tokens decode to real text.
    hc = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, tie_word_embeddings=True,
                                  bos_token_id=None, eos_token_id=None)
    path = str(tmp_path_factory.mktemp("vocab_model"))
    transformers.LlamaForCausalLM(hc).save_pretrained(path)
    cfg = ModelConfig.from_json_file(f"{path}/config.json")
    ck = SafetensorsCheckpoint(path)
    model = build_model(cfg, ck.get, jnp.float32, ck.where)
    eng = Engine(cfg, model, EngineConfig(page_size=8, max_num_batched_tokens=32, max_num_seqs=8,
                                          max_model_len=128, num_pages=200,
                                          attention_impl="reference", fused_decode_steps=4),
                 tokenizer=tok)
    return eng, tok


def test_stop_strings_cut_text_and_tokens(engine):
    eng, tok = engine
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1000, 20000, 12).tolist() for _ in range(6)]
    free = eng.run([Request(str(i), p, SamplingParams(max_tokens=40, temperature=0))
                    for i, p in enumerate(prompts)])
    reqs, expect = [], []
    for i, (p, o) in enumerate(zip(prompts, free)):
        text = tok.decode(o.token_ids)
        # A 4-character stop string straddling the boundary between two tokens in the middle of
        # the output (so it completes only with the second token), made of plain characters.
        stop = None
        for k in range(len(o.token_ids) // 3, len(o.token_ids) - 1):
            cut = len(tok.decode(o.token_ids[:k]))
            cand = text[cut - 2:cut + 2]
            if cut >= 2 and len(cand) == 4 and re.fullmatch(r"[\w ,.]{4}", cand) and cand.strip():
                stop = cand
                break
        if stop is None:
            continue
        first = text.index(stop)
        n = next(k for k in range(1, len(o.token_ids) + 1) if stop in tok.decode(o.token_ids[:k]))
        include = bool(i % 2)
        reqs.append(Request(str(i), p, SamplingParams(max_tokens=40, temperature=0, stop=[stop, "\x00never"],
                                                      include_stop_str_in_output=include)))
        expect.append((text[:first + (len(stop) if include else 0)], o.token_ids[:n]))
    assert len(reqs) >= 4
    outs = eng.run(reqs)
    for o, (text, ids) in zip(outs, expect):
        assert o.finish_reason == "stop"
        assert o.text == text
        assert o.token_ids == ids


def test_stop_string_validation():
    with pytest.raises(InvalidRequest, match="'stop'"):
        SamplingParams(stop=["ok", ""])
    assert SamplingParams(stop="x").stop == ("x",)
