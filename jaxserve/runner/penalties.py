"""Presence, frequency and repetition penalties (vLLM / OpenAI semantics), on the device.

A row's history reaches the device as a sparse list (`hist_ids` i32[S, W]: distinct token ids,
-1 padded; `hist_counts` i32[S, W]: times generated, 0 for prompt tokens listed only because the
repetition penalty counts them as "seen") and is scattered into dense [S, V] arrays only in steps
that have a penalised row. W is fixed for a run (one program per bucket), the smallest power of
two >= the most distinct tokens any penalised request can list.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def history_to_dense(hist_ids, hist_counts, vocab_size: int):
    """Per-row sparse token history -> (generated-token counts i32[S, V], seen bool[S, V])."""
    s = hist_ids.shape[0]
    rows = jnp.arange(s)[:, None]
    idx = jnp.where(hist_ids >= 0, hist_ids, vocab_size)   # out of range -> dropped
    counts = jnp.zeros((s, vocab_size), jnp.int32).at[rows, idx].add(hist_counts, mode="drop")
    seen = jnp.zeros((s, vocab_size), bool).at[rows, idx].set(True, mode="drop")
    return counts, seen


def apply_penalties(logits, counts, seen, presence, frequency, repetition):
    """vLLM's order: repetition over seen tokens (prompt + generated), then frequency * count and
    presence * (count > 0) over generated tokens. Rows with presence = frequency = 0 and
    repetition = 1 come out bit-identical (x / 1, x * 1 and x - 0 are exact)."""
    r = repetition[:, None]
    x = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    x = x - frequency[:, None] * counts.astype(x.dtype)
    return x - presence[:, None] * (counts > 0).astype(x.dtype)


def any_active(presence, frequency, repetition):
    return jnp.any((presence != 0) | (frequency != 0) | (repetition != 1))


def _skippable(fn, logits, presence, frequency, repetition, skip_inactive: bool):
    """fn(logits), skipped under `lax.cond` when no row of the step has a penalty and
    `skip_inactive` (see `ProgramContext.device_conditionals`). Unskipped, a row without
    penalties comes out unchanged (x / 1, x * 1, x - 0), so both give the same logits."""
    if not skip_inactive:
        return fn(logits)
    return jax.lax.cond(any_active(presence, frequency, repetition), fn, lambda x: x, logits)


def penalize(logits, hist_ids, hist_counts, presence, frequency, repetition, *,
             skip_inactive: bool = True):
    """Penalties from the sparse history."""
    def on(x):
        counts, seen = history_to_dense(hist_ids, hist_counts, x.shape[-1])
        return apply_penalties(x, counts, seen, presence, frequency, repetition)

    return _skippable(on, logits, presence, frequency, repetition, skip_inactive)


def penalize_dense(logits, counts, seen, presence, frequency, repetition, *,
                   skip_inactive: bool = True):
    """Penalties from a dense history carried through a fused decode block."""
    return _skippable(lambda x: apply_penalties(x, counts, seen, presence, frequency, repetition),
                      logits, presence, frequency, repetition, skip_inactive)
