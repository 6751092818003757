"""What a request returns.

Log-probabilities (when SamplingParams.logprobs / prompt_logprobs ask for them) come in vLLM's
shape: one dict per token, token id -> logprob (a float, natural log), holding the top-k tokens most
likely first, then the token actually sampled (or, for prompt_logprobs, the prompt token) when it is
not among them; so a dict has k or k + 1 entries, and `d[token_ids[i]]` is always the chosen
token's logprob. They are of the model's raw distribution: before penalties, temperature and
top-k/top-p/min-p filtering (vLLM's default "raw_logprobs").
"""
from __future__ import annotations

import dataclasses
from typing import Optional

# One token's log-probabilities: token id -> logprob (see the module docstring).
TokenLogprobs = dict[int, float]


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float = 0.0
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_computed_prompt_tokens: int = 0   # prompt tokens this request actually prefilled
    num_preemptions: int = 0


@dataclasses.dataclass
class SampleOutput:
    """One of the `n` samples of a request."""

    text: str
    token_ids: list[int]
    finish_reason: Optional[str]
    # One dict per generated token when SamplingParams.logprobs is set, else None.
    logprobs: Optional[list[TokenLogprobs]] = None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]          # "stop" | "length" | "error"
    error: Optional[str] = None
    metrics: RequestMetrics = dataclasses.field(default_factory=RequestMetrics)
    # All n samples (text / token_ids / finish_reason / logprobs above are the first one's).
    samples: list[SampleOutput] = dataclasses.field(default_factory=list)
    # One entry per prompt token when SamplingParams.prompt_logprobs is set (None for the first
    # token, which has no context), else None.
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None
    # The first sample's logprobs (samples[0].logprobs).
    logprobs: Optional[list[TokenLogprobs]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
