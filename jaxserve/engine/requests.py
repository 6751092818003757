"""Requests in, samples out: what users hand the engine, how a prompt becomes token ids, the checks
that make a bad request cost only itself, and the expansion of a request into its `n` samples
(each with its own random stream and stop checker)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import numpy as np

from jaxserve.runner.sampler import NUM_BANNED
from jaxserve.sampling_params import InvalidRequest, SamplingParams
from jaxserve.scheduler.sequence import Sample

PromptType = Union[str, Sequence[int], dict]


@dataclasses.dataclass
class Request:
    """One tokenized request. `error` set means it failed before reaching the engine."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: Optional[str] = None
    priority: int = 0
    error: Optional[str] = None


def to_request(i: int, prompt: PromptType, params: Any, priority: int, tokenizer) -> Request:
    """A user's prompt (text, token ids, or a dict with 'prompt' / 'messages' / 'prompt_token_ids')
    as a tokenized Request; anything unusable becomes an error Request naming the problem."""
    rid = str(i)
    try:
        if isinstance(params, dict):
            params = SamplingParams(**params)
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, dict):
            rid = str(prompt.get("request_id", rid))
            if prompt.get("error"):
                return Request(rid, [], SamplingParams(), priority=priority, error=prompt["error"])
            if "messages" in prompt:
                if tokenizer is None:
                    raise InvalidRequest("messages given but this model has no tokenizer")
                text = tokenizer.apply_chat_template(
                    prompt["messages"], add_generation_prompt=prompt.get("add_generation_prompt", True))
                return Request(rid, tokenizer.encode(text, add_special_tokens=False), params,
                               prompt=text, priority=priority)
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidRequest("prompt dict needs 'prompt', 'messages' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if tokenizer is None:
                raise InvalidRequest("text prompt given but this model has no tokenizer "
                                     "(pass token ids)")
            return Request(rid, tokenizer.encode(prompt), params, prompt=prompt, priority=priority)
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidRequest("prompt token ids must be integers")
        return Request(rid, ids, params, priority=priority)
    except Exception as e:  # noqa: BLE001  (a bad request costs only itself)
        text = prompt if isinstance(prompt, str) else None
        return Request(rid, [], SamplingParams(), prompt=text, priority=priority,
                       error=f"invalid request: {e}")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the engine can hold, for request validation."""

    max_model_len: int
    vocab_size: int
    usable_pages: int
    page_size: int
    eos_token_ids: tuple[int, ...]
    has_tokenizer: bool


def validate(req: Request, lim: Limits) -> Optional[str]:
    """Why `req` cannot run, or None."""
    if req.error:
        return req.error
    n = len(req.prompt_ids)
    if n == 0:
        return "empty prompt"
    if n >= lim.max_model_len:
        return (f"prompt of {n} tokens does not fit max_model_len={lim.max_model_len} "
                "(needs room for at least one generated token)")
    bad = [t for t in req.prompt_ids if not 0 <= t < lim.vocab_size]
    if bad:
        return f"prompt token id {bad[0]} is outside the vocabulary (size {lim.vocab_size})"
    p = req.params
    bad = [t for t in p.stop_token_ids if not 0 <= t < lim.vocab_size]
    if bad:
        return (f"field 'stop_token_ids': token id {bad[0]} is outside the vocabulary "
                f"(size {lim.vocab_size})")
    longest = min(n + p.max_tokens, lim.max_model_len)
    pages = -(-longest // lim.page_size)
    # +1: a sample below a shared prefix holds its own copy of the prefix's partial page.
    if pages + 1 > lim.usable_pages:
        return (f"request needs up to {pages + 1} KV pages but the pool has {lim.usable_pages}; "
                "lower max_tokens or raise num_pages")
    stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(lim.eos_token_ids))
    if p.stop and not lim.has_tokenizer:
        return "field 'stop': stop strings need a tokenizer; this model has none"
    if p.min_tokens and len(stops) > NUM_BANNED:
        return f"field 'min_tokens' with more than {NUM_BANNED} stop token ids is not supported"
    return None


def sample_seed(p: SamplingParams, engine_seed: int, request: int, k: int) -> int:
    """Sample k's random stream: from the request's seed when given, else from the engine seed and
    the request's position; sample 0 is the n = 1 stream."""
    if p.seed is not None and k == 0:
        return p.seed
    base = [p.seed % 2 ** 64] if p.seed is not None else [engine_seed, request]
    return int(np.random.SeedSequence(base + ([k] if k else [])).generate_state(1)[0])


def make_samples(i: int, req: Request, start_index: int, *, engine_seed: int, max_len: int,
                 eos_token_ids: tuple[int, ...], tokenizer,
                 position: Optional[int] = None) -> list[Sample]:
    """The n samples of valid request i (`position`: its place in the whole batch, for seeds)."""
    p = req.params
    stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos
                                              else frozenset(eos_token_ids))
    out = []
    for k in range(p.n):
        s = Sample(prompt_ids=list(req.prompt_ids), index=start_index + k, priority=req.priority,
                   params=p, request=i, sample=k,
                   seed=sample_seed(p, engine_seed, i if position is None else position, k),
                   stop_ids=stop_ids, max_len=max_len)
        if p.stop:
            from jaxserve.text.stop_strings import StopStringChecker

            s.stop_checker = StopStringChecker(tokenizer, p.stop, p.include_stop_str_in_output)
        out.append(s)
    return out
