"""SamplingParams: how one request is decoded. Validated on construction so that a bad value is an
error for that request alone, found before any compute."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

MAX_LOGPROBS = 20   # top log-probabilities per token (OpenAI's top_logprobs limit, vLLM's default)
# Integers that reach the device (top_k, max_tokens, min_tokens, stop token ids) live in int32
# arrays; a larger value would overflow there, so it is refused here, naming the field.
INT32_MAX = 2**31 - 1
# Seeds are reduced to 64 bits by the engine; vLLM accepts the int64 range, and so do we.
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1
# Float fields become float32 on the device: a larger magnitude would turn into inf there.
FLOAT32_MAX = 3.4028234663852886e38


def _show(v) -> str:
    """repr of a user value for an error message, bounded (a 5,000-digit int has no repr)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 128:
        return f"an integer of {v.bit_length()} bits"
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


class InvalidRequest(ValueError):
    """A request that cannot run; the message names the field. Costs only that request."""


@dataclasses.dataclass
class SamplingParams:
    n: int = 1               # samples per prompt; they share the prompt's KV (the prefix tree)
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1          # -1 or 0: disabled
    min_p: float = 0.0
    seed: Optional[int] = None
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()             # stop strings, cut from the text
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    ignore_eos: bool = False
    # Log-probabilities (vLLM semantics): for each generated token, its own logprob plus the top
    # `logprobs` tokens'; for each prompt token after the first, the same with `prompt_logprobs`.
    # Both are of the model's raw distribution (log_softmax of the logits before penalties,
    # temperature and top-k/top-p/min-p: vLLM's default "raw_logprobs"). None = not returned.
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    # Penalties (vLLM/OpenAI semantics), applied to the logits before temperature and filtering,
    # greedy included: repetition over prompt + generated tokens (logit > 0 -> logit / r, else
    # logit * r; 1 = off), then frequency * count and presence * (count > 0) over this sample's
    # generated tokens (0 = off).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        def bad(field, why):
            raise InvalidRequest(f"field '{field}': {why} (got {_show(getattr(self, field))})")

        for field in ("n", "max_tokens", "min_tokens", "top_k"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(field, "must be an integer")
            if v > INT32_MAX:   # lower bounds: below, per field
                bad(field, f"must be at most {INT32_MAX} (int32)")
        for field in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                      "repetition_penalty"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                bad(field, "must be a number")
            try:
                v = float(v)
            except OverflowError:   # an int too large for a float
                bad(field, "must be finite")
            if not math.isfinite(v):
                bad(field, "must be finite")
            if abs(v) > FLOAT32_MAX:
                bad(field, "is beyond the float32 range")
        for field in ("include_stop_str_in_output", "ignore_eos"):
            if not isinstance(getattr(self, field), bool):
                bad(field, "must be true or false")
        for field in ("logprobs", "prompt_logprobs"):
            v = getattr(self, field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                bad(field, "must be an integer or null")
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                bad(field, f"must be in [0, {MAX_LOGPROBS}]")
        for field in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, field) <= 2:
                bad(field, "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 = off)")
        if not 1 <= self.n <= 1024:
            bad("n", "must be in [1, 1024]")
        if self.max_tokens < 1:
            bad("max_tokens", "must be >= 1")
        if self.min_tokens < 0:
            bad("min_tokens", "must be >= 0")
        if self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens={self.max_tokens}")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if self.top_k < -1:
            bad("top_k", "must be -1 (disabled) or >= 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", "must be an integer or null")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            bad("seed", "must fit in 64 bits (int64)")
        if not isinstance(self.stop_token_ids, (list, tuple, set, frozenset)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of non-negative integers")
        if any(t > INT32_MAX for t in self.stop_token_ids):
            bad("stop_token_ids", f"token ids must be at most {INT32_MAX} (int32)")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(x, str) and x
                                                               for x in self.stop):
            bad("stop", "must be a string or a list of non-empty strings")
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(sorted(self.stop_token_ids) if isinstance(
            self.stop_token_ids, (set, frozenset)) else self.stop_token_ids)
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.min_p = float(self.min_p)
        self.presence_penalty = float(self.presence_penalty)
        self.frequency_penalty = float(self.frequency_penalty)
        self.repetition_penalty = float(self.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_filters(self) -> bool:
        """top-k, top-p or min-p set (each restricts what a draw can pick)."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)
