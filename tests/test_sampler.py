"""The on-device sampler against a numpy reference that sorts (the sampler itself never sorts)."""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp
import pytest

from jaxserve.runner.sampler import NUM_BANNED, SamplingInputs, filter_logits, sample


def inputs(S, temperature, top_k, top_p, min_p, seeds=None):
    f = lambda v, dt: jnp.asarray(np.broadcast_to(np.asarray(v, dt), (S,)))  # noqa: E731
    return SamplingInputs(
        temperature=f(temperature, np.float32), top_k=f(top_k, np.int32), top_p=f(top_p, np.float32),
        min_p=f(min_p, np.float32), seeds=f(seeds if seeds is not None else np.arange(S), np.uint32),
        token_index=f(0, np.int32))


def numpy_keep(logits, temperature, top_k, top_p, min_p):
    """vLLM's order: temperature, top-k, top-p on the renormalised top-k set, then min-p."""
    x = logits / temperature
    order = np.argsort(-x)
    keep = np.zeros_like(x, bool)
    k = top_k if 0 < top_k < len(x) else len(x)
    keep[order[:k]] = True
    xs = np.where(keep, x, -np.inf)
    p = np.exp(xs - xs.max())
    p /= p.sum()
    ps = p[order]
    csum = np.cumsum(ps)
    n = int(np.searchsorted(csum, top_p - 1e-7) + 1) if top_p < 1 else len(x)  # smallest prefix
    nucleus = np.zeros_like(keep)
    nucleus[order[:n]] = True
    keep &= nucleus
    keep &= p >= min_p * p.max()
    return keep


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.8, 0.0),
                                               (40, 0.9, 0.0), (0, 1.0, 0.1), (17, 0.5, 0.02)])
def test_filter_matches_sorting_reference(top_k, top_p, min_p):
    rng = np.random.default_rng(top_k * 100 + int(top_p * 10))
    S, V = 6, 500
    logits = rng.normal(0, 3, (S, V)).astype(np.float32)
    temp = 0.7
    x = np.asarray(filter_logits(jnp.asarray(logits), inputs(S, temp, top_k, top_p, min_p)))
    for s in range(S):
        want = numpy_keep(logits[s].astype(np.float64), temp, top_k, top_p, min_p)
        got = np.isfinite(x[s])
        assert (got == want).all(), (s, got.sum(), want.sum())


def test_greedy_and_bans():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32)
    banned = np.full((4, NUM_BANNED), -1, np.int32)
    top = logits.argmax(-1)
    banned[1, 0] = top[1]
    for stochastic in (True, False):   # greedy rows: the same argmax with the draw compiled in
        out = np.asarray(sample(jnp.asarray(logits), inputs(4, 0.0, 0, 1.0, 0.0),
                                jnp.asarray(banned), stochastic=stochastic))
        assert out[0] == top[0] and out[2] == top[2]
        assert out[1] == np.argsort(-logits[1])[1]


def test_sampling_distribution_matches_softmax():
    """Many rows with distinct seeds sample from softmax(logits / T) restricted to the top-k."""
    V, S = 8, 4000
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
    out = np.asarray(sample(jnp.asarray(np.tile(logits, (S, 1))),
                            inputs(S, 0.8, 4, 1.0, 0.0, seeds=np.arange(S) + 17)))
    p = np.exp(logits[:4] / 0.8)
    p /= p.sum()
    freq = np.bincount(out, minlength=V) / S
    assert freq[4:].sum() == 0
    # 4000 draws: standard error <= 0.008; allow 4 sigma.
    assert np.abs(freq[:4] - p).max() < 0.035, (freq, p)


def test_unfiltered_draw_equals_the_filtered_path_with_filters_off():
    """Programs of a batch with no top-k / top-p / min-p skip the thresholds: same tokens as the
    full path with every filter off, greedy rows and bans included."""
    rng = np.random.default_rng(3)
    S, V = 64, 300
    logits = rng.normal(size=(S, V)).astype(np.float32) * 3
    temp = np.where(np.arange(S) % 4 == 0, 0.0, rng.uniform(0.3, 1.5, S)).astype(np.float32)
    si = SamplingInputs(temperature=jnp.asarray(temp), top_k=jnp.zeros(S, jnp.int32),
                        top_p=jnp.ones(S, jnp.float32), min_p=jnp.zeros(S, jnp.float32),
                        seeds=jnp.arange(S, dtype=jnp.uint32) + 5,
                        token_index=jnp.full(S, 3, jnp.int32))
    banned = np.full((S, NUM_BANNED), -1, np.int32)
    banned[:, 0] = logits.argmax(-1)
    full = np.asarray(sample(jnp.asarray(logits), si, jnp.asarray(banned)))
    fast = np.asarray(sample(jnp.asarray(logits), si, jnp.asarray(banned), filters=False))
    assert (full == fast).all()
    assert (full != banned[:, 0]).all()
