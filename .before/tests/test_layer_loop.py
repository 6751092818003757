"""The unrolled layer loop (per-layer weight arrays, the accelerator default) computes exactly
what the scan over stacked weights computes, against transformers too."""
from __future__ import annotations

import pytest

from tests.test_engine import hf_greedy, make_engine, ragged_requests


@pytest.mark.parametrize("kind", ["qwen2"])
def test_unrolled_layers_equal_scan_and_transformers(kind, tiny_models):
    path, hf = tiny_models[kind]
    reqs = ragged_requests(12, hf.config.vocab_size, seed=3, max_prompt=70, max_out=40)
    scan = make_engine(path, layer_loop="scan")
    unrolled = make_engine(path, layer_loop="unrolled", fused_decode_steps=4)
    # Every stacked parameter became one array per layer.
    layers = unrolled.runner.params["layers"]
    qkv = layers["qkv_proj"].value
    assert isinstance(qkv, tuple) and len(qkv) == hf.config.num_hidden_layers
    assert not isinstance(scan.runner.params["layers"]["qkv_proj"].value, tuple)
    out_s = scan.run(reqs)
    out_u = unrolled.run(reqs)
    assert unrolled.last_stats.fused_blocks > 0
    for r, a, b in zip(reqs, out_s, out_u):
        assert a.token_ids == b.token_ids, r.request_id
        assert b.token_ids == hf_greedy(hf, r), r.request_id


def test_layer_loop_auto_is_scan(tiny_models):
    path, _ = tiny_models["llama3"]
    assert make_engine(path).layer_loop == "scan"
