"""Log-probabilities on the device: of each sampled token and the top-k (`logprobs`), and of every
prompt token given the ones before it (`prompt_logprobs`).

They are of the model's raw distribution: log_softmax of the logits before penalties, bans,
temperature and top-k/top-p/min-p (vLLM's default "raw_logprobs"); the top `MAX_LOGPROBS` values
and ids are computed once per row and cut to each request's k on the host.

Prompt logprobs need logits at every prompt position, not only at each row's last token: the
programs that compute them keep the final hidden states of all T token rows and run the LM head,
log_softmax and top-k over them in chunks of at most `PROMPT_CHUNK` rows (bounding the [chunk, V]
temporaries); where conditionals stay on the device, under a `lax.cond` taken only when the
step has such rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.sampling_params import MAX_LOGPROBS

PROMPT_CHUNK = 256


def num_top(vocab_size: int) -> int:
    return min(MAX_LOGPROBS, vocab_size)


def top_logprobs(logits, k: int):
    """log_softmax of raw logits f32[R, V] -> (logprobs f32[R, V], top-k values f32[R, k], ids)."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    vals, ids = jax.lax.top_k(lp, k)
    return lp, vals, ids.astype(jnp.int32)


def _chunk(t: int) -> int:
    """Rows per LM-head chunk: the largest power of two dividing T, capped."""
    return min(t & -t, PROMPT_CHUNK)


def prompt_logprobs(compute_logits, hidden, targets, k: int, *, skip_empty: bool = True):
    """Logprob of `targets[t]` (-1: none) and the top-k at every token row t of `hidden` [T, D];
    zeros when no row has a target (skipped under lax.cond if `skip_empty`, else computed and
    selected away: see `ProgramContext.device_conditionals`)."""
    t, d = hidden.shape
    c = _chunk(t)

    def compute(_):
        def one(args):
            h, tg = args
            lp, vals, ids = top_logprobs(compute_logits(h), k)
            return jnp.take_along_axis(lp, jnp.maximum(tg, 0)[:, None], axis=-1)[:, 0], vals, ids

        a, vals, ids = jax.lax.map(one, (hidden.reshape(t // c, c, d), targets.reshape(t // c, c)))
        return a.reshape(t), vals.reshape(t, k), ids.reshape(t, k)

    def skip(_):
        return (jnp.zeros(t, jnp.float32), jnp.zeros((t, k), jnp.float32),
                jnp.zeros((t, k), jnp.int32))

    if skip_empty:
        return jax.lax.cond(jnp.any(targets >= 0), compute, skip, None)
    return jax.tree.map(lambda a, b: jnp.where(jnp.any(targets >= 0), a, b),
                        compute(None), skip(None))
