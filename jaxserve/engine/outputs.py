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


class OutputCollector:
    """Assembles each request's output from its samples as they finish, and hands every final
    output to `on_output(index, output)` as soon as it exists (errors first, then in finishing
    order), e.g. to persist it."""

    def __init__(self, requests, on_output=None):
        self.requests = requests
        self.on_output = on_output
        self.outputs: list[Optional[RequestOutput]] = [None] * len(requests)
        self._pending: dict[int, list] = {}    # request -> its samples' outputs so far

    def error(self, i: int, message: str) -> None:
        req = self.requests[i]
        self._emit(i, RequestOutput(req.request_id, req.prompt, list(req.prompt_ids), "", [],
                                    "error", error=message))

    def expect(self, i: int, n: int) -> None:
        self._pending[i] = [None] * n

    def add(self, sample, text: str, metrics: RequestMetrics) -> None:
        parts = self._pending[sample.request]
        parts[sample.sample] = (sample, SampleOutput(text, list(sample.output_ids),
                                                     sample.finish_reason,
                                                     logprobs=sample.logprobs), metrics)
        if any(x is None for x in parts):
            return
        i = sample.request
        del self._pending[i]
        first, first_out, first_metrics = parts[0]
        samples = [x[1] for x in parts]
        req = self.requests[i]
        self._emit(i, RequestOutput(req.request_id, req.prompt, first.prompt_ids, first_out.text,
                                    first_out.token_ids, first_out.finish_reason,
                                    metrics=first_metrics, samples=samples,
                                    prompt_logprobs=first.prompt_logprobs,
                                    logprobs=first_out.logprobs))

    def _emit(self, i: int, out: RequestOutput) -> None:
        self.outputs[i] = out
        if self.on_output is not None:
            self.on_output(i, out)

    def results(self) -> list[RequestOutput]:
        assert all(o is not None for o in self.outputs)
        return self.outputs  # type: ignore[return-value]
