"""What a request returns."""
from __future__ import annotations

import dataclasses
from typing import Optional


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
    # All n samples (text / token_ids / finish_reason above are the first one's).
    samples: list[SampleOutput] = dataclasses.field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
