"""One request's state as the scheduler sees it."""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional

from jaxserve.outputs import RequestMetrics
from jaxserve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclasses.dataclass(eq=False)
class Sequence:
    index: int                      # position in the user's input: outputs come back in this order
    prompt_ids: list[int]
    params: SamplingParams
    seed: int                       # the request's own random stream (given or derived from index)
    stop_ids: frozenset             # token ids that end this request (eos unless ignore_eos, + stop ids)
    max_len: int                    # prompt + generated may not exceed this (max_model_len)
    priority: int = 0               # lower runs first (vLLM's convention)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0           # tokens whose K/V are in the cache
    pages: list[int] = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None
    metrics: RequestMetrics = dataclasses.field(default_factory=RequestMetrics)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache: the whole prompt at first, 1 while decoding."""
        return self.num_tokens - self.num_computed

    @property
    def remaining(self) -> int:
        """Tokens this request may still generate (max_tokens and max_model_len)."""
        return min(self.params.max_tokens - len(self.output_ids), self.max_len - self.num_tokens)

    @property
    def sort_key(self):
        return (self.priority, self.index)

    def append(self, token: int) -> None:
        """Record a sampled token and decide whether the request is done."""
        self.output_ids.append(token)
        n_out = len(self.output_ids)
        if token in self.stop_ids and n_out >= self.params.min_tokens:
            self.finish_reason = "stop"
        elif n_out >= self.params.max_tokens or self.num_tokens >= self.max_len:
            self.finish_reason = "length"
