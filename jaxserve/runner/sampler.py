"""On-device sampling for a step's rows: greedy, temperature, top-k, top-p, min-p, banned tokens.

No vocabulary sort: top-k and top-p thresholds are found by bisection over values (a fixed number
of [S, V] reductions), which is exact up to ties and cheap next to the LM head. Each row draws its
Gumbel noise from a key derived from the request's own seed and the index of the token being
sampled, so a request's samples do not depend on what else is in the batch (or on preemption).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_BISECT_ITERS = 40
NUM_BANNED = 16   # stop ids masked out while a request is below min_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingInputs:
    temperature: jax.Array   # f32[S]; 0 = greedy
    top_k: jax.Array         # i32[S]; 0 = off
    top_p: jax.Array         # f32[S]; 1 = off
    min_p: jax.Array         # f32[S]; 0 = off
    seeds: jax.Array         # u32[S]  the request's seed
    token_index: jax.Array   # i32[S]  index of the token being sampled in the request's output


def _kth_largest(x, k):
    """Per row, the largest v with count(x >= v) >= k (the k-th largest value), by bisection."""
    lo = jnp.min(x, axis=-1)
    hi = jnp.max(x, axis=-1)

    def body(_, lh):
        lo, hi = lh
        mid = (lo + hi) * 0.5
        ok = jnp.sum(x >= mid[:, None], axis=-1) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _BISECT_ITERS, body, (lo, hi))
    # lo always satisfies the count; snap it to the actual element value (the smallest kept one).
    return jnp.min(jnp.where(x >= lo[:, None], x, jnp.inf), axis=-1)


def _top_p_threshold(probs, p):
    """Per row, the largest t with sum(probs[probs >= t]) >= p: keeps the smallest nucleus."""
    lo = jnp.zeros(probs.shape[0], probs.dtype)
    hi = jnp.max(probs, axis=-1)

    def body(_, lh):
        lo, hi = lh
        mid = (lo + hi) * 0.5
        ok = jnp.sum(jnp.where(probs >= mid[:, None], probs, 0.0), axis=-1) >= p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _BISECT_ITERS, body, (lo, hi))
    return jnp.min(jnp.where(probs >= lo[:, None], probs, jnp.inf), axis=-1)


def apply_bans(logits, banned):
    rows = jnp.arange(logits.shape[0])[:, None]
    idx = jnp.where(banned >= 0, banned, logits.shape[1])   # out of range -> dropped
    return logits.at[rows, idx].set(-jnp.inf, mode="drop")


def filter_logits(logits, si: SamplingInputs):
    """Temperature-scaled logits with everything outside top-k / top-p / min-p set to -inf."""
    temp = jnp.where(si.temperature > 0, si.temperature, 1.0)
    x = logits / temp[:, None]
    v = x.shape[-1]
    k = jnp.where((si.top_k > 0) & (si.top_k < v), si.top_k, v)
    x = jnp.where(x >= _kth_largest(x, k)[:, None], x, -jnp.inf)
    probs = jax.nn.softmax(x, axis=-1)
    # top_p == 1 keeps everything (a float32 mass never quite reaches 1.0 over a long tail).
    keep = (probs >= _top_p_threshold(probs, si.top_p)[:, None]) | (si.top_p >= 1.0)[:, None]
    keep &= probs >= (si.min_p * jnp.max(probs, axis=-1))[:, None]
    return jnp.where(keep, x, -jnp.inf)


def row_keys(si: SamplingInputs):
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(si.seeds, si.token_index)


def sample(logits: jax.Array, si: SamplingInputs, banned=None, *, stochastic: bool = True,
           filters: bool = True) -> jax.Array:
    """logits f32[S, V] -> token ids i32[S]; `banned` i32[S, NUM_BANNED] (-1 = none) are never drawn.

    Both switches are static, the batch's (a program's key), not decided per step:
    `stochastic` compiles the draw in (rows with temperature 0 still take the argmax; False:
    argmax only); `filters` the top-k / top-p / min-p thresholds (False: no row of the batch
    sets one, and the bisections, ~80 passes over [S, V] a step, are left out: with every
    filter off `filter_logits` keeps every logit, so the draw is the same). Static rather than a
    `lax.cond` on the rows' settings because XLA:GPU decides a conditional on the host (it
    copies the predicate back and waits for the stream), which would hold the thread launching
    a step until the steps before it have run."""
    if banned is not None:
        logits = apply_bans(logits, banned)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not stochastic:
        return greedy
    if filters:
        x = filter_logits(logits, si)
    else:
        x = logits / jnp.where(si.temperature > 0, si.temperature, 1.0)[:, None]
    g = jax.vmap(lambda k: jax.random.gumbel(k, (logits.shape[1],), jnp.float32))(row_keys(si))
    drawn = jnp.argmax(x + g, axis=-1).astype(jnp.int32)
    return jnp.where(si.temperature > 0, drawn, greedy)
