"""Nano-batched steps: a step's tokens cut in two batches run layer by layer (A then B), so a
CUDA graph that follows data dependencies may run one's attention beside the other's matmuls.
The outputs must not change: attention of the halves equals attention of the whole (rows cut in
two included), and greedy runs with and without the cut give the same tokens."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import reference
from tests.test_engine import make_engine, ragged_requests
from tests.test_kernels import MIXED, assert_close, make_case, reference_out

# Rows cut by every half of this step: MIXED's 8 rows hold 89 query tokens (+ 3 pad tokens);
# the 47-token prefill row spans tokens 10..56 and the 30-token chunk 57..86.
CUTS = [1, 10, 33, 46, 60, 88]


@pytest.mark.parametrize("impl", ["reference", "pallas_gpu_interpret"])
@pytest.mark.parametrize("cut", CUTS)
def test_split_tokens_attention_equals_whole(impl, cut):
    c = make_case(50 + cut, seqs=MIXED, page_size=16, g=4, d=64)
    spec = pallas_kernels.AttentionSpec(impl, c.hq, c.hkv, 64, c.page_size)

    def attend(q, md):
        md = pallas_kernels.device_prepare(md, spec)
        return pallas_kernels.ragged_paged_attention(q, c.k_cache, c.v_cache, md, spec=spec,
                                                     page_offset=c.page_offset,
                                                     sm_scale=c.sm_scale)

    a, b = pallas_kernels.split_tokens(c.md, cut)
    assert a.num_tokens == cut and b.num_tokens == c.md.num_tokens - cut
    out = jnp.concatenate([attend(c.q[:cut], a), attend(c.q[cut:], b)])
    assert_close(out, reference_out(c), c, jnp.float32)


def test_split_tokens_rejects_prepared_metadata():
    c = make_case(3, seqs=MIXED, groups=[(16, [1, 2])], page_size=16, g=4, d=64)
    with pytest.raises(ValueError, match="base metadata"):
        pallas_kernels.split_tokens(c.md, 4)
    with pytest.raises(ValueError, match="outside"):
        pallas_kernels.split_tokens(dataclasses.replace(c.md, groups=None), 0)


@pytest.mark.parametrize("impl,loop", [("reference", "unrolled"), ("reference", "scan"),
                                       ("pallas_gpu_interpret", "unrolled")])
def test_nano_batched_engine_greedy_identical(tiny_models, monkeypatch, impl, loop):
    """Prefill chunks cut in two, decode steps, fused decode blocks: the same greedy tokens with
    steps of >= 16 tokens run as nano-batches, and the cut really happened."""
    path, _ = tiny_models["llama3"]
    kw = dict(attention_impl=impl, layer_loop=loop, max_num_batched_tokens=48, max_num_seqs=16,
              num_pages=300, shared_prefix_attention=False, fused_decode_steps=4)
    reqs = ragged_requests(14, 256, seed=21, max_prompt=70, max_out=12)
    plain = [o.token_ids for o in make_engine(path, **kw).run(reqs)]
    cuts = []
    split = pallas_kernels.split_tokens
    monkeypatch.setattr(pallas_kernels, "split_tokens",
                        lambda md, h: cuts.append((md.num_tokens, h)) or split(md, h))
    nano = make_engine(path, nano_batch_min_tokens=16, compilation_cache_dir="off", **kw)
    assert [o.token_ids for o in nano.run(reqs)] == plain
    assert cuts and all(t >= 16 and h == t // 2 for t, h in cuts)


def test_nano_batch_config_and_compiler_options():
    from jaxserve.config import ConfigError, EngineConfig
    from jaxserve.runner.programs import CONCURRENT_GRAPHS, compiler_options
    with pytest.raises(ConfigError, match="nano_batch_min_tokens"):
        EngineConfig(nano_batch_min_tokens=-1)
    gpu = compiler_options("gpu", False, concurrent_graphs=True)
    assert gpu["xla_gpu_command_buffer_scheduling_mode"] == "CONCURRENT"
    assert "CUSTOM_CALL" in gpu["xla_gpu_enable_command_buffer"]
    assert not set(CONCURRENT_GRAPHS) & set(compiler_options("cpu", False, True))
    # XLA parses the options (the enum by name) on any backend.
    jax.jit(lambda x: x + 1).lower(jnp.ones(2)).compile(CONCURRENT_GRAPHS)
