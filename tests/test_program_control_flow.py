"""Step programs hold no control flow that XLA:GPU decides on the host.

XLA:GPU runs a `conditional` by copying its predicate to the host and blocking until the stream
reaches it, and a `while` without a known trip count the same way every iteration, so either in
a step program holds the thread that launches it until every step before it has finished: the
GPU then idles while the host plans the next step. On GPU the runner builds its programs with
`device_conditionals=False` and every loop has a static trip count; these tests compile those
programs here (CPU) and read the optimised HLO, and check that the outputs do not change.
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.engine import Request
from jaxserve.runner import model_runner
from jaxserve.runner.buckets import BucketSet
from jaxserve.runner.programs import Features, ProgramKey
from jaxserve.sampling_params import SamplingParams
from pallas_kernels import AttentionSpec
from tests.test_engine import make_engine
from tests.test_model_hf import PAGE_SIZE, load

EVERYTHING = Features(logprobs=True, prompt_logprobs=True, hist_width=16, stochastic=True,
                      filters=True)
KEYS = [ProgramKey(16, 4, 1, Features()), ProgramKey(16, 4, 1, Features(stochastic=True)),
        ProgramKey(16, 4, 1, EVERYTHING), ProgramKey(8, 4, 4, EVERYTHING.for_decode_block())]


def control_flow(runner, key):
    """(conditionals, while loops, while loops with a known trip count) in the compiled program."""
    hlo = runner._lower(key).compile().as_text()
    whiles = re.findall(r"= [^\n]*\bwhile\([^\n]*", hlo)
    return (len(re.findall(r"\bconditional\(", hlo)), len(whiles),
            sum("known_trip_count" in w for w in whiles))


def runner_for(tiny_models, platform, monkeypatch):
    cfg, model = load(tiny_models["llama3"][0])
    monkeypatch.setattr(model_runner, "conditionals_on_device",
                        lambda _p, real=model_runner.conditionals_on_device: real(platform))
    buckets = BucketSet.make(32, 8, max_pages_per_seq=16, page_growth=4)
    spec = AttentionSpec("reference", cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, PAGE_SIZE)
    return model_runner.ModelRunner(model, cfg, num_pages=64, page_size=PAGE_SIZE,
                                    buckets=buckets, attention=spec, kv_dtype=jnp.float32)


def test_gpu_programs_have_no_host_decided_control_flow(tiny_models, monkeypatch):
    runner = runner_for(tiny_models, "gpu", monkeypatch)
    assert not runner.ctx.device_conditionals
    for key in KEYS:
        conds, whiles, known = control_flow(runner, key)
        assert conds == 0, (str(key), conds)
        assert whiles == known, (str(key), whiles, known)   # layer scan, bisection, fused block


def test_cache_writes_are_unordered_scatters(tiny_models, monkeypatch):
    """Every scatter into the KV cache (the new tokens' K/V, the copy-on-write pages) is
    promised unique indices: without the promise XLA:GPU orders colliding writes, and on the
    H200 the 32 layers' K/V writes took ~15 % of a 1,024-row decode step."""
    runner = runner_for(tiny_models, "gpu", monkeypatch)
    c = runner.cfg
    slots = c.num_layers * 64 * PAGE_SIZE
    shapes = (f"f32[{c.num_kv_heads},{c.num_layers * 64},{PAGE_SIZE},{c.head_dim}]",
              f"f32[{c.num_kv_heads},{slots},{c.head_dim}]")      # the cache, paged and flat
    for key in KEYS:
        hlo = runner._lower(key).as_text(dialect="hlo")
        into_cache = [ln for ln in hlo.splitlines()
                      if re.search(r"\bscatter\(", ln) and any(f"= {x}" in ln for x in shapes)]
        # K and V of the new tokens (the layer loop's body), K and V of the page copies.
        assert len(into_cache) >= 4, (str(key), len(into_cache))
        assert all("unique_indices=true" in ln for ln in into_cache), (str(key), into_cache)


def test_elsewhere_conditionals_skip_unneeded_work(tiny_models, monkeypatch):
    """On CPU and TPU a cond is decided on the device: the extras programs keep theirs (which
    also shows that the check above can see one)."""
    runner = runner_for(tiny_models, "cpu", monkeypatch)
    assert runner.ctx.device_conditionals
    assert control_flow(runner, KEYS[2])[0] > 0
    assert control_flow(runner, KEYS[0])[0] == 0     # no extras: nothing to skip


@pytest.mark.parametrize("fused", [1, 4])
def test_outputs_equal_with_and_without_device_conditionals(tiny_models, monkeypatch, fused):
    """Greedy, seeded sampling, penalties, logprobs and prompt logprobs in one batch: the same
    tokens and logprobs whether skippable work is skipped under a cond or done and selected."""
    path = tiny_models["llama3"][0]
    rng = np.random.default_rng(21)
    reqs = []
    for i in range(8):
        kw = dict(max_tokens=int(rng.integers(4, 14)), temperature=0)
        if i % 3 == 0:
            kw["logprobs"] = 2
        if i in (2, 5):
            kw.update(temperature=0.9, seed=11 + i, top_p=0.9, top_k=20)
        if i == 4:
            kw.update(frequency_penalty=0.8, repetition_penalty=1.3)
        if i in (1, 6):
            kw["prompt_logprobs"] = 2
        reqs.append(Request(f"c{i}", rng.integers(0, 384, int(rng.integers(2, 40))).tolist(),
                            SamplingParams(**kw)))
    outs = {}
    for platform in ("cpu", "gpu"):
        monkeypatch.setattr(model_runner, "conditionals_on_device",
                            lambda _p, pl=platform: pl != "gpu")
        eng = make_engine(path, page_bucket_growth=1, fused_decode_steps=fused)
        assert eng.runner.ctx.device_conditionals == (platform == "cpu")
        outs[platform] = eng.run(reqs)
    for a, b in zip(outs["cpu"], outs["gpu"]):
        assert a.token_ids == b.token_ids, a.request_id
        assert a.finish_reason == b.finish_reason
        for sa, sb in zip(a.samples, b.samples):
            assert (sa.logprobs is None) == (sb.logprobs is None)
            for da, db in zip(sa.logprobs or [], sb.logprobs or []):
                assert list(da) == list(db)
                np.testing.assert_allclose(list(da.values()), list(db.values()), atol=1e-5)
        if a.prompt_logprobs is not None:
            for da, db in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
                assert list(da) == list(db)
                np.testing.assert_allclose(list(da.values()), list(db.values()), atol=1e-5)
