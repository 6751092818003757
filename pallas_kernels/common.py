"""Small numeric helpers every implementation shares."""
from __future__ import annotations

import jax.numpy as jnp

# Finite mask value: the running max of an online softmax starts here, so a fully masked block
# never computes inf - inf = NaN; empty rows are given lse = -inf explicitly instead.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n - 1).bit_length())
